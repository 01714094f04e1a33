"""Headline report: the Markdown numbers (means, student/expert, bold, baselines that beat the student) and the PNG;
the run report (`pluribus report RUN_DIR`) on small synthetic run folders."""

import json
import random
import re
import statistics
import subprocess
import sys

import pytest
from matplotlib.image import imread

from pluribus.errors import PluribusError
from pluribus.report import (grpo_panels, headline, judge_panels, ratio_error, read_metrics, series, smooth,
                             started_from, teacher_panels, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# add: merge_ties beats both opd and the expert; sort: opd is the best non-expert but below 95% of the expert.
SCORES = {"base": {"add": 0.1, "sort": 0.2},
          "expert": {"add": 0.5, "sort": 0.4},
          "opd": {"add": 0.49, "sort": 0.3},
          "merge_ties": {"add": 0.6, "sort": 0.25}}


def table(text: str) -> dict[str, list[str]]:
    """Markdown table rows as first cell → the other cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows if row[0] != "---"}


def test_table_means_ratios_and_bold(tmp_path):
    md, _ = headline(SCORES, out_dir=tmp_path)
    rows = table(md.read_text())
    assert rows["domain"] == ["base", "expert", "opd", "merge_ties", "opd / expert"]
    assert rows["add"] == ["10.0", "50.0", "49.0", "**60.0**", "98.0%"]
    assert rows["sort"] == ["20.0", "40.0", "**30.0**", "25.0", "75.0%"]
    assert rows["mean"] == ["15.0", "45.0", "39.5", "**42.5**", "86.5%"]  # mean ratio: (98 + 75) / 2


def test_summary_names_the_worst_domain_and_the_baseline_that_wins(tmp_path):
    text = headline(SCORES, out_dir=tmp_path)[0].read_text()
    assert "opd / expert: min 75.0% (sort), mean 86.5%" in text
    assert "target ≥ 95% on every domain: not met on sort." in text
    assert "- merge_ties: add (+11.0)" in text
    assert "- base:" not in text  # base never beats opd
    assert "![headline](headline.png)" in text


def test_target_met_and_no_baseline_above(tmp_path):
    scores = {"expert": {"add": 0.8, "sort": 0.5}, "opd": {"add": 0.8, "sort": 0.49}, "sft": {"add": 0.3, "sort": 0.1}}
    text = headline(scores, out_dir=tmp_path)[0].read_text()
    assert "min 98.0% (sort), mean 99.0%" in text and "on every domain: met." in text
    assert "No model beats opd on any domain." in text
    assert table(text)["add"] == ["80.0", "**80.0**", "30.0", "100.0%"]


def test_a_student_started_from_a_baseline_says_so(tmp_path):
    default = headline(SCORES, out_dir=tmp_path / "a")[0].read_text()
    assert "starts from" not in default
    text = headline(SCORES, out_dir=tmp_path / "b", start="merge_ties")[0].read_text()
    assert "opd starts from merge_ties's model, not sft's: merge_ties is its starting point as well as a baseline." in text
    assert text.replace("opd starts from merge_ties's model, not sft's: merge_ties is its starting point as well as a "
                        "baseline.\n", "") == default  # the table and the rest as before


def test_ratio_error_is_the_binomial_spread_of_the_ratio():
    assert ratio_error(0.5, 0.5, 200) == pytest.approx(0.1)  # sqrt(0.00125/0.25 + 0.25·0.00125/0.0625)
    assert ratio_error(0.0, 0.5, 200) == 0.0 and ratio_error(1.0, 1.0, 200) == 0.0
    rng = random.Random(0)  # the spread of the ratio of two binomial pass rates, drawn
    for s, e, n in ((0.44, 0.51, 200), (0.77, 0.85, 200), (0.36, 0.405, 2000)):
        draws = [sum(rng.random() < s for _ in range(n)) / max(1, sum(rng.random() < e for _ in range(n)))
                 for _ in range(2000)]
        assert ratio_error(s, e, n) == pytest.approx(statistics.pstdev(draws), rel=0.08), (s, e, n)


def test_the_noise_line_names_the_domains_short_by_more_than_two_errors(tmp_path):
    scores = {"expert": {"add": 0.5, "sort": 0.5, "case": 0.9}, "opd": {"add": 0.45, "sort": 0.25, "case": 0.9}}
    assert "standard error" not in headline(scores, out_dir=tmp_path / "a")[0].read_text()  # without n: no line
    text = headline(scores, out_dir=tmp_path / "b", n=200)[0].read_text()
    # sort: 50.0% ± 7.1, short; add: 90.0% ± 9.5 is within two errors of 95%
    assert ("One standard error at n = 200 prompts a domain (binomial): sort 50.0% ± 7.1, the mean 80.0% ± 4.1; "
            "short of 95% by more than two standard errors: sort.") in text
    scores["opd"]["sort"] = 0.45
    assert "two standard errors: none." in headline(scores, out_dir=tmp_path / "c", n=200)[0].read_text()


def test_started_from_reads_the_stages_configs(tmp_path):
    def stage(name, **config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    stage("sft", out=str(tmp_path / "sft" / "model"))
    stage("offpolicy", model=str(tmp_path / "sft" / "model"), out=str(tmp_path / "offpolicy" / "model"))
    stage("opd", model=str(tmp_path / "sft" / "model"), out=str(tmp_path / "opd" / "model"))
    (tmp_path / "eval").mkdir()  # a stage folder without its config yet
    (tmp_path / "mixed_rl").mkdir()
    (tmp_path / "mixed_rl" / "config.json").write_text("[1, 2]")  # no dict: not the start
    assert started_from(tmp_path, "opd") == "sft"
    (tmp_path / "opd" / "config.json").write_text(json.dumps({"model": str(tmp_path / "offpolicy" / "model")}))
    assert started_from(tmp_path, "opd") == "offpolicy"
    assert started_from(tmp_path, "missing") == "sft"


def test_other_labels_an_expert_at_zero_and_a_missing_score(tmp_path):
    scores = {"student": {"add": 0.2, "sort": 0.0}, "teacher": {"add": 0.4, "sort": 0.0}, "partial": {"add": 0.1}}
    text = headline(scores, expert_label="teacher", student_label="student", out_dir=tmp_path)[0].read_text()
    assert table(text)["sort"] == ["**0.0**", "0.0", "-", "-"]
    assert table(text)["mean"] == ["**10.0**", "20.0", "-", "50.0%"]  # no mean over fewer domains
    assert "min 50.0% (add), mean 50.0%" in text
    assert "No ratio where the expert scores 0 or a score is missing: sort." in text


def test_png_is_written_atomically(tmp_path):
    md, png = headline(SCORES, out_dir=tmp_path / "out")
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["headline.md", "headline.png"]  # no .tmp left


@pytest.mark.parametrize("scores, problem", [
    ({"expert": {"add": 0.5}}, "no scores for 'opd'"),
    ({"expert": {"add": 0.5}, "opd": {"add": 49.0}}, r"fractions in \[0, 1\], got opd/add = 49.0"),
])
def test_bad_scores_are_refused(tmp_path, scores, problem):
    with pytest.raises(PluribusError, match=problem):
        headline(scores, out_dir=tmp_path)
    assert not (tmp_path / "headline.md").exists()


# ---- the run report (`pluribus report RUN_DIR`) on small synthetic runs -----------------------------------------

DOMAINS = ["add", "sort"]


def _write(path, obj=None, lines=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n" if lines is not None else json.dumps(obj))


def _stage(run, name, done=True):
    _write(run / name / "config.json", {"stage": name})
    if done:
        (run / name / "DONE").write_text("key")


def _grpo_rows(steps, reward0, **extra):
    return [{"step": s, "reward_mean": reward0 + 0.01 * s, "kl": 0.002 * s, "loss": 0.1, **extra} for s in range(steps)]


def make_run(root, *, through="compare"):
    """A run folder as the pipeline leaves it, written by hand: scores and metrics of the stages up to `through`."""
    run = root / "toy"
    order = ["sft", "eval", "experts", "opd", "mixed_rl", "compare"]
    for name in order[:order.index(through) + 1]:
        _stage(run, name)
    _write(run / "sft" / "model.metrics.jsonl", lines=[{"step": s, "loss": 1.0 / (s + 1)} for s in range(0, 50, 10)])
    _write(run / "eval" / "scores.json", {label: [{"domain": d, "pass1_greedy": v} for d, v in zip(DOMAINS, vals)]
                                          for label, vals in (("base", (0.1, 0.2)), ("sft", (0.3, 0.4)))})
    if through == "eval":
        return run
    for d in DOMAINS:
        _write(run / "experts" / d / "sft.metrics.jsonl", lines=[{"step": s, "loss": 2.0 - s / 10} for s in range(10)])
        _write(run / "experts" / d / "expert.metrics.jsonl", lines=_grpo_rows(30, 0.2))
    _write(run / "experts" / "report.json", {
        "n": 5, "base": {"add": 0.1, "sort": 0.2}, "general": {"add": 0.3, "sort": 0.4},
        "experts": {"add": {"sft": {"add": 0.45, "sort": 0.3}, "final": {"add": 0.5, "sort": 0.3}, "rl": True},
                    "sort": {"sft": {"add": 0.2, "sort": 0.35}, "final": {"add": 0.2, "sort": 0.4}, "rl": True}}})
    if through == "experts":
        return run
    _write(run / "opd" / "model.metrics.jsonl", lines=[
        {"step": s, "loss": 3.0 - 0.05 * s, "kl": 1.0 - 0.01 * s, "kl_add": 1.2 - 0.01 * s, "kl_sort": 0.8,
         "reward_add": 0.1, "reward_sort": 0.3 + 0.001 * s} for s in range(40)])
    _write(run / "mixed_rl" / "model.metrics.jsonl", lines=_grpo_rows(25, 0.3, judge_acc=0.6))
    _write(run / "compare" / "scores.json", {"base": {"add": 0.1, "sort": 0.2}, "sft": {"add": 0.3, "sort": 0.4},
                                             "expert": {"add": 0.5, "sort": 0.4}, "opd": {"add": 0.45, "sort": 0.4},
                                             "mixed_rl": {"add": 0.35, "sort": 0.45}})
    return run


def section(text: str, title: str) -> str:
    """The Markdown from the `## title` heading to the next `## ` heading."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_full_run_report_has_the_headline_of_every_domain_and_readable_figures(tmp_path):
    run = make_run(tmp_path)
    text = write_report(run).read_text()
    head = table(section(text, "Headline"))
    assert head["domain"] == ["base", "sft", "expert", "opd", "mixed_rl", "opd / expert"]
    assert head["add"] == ["10.0", "30.0", "50.0", "**45.0**", "35.0", "90.0%"]
    assert head["sort"] == ["20.0", "40.0", "40.0", "40.0", "**45.0**", "100.0%"]
    assert "opd / expert: min 90.0% (add), mean 95.0%" in text and "- mixed_rl: sort (+5.0)" in text
    experts = table(section(text, "Experts"))
    assert experts["domain"] == ["base", "general sft", "expert after sft", "expert after rl"]
    assert experts["add"] == ["10.0", "30.0", "45.0", "50.0"] and experts["sort"] == ["20.0", "40.0", "35.0", "40.0"]

    figures = re.findall(r"!\[[^]]*\]\((report/[^)]+)\)", text)
    assert sorted(figures) == sorted(f"report/{name}.png" for name in (
        "headline", "experts", "grpo_experts", "grpo_mixed_rl", "opd", "opd_teachers", "judge", "losses"))
    for figure in figures:
        pixels = imread(run / figure)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500, figure
        assert pixels[..., :3].std() > 0.05, figure  # drawn on, not a blank canvas
    after_stages = text[text.index("## Headline"):]
    assert "not run yet" not in after_stages.lower() and "could not be written" not in text
    assert "| compare | done |" in text and "| pretrain | not run yet |" in text


def test_partial_run_states_what_is_missing(tmp_path):
    run = make_run(tmp_path, through="eval")
    _stage(run, "experts", done=False)  # experts started, nothing written yet
    text = write_report(run).read_text()
    assert "| eval | done |" in text and "| experts | started, not finished |" in text
    assert "| opd | not run yet |" in text and "| merge_<method> | not run yet |" in text
    assert "Not run yet: the compare stage writes it" in section(text, "Headline")
    assert table(section(text, "Headline"))["add"] == ["10.0", "30.0"]  # the scores so far: base and sft
    assert "experts/report.json is written once every expert is done" in section(text, "Experts")
    curves = section(text, "Training curves")
    for heading in ("GRPO of each expert", "Mixed RL baseline", "OPD: the merge", "Generative judge"):
        assert re.search(f"### {heading}[^\n]*\n\nNot run yet", curves), heading
    assert (run / "report" / "scores_so_far.png").stat().st_size > 5_000 and (run / "report" / "losses.png").is_file()


def test_experts_done_but_no_compare_yet(tmp_path):
    run = make_run(tmp_path, through="experts")
    text = write_report(run).read_text()
    assert table(section(text, "Headline"))["domain"] == ["base", "sft", "expert"]
    assert table(section(text, "Headline"))["sort"] == ["20.0", "40.0", "40.0"]
    assert "![Experts: GRPO on their own domain](report/grpo_experts.png)" in text
    assert "KL is 0 at every step" not in text  # the synthetic KL grows


def test_opd_figure_has_one_line_per_teacher(tmp_path):
    records = read_metrics(make_run(tmp_path) / "opd" / "model.metrics.jsonl")
    kl, reward = teacher_panels(records)
    assert list(kl.lines) == ["add", "sort"] and list(reward.lines) == ["add", "sort"]
    steps, values = kl.lines["add"]
    assert steps[:2] == [0.0, 1.0] and values[:2] == [1.2, 1.19] and len(values) == 40


def test_grpo_figure_shows_the_rows_without_an_advantage_where_they_are_logged():
    runs = {"add": _grpo_rows(3, 0.2, zero_adv_frac=0.5), "old": _grpo_rows(3, 0.4)}  # "old": before the metric
    reward, kl, zero = grpo_panels(runs)
    assert reward.lines["add"][1] == pytest.approx([0.2, 0.21, 0.22])
    assert zero.lines["add"] == ([0.0, 1.0, 2.0], [0.5, 0.5, 0.5]) and zero.lines["old"] == ([], [])


def test_judge_keys_are_found_in_any_metrics_file(tmp_path):
    run = make_run(tmp_path)
    (panel,) = judge_panels(run)
    assert panel.title == "judge_acc"
    assert {name: xy[1][:2] for name, xy in panel.lines.items() if xy[1]} == {"mixed_rl/model": [0.6, 0.6]}


def test_metrics_keep_the_latest_attempt_and_skip_a_torn_line(tmp_path):
    path = tmp_path / "m.metrics.jsonl"
    rows = [{"step": s, "kl": float(s)} for s in range(5)] + [{"step": 3, "kl": 30.0}, {"step": 4, "kl": 40.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 5, "kl"')
    assert series(read_metrics(path), "kl") == ([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 30.0, 40.0])
    path.write_text('{"step": 0, "kl": NaN}\n{"step": 1, "kl": 0.5, "x": true}\n')
    assert series(read_metrics(path), "kl") == ([1.0], [0.5])  # NaN is no point on a curve


def test_smooth_is_a_trailing_mean():
    assert smooth([0.0, 3.0, 6.0, 9.0], 2) == [0.0, 1.5, 4.5, 7.5]
    assert smooth([2.0] * 7, 3) == [2.0] * 7
    assert smooth([1.0, 5.0], 1) == [1.0, 5.0]


def _report_cli(*args):
    return subprocess.run([sys.executable, "-m", "pluribus.cli", "report", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_the_report_and_refuses_a_folder_that_is_not_a_run(tmp_path):
    run = make_run(tmp_path, through="eval")
    result = _report_cli(run)
    assert result.returncode == 0 and (run / "report.md").is_file(), result.stderr
    (tmp_path / "other" / "eval").mkdir(parents=True)  # a folder named like a stage, but no stage wrote it
    for folder in (tmp_path / "other", tmp_path / "nowhere"):
        result = _report_cli(folder)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"error: {folder}: ")
