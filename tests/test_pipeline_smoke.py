"""The pipeline end to end on the smoke config: stages run, DONE markers, skip on rerun, eval table."""

import json
import shutil
from pathlib import Path

import pytest

from pluribus.pipeline import load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    config = work / "quickstart.yaml"
    shutil.copy(ROOT / "examples" / "quickstart.yaml", config)
    text = config.read_text().replace("out_dir: runs", f"out_dir: {work / 'runs'}")
    config.write_text(text)
    return config, run_pipeline(config, smoke=True)


def test_smoke_run_completes_every_stage(smoke_run):
    _, run_dir = smoke_run
    for stage in ("pretrain", "sft", "eval", "experts", "opd", "mixed_rl", "merge_linear", "merge_ties", "offpolicy",
                  "compare"):
        assert (run_dir / stage / "DONE").is_file(), stage
        assert json.loads((run_dir / stage / "config.json").read_text())
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert set(scores) == {"base", "sft"}
    assert [s["domain"] for s in scores["sft"]] == ["reverse", "max", "case"]
    assert all(0.0 <= s["pass1_greedy"] <= 1.0 and s["n"] == 10 for s in scores["sft"])
    compared = json.loads((run_dir / "compare" / "scores.json").read_text())
    assert list(compared) == ["base", "sft", "expert", "opd", "mixed_rl", "merge_linear", "merge_ties", "offpolicy"]
    assert all(set(v) == {"reverse", "max", "case"} and all(0.0 <= x <= 1.0 for x in v.values())
               for v in compared.values())
    assert compared["sft"] == {s["domain"]: s["pass1_greedy"] for s in scores["sft"]}  # same prompts, same greedy
    headline = (run_dir / "compare" / "headline.md").read_text()
    assert "| reverse |" in headline and (run_dir / "compare" / "headline.png").stat().st_size > 1000


def test_students_scores_are_kept_in_their_stage_folders_and_the_comparison_reads_them(smoke_run):
    from pluribus.pipeline import _student_scores

    _, run_dir = smoke_run
    compared = json.loads((run_dir / "compare" / "scores.json").read_text())
    scoring = (["reverse", "max", "case"], 10, 0)
    for label in ("opd", "mixed_rl", "merge_linear", "merge_ties", "offpolicy"):
        assert json.loads((run_dir / label / "scores.json").read_text()) == compared[label], label
        assert _student_scores(run_dir / label, run_dir / label / "model", *scoring, compute=False) == compared[label]
    stale = (["reverse", "max"], 10, 0)  # another evaluation: not taken for this one, recomputed on demand
    assert _student_scores(run_dir / "opd", run_dir / "opd" / "model", *stale, compute=False) is None


def test_finished_stages_are_skipped(smoke_run, capsys):
    config, run_dir = smoke_run
    before = (run_dir / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(config, smoke=True)
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 10
    assert (run_dir / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_smoke_overrides_apply():
    cfg = load_pipeline(ROOT / "examples" / "quickstart.yaml", smoke=True)
    assert cfg.domains == ["reverse", "max", "case"] and cfg.pretrain["steps"] < 100
    full = load_pipeline(ROOT / "examples" / "quickstart.yaml")
    assert full.domains == [] and full.pretrain["steps"] >= 1000


def test_run_ends_with_its_report(smoke_run):
    _, run_dir = smoke_run
    text = (run_dir / "report.md").read_text()
    headline = text[text.index("## Headline"):text.index("## Experts")]
    assert all(f"| {d} |" in headline for d in ("reverse", "max", "case", "mean"))
    assert "| compare | done |" in text and "Not run yet" not in headline
    for name in ("headline", "experts", "grpo_experts", "grpo_mixed_rl", "opd", "opd_teachers", "losses"):
        assert f"](report/{name}.png)" in text and (run_dir / "report" / f"{name}.png").stat().st_size > 5_000, name


def test_one_domains_per_domain_change_retrains_that_expert_alone(smoke_run, capsys):
    """Last in this module: it changes the smoke run's config. The experts stage re-runs (its snapshot changed)
    but keeps the experts whose own config did not change; the students that learn from the experts re-run."""
    config, run_dir = smoke_run
    mtimes = {d: (run_dir / "experts" / d / "expert" / "config.json").stat().st_mtime_ns
              for d in ("reverse", "max", "case")}
    opd_done = (run_dir / "opd" / "DONE").read_text()
    text = config.read_text().replace("    arith: {grpo: {optim: {lr: 1.0e-4}}}\n",
                                      "    arith: {grpo: {optim: {lr: 1.0e-4}}}\n    max: {grpo: {optim: {lr: 2.0e-4}}}\n")
    assert "max: {grpo" in text
    config.write_text(text)
    run_pipeline(config, smoke=True)
    out = capsys.readouterr().out
    assert "[experts] reverse done earlier, skipped" in out and "[experts] case done earlier, skipped" in out
    assert "[experts] max done earlier" not in out and "[experts] finished in" in out
    assert (run_dir / "opd" / "DONE").read_text() != opd_done  # its teachers changed: it ran again (in a worker)
    after = {d: (run_dir / "experts" / d / "expert" / "config.json").stat().st_mtime_ns for d in mtimes}
    assert after["reverse"] == mtimes["reverse"] and after["case"] == mtimes["case"] and after["max"] > mtimes["max"]


def test_opd_started_from_the_offpolicy_student_reruns_alone_from_that_model(smoke_run, capsys):
    """After the test above (it reads the config that one left): `opd_start: offpolicy` re-runs the OPD stage alone,
    from the off-policy baseline's saved student; the baselines and the experts are kept."""
    config, run_dir = smoke_run
    opd_done = (run_dir / "opd" / "DONE").read_text()
    config.write_text(config.read_text().replace("\nworkers: 2 ", "\nopd_start: offpolicy\nworkers: 2 "))
    assert "opd_start: offpolicy" in config.read_text()
    run_pipeline(config, smoke=True)
    out = capsys.readouterr().out
    for stage in ("experts", "offpolicy", "mixed_rl", "merge_linear", "merge_ties", "eval"):
        assert f"[{stage}] done earlier, skipped" in out, stage
    assert (run_dir / "opd" / "DONE").read_text() != opd_done and "[opd] finished in" in out
    ran = json.loads((run_dir / "opd" / "config.json").read_text())
    assert ran["model"] == str(run_dir / "offpolicy" / "model")
    compared = json.loads((run_dir / "compare" / "scores.json").read_text())
    assert json.loads((run_dir / "opd" / "scores.json").read_text()) == compared["opd"]
    assert out.count("[offpolicy] done earlier, skipped") == 1  # said by its stage in the chain, not twice
    headline = (run_dir / "compare" / "headline.md").read_text()
    assert "opd starts from offpolicy's model, not sft's" in headline
    run_pipeline(config, smoke=True)  # everything done: each stage of the chain skipped once, without a process
    out = capsys.readouterr().out
    assert out.count("[offpolicy] done earlier, skipped") == 1 and out.count("[opd] done earlier, skipped") == 1
    assert "finished in" not in out
