"""The headline comparison: every model on every domain, and the merged student against its experts.

`headline` takes greedy pass@1 per (model, domain) and writes a Markdown table and a grouped bar
chart. The target (DESIGN.md §1) is a student that keeps at least 95% of the expert's score on
every domain, so the table carries student/expert per domain with its min and mean, and names any
baseline (a label other than the student and the expert) that beats the student somewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from pluribus.errors import PluribusError

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


def _markdown(scores: dict[str, dict[str, float]], expert: str, student: str, png_name: str) -> str:
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
    skipped = [d for d in rows if d != "mean" and d not in ratios]
    if skipped:
        lines.append(f"No ratio where the expert scores 0 or a score is missing: {', '.join(skipped)}.")
    lines.append(f"Bold: the best model other than {expert} on each row.")
    if beaten:
        lines += ["", f"Models that beat {student} (points ahead; base and sft are its starting points, not baselines):"]
        lines += [f"- {label}: {', '.join(where)}" for label, where in beaten.items()]
    else:
        lines.append(f"No model beats {student} on any domain.")
    lines += ["", f"![headline]({png_name})", ""]
    return "\n".join(lines)


def _bar_chart(scores: dict[str, dict[str, float]], path: Path) -> None:
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
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")


def headline(scores: dict[str, dict[str, float]], expert_label: str = "expert", student_label: str = "opd", *,
             out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/headline.md and out_dir/headline.png; return their paths.

    scores: model label → {domain: greedy pass@1 in [0, 1]}; columns and bars keep the order of the
    labels, rows the order in which domains first appear. The expert column is the per-domain expert
    (each domain scored by its own expert); the student is the merged model under test.
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
    text = _markdown(scores, expert_label, student_label, png.name)
    _write_atomic(md, lambda tmp: tmp.write_text(text))
    _write_atomic(png, lambda tmp: _bar_chart(scores, tmp))
    return md, png
