"""The headline comparison: every model on every domain, and the merged student against its experts.

`headline` takes greedy pass@1 per (model, domain) and writes a Markdown table and a grouped bar
chart. The target (DESIGN.md §1) is a student that keeps at least 95% of the expert's score on
every domain, so the table carries student/expert per domain with its min and mean, and names any
baseline (a label other than the student and the expert) that beats the student somewhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pluribus.errors import ConfigError, PluribusError

TARGET_RATIO = 0.95


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _rows(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per row (each domain in order of first appearance, then `mean`): label → score or None.

    A label missing a domain has no mean: a mean over fewer domains would not compare."""
    domains = list(dict.fromkeys(d for per_domain in scores.values() for d in per_domain))
    rows = {d: {label: per_domain.get(d) for label, per_domain in scores.items()} for d in domains}
    rows["mean"] = {label: _mean(list(per_domain.values())) if len(per_domain) == len(domains) else None
                    for label, per_domain in scores.items()}
    return rows


def _student_vs_expert(rows, expert: str, student: str) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(student/expert per domain where the expert scores above 0,
    baseline → the domains where it beats the student, with its lead in points)."""
    ratios: dict[str, float] = {}
    beaten: dict[str, list[str]] = {}
    for domain, by_label in rows.items():
        s, e = by_label[student], by_label[expert]
        if domain == "mean" or s is None:
            continue
        if e:
            ratios[domain] = s / e
        for label, v in by_label.items():
            if label not in (student, expert) and v is not None and v > s:
                beaten.setdefault(label, []).append(f"{domain} (+{100 * (v - s):.1f})")
    return ratios, beaten


def ratio_error(student: float, expert: float, n: int) -> float:
    """One standard error of student / expert, each a pass rate over n independent prompts (binomial variances,
    first-order propagation: Var(s)/e² + s²·Var(e)/e⁴); the expert above 0."""
    def var(p: float) -> float:
        return p * (1 - p) / n
    return math.sqrt(var(student) / expert**2 + student**2 * var(expert) / expert**4)


def _noise_line(rows, ratios: dict[str, float], expert: str, student: str, n: int) -> str:
    """How far the ratios can be trusted at n prompts a domain, and which domains are short of the target by more
    than the noise."""
    errors = {d: ratio_error(rows[d][student], rows[d][expert], n) for d in ratios}
    worst = min(ratios, key=ratios.get)
    mean_error = math.sqrt(sum(e * e for e in errors.values())) / len(errors)
    short = [d for d, r in ratios.items() if r + 2 * errors[d] < TARGET_RATIO]
    return (f"One standard error at n = {n} prompts a domain (binomial): {worst} {_pct(ratios[worst])}% ± "
            f"{_pct(errors[worst])}, the mean {_pct(_mean(list(ratios.values())))}% ± {_pct(mean_error)}; short of "
            f"{100 * TARGET_RATIO:.0f}% by more than two standard errors: {', '.join(short) or 'none'}.")


def _markdown(scores: dict[str, dict[str, float]], expert: str, student: str, png_name: str, start: str,
              n: int | None) -> str:
    rows = _rows(scores)
    ratios, beaten = _student_vs_expert(rows, expert, student)
    mean_ratio = _mean(list(ratios.values()))
    ratio_col = f"{student} / {expert}"
    lines = ["# Headline: greedy pass@1 (%) per domain", "",
             "| domain | " + " | ".join(scores) + f" | {ratio_col} |",
             "| --- |" + " ---: |" * (len(scores) + 1)]
    for row, by_label in rows.items():
        best = max((v for label, v in by_label.items() if label != expert and v is not None), default=None)
        cells = [f"**{_pct(v)}**" if label != expert and v is not None and v == best else _pct(v)
                 for label, v in by_label.items()]
        ratio = mean_ratio if row == "mean" else ratios.get(row)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'-' if ratio is None else _pct(ratio) + '%'} |")
    lines.append("")
    if ratios:
        worst = min(ratios, key=ratios.get)
        below = [d for d, r in ratios.items() if r < TARGET_RATIO]
        verdict = f"not met on {', '.join(below)}" if below else "met"
        lines.append(f"{ratio_col}: min {_pct(ratios[worst])}% ({worst}), mean {_pct(mean_ratio)}% "
                     f"(of the per-domain ratios); target ≥ {100 * TARGET_RATIO:.0f}% on every domain: {verdict}.")
        if n:
            lines.append(_noise_line(rows, ratios, expert, student, n))
    skipped = [d for d in rows if d != "mean" and d not in ratios]
    if skipped:
        lines.append(f"No ratio where the expert scores 0 or a score is missing: {', '.join(skipped)}.")
    if start != "sft":
        lines.append(f"{student} starts from {start}'s model, not sft's: {start} is its starting point as well as a "
                     "baseline.")
    lines.append(f"Bold: the best model other than {expert} on each row.")
    if beaten:
        lines += ["", f"Models that beat {student} (points ahead; base and sft are its starting points, not baselines):"]
        lines += [f"- {label}: {', '.join(where)}" for label, where in beaten.items()]
    else:
        lines.append(f"No model beats {student} on any domain.")
    lines += ["", f"![headline]({png_name})", ""]
    return "\n".join(lines)


def _bar_chart(scores: dict[str, dict[str, float]], path: Path, title: str = "Greedy pass@1 per domain") -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    rows = _rows(scores)
    labels = list(scores)
    width = 0.8 / len(labels)
    colors = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    fig = Figure(figsize=(max(6.0, 0.12 * len(rows) * len(labels) + 2.5), 4), dpi=100)
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i, row in enumerate(rows) if rows[row][label] is not None]
        ys = [100 * v[label] for v in rows.values() if v[label] is not None]
        ax.bar(xs, ys, width, label=label, color=colors(j))
    ax.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right")
    ax.set_ylabel("greedy pass@1 (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")


def headline(scores: dict[str, dict[str, float]], expert_label: str = "expert", student_label: str = "opd", *,
             out_dir: str | Path, start: str = "sft", n: int | None = None) -> tuple[Path, Path]:
    """Write out_dir/headline.md and out_dir/headline.png; return their paths.

    scores: model label → {domain: greedy pass@1 in [0, 1]}; columns and bars keep the order of the
    labels, rows the order in which domains first appear. The expert column is the per-domain expert
    (each domain scored by its own expert); the student is the merged model under test, trained from the
    model labelled `start` (said under the table when it is not the general SFT model, `started_from`).
    n: the test prompts a domain; given, the summary adds the ratios' standard errors and the domains short of the
    target by more than two of them (200 prompts: ±3.5 points on a score near 50%).
    """
    for label in (expert_label, student_label):
        if label not in scores:
            raise PluribusError(f"report: no scores for '{label}' (labels: {', '.join(scores)})")
    bad = [(label, d, v) for label, per_domain in scores.items() for d, v in per_domain.items() if not 0 <= v <= 1]
    if bad:
        raise PluribusError(f"report: scores must be fractions in [0, 1], got {bad[0][0]}/{bad[0][1]} = {bad[0][2]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "headline.md", out_dir / "headline.png"
    text = _markdown(scores, expert_label, student_label, png.name, start, n)
    _write_atomic(md, lambda tmp: tmp.write_text(text))
    _write_atomic(png, lambda tmp: _bar_chart(scores, tmp))
    return md, png


def student_label(scores: dict[str, dict[str, float]]) -> str:
    """The merged model under test: `opd` where the run has it, else the last label compared."""
    return "opd" if "opd" in scores else list(scores)[-1]


def started_from(run_dir: Path, student: str) -> str:
    """The stage of `run_dir` whose model the student's stage started from (`offpolicy` under `opd_start:
    offpolicy`), read from the stages' configs; `sft` where no other stage's output is its model."""
    model = (_read_json(run_dir / student / "config.json") or {}).get("model")
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name not in (student, "sft")):
        try:
            if model and (_read_json(folder / "config.json") or {}).get("out") == model:
                return folder.name
        except (ValueError, AttributeError):  # a half-written or foreign config.json: not the start
            continue
    return "sft"


# ---- The run report: `pluribus report RUN_DIR` ------------------------------------------------------------------
#
# Everything is read from what the stages left in the run folder (scores, metrics JSONL), so the report can be
# (re)written at any time, during a run or after it; a stage that has not written its files yet is said so.

SMOOTH_POINTS = 40  # a curve is smoothed over about len/SMOOTH_POINTS steps: light, the trend stays honest
CAN_FAIL = (OSError, ValueError, KeyError, TypeError, IndexError, PluribusError)  # what a half-written run can raise


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL from the latest attempt of its stage.

    A stage that is rerun or resumed appends to the same file, so a step at or below an earlier one
    starts over from there; a line that does not parse (the last, torn while it was written) is skipped."""
    records: list[dict] = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if isinstance(step, (int, float)):
            records = [r for r in records if not r.get("step", -1) >= step]
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` where a record has it as a finite number; a record with no step counts by its index."""
    points = [(float(r.get("step", i)), float(r[key])) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [x for x, _ in points], [y for _, y in points]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): no look-ahead, no lag at step 0."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class Panel:
    """One axes of a figure: a line per label, each (steps, values)."""

    title: str
    ylabel: str
    lines: dict[str, tuple[list[float], list[float]]]


def _line_figure(panels: list[Panel], title: str, path: Path) -> None:
    """A row of panels, one colour per label across them; one legend for all at the right when the panels
    show the same labels or a panel has too many lines to leave room for a legend inside."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(label for p in panels for label in p.lines))
    colors = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    color = {label: colors(i) for i, label in enumerate(labels)}
    shared = len(labels) > 1 and (all(set(p.lines) == set(labels) for p in panels)
                                  or max(len(p.lines) for p in panels) > 3)
    fig = Figure(figsize=(5.0 * len(panels) + (1.6 if shared else 0), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, (steps, values) in panel.lines.items():
            window = max(1, round(len(values) / SMOOTH_POINTS))
            if len(panel.lines) <= 3 and window > 1:  # few lines: the raw values stay visible, faintly
                ax.plot(steps, values, color=color[label], alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=color[label], label=label, linewidth=1.5)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if not shared:
            ax.legend(fontsize="small", ncol=2 if len(panel.lines) > 6 else 1)
    if shared:
        handles = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - (1.6 / fig.get_figwidth() if shared else 0), 1))
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _figure_lines(panels: list[Panel], title: str, fig_dir: Path, name: str, caption: str) -> list[str]:
    """Draw the panels that have data into fig_dir/name; return the Markdown that shows them."""
    panels = [Panel(p.title, p.ylabel, lines) for p in panels  # a label with nothing logged is no line, no legend
              if (lines := {label: xy for label, xy in p.lines.items() if xy[1]})]
    if not panels:
        return [f"{caption}: nothing logged yet.", ""]
    _line_figure(panels, title, fig_dir / name)
    return [f"![{title}]({fig_dir.name}/{name})", ""]


def _score_table(scores: dict[str, dict[str, float]], title: str) -> list[str]:
    """A plain per-domain table (in %) with a mean row, for scores that are not the headline."""
    rows = _rows(scores)
    return [title, "", "| domain | " + " | ".join(scores) + " |", "| --- |" + " ---: |" * len(scores),
            *(f"| {row} | " + " | ".join(_pct(v) for v in by_label.values()) + " |" for row, by_label in rows.items()),
            ""]


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def stage_status(run_dir: Path) -> dict[str, str]:
    """Stage folder name → done, started (its config.json but no DONE yet), not run yet, or skipped (pretrain
    under base_model). Every stage writes its config.json first: a folder without one is no stage."""
    from pluribus.pipeline import STAGES

    merges = sorted(p.name for p in run_dir.glob("merge_*") if p.is_dir()) or ["merge_<method>"]
    names = [m for s in STAGES for m in (merges if s == "merge_<method>" else [s])]
    status = {}
    for name in names:
        folder = run_dir / name
        status[name] = ("done" if (folder / "DONE").is_file()
                        else "started, not finished" if (folder / "config.json").is_file() else "not run yet")
    try:
        base = (_read_json(run_dir / "sft" / "config.json") or {}).get("model")
    except (ValueError, AttributeError):  # half-written: the status of pretrain stays unknown
        base = None
    if status["pretrain"] == "not run yet" and base and not str(base).startswith(str(run_dir / "pretrain")):
        status["pretrain"] = f"skipped: base_model {base}"
    return status


def _headline_section(run_dir: Path, fig_dir: Path) -> list[str]:
    scores = _read_json(run_dir / "compare" / "scores.json")
    if scores is not None:
        student = student_label(scores)
        n = (_read_json(run_dir / "compare" / "config.json") or {}).get("n")
        md, _ = headline(scores, "expert", student, out_dir=fig_dir, start=started_from(run_dir, student), n=n)
        text = md.read_text().replace("](headline.png)", f"]({fig_dir.name}/headline.png)")
        return ["#" + text, ""]  # its title becomes a section of this report
    lines = ["## Headline", "", "Not run yet: the compare stage writes it once OPD and the baselines are done.", ""]
    so_far: dict[str, dict[str, float]] = {}
    evaluated = _read_json(run_dir / "eval" / "scores.json") or {}
    for label, per_domain in evaluated.items():
        so_far[label] = {s["domain"]: s["pass1_greedy"] for s in per_domain}
    experts = _read_json(run_dir / "experts" / "report.json")
    if experts:
        so_far["expert"] = {d: e["final"][d] for d, e in experts["experts"].items()}
    if so_far:
        title = "Greedy pass@1 of the models scored so far"
        _write_atomic(fig_dir / "scores_so_far.png", lambda tmp: _bar_chart(so_far, tmp, title))
        lines += _score_table(so_far, f"{title} (%):")
        lines += [f"![scores so far]({fig_dir.name}/scores_so_far.png)", ""]
    return lines


def _experts_section(run_dir: Path, fig_dir: Path) -> list[str]:
    lines = ["## Experts: what SFT and RL add on each expert's own domain", ""]
    report = _read_json(run_dir / "experts" / "report.json")
    if report is None:
        started = (run_dir / "experts" / "config.json").is_file()
        return lines + [("Training: experts/report.json is written once every expert is done." if started
                         else "Not run yet."), ""]
    experts = report["experts"]  # domain -> {sft: its own domain, final: every domain}: keep each expert's own domain
    scores = {label: {d: report[key][d] for d in experts}
              for label, key in (("base", "base"), ("general sft", "general")) if report.get(key)}
    scores["expert after sft"] = {d: e["sft"][d] for d, e in experts.items()}
    scores["expert after rl"] = {d: e["final"][d] for d, e in experts.items()}
    _write_atomic(fig_dir / "experts.png", lambda tmp: _bar_chart(scores, tmp, "Each expert on its own domain"))
    no_rl = [d for d, e in experts.items() if not e.get("rl", True)]
    lines += _score_table(scores, f"Greedy pass@1 (%) on {report['n']} test prompts of the expert's domain:")
    if no_rl:
        lines += [f"No RL (a rubric domain without a judge: its SFT checkpoint is the expert): {', '.join(no_rl)}.", ""]
    return lines + [f"![experts]({fig_dir.name}/experts.png)", ""]


def grpo_panels(runs: dict[str, list[dict]]) -> list[Panel]:
    """GRPO runs (label → metrics records): reward, KL, and the share of rows without an advantage (a group whose
    rewards are all equal teaches nothing: high on both ends of learning, and where the reward says too little)."""
    return [Panel("reward (mean over rollouts)", "reward", {k: series(r, "reward_mean") for k, r in runs.items()}),
            Panel("KL to the reference", "KL", {k: series(r, "kl") for k, r in runs.items()}),
            Panel("rows without an advantage (no gradient)", "share",
                  {k: series(r, "zero_adv_frac") for k, r in runs.items()})]


def _zero_kl_note(runs: dict[str, list[dict]]) -> list[str]:
    values = [v for records in runs.values() for v in series(records, "kl")[1]]
    if values and not any(values):
        return ["KL is 0 at every step: with `kl_coef: 0` the loss has no reference model to measure it against.", ""]
    return []


def teacher_panels(opd_records: list[dict]) -> list[Panel]:
    """OPD per teacher: its KL (keys kl_<teacher>) and the checker reward per domain (reward_<domain>)."""
    keys = list(dict.fromkeys(k for r in opd_records for k in r))
    return [Panel("KL per teacher", "KL", {k[3:]: series(opd_records, k) for k in keys if k.startswith("kl_")}),
            Panel("reward per domain", "reward",
                  {k[7:]: series(opd_records, k) for k in keys if k.startswith("reward_")})]


def judge_panels(run_dir: Path) -> list[Panel]:
    """One panel per judge key (a key with `judge` in its name, such as judge_acc), a line per metrics file."""
    judged = {}
    for path in sorted(run_dir.rglob("*.metrics.jsonl")):
        records = read_metrics(path)
        if any("judge" in k for r in records for k in r):
            judged[str(path.relative_to(run_dir)).removesuffix(".metrics.jsonl")] = records
    keys = list(dict.fromkeys(k for records in judged.values() for r in records for k in r if "judge" in k))
    return [Panel(key, key, {name: series(records, key) for name, records in judged.items()}) for key in keys]


def _curves_section(run_dir: Path, fig_dir: Path) -> list[str]:
    lines = ["## Training curves", "", f"Smoothed by a trailing mean over about 1/{SMOOTH_POINTS} of each run.", ""]

    expert_runs = {p.parent.name: read_metrics(p) for p in sorted((run_dir / "experts").glob("*/expert.metrics.jsonl"))}
    lines += ["### GRPO of each expert", ""]
    if expert_runs:
        lines += _figure_lines(grpo_panels(expert_runs), "Experts: GRPO on their own domain", fig_dir,
                               "grpo_experts.png", "GRPO of each expert") + _zero_kl_note(expert_runs)
        sft_only = sorted(p.parent.name for p in (run_dir / "experts").glob("*/sft.metrics.jsonl")
                          if p.parent.name not in expert_runs)
        if sft_only:
            lines += [f"No GRPO metrics (yet) for: {', '.join(sft_only)}.", ""]
    else:
        lines += ["Not run yet.", ""]

    mixed = run_dir / "mixed_rl" / "model.metrics.jsonl"
    lines += ["### Mixed RL baseline (one GRPO run on every domain)", ""]
    if mixed.is_file():
        runs = {"mixed_rl": read_metrics(mixed)}
        lines += _figure_lines(grpo_panels(runs), "Mixed RL: GRPO on every domain", fig_dir, "grpo_mixed_rl.png",
                               "Mixed RL") + _zero_kl_note(runs)
    else:
        lines += ["Not run yet.", ""]

    opd_path = run_dir / "opd" / "model.metrics.jsonl"
    lines += ["### OPD: the merge by on-policy distillation", ""]
    if opd_path.is_file():
        records = read_metrics(opd_path)
        lines += _figure_lines([Panel("loss: Σ_i w_i · KL_i", "loss", {"opd": series(records, "loss")}),
                                Panel("reverse KL to the teachers (token mean)", "KL", {"opd": series(records, "kl")})],
                               "OPD", fig_dir, "opd.png", "OPD")
        lines += ["Per teacher: the KL of the student to each teacher on that teacher's samples, and the checker "
                  "reward of those samples (watched only, not trained on).", ""]
        lines += _figure_lines(teacher_panels(records), "OPD per teacher", fig_dir, "opd_teachers.png",
                               "Per-teacher KL")
    else:
        lines += ["Not run yet.", ""]

    lines += ["### Generative judge", ""]
    judged = judge_panels(run_dir)
    if judged:
        lines += _figure_lines(judged, "Generative judge", fig_dir, "judge.png", "Judge")
    else:
        lines += ["Not run yet: no metrics file of this run logs judge keys (such as `judge_acc`).", ""]

    lines += ["### Supervised losses", ""]
    expert_sft = {p.parent.name: p for p in sorted((run_dir / "experts").glob("*/sft.metrics.jsonl"))}
    loss_panels = [Panel(title, "loss", {label: series(read_metrics(p), "loss") for label, p in paths.items()
                                         if p.is_file()})
                   for title, paths in (
                       ("pretrain", {"pretrain": run_dir / "pretrain" / "model.metrics.jsonl"}),
                       ("general SFT", {"sft": run_dir / "sft" / "model.metrics.jsonl"}),
                       ("experts' SFT", expert_sft),
                       ("off-policy distillation (SFT)", {"offpolicy": run_dir / "offpolicy" / "model.metrics.jsonl"}))]
    return lines + _figure_lines(loss_panels, "Supervised losses", fig_dir, "losses.png", "Supervised losses")


def write_report(run_dir: str | Path) -> Path:
    """(Re)write run_dir/report.md and its figures in run_dir/report/ from what the run's stages left.

    Works on a partial run: a section whose stage has not run yet says so. A folder with no stage
    folder in it is not a run: a ConfigError (exit code 2)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run folder not found")
    status = stage_status(run_dir)
    if all(s == "not run yet" for s in status.values()):
        raise ConfigError(f"{run_dir}: not a run folder (no stage folder such as sft/ with a config.json in it)")
    fig_dir = run_dir / "report"
    fig_dir.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir.name}", "",
             f"Written from the files in `{run_dir}`; `pluribus report {run_dir}` writes it again.", "",
             "## Stages", "", "| stage | status |", "| --- | --- |",
             *(f"| {name} | {s} |" for name, s in status.items()), ""]
    for section in (_headline_section, _experts_section, _curves_section):
        try:
            lines += section(run_dir, fig_dir)
        except CAN_FAIL as e:  # a file half-written or of another version: say so, keep the other sections
            lines += [f"*{section.__name__.strip('_').replace('_', ' ')} could not be written: "
                      f"{type(e).__name__}: {e}*", ""]
    path = run_dir / "report.md"
    text = "\n".join(lines)
    _write_atomic(path, lambda tmp: tmp.write_text(text))
    return path
