"""Crash-safe stages: a run killed anywhere resumes to the numbers of an uninterrupted run, to the bit.

Kills are deterministic (`PLURIBUS_CRASH_AT`, see `pluribus.crash`): the real CLI runs the smoke
pipeline, is SIGKILLed at a point drawn with a seeded random in one stage, and the same command is
run again, which is killed in the next stage, and so on; a last run completes. Every stage is killed
once: after a step, mid-way through writing a checkpoint, mid-way through a rollout batch, or between
a stage's outputs and its DONE marker. The reference is one uninterrupted run of the same config.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pluribus.config import OptimConfig, SFTConfig, validate
from pluribus.crash import armed
from pluribus.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "experts", "opd", "mixed_rl", "merge_linear", "merge_ties", "offpolicy", "eval", "compare")
SMOKE = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["smoke"]
TIMING = ("elapsed_s", "tokens_per_s", "step_s", "sample_s", "teacher_s", "student_s")


def _crash_plan(seed: int = 6) -> list[tuple[str, str]]:
    """(stage, PLURIBUS_CRASH_AT) for one kill in each stage that trains, and one before a DONE marker."""
    rng = random.Random(seed)
    pretrain, sft = SMOKE["pretrain"]["steps"], SMOKE["sft"]["steps"]
    expert_loop = rng.choice(["sft", "expert"])
    expert_steps = SMOKE["experts"]["sft" if expert_loop == "sft" else "grpo"]["steps"]
    return [
        ("pretrain", f"pretrain/model:{rng.randrange(pretrain)}"),  # between checkpoints (every 8 steps)
        ("sft", f"sft/model:checkpoint@{rng.randrange(2, sft, 3)}"),  # mid-write of a checkpoint (every 3)
        # not the first domain: finished domains must be skipped, this one resumed
        ("experts", f"experts/{rng.choice(['max', 'case'])}/{expert_loop}:{rng.randrange(expert_steps)}"),
        ("opd", f"opd/model:{rng.randrange(SMOKE['opd']['steps'])}"),
        # mid-generation, no checkpoint yet: earlier batches replay from their logs, this one resumes
        ("mixed_rl", f"mixed_rl/model:rollout@{rng.randrange(SMOKE['baselines']['mixed_rl']['steps'])}"),
        ("offpolicy", f"offpolicy/model:{rng.randrange(SMOKE['baselines']['offpolicy']['sft']['steps'])}"),
        ("compare", "compare:done"),
    ]


def _config(folder: Path, workers: int = 1) -> Path:
    """The quickstart with --smoke, checkpointing every few steps so that kills land between checkpoints.

    The killed runs use one worker, so each kill ends the process the test runs; the reference uses
    two (stages side by side in worker processes): the same numbers either way."""
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw["out_dir"] = str(folder / "runs")
    raw["workers"] = raw["smoke"]["experts"]["workers"] = workers
    smoke = raw["smoke"]
    smoke["pretrain"]["checkpoint_every"] = 8
    smoke["sft"]["checkpoint_every"] = 3
    smoke["experts"]["sft"]["checkpoint_every"] = smoke["experts"]["grpo"]["checkpoint_every"] = 1
    smoke["opd"]["checkpoint_every"] = 1
    smoke["baselines"]["mixed_rl"]["checkpoint_every"] = smoke["baselines"]["mixed_rl"]["steps"]
    smoke["baselines"]["offpolicy"]["sft"]["checkpoint_every"] = 1
    config = folder / "quickstart.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _run(config: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PLURIBUS_CRASH_AT"} | {"OMP_NUM_THREADS": "1",
                                                                              "HF_HUB_OFFLINE": "1"}
    if crash:
        env["PLURIBUS_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "pluribus.cli", "run", str(config), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=600)


def _outputs(run_dir: Path) -> dict[str, str]:
    """sha256 of every weight file and score file a stage leaves, by path in the run (checkpoints aside)."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and (path.suffix == ".safetensors" or path.name in ("scores.json", "report.json")) \
                and not any(part.endswith((".ckpt", ".init", ".tmp")) for part in rel.parts):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Every metrics.jsonl of the run, timings left out (they differ from run to run)."""
    return {str(p.relative_to(run_dir)): [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                                          for line in p.read_text().splitlines()]
            for p in sorted(run_dir.rglob("*.metrics.jsonl"))}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The reference run, then the killed chain: per kill its exit code, stdout, and what was on disk."""
    reference = _config(tmp_path_factory.mktemp("reference"), workers=2)
    assert _run(reference).returncode == 0
    ref_dir = reference.parent / "runs" / "quickstart"
    config = _config(tmp_path_factory.mktemp("killed"))
    run_dir = config.parent / "runs" / "quickstart"
    kills = {}
    for stage, crash in _crash_plan():
        done = _run(config, crash)
        kills[stage] = {"crash": crash, "returncode": done.returncode, "stdout": done.stdout,
                        "done": [s for s in STAGES if (run_dir / s / "DONE").is_file()],
                        "outputs": _outputs(run_dir),
                        "partial_checkpoints": sorted(p.name for p in run_dir.rglob("step-*.tmp")),
                        "rollout_logs": {p.name: len(p.read_text().splitlines())
                                         for p in run_dir.glob(f"{stage}/*.ckpt/rollout-*.jsonl")}}
    final = _run(config)
    return {"ref": ref_dir, "dir": run_dir, "kills": kills, "final": final}


@pytest.mark.parametrize("stage", [stage for stage, _ in _crash_plan()])
def test_each_kill_stops_its_stage_before_done(killed, stage):
    kill = killed["kills"][stage]
    assert kill["returncode"] == -9, (kill["crash"], kill["stdout"][-2000:])
    assert kill["done"] == list(STAGES[:STAGES.index(stage)])  # earlier stages finished (now or before), not it


def test_no_stage_is_marked_done_with_missing_or_partial_outputs(killed):
    reference = _outputs(killed["ref"])
    for stage, kill in killed["kills"].items():
        for done in kill["done"]:
            expected = {p: h for p, h in reference.items() if p.split("/")[0] == done}
            assert expected, done
            assert {p: kill["outputs"].get(p) for p in expected} == expected, (stage, done)


def test_a_kill_mid_checkpoint_leaves_the_previous_checkpoint(killed):
    kill = killed["kills"]["sft"]
    step = int(kill["crash"].split("@")[1])
    assert kill["partial_checkpoints"] == [f"step-{step + 1:08d}.tmp"]  # killed between writing and renaming
    resumed = killed["kills"]["experts"]["stdout"]  # the next run
    if step >= 3:  # from the checkpoint before (every 3 steps), the partial one discarded
        assert f"sft/model] resumed after step {step - 3} of" in resumed
    else:
        assert "sft/model] resumed" not in resumed
    assert not list(killed["dir"].rglob("step-*.tmp"))


def test_experts_resume_per_domain(killed):
    stdout = killed["kills"]["opd"]["stdout"]  # the run after the kill inside experts
    _, domain, loop_step = killed["kills"]["experts"]["crash"].split("/")
    loop, step = loop_step.split(":")
    assert "[experts] reverse done earlier, skipped" in stdout and f"[experts] {domain} done" not in stdout
    assert f"experts/{domain}/{loop}] resumed after step {step} of" in stdout  # a checkpoint every step


def test_a_rollout_batch_killed_mid_generation_resumes_from_its_log(killed):
    from pluribus.stages.checkpoint import CRASH_AFTER_TOKENS

    kill = killed["kills"]["mixed_rl"]
    step = int(kill["crash"].split("@")[1])
    logs = kill["rollout_logs"]  # no checkpoint before the last step: every batch so far is logged
    assert sorted(logs) == [f"rollout-{s:08d}.jsonl" for s in range(step + 1)]
    assert logs[f"rollout-{step:08d}.jsonl"] == CRASH_AFTER_TOKENS  # one line per decoding step
    resumed = killed["kills"]["offpolicy"]["stdout"]  # the next run
    assert all(f"mixed_rl/model] step {s}: rollout resumed from its token log" in resumed for s in range(step + 1))
    assert not list(killed["dir"].glob("mixed_rl/*.ckpt/rollout-*"))  # dropped with the final checkpoint


def test_resumed_run_gives_the_reference_numbers(killed):
    assert killed["final"].returncode == 0, killed["final"].stderr[-2000:]
    assert all((killed["dir"] / s / "DONE").is_file() for s in STAGES)
    ref = json.loads((killed["ref"] / "compare" / "scores.json").read_text())
    got = json.loads((killed["dir"] / "compare" / "scores.json").read_text())
    assert got.keys() == ref.keys() and all(got[m].keys() == ref[m].keys() for m in ref)
    assert max(abs(got[m][d] - ref[m][d]) for m in ref for d in ref[m]) <= 0.01  # the requirement: ±1 point
    assert got == ref  # what it does: exactly


def test_resumed_run_is_bit_identical_and_logs_each_step_once(killed):
    assert _outputs(killed["dir"]) == _outputs(killed["ref"])  # every weight file and score file
    metrics = _metrics(killed["dir"])
    assert metrics == _metrics(killed["ref"]) and len(metrics) == 11


def test_crash_points_name_a_folder_tail_and_an_event(monkeypatch):
    monkeypatch.setenv("PLURIBUS_CRASH_AT", "experts/max/expert:rollout@3")
    assert armed("/runs/q/experts/max/expert", "rollout@3")
    assert not armed("/runs/q/experts/max/expert", "3") and not armed("/runs/q/experts/case/expert", "rollout@3")
    assert not armed("/runs/q/experts/max/expert.x", "rollout@3")
    monkeypatch.delenv("PLURIBUS_CRASH_AT")
    assert not armed("/runs/q/experts/max/expert", "rollout@3")


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="checkpoint_every"):
        validate(SFTConfig, {"model": "m", "out": "o", "data": {"domains": ["max"]}, "checkpoint_every": 0}, "sft")


def test_a_checkpoint_restores_in_place_and_only_for_its_own_config(tiny_llama, tmp_path):
    from pluribus.models import load
    from pluribus.stages.checkpoint import Checkpointer
    from pluribus.stages.common import make_optimizer

    def checkpointer(config):
        model, tokenizer = load(tiny_llama)
        optimizer, scheduler = make_optimizer(model, OptimConfig(warmup_steps=2), 10)
        return model, optimizer, Checkpointer(tmp_path / "m", every=2, total=10, config=config, records=None,
                                              model=model, tokenizer=tokenizer, optimizer=optimizer,
                                              scheduler=scheduler)

    model, optimizer, ckpt = checkpointer({"lr": 1})
    assert ckpt.restore({"order": []}) == (0, {"order": []})
    for step in range(3):
        model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ckpt.scheduler.step()
        ckpt.step_done(step, {"order": [step]})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    next_draw = torch.rand(3)
    assert [p.name for p in (tmp_path / "m.ckpt").glob("step-*")] == ["step-00000002"]  # after step 1 only

    model, optimizer, ckpt = checkpointer({"lr": 1, "checkpoint_every": 5})  # the interval is not identity
    assert ckpt.restore({"order": []}) == (2, {"order": [1]})
    assert ckpt.scheduler.last_epoch == 2 and optimizer.state_dict()["state"][0]["step"] == 2
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # step 2 is not in it
    model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # step 2 redone: the same
    assert torch.equal(torch.rand(3), next_draw)

    _, _, other = checkpointer({"lr": 2})
    assert other.restore({"order": []}) == (0, {"order": []}) and not list((tmp_path / "m.ckpt").glob("step-*"))


def _steps_and_losses(path: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, path.read_text().splitlines())]


def test_a_resumed_metrics_log_drops_what_came_after_its_checkpoint(tmp_path):
    from pluribus.stages.common import MetricsLog

    path = tmp_path / "m.metrics.jsonl"
    log = MetricsLog(path)
    for step in range(5):
        log.write(step=step, loss=float(step))
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # torn by the kill
    log = MetricsLog(path, start_step=3)
    log.write(step=3, loss=9.0)
    log.close()
    assert _steps_and_losses(path) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 9.0)]
    MetricsLog(path).close()  # a fresh start
    assert path.read_text() == ""


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pluribus.stages.common import MetricsLog

    log = MetricsLog(tmp_path / "m.metrics.jsonl")
    for step in range(5):
        log.write(step=step, loss=float(step), note="text is not a scalar")
    log.close()
    log = MetricsLog(tmp_path / "m.metrics.jsonl", start_step=3)  # resumed: steps 3 and 4 again
    for step in (3, 4):
        log.write(step=step, loss=10.0 * step)
    log.close()
    events = EventAccumulator(str(tmp_path / "m.tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_metrics_need_no_tensorboard(tmp_path, monkeypatch):
    from pluribus.stages.common import MetricsLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if neither were installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    log = MetricsLog(tmp_path / "m.metrics.jsonl")
    log.write(step=0, loss=1.5)
    log.close()
    assert _steps_and_losses(tmp_path / "m.metrics.jsonl") == [(0, 1.5)] and not (tmp_path / "m.tb").exists()


def test_a_stage_folder_is_reused_only_by_its_own_snapshot(tmp_path, capsys):
    from pluribus.pipeline import _stage

    def body(stage_dir):
        (stage_dir / "out.txt").write_text("x" if not (stage_dir / "partial").exists() else "resumed")

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(json.dumps({"lr": 1, "checkpoint_every": 5}))
    (tmp_path / "s" / "partial").write_text("")  # an interrupted run of this snapshot left work behind
    _stage(tmp_path, "s", {"lr": 1, "checkpoint_every": 9}, body)  # a new interval: the same snapshot
    assert (tmp_path / "s" / "out.txt").read_text() == "resumed"
    _stage(tmp_path, "s", {"lr": 1, "checkpoint_every": 2}, body)
    assert capsys.readouterr().out.count("done earlier, skipped") == 1
    _stage(tmp_path, "s", {"lr": 2, "checkpoint_every": 2}, body)  # another snapshot: a fresh folder
    assert not (tmp_path / "s" / "partial").exists() and (tmp_path / "s" / "out.txt").read_text() == "x"
    assert json.loads((tmp_path / "s" / "config.json").read_text()) == {"lr": 2, "checkpoint_every": 2}


def test_a_marker_holds_only_the_key_written_into_it(tmp_path):
    from pluribus.durable import holds, write_text

    marker = tmp_path / "DONE"
    assert not holds(marker, "k1")  # missing: holds nothing
    write_text(marker, "k1")
    assert holds(marker, "k1") and not holds(marker, "k2") and not holds(marker, "")
    marker.write_text("k1\n")  # written by hand with a newline: the same key
    assert holds(marker, "k1")
    (tmp_path / "folder").mkdir()
    assert not holds(tmp_path / "folder", "k1")  # a folder is no marker


def test_kept_json_is_computed_once_per_key_and_its_key_written_last(tmp_path, monkeypatch):
    from pluribus import durable

    path, made = tmp_path / "scores.json", []

    def make():
        made.append(1)
        return {"add": 0.25 * len(made)}

    assert durable.kept_json(path, "k1", make, compute=False) is None and not made  # nothing kept, nothing computed
    assert durable.kept_json(path, "k1", make) == {"add": 0.25} and (tmp_path / "scores.key").read_text() == "k1"
    assert durable.kept_json(path, "k1", make) == {"add": 0.25} and len(made) == 1  # read back
    assert durable.kept_json(path, "k2", make, compute=False) is None  # another key: stale
    writes = []
    real = durable.write_text
    monkeypatch.setattr(durable, "write_text", lambda p, text: writes.append(Path(p).name) or real(p, text))
    assert durable.kept_json(path, "k2", make) == {"add": 0.5}
    assert writes == ["scores.json", "scores.key"]  # a crash between the two leaves no key that holds
    assert durable.fingerprint_dir(tmp_path / "nowhere") == "missing"
    (tmp_path / "DONE").write_text("stage-key\n")
    assert durable.fingerprint_dir(tmp_path / "model") == "stage-key"  # the stage's DONE beside the folder
