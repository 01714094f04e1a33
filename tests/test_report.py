"""Headline report: the Markdown numbers (means, student/expert, bold, baselines that beat the student) and the PNG."""

import pytest

from pluribus.errors import PluribusError
from pluribus.report import headline

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
