"""`pluribus bench`: the harness end to end on a toy model (the figures mean nothing, their shape does)."""

import json
import math

import pytest
from typer.testing import CliRunner

from pluribus.bench import SMOKE, TARGETS, run
from pluribus.cli import app
from pluribus.errors import PluribusError


def _ratios(tree, path=""):
    """(path, value) of every field whose name holds 'ratio'."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if "ratio" in key and not isinstance(value, (dict, list, str)):
                yield f"{path}{key}", value
            yield from _ratios(value, f"{path}{key}.")


def _check_pluribus_side(results):
    for task in ("grpo", "opd"):
        side = results[task]["pluribus"]
        assert side["timed_steps"] == SMOKE.steps * SMOKE.rounds
        assert all(t > 0 and math.isfinite(t) for t in side["steps_s"] + side["cpu_steps_s"])
        assert side["step_s"] > 0 and side["threads"] == SMOKE.threads
        assert side["step_gflop"] > 0  # the first step's matmuls were counted
    assert results["opd"]["pluribus"]["sample_s"] > 0  # the stage's own breakdown came through
    for batch in ("grpo_batch", "opd_batch"):
        r = results["rollout"][batch]
        assert r["pluribus_tokens_per_s"] > 0 and r["generate_tokens_per_s"] > 0
        assert 0 < r["pluribus_tokens_per_call"] <= r["rows"] * SMOKE.max_new_tokens
    assert results["rollout"]["grpo_batch"]["rows"] == SMOKE.prompts * SMOKE.group
    teachers = results["opd_teachers"]
    assert sorted(int(k) for k in teachers["by_count"]) == sorted(SMOKE.teacher_counts)
    assert all(t["peak_mib"] > 0 and t["tokens"] > 0 and t["processes"] == SMOKE.rounds
               and t["timed_steps"] == SMOKE.steps * SMOKE.rounds and t["process_step_s"] > 0
               for t in teachers["by_count"].values())
    assert teachers["by_count"][str(max(SMOKE.teacher_counts))]["loads"] == 1  # LoRA teachers share one base
    kl = results["chunked_kl"]
    assert kl["vocab"] == SMOKE.kl_vocab and kl["mean_kl"] > 0
    assert results["model"]["arch"] == "qwen2" and results["model"]["parameters"] > 0
    assert [t["ratio"] for t in results["targets"]] == [path for path, _, _ in TARGETS]


def test_bench_smoke_without_trl_writes_ratios(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", "--smoke", "--no-trl", "--json", str(out)])
    assert done.exit_code == 0, done.output
    assert "GRPO" in done.output and "rollout" in done.output and "generate" in done.output
    results = json.loads(out.read_text())
    _check_pluribus_side(results)
    assert results["grpo"]["trl"] is None and results["grpo"]["step_time_ratio"] is None
    assert results["notes"]  # says why the TRL columns are empty
    ratios = dict(_ratios(results))
    for name in ("rollout.grpo_batch.tokens_per_s_ratio", "rollout.opd_batch.tokens_per_s_ratio",
                 "opd_teachers.step_time_ratio", "opd_teachers.peak_rss_ratio"):
        assert ratios[name] > 0 and math.isfinite(ratios[name]), name
    # a toy KL in a process that already holds more memory than it needs can peak at 0 above its inputs
    assert 0 <= ratios["chunked_kl.peak_to_full_logits_ratio"] < 10
    assert "grpo.step_time_ratio" in ratios and "opd.step_time_ratio" in ratios
    met = {t["ratio"]: t["met"] for t in results["targets"]}
    assert met["grpo.step_time_ratio"] is None  # no TRL, no verdict
    assert met["opd_teachers.peak_rss_ratio"] in (True, False)


def test_bench_with_trl_fills_the_trl_side(one_thread):
    pytest.importorskip("trl")
    results = run(SMOKE, with_trl=True, in_process=True)
    _check_pluribus_side(results)
    for task in ("grpo", "opd"):
        assert results[task]["trl"]["timed_steps"] == SMOKE.steps * SMOKE.rounds
        assert results[task]["step_time_ratio"] > 0 and math.isfinite(results[task]["step_time_ratio"])
        assert results[task]["trl"]["step_gflop"] > 0
        assert results[task]["work_ratio"] == pytest.approx(
            results[task]["pluribus"]["step_gflop"] / results[task]["trl"]["step_gflop"])
    assert results["machine"]["trl"] and not results["notes"]


def test_a_worker_process_returns_its_measurement(tmp_path):
    from pluribus.bench import _subprocess

    call = _subprocess(tmp_path, SMOKE)
    kl = call("chunked_kl")
    assert kl["positions"] == SMOKE.kl_positions and kl["peak_above_inputs_gib"] >= 0
    with pytest.raises(PluribusError, match="no_such_task measurement failed"):
        call("no_such_task")


def test_first_step_work_counts_the_matmuls_of_the_first_step_only():
    import torch

    from pluribus.bench.workloads import FirstStepWork

    a, b = torch.ones(4, 8), torch.ones(8, 16)
    work = FirstStepWork()
    work.start()
    a @ b
    torch.ones(3) + 1  # not a matmul: no FLOPs
    work.step_end()
    a @ b  # the second step: not counted
    work.step_end()
    assert work.gflop == pytest.approx(2 * 4 * 8 * 16 / 1e9)


def test_teacher_counts_take_time_from_the_alternating_run_and_memory_from_their_processes():
    """Step times: medians of the counts stepped in turn in one process; memory: the highest peak of each count's own
    processes (their pooled step times kept beside, with their ratio)."""
    from pluribus.bench import _teachers

    def process(steps, peak):
        return {"steps_s": steps, "cpu_steps_s": steps, "threads": 1, "tokens": 10, "loads": 1, "peak_mib": peak,
                "above_baseline_mib": peak - 100}

    def turns(steps):
        return {"steps_s": steps, "cpu_steps_s": [2 * t for t in steps], "threads": 1}

    pooled = _teachers({1: [process([1.0, 1.2], 300), process([1.1, 5.0], 310)],
                        12: [process([1.3, 1.3], 320), process([1.2, 1.4], 305)]},
                       {"1": turns([0.5, 0.7, 0.6]), "12": turns([0.66, 0.9, 0.6])})
    assert pooled["by_count"]["1"]["step_s"] == pytest.approx(0.6)  # the median of the alternating run's steps
    assert pooled["by_count"]["12"]["timed_steps"] == 3 and pooled["by_count"]["12"]["processes"] == 2
    assert pooled["step_time_ratio"] == pytest.approx(0.66 / 0.6)
    assert pooled["cpu_time_ratio"] == pytest.approx(1.32 / 1.2)
    assert pooled["by_count"]["1"]["process_step_s"] == pytest.approx(1.15)  # median of 1.0, 1.1, 1.2, 5.0
    assert pooled["process_step_time_ratio"] == pytest.approx(1.3 / 1.15)
    assert pooled["by_count"]["12"]["tokens"] == 10 and pooled["by_count"]["12"]["loads"] == 1
    assert pooled["peak_rss_ratio"] == pytest.approx(320 / 310)
    assert pooled["peak_above_baseline_ratio"] == pytest.approx(220 / 210)


def test_the_prefetch_bench_prints_both_medians(tmp_path, capsys, one_thread):
    """The harness of `python -m pluribus.bench.prefetch` (a warm page cache here: no root needed), in seconds."""
    import re

    from pluribus.bench import prefetch

    prefetch.main(["--size", "1", "--teachers", "2", "--steps", "2", "--rounds", "1", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 full-weight teachers" in out and "warm page cache, 1 steps a side" in out
    off, on, ratio = (float(x) for x in re.search(r"([\d.]+) s synchronous, ([\d.]+) s reading ahead \(([\d.]+)x\)",
                                                   out).groups())
    # the ratio is of the unrounded medians: within what rounding each figure to 3 decimals (the ratio to 2) allows
    assert off > 0 and on > 0
    assert (on - 5e-4) / (off + 5e-4) - 5e-3 <= ratio <= (on + 5e-4) / (off - 5e-4) + 5e-3


def test_the_bench_help_gives_the_settings_defaults():
    """The CLI's help says how many processes and steps a side gets; it must not drift from `BenchSettings`."""
    import re

    from pluribus.bench import BenchSettings

    text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output)
    assert f"processes per side (default {BenchSettings.rounds})" in text
    assert f"timed steps per process (default {BenchSettings.steps})" in text
