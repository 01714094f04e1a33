"""Off-policy distillation baseline: the student is fine-tuned on exactly what each domain's own expert wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pluribus.config import OffPolicyConfig, SamplingConfig, validate
from pluribus.data import read_jsonl
from pluribus.errors import ConfigError
from pluribus.models import load, read_meta
from pluribus.rollout import SamplingParams
from pluribus.stages import offpolicy as stage
from pluribus.stages.evaluate import generate_texts
from pluribus.world import generate
from test_teachers import make_adapter, make_full

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = {"max_new_tokens": 6, "temperature": 1.0}
SFT = {"steps": 2, "batch_size": 4, "optim": {"lr": 1e-2, "warmup_steps": 0}}


@pytest.fixture(scope="module")
def experts(tiny_llama, tmp_path_factory):
    """A LoRA expert for add and a full-weight one for sort: the two kinds a config may name."""
    root = tmp_path_factory.mktemp("offpolicy-experts")
    return {"add": str(make_adapter(tiny_llama, root / "add", seed=1)),
            "sort": str(make_full(tiny_llama, root / "sort", seed=2))}


def config(tiny_llama, experts, out, **fields) -> OffPolicyConfig:
    return OffPolicyConfig(**{"model": str(tiny_llama), "out": str(out), "experts": experts, "n_per_domain": 3,
                              "sampling": SAMPLING, "sft": SFT, "seed": 5, **fields})


def test_student_learns_each_experts_own_samples(tiny_llama, experts, tmp_path):
    out = stage.run(config(tiny_llama, experts, tmp_path / "student"))
    records = read_jsonl(stage.data_path(out))
    assert [r.domain for r in records] == ["add"] * 3 + ["sort"] * 3
    params = SamplingParams(**SAMPLING)
    for domain, path in experts.items():
        mine = [r for r in records if r.domain == domain]
        prompts = generate(domain, "train", 3, seed=5)
        model, tok = load(path, trainable=False)
        again = [t[0] for t in generate_texts(model, tok, prompts, params, seed=5, batch_size=8)]
        assert [r.id for r in mine] == [p.id for p in prompts]
        assert [r.answer for r in mine] == again  # the expert's text, unfiltered, not the world's answer
        assert [r.answer for r in mine] != [p.answer for p in prompts]
        assert {r.meta["expert"] for r in mine} == {path}
    student, _ = load(out, trainable=False)
    start, _ = load(tiny_llama, trainable=False)
    assert read_meta(out)["stage"] == "offpolicy" and read_meta(out)["experts"] == experts
    moved = max((a - b).abs().max().item() for a, b in zip(student.parameters(), start.parameters()))
    assert moved > 1e-4
    assert len((tmp_path / "student.metrics.jsonl").read_text().splitlines()) == SFT["steps"]


def test_records_are_routed_to_their_domains_expert_and_passed_to_sft(monkeypatch, tmp_path):
    """Each (fake) expert answers with its own folder name; SFT must receive exactly those records."""
    calls = []

    def fake_generate(model, tokenizer, records, params, seed, batch_size):
        calls.append((model, {r.domain for r in records}, params, seed, batch_size))
        return [[model] for _ in records]

    trained = {}

    def fake_sft(cfg, records, meta):
        trained.update(cfg=cfg, records=records, meta=meta)
        return Path(cfg.out)

    monkeypatch.setattr(stage, "load", lambda path, trainable: (Path(path).name, None))
    monkeypatch.setattr(stage, "generate_texts", fake_generate)
    monkeypatch.setattr(stage.sft, "run", fake_sft)
    experts = {"sort": "/nowhere/expert-of-sort", "add": "/nowhere/expert-of-add"}
    cfg = config("/nowhere/general-sft", experts, tmp_path / "student", generate_batch_size=7, save_data=False,
                 sampling={"max_new_tokens": 5, "temperature": 0.7, "top_k": 3})
    stage.run(cfg)
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=1.0, top_k=3)
    assert calls == [("expert-of-sort", {"sort"}, params, 5, 7), ("expert-of-add", {"add"}, params, 5, 7)]
    routed = [(r.domain, r.answer) for r in trained["records"]]
    assert routed == [("sort", "expert-of-sort")] * 3 + [("add", "expert-of-add")] * 3
    sft_cfg = trained["cfg"]
    student = str(tmp_path / "student")
    assert (sft_cfg.model, sft_cfg.out, sft_cfg.steps, sft_cfg.seed) == ("/nowhere/general-sft", student, 2, 5)
    assert trained["meta"] == {"stage": "offpolicy", "experts": experts}
    assert not stage.data_path(cfg.out).exists()


def test_a_rerun_reads_the_answers_back_and_new_sampling_arguments_draw_again(monkeypatch, tiny_llama, experts,
                                                                                tmp_path):
    """A resumed stage must not pay the experts' sampling twice (at 40x it is ~15 minutes), and must not reuse
    answers drawn under other arguments."""
    cfg = config(tiny_llama, experts, tmp_path / "student")
    jsonl = stage.data_path(cfg.out)
    written = []
    monkeypatch.setattr(stage.sft, "run", lambda cfg, records, meta: written.append(records) or Path(cfg.out))
    stage.run(cfg)
    first = jsonl.read_text()
    assert jsonl.with_suffix(".key").read_text() == stage.data_key(cfg)

    def no_sampling(*args):
        raise AssertionError("sampled again")

    monkeypatch.setattr(stage, "expert_records", no_sampling)
    stage.run(cfg)
    assert [r.to_json() for r in written[1]] == [r.to_json() for r in written[0]]  # the same records reach SFT
    assert jsonl.read_text() == first
    for changed in ({"n_per_domain": 2}, {"sampling": {**SAMPLING, "temperature": 0.5}}, {"seed": 6}):
        with pytest.raises(AssertionError, match="sampled again"):
            stage.run(config(tiny_llama, experts, tmp_path / "student", **changed))
    stage.run(cfg)  # the first set and its key stay together until a new set is written whole
    assert jsonl.read_text() == first and len(written) == 3


def test_an_sft_typo_fails_before_any_generation(tmp_path):
    cfg = config(tmp_path / "start", {"add": str(tmp_path / "missing")}, tmp_path / "student", sft={"stepz": 3})
    with pytest.raises(ConfigError, match=r"^offpolicy\.sft: stepz: unknown field$"):
        stage.run(cfg)  # an expert folder that does not exist would fail differently, later


@pytest.mark.parametrize("experts, problem", [
    ({"add": "a", "nope": "b"}, "experts: unknown domain(s) ['nope']; known: ['add', "),
    ({}, "experts: Dictionary should have at least 1 item"),
])
def test_config_refuses_unknown_or_no_domains(experts, problem):
    with pytest.raises(ConfigError) as err:
        validate(OffPolicyConfig, {"model": "m", "out": "o", "experts": experts}, "off.yaml")
    assert str(err.value).startswith(f"off.yaml: {problem}") and "\n" not in str(err.value)


def test_config_defaults():
    cfg = OffPolicyConfig(model="m", out="o", experts={"add": "a"})
    assert cfg.sampling == SamplingConfig() and cfg.sampling.temperature == 1.0
    assert (cfg.n_per_domain, cfg.save_data, cfg.sft, cfg.seed) == (500, True, {}, 0)


def test_cli_offpolicy(tiny_llama, experts, tmp_path):
    from pluribus.cli import app

    yaml = tmp_path / "offpolicy.yaml"
    yaml.write_text(f"model: {tiny_llama}\nout: {tmp_path / 'cli-student'}\nexperts: {{add: {experts['add']}}}\n"
                    "n_per_domain: 2\nsampling: {max_new_tokens: 4}\nsft: {steps: 1, batch_size: 2}\n")
    result = CliRunner().invoke(app, ["offpolicy", str(yaml)])
    assert result.exit_code == 0, result.output
    assert "student saved to" in result.output
    assert len(read_jsonl(stage.data_path(tmp_path / "cli-student"))) == 2
    assert read_meta(tmp_path / "cli-student")["experts"] == {"add": experts["add"]}
