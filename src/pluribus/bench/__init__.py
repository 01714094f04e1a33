"""`pluribus bench`: pluribus side by side with TRL on one tiny model, and the memory figures of OPD.

What runs (sizes in `BenchSettings`; both sides of a comparison get the same model, tokenizer, prompts,
batch, group size, lengths, steps and torch threads):
- GRPO step: `pluribus.stages.grpo` vs TRL `GRPOTrainer` (full weights, no KL term, one update per batch).
- OPD step, one teacher: `pluribus.stages.opd` vs TRL `DistillationTrainer` (on-policy, β = 1: reverse KL
  over the full vocabulary).
- Rollout tokens/s: `pluribus.rollout.sample` vs `model.generate` on the GRPO batch and on the OPD batch.
- OPD with 1, 4 and 12 teachers: step time (`workloads.opd_teachers_alternating`: the counts in turn in one
  process) and peak memory (`workloads.opd_teachers`: each count in processes of its own).
- The chunked exact KL's peak memory at |V| = 131,072 (`memory.chunked_kl_peak`).

`workloads` says what a timed step contains. TRL is optional (extra `bench`); without it the TRL columns are
empty and say why. Every measurement runs in a fresh process, the two sides of a comparison alternating;
`in_process=True` (the smoke test) runs them in this one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from pluribus.bench.settings import SMOKE, BenchSettings
from pluribus.errors import PluribusError

__all__ = ["SMOKE", "BenchSettings", "TARGETS", "run", "table_rows"]

TRL_MISSING = "trl is not installed (pip install 'pluribus[bench]'): the TRL columns are left empty"
TRL_LEFT_OUT = "TRL left out (with_trl=False, --no-trl): the TRL columns are left empty"
# (JSON path of a ratio, comparison, bound): the targets.
TARGETS = [("grpo.step_time_ratio", "<=", 0.5), ("opd.step_time_ratio", "<=", 0.5),
           ("rollout.grpo_batch.tokens_per_s_ratio", ">=", 2.0), ("rollout.opd_batch.tokens_per_s_ratio", ">=", 2.0),
           ("opd_teachers.step_time_ratio", "<=", 1.15), ("opd_teachers.peak_rss_ratio", "<=", 1.25)]


def trl_installed() -> bool:
    return find_spec("trl") is not None


def run(settings: BenchSettings = BenchSettings(), *, with_trl: bool | None = None, in_process: bool = False,
        echo: Callable[[str], None] = lambda line: None) -> dict:
    """Every measurement; returns the JSON-able results (medians, ratios, targets, machine)."""
    if with_trl is None:
        with_trl = trl_installed()
    elif with_trl and not trl_installed():
        raise PluribusError(TRL_MISSING)
    if settings.warmup < 1 or settings.steps < 1 or settings.rounds < 1:
        raise PluribusError("bench: warm-up, steps and rounds must each be at least 1")
    from pluribus.bench import workloads
    from pluribus.models import quiet_hf_progress

    quiet_hf_progress()  # the weight-loading bars of in-process runs
    with tempfile.TemporaryDirectory(prefix="pluribus-bench-") as tmp:
        root = Path(tmp)
        echo("building the models")
        model = workloads.build_models(root, settings)
        call = _in_process(root, settings) if in_process else _subprocess(root, settings)
        sides = ["pluribus", "trl"] if with_trl else ["pluribus"]
        runs: dict[str, dict[str, list[dict]]] = {task: {side: [] for side in sides} for task in ("grpo", "opd")}
        for r in range(settings.rounds):
            for task in ("grpo", "opd"):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    echo(f"round {r + 1}/{settings.rounds}: {task} step, {side}")
                    runs[task][side].append(call(f"{task}_{side}"))
        echo("rollout throughput")
        rollout = call("rollout")
        # Peak memory: each count in `rounds` processes of its own, the order reversed every round. Step time: the
        # counts stepped in turn in one process, so a slow stretch of a shared machine falls on every count alike.
        teachers: dict[int, list[dict]] = {count: [] for count in settings.teacher_counts}
        for r in range(settings.rounds):
            for count in (settings.teacher_counts if r % 2 == 0 else settings.teacher_counts[::-1]):
                echo(f"round {r + 1}/{settings.rounds}: OPD step with {count} teacher(s), peak memory")
                teachers[count].append(call("opd_teachers", count))
        echo("OPD step with " + ", ".join(map(str, settings.teacher_counts)) + " teachers in turn, step time")
        alternating = call("opd_teachers_alternating")
        echo("chunked KL peak memory")
        kl = call("chunked_kl")
    results = {"machine": machine(settings.threads), "settings": asdict(settings), "model": model,
               "grpo": _compare(runs["grpo"]), "opd": _compare(runs["opd"]), "rollout": _rollout(rollout),
               "opd_teachers": _teachers(teachers, alternating), "chunked_kl": kl,
               "notes": [] if with_trl else [TRL_LEFT_OUT if trl_installed() else TRL_MISSING]}
    results["targets"] = [_target(results, path, op, bound) for path, op, bound in TARGETS]
    return results


def machine(threads: int) -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            **{package: version(package) for package in ("torch", "transformers", "trl", "pluribus")}}


# --- running the measurements ------------------------------------------------------------------------------

def _in_process(root: Path, settings: BenchSettings):
    from pluribus.bench.workloads import TASKS

    def call(task: str, *arg: int) -> dict:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        try:
            return TASKS[task](root, settings, *arg)
        finally:
            torch.set_num_threads(threads)

    return call


def _subprocess(root: Path, settings: BenchSettings):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(settings.threads),
           "MKL_NUM_THREADS": str(settings.threads), "TOKENIZERS_PARALLELISM": "false"}

    def call(task: str, *arg: int) -> dict:
        command = [sys.executable, "-m", "pluribus.bench.worker", task, str(root), json.dumps(asdict(settings)),
                   *map(str, arg)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise PluribusError(f"bench: the {task} measurement failed: {last}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    return call


# --- results ---------------------------------------------------------------------------------------------

def _pooled(runs: list[dict]) -> dict:
    """Medians over every timed step of every process of one side."""
    from statistics import median

    wall = [t for r in runs for t in r["steps_s"]]
    cpu = [t for r in runs for t in r["cpu_steps_s"]]
    extra = {k: median(r[k] for r in runs) for k in ("sample_s", "teacher_s", "student_s", "response_tokens",
                                                      "step_gflop") if all(r.get(k) is not None for r in runs)}
    return {"step_s": median(wall), "cpu_s": median(cpu), "timed_steps": len(wall), "steps_s": wall,
            "cpu_steps_s": cpu, "threads": runs[0]["threads"], **extra}


def _compare(sides: dict[str, list[dict]]) -> dict:
    ours = _pooled(sides["pluribus"])
    theirs = _pooled(sides["trl"]) if sides.get("trl") else None
    both_counted = theirs is not None and "step_gflop" in ours and "step_gflop" in theirs
    return {"pluribus": ours, "trl": theirs,
            "step_time_ratio": ours["step_s"] / theirs["step_s"] if theirs else None,
            "cpu_time_ratio": ours["cpu_s"] / theirs["cpu_s"] if theirs else None,
            # the work of the first step (matmul FLOPs): the time ratio a side would get from doing less alone
            "work_ratio": ours["step_gflop"] / theirs["step_gflop"] if both_counted else None}


def _rollout(measured: dict) -> dict:
    out = {}
    for name in ("grpo_batch", "opd_batch"):
        m = measured[name]
        out[name] = {**m, "tokens_per_s_ratio": m["pluribus_tokens_per_s"] / m["generate_tokens_per_s"],
                     "cpu_tokens_per_s_ratio": m["pluribus_cpu_tokens_per_s"] / m["generate_cpu_tokens_per_s"]}
    return out


def _teachers(runs_by_count: dict[int, list[dict]], alternating: dict[str, dict]) -> dict:
    """Per teacher count: step times from the counts stepped in turn (`alternating`, medians over its timed steps),
    the highest peak memory of the count's own processes (their step times kept as `process_step_s`)."""
    by_count = {count: {**runs[0], "process_step_s": _pooled(runs)["step_s"], **_pooled([alternating[str(count)]]),
                        "processes": len(runs), "peak_mib": max(r["peak_mib"] for r in runs),
                        "above_baseline_mib": None if any(r["above_baseline_mib"] is None for r in runs)
                        else max(r["above_baseline_mib"] for r in runs)}
                for count, runs in runs_by_count.items()}
    fewest, most = by_count[min(by_count)], by_count[max(by_count)]
    above = [r["above_baseline_mib"] for r in (most, fewest)]
    return {"by_count": {str(k): v for k, v in by_count.items()}, "most": max(by_count), "fewest": min(by_count),
            "step_time_ratio": most["step_s"] / fewest["step_s"], "cpu_time_ratio": most["cpu_s"] / fewest["cpu_s"],
            "process_step_time_ratio": most["process_step_s"] / fewest["process_step_s"],
            "peak_rss_ratio": most["peak_mib"] / fewest["peak_mib"],
            "peak_above_baseline_ratio": above[0] / above[1] if None not in above and above[1] > 0 else None}


def _lookup(results: dict, path: str):
    value = results
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _target(results: dict, path: str, op: str, bound: float) -> dict:
    value = _lookup(results, path)
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"ratio": path, "value": value, "target": f"{op} {bound}", "met": met}


def table_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(measure, pluribus, reference, ratio, ratio of CPU times, target) rows for the printed table."""

    def seconds(side: dict | None) -> str:
        return "—" if side is None else f"{side['step_s']:.3f} s"

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    targets = {t["ratio"]: t for t in results["targets"]}

    def target(path: str) -> str:
        t = targets.get(path)
        if t is None:
            return ""
        return f"{t['target']}  " + {True: "met", False: "NOT met", None: "n/a"}[t["met"]]

    s = results["settings"]
    rows = []
    for task, what in (("grpo", f"GRPO step ({s['prompts']} prompts × {s['group']})"),
                       ("opd", f"OPD step, 1 teacher ({s['opd_batch']} prompts)")):
        r = results[task]
        rows.append((what, seconds(r["pluribus"]), "TRL " + seconds(r["trl"]), ratio(r["step_time_ratio"]),
                     ratio(r["cpu_time_ratio"]), target(f"{task}.step_time_ratio")))
        if r.get("work_ratio") is not None:
            rows.append(("  first step's work, matmul GFLOP", f"{r['pluribus']['step_gflop']:.2f}",
                         f"TRL {r['trl']['step_gflop']:.2f}", ratio(r["work_ratio"]), "", ""))
    for name, what in (("grpo_batch", "rollout tokens/s, GRPO batch"), ("opd_batch", "rollout tokens/s, OPD batch")):
        r = results["rollout"][name]
        rows.append((what, f"{r['pluribus_tokens_per_s']:.0f}", f"generate {r['generate_tokens_per_s']:.0f}",
                     ratio(r["tokens_per_s_ratio"]), ratio(r["cpu_tokens_per_s_ratio"]),
                     target(f"rollout.{name}.tokens_per_s_ratio")))
    t = results["opd_teachers"]
    most, fewest = t["by_count"][str(t["most"])], t["by_count"][str(t["fewest"])]
    rows.append((f"OPD step after rollout, {t['most']} vs {t['fewest']} teacher(s)", f"{most['step_s']:.3f} s",
                 f"{fewest['step_s']:.3f} s", ratio(t["step_time_ratio"]), ratio(t["cpu_time_ratio"]),
                 target("opd_teachers.step_time_ratio")))
    rows.append((f"OPD peak RSS, {t['most']} vs {t['fewest']} teacher(s)", f"{most['peak_mib']:.0f} MiB",
                 f"{fewest['peak_mib']:.0f} MiB", ratio(t["peak_rss_ratio"]), "", target("opd_teachers.peak_rss_ratio")))
    kl = results["chunked_kl"]
    rows.append((f"chunked KL peak, N={kl['positions']} |V|={kl['vocab']:,}", f"{kl['peak_above_inputs_gib']:.3f} GiB",
                 f"one [N, V] {kl['full_logits_gib']:.3f} GiB", ratio(kl["peak_to_full_logits_ratio"]), "", ""))
    return rows
