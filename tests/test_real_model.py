"""The real-model recipe (examples/real-model.yaml) end to end, shrunk by its smoke section, on a tiny Qwen2 saved
here and the few records of each public format under examples/data/: general SFT → experts (SFT, GRPO on the
checkers, the GRM loop for the rubric set) → OPD → compare on the test records. Also: the format converters, and that each domain's reward is
routed to its checker (a right answer scores 1, a wrong one 0)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pluribus.data import read_jsonl
from pluribus.errors import ConfigError
from pluribus.formats import read_dataset
from pluribus.real import plan, run_real

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "real-model.yaml"
DOMAINS = ["gsm8k", "mbpp", "humaneval", "ifeval", "helpful"]


@pytest.fixture(scope="module")
def recipe(tiny_qwen2, tmp_path_factory):
    """The shipped recipe on the tiny model, written under a temporary folder."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["base_model"] = str(tiny_qwen2)
    raw["out_dir"] = str(tmp_path_factory.mktemp("runs"))
    for dataset in raw["datasets"].values():
        dataset.update({key: str(ROOT / dataset[key]) for key in ("path", "test") if key in dataset})
    path = tmp_path_factory.mktemp("config") / "real-model.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_run(recipe, one_thread):
    return run_real(recipe, smoke=True)


def test_the_converters_read_each_public_format():
    gsm8k = read_dataset(ROOT / "examples/data/gsm8k.jsonl", "gsm8k")
    assert gsm8k[0].answer.endswith("#### 27") and "<<" not in gsm8k[0].answer  # calculator notes dropped
    mbpp = read_dataset(ROOT / "examples/data/mbpp.jsonl", "mbpp", domain="code")
    assert {r.domain for r in mbpp} == {"code"} and "assert sum_squares([1, 2, 3]) == 14" in mbpp[0].prompt
    assert mbpp[3].tests[0] == "import math"  # test_setup_code runs before the tests
    humaneval = read_dataset(ROOT / "examples/data/humaneval.jsonl", "humaneval")
    assert humaneval[0].meta["entry_point"] == "add_evens" and humaneval[0].tests[0].startswith("def check(")
    ifeval = read_dataset(ROOT / "examples/data/ifeval.jsonl", "ifeval")
    assert ifeval[1].meta["instruction_id_list"] == ["length_constraints:number_words", "change_case:english_lowercase"]
    assert all(r.answer is None for r in ifeval)


def test_a_line_that_does_not_fit_its_format_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "pluribus.cli", "data", "convert", str(bad), str(tmp_path / "o.jsonl"),
                           "--format", "gsm8k"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert f"{bad}:1: not a gsm8k record: the answer has no '#### <final answer>' line" in done.stderr
    good = subprocess.run([sys.executable, "-m", "pluribus.cli", "data", "convert", str(ROOT / "examples/data/mbpp.jsonl"),
                           str(tmp_path / "mbpp.jsonl"), "--format", "mbpp"], capture_output=True, text=True)
    assert good.returncode == 0 and len(read_jsonl(tmp_path / "mbpp.jsonl")) == 4


def test_each_domain_is_routed_to_its_checker(recipe):
    from pluribus.stages.grpo import default_reward

    experts = plan(recipe, smoke=True)["stages"]["experts"]
    assert "grm" in experts["helpful"] and all("grpo" in experts[d] for d in DOMAINS[:4])
    assert experts["helpful"]["grm"].judge_domains == DOMAINS[:4]
    for domain, wrong in [("gsm8k", "The answer is\n#### 28"), ("mbpp", "```python\ndef f(x):\n    return x\n```"),
                          ("humaneval", "```python\ndef add_evens(nums):\n    return 0\n```")]:
        cfg = experts[domain]["grpo"]
        records = read_dataset(*{"gsm8k": ("examples/data/gsm8k.jsonl", "gsm8k"),
                                 "mbpp": ("examples/data/mbpp.jsonl", "mbpp"),
                                 "humaneval": ("examples/data/humaneval.jsonl", "humaneval")}[domain], domain=domain)
        reward = default_reward(cfg)
        assert reward(records, [r.answer for r in records], [1] * len(records)) == [1.0] * len(records), domain
        assert reward(records[:1], [wrong], [1]) == [0.0], domain
    ifeval = read_dataset(ROOT / "examples/data/ifeval.jsonl", "ifeval")
    reward = default_reward(experts["ifeval"]["grpo"])
    assert reward(ifeval[:2], ["no commas here", "Too short, AND NOT LOWERCASE."], [1, 1]) == [1.0, 0.0]


def test_a_config_mistake_fails_before_anything_runs(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    raw["datasets"]["gsm8k"]["format"] = "gsm9k"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="datasets.gsm8k.format"):
        plan(bad)
    raw["datasets"]["gsm8k"]["format"] = "pluribus"  # a contract file must name its reward
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="datasets.gsm8k.reward: Field required"):
        plan(bad)


@pytest.mark.slow
def test_the_recipe_runs_sft_experts_and_opd(finished_run):
    run = finished_run
    assert (run / "sft" / "model" / "config.json").is_file()
    for domain in DOMAINS:
        assert (run / "experts" / domain / "DONE").is_file()
        assert (run / "experts" / domain / "expert" / "adapter_config.json").is_file()  # a LoRA expert
        assert (run / "experts" / domain / "sft").is_dir() == (domain != "ifeval")  # IFEval has no demonstrations
    grpo_rows = [json.loads(line) for line in (run / "experts/gsm8k/expert.metrics.jsonl").read_text().splitlines()]
    assert grpo_rows[0]["step"] == 0 and 0.0 <= grpo_rows[0]["pass_rate"] <= 1.0
    grm_rows = [json.loads(line) for line in (run / "experts/helpful/expert.metrics.jsonl").read_text().splitlines()]
    assert grm_rows[0]["annotated_labels"] == 6  # the people's labels of examples/data/rubric.jsonl
    assert "judge_acc" in grm_rows[0] and "judging_reward" in grm_rows[-1] and "gen_hidden_score" not in grm_rows[-1]
    assert (run / "experts/helpful/expert.warmup").is_dir()
    opd_rows = [json.loads(line) for line in (run / "opd/model.metrics.jsonl").read_text().splitlines()]
    assert (run / "opd" / "model" / "config.json").is_file() and opd_rows[0]["tokens"] > 0
    assert not any(key == "reward_helpful" for key in opd_rows[0])  # no checker for the rubric set: never logged
    scores = json.loads((run / "compare" / "scores.json").read_text())
    assert list(scores) == ["base", "sft", "expert", "opd"]
    assert all(set(by_domain) == set(DOMAINS[:4]) and all(0.0 <= s["reward"] <= 1.0 for s in by_domain.values())
               for by_domain in scores.values())  # the rubric set has no checker: not scored
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student"] == str(run / "opd" / "model")


@pytest.mark.slow
def test_a_finished_run_is_skipped_stage_by_stage(recipe, finished_run, capsys):
    model = finished_run / "opd" / "model" / "model.safetensors"
    before = model.stat().st_mtime_ns
    run_real(recipe, smoke=True)
    assert model.stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("done earlier, skipped") == 3 + len(DOMAINS)  # sft, experts, opd, compare
