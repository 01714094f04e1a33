"""Config errors: one line naming the file, the field and the problem; exit code 2; no traceback."""

import subprocess
import sys

import pytest

from pluribus.config import GRPOConfig, SFTConfig, load_yaml
from pluribus.errors import ConfigError


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("body, field, problem", [
    ("model: m\nout: o\ndata: {domains: [add]}\nsteps: -3\n", "steps", "greater than 0"),
    ("model: m\nout: o\ndata: {domains: [add]}\nstepz: 3\n", "stepz", "unknown field"),
    ("model: m\nout: o\ndata: {domains: [nope]}\n", "data", "unknown domain"),
    ("model: m\ndata: {domains: [add]}\n", "out", "Field required"),
    ("model: m\nout: o\ndata: {domains: [add]}\noptim: {lr: fast}\n", "optim.lr", "valid number"),
])
def test_invalid_sft_config_names_file_field_and_problem(tmp_path, body, field, problem):
    path = tmp_path / "sft.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_yaml(path, SFTConfig)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}") and problem in message and "\n" not in message


def test_grpo_batch_must_split_into_minibatches(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("model: m\nout: o\ndata: {domains: [add]}\nprompts_per_step: 3\ngroup_size: 3\nminibatches: 2\n")
    with pytest.raises(ConfigError, match="grpo.yaml: .*must divide into 2 minibatches"):
        load_yaml(path, GRPOConfig)


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nout: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_yaml(path, SFTConfig)


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: m\nout: o\ndata: {domains: [add]}\nbatch_size: 0\n")
    result = _cli("sft", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path}: batch_size: Input should be greater than 0"]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_missing_config_and_model_are_clear_errors(tmp_path):
    result = _cli("sft", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr and "Traceback" not in result.stderr
    result = _cli("eval", "--model", str(tmp_path / "nomodel"), "--n", "2")
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path / 'nomodel'}: model folder not found"


def test_cli_world_list_shows_every_domain():
    from pluribus.world import DOMAINS

    result = _cli("world", "list")
    assert result.returncode == 0
    assert all(name in result.stdout for name in DOMAINS) and len(DOMAINS) >= 12


def test_stage_without_any_data_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "sft.yaml"
    path.write_text("model: m\nout: o\ndata: {n_per_domain: 10}\n")
    (tmp_path / "m").mkdir()
    result = subprocess.run([sys.executable, "-m", "pluribus.cli", "sft", str(path)], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "no domains and no jsonl" in result.stderr


# A pipeline YAML is checked whole before any stage runs: nested sections name their full dotted path.
PIPELINE = "name: t\nout_dir: {out}\ndomains: [add]\nexperts: {{}}\nopd: {{}}\n"


def _pipeline_yaml(tmp_path, extra: str):
    """PIPELINE with the top-level section that `extra` sets replaced by it."""
    path = tmp_path / "pipe.yaml"
    key = extra.split(":")[0]
    lines = [line for line in PIPELINE.format(out=tmp_path / "runs").splitlines() if not line.startswith(key + ":")]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.mark.parametrize("extra, args, field, problem", [
    ("experts: {grpo: {optim: {lr: fast}}}\n", [], "experts.grpo.optim.lr", "Input should be a valid number"),
    ("baselines: {mixed_rl: {stepz: 3}}\n", [], "baselines.mixed_rl.stepz", "unknown field"),
    ("sft: {data: {jsonl: [nowhere.jsonl]}}\n", [], "sft.data.jsonl", "data file not found: nowhere.jsonl"),
    ("smoke: {opd: {steps: 0}}\n", ["--smoke"], "smoke.opd.steps", "Input should be greater than 0"),
])
def test_cli_pipeline_error_names_file_and_dotted_field_before_anything_runs(tmp_path, extra, args, field, problem):
    path = _pipeline_yaml(tmp_path, extra)
    result = _cli("run", str(path), *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: {field}: {problem}"), line
    assert not (tmp_path / "runs").exists()  # failed before the first stage


@pytest.mark.parametrize("extra, message", [
    ("opd: {model: elsewhere}\n", "opd.model: filled in by pluribus; remove it"),
    ("experts: {sft: {lora: null}}\n", "experts.sft.lora: filled in by pluribus; remove it"),
    ("baselines: {mixed_rll: {}}\n", "baselines.mixed_rll: unknown field"),
    ("baselines: {merge: [{method: ties}, {method: linear}, {method: ties}]}\n",
     "baselines.merge.2.method: a second merge_ties would overwrite the first"),
    ("baselines: {offpolicy: {sft: {optim: {warmup_steps: -1}}}}\n",
     "baselines.offpolicy.sft.optim.warmup_steps: Input should be greater than or equal to 0"),
    ("domains: [add, nope]\n", "domains: unknown domain(s) ['nope']"),
    ("opd_start: offpolicy\n", "opd_start: offpolicy: the OPD student would start from the off-policy baseline's "
                                "student, and baselines.offpolicy is not set"),
    ("opd_start: rl\n", "opd_start: Input should be 'sft' or 'offpolicy'"),
])
def test_pipeline_sections_are_validated_with_their_dotted_path(tmp_path, extra, message):
    from pluribus.pipeline import plan_pipeline

    path = _pipeline_yaml(tmp_path, extra)
    with pytest.raises(ConfigError) as info:
        plan_pipeline(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_opd_started_from_the_offpolicy_student_runs_after_it_and_is_keyed_on_it(tmp_path):
    """`opd_start: offpolicy`: the OPD student's model is the off-policy baseline's, the two run in one worker in
    that order (the OPD chain first, the longest), and a change to the baseline changes the OPD stage's key."""
    from pluribus.pipeline import _chains, _student_inputs, plan_pipeline

    base = "baselines: {mixed_rl: {}, offpolicy: {n_per_domain: 8}, merge: [{method: linear}]}\n"
    plan = plan_pipeline(_pipeline_yaml(tmp_path, base + "opd_start: offpolicy\n"))
    assert plan.students["opd"].model == plan.students["offpolicy"].out != plan.sft.out
    assert plan.students["mixed_rl"].model == plan.sft.out
    assert _chains(plan) == [["offpolicy", "opd"], ["mixed_rl"], ["merge_linear"]]
    inputs = _student_inputs(plan, "experts-key")
    assert inputs["offpolicy"] == inputs["mixed_rl"] == "experts-key" != inputs["opd"]
    changed = plan_pipeline(_pipeline_yaml(tmp_path, base.replace("8}", "9}") + "opd_start: offpolicy\n"))
    assert _student_inputs(changed, "experts-key")["opd"] != inputs["opd"]
    assert _student_inputs(changed, "other-experts")["opd"] != _student_inputs(changed, "experts-key")["opd"]

    recipe = plan_pipeline(_pipeline_yaml(tmp_path, base))  # the default: every student from the general SFT model
    assert recipe.students["opd"].model == plan.sft.out and recipe.after == {}
    assert _chains(recipe) == [["opd"], ["mixed_rl"], ["merge_linear"], ["offpolicy"]]
    assert set(_student_inputs(recipe, "experts-key").values()) == {"experts-key"}


def test_stage_config_sections_and_missing_data_file(tmp_path):
    from pluribus.config import ExpertsConfig

    path = tmp_path / "experts.yaml"
    path.write_text("model: m\nout_dir: o\ngrpo: {prompts_per_step: 3, group_size: 3, minibatches: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: grpo: prompts_per_step × group_size \(9\) must divide"):
        load_yaml(path, ExpertsConfig)
    path = tmp_path / "sft.yaml"
    path.write_text("model: m\nout: o\ndata: {jsonl: [gone.jsonl]}\n")
    result = _cli("sft", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path}: data.jsonl: data file not found: gone.jsonl"]


def test_teacher_prefetch_is_left_out_of_the_opd_dump_when_off():
    """Runs from before the option keep their OPD stage key; turned on, it is recorded."""
    from pluribus.config import OPDConfig, validate

    fields = {"model": "m", "out": "o", "data": {"domains": ["add"]}, "teachers": [{"path": "t", "domains": ["add"]}]}
    assert "teacher_prefetch" not in validate(OPDConfig, fields, "opd").model_dump()
    assert validate(OPDConfig, {**fields, "teacher_prefetch": True}, "opd").model_dump()["teacher_prefetch"] is True


def test_each_example_stage_config_runs_on_what_the_quickstart_writes():
    """The stand-alone example YAMLs load, name their data, and start from the quickstart's own paths, so
    `make quickstart` then `pluribus <stage> examples/<file>` works (opd-long once named no domains and failed)."""
    from pathlib import Path

    from pluribus.config import ExpertsConfig, OPDConfig
    from pluribus.pipeline import plan_pipeline

    examples = Path(__file__).resolve().parents[1] / "examples"
    stages = {"opd-long.yaml": OPDConfig, "opd-full.yaml": OPDConfig, "sft-one-domain.yaml": SFTConfig,
              "grm-describe.yaml": ExpertsConfig}
    pipelines = {"quickstart.yaml", "real-model.yaml"}
    assert {p.name for p in examples.glob("*.yaml")} == set(stages) | pipelines  # a new example is checked here
    plan = plan_pipeline(examples / "quickstart.yaml")
    opd, opd_full, sft, grm = (load_yaml(examples / name, cls) for name, cls in stages.items())

    for o in (opd, opd_full):
        assert sorted(o.data.domains) == sorted(plan.domains)  # every domain distilled: a domain left out is forgotten
        assert o.model == plan.sft.out
        assert [(t.path, t.domains) for t in o.teachers] == [(t.path, t.domains) for t in plan.students["opd"].teachers]
        assert set(o.domain_weights) <= set(plan.domains)
    assert opd.out != opd_full.out
    assert sft.data.domains and sft.model == str(plan.base)
    assert grm.domains == ["describe"] and grm.model == plan.sft.out
