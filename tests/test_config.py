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
