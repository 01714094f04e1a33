"""The experts stage: each expert's SFT checkpoint and final model saved with its domain; a rubric
domain without a judge keeps its SFT checkpoint; the report scores every checkpoint on every domain."""

import json

import pytest

from pluribus.config import ExpertsConfig
from pluribus.models import read_meta
from pluribus.stages import experts
from pluribus.world import DOMAINS


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("experts")
    cfg = ExpertsConfig(model=str(tiny_llama), out_dir=str(out), domains=["max", "describe"], n_demos=8, n_train=8,
                        sft={"steps": 2, "batch_size": 4},
                        grpo={"steps": 2, "prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 4}},
                        report_n=4)
    return cfg, experts.run(cfg)


def test_each_expert_records_its_domain_and_stage(trained):
    cfg, paths = trained
    assert set(paths) == {"max", "describe"}
    sft_max, final_max = experts.expert_paths(cfg.out_dir, "max")
    assert read_meta(sft_max)["domain"] == "max" and read_meta(sft_max)["expert_stage"] == "sft"
    assert read_meta(final_max)["domain"] == "max" and read_meta(final_max)["expert_stage"] == "grpo"
    assert (final_max / "adapter_config.json").is_file()  # LoRA by default


def test_rubric_domain_without_a_judge_keeps_its_sft_checkpoint(trained):
    cfg, _ = trained
    sft_path, final_path = experts.expert_paths(cfg.out_dir, "describe")
    assert read_meta(final_path)["expert_stage"] == "sft"
    assert (final_path / "adapter_model.safetensors").read_bytes() == (sft_path / "adapter_model.safetensors").read_bytes()


def test_report_scores_final_experts_everywhere_and_sft_checkpoints_on_their_own_domain(trained):
    cfg, _ = trained
    rep = experts.report(cfg)
    assert set(rep["general"]) == set(DOMAINS)
    for d in ("max", "describe"):
        assert set(rep["experts"][d]["final"]) == set(DOMAINS)
        assert set(rep["experts"][d]["sft"]) == {d}
        assert all(0.0 <= v <= 1.0 for stage in ("sft", "final") for v in rep["experts"][d][stage].values())
    assert rep["experts"]["max"]["rl"] and not rep["experts"]["describe"]["rl"]
    assert rep["experts"]["max"]["sft"]["max"] == experts.pass1(experts.expert_paths(cfg.out_dir, "max")[0], ["max"],
                                                               cfg.report_n, cfg.seed)["max"]
    assert rep["experts"]["describe"]["sft"]["describe"] == rep["experts"]["describe"]["final"]["describe"]  # one model
    assert json.loads((experts.Path(cfg.out_dir) / "report.json").read_text()) == rep
    table = experts.report_table(rep)
    assert table.row_count == 3 and [c.header for c in table.columns][4] == "expert GRPO"


def test_the_report_takes_the_scores_each_expert_kept_as_it_ended(trained, monkeypatch):
    """`run` scores each expert in its worker as it ends, then the general model (and the base, when given) in the
    same pool; `report` scores only what is not kept (here the base, which `run` was not given), and again what is
    stale."""
    cfg, _ = trained
    out = experts.Path(cfg.out_dir)
    kept = {d: json.loads((out / d / "scores.json").read_text()) for d in ("max", "describe")}
    assert set(kept["max"]["final"]) == set(DOMAINS) and set(kept["max"]["sft"]) == {"max"}
    assert "sft" not in kept["describe"]  # no RL: its one model's scores
    general = json.loads((out / "scores.general.json").read_text())
    assert general == experts.pass1(cfg.model, list(DOMAINS), cfg.report_n, cfg.seed)
    assert not (out / "scores.base.json").exists()
    scored = []
    monkeypatch.setattr(experts, "run_all", lambda fn, jobs, workers: [
        scored.append(model) or {d: 0.5 for d in domains} for model, domains, *_ in jobs])
    rep = experts.report(cfg, base="elsewhere/base")
    assert scored == ["elsewhere/base"] and rep["base"] == {d: 0.5 for d in DOMAINS} and rep["general"] == general
    assert rep["experts"]["max"]["final"] == kept["max"]["final"] and rep["experts"]["max"]["sft"] == kept["max"]["sft"]
    assert rep["experts"]["describe"]["sft"] == {"describe": kept["describe"]["final"]["describe"]}
    scored.clear()
    assert "base" not in experts.report(cfg) and scored == []  # nothing stale
    (out / "max" / "scores.key").write_text("another report's")
    (out / "scores.general.key").write_text("another model's")
    rep = experts.report(cfg)
    sft_path, final_path = experts.expert_paths(cfg.out_dir, "max")
    assert scored == [cfg.model, str(final_path), str(sft_path)] and rep["experts"]["max"]["final"]["max"] == 0.5
    assert rep["general"] == {d: 0.5 for d in DOMAINS}
    monkeypatch.setattr(experts, "pass1", lambda model, domains, n, seed: {d: 0.25 for d in domains})
    assert experts._reference_scores(cfg, "base", "org/hub-model") == {d: 0.25 for d in DOMAINS}
    assert experts._reference_scores(cfg, "base", "org/hub-model", compute=False) == {d: 0.25 for d in DOMAINS}
    # no folder, so no identity ("missing") for either: another name is another model
    assert experts._reference_scores(cfg, "base", "org/other-model", compute=False) is None


def test_parallel_workers_train_the_same_experts(trained, tmp_path):
    cfg, _ = trained
    parallel = cfg.model_copy(update={"out_dir": str(tmp_path), "workers": 2})
    paths = experts.run(parallel)  # two spawned processes, one thread each (2 cores), like the serial run here
    assert set(paths) == {"max", "describe"}
    for d in ("max", "describe"):
        for serial_dir, parallel_dir in zip(experts.expert_paths(cfg.out_dir, d), experts.expert_paths(tmp_path, d)):
            assert (parallel_dir / "adapter_model.safetensors").read_bytes() == \
                (serial_dir / "adapter_model.safetensors").read_bytes()
        assert (tmp_path / d / "DONE").is_file()


def test_per_domain_changes_apply_to_their_domain_only(tmp_path):
    base = dict(model="m", out_dir="o", grpo={"steps": 5, "optim": {"lr": 3e-4, "warmup_steps": 2}})
    cfg = ExpertsConfig(**base, per_domain={"arith": {"grpo": {"optim": {"lr": 1e-4}}}})
    assert cfg.section("grpo", "arith") == {"steps": 5, "optim": {"lr": 1e-4, "warmup_steps": 2}}
    assert cfg.section("grpo", "add") == base["grpo"] and cfg.section("sft", "arith") == {}
    plain = ExpertsConfig(**base)
    assert "per_domain" not in plain.model_dump()  # configs written before it keep their stage keys
    assert experts.domain_key(cfg, "add") == experts.domain_key(plain, "add")  # add's finished expert is kept
    assert experts.domain_key(cfg, "arith") != experts.domain_key(plain, "arith")


@pytest.mark.parametrize("per_domain, message", [
    ({"nope": {"grpo": {}}}, "unknown domain(s) ['nope']"),
    ({"arith": {"ppo": {}}}, "Input should be 'sft', 'grpo' or 'grm'"),
    ({"arith": {"grpo": {"optim": {"lr": -1}}}}, "per_domain: arith.grpo.optim.lr: Input should be greater than 0"),
])
def test_per_domain_changes_are_validated(tmp_path, per_domain, message):
    from pluribus.config import load_yaml
    from pluribus.errors import ConfigError

    path = tmp_path / "experts.yaml"
    path.write_text(json.dumps({"model": "m", "out_dir": "o", "per_domain": per_domain}))
    with pytest.raises(ConfigError) as info:
        load_yaml(path, ExpertsConfig)
    assert str(info.value).startswith(f"{path}: per_domain") and message in str(info.value)


def test_longest_experts_start_first(monkeypatch):
    """Workers start the experts in order of expected cost: long answers, more RL steps and an RL stage at all
    cost more; the stage still returns its domains in their given order."""
    cfg = ExpertsConfig(model="m", out_dir="o", domains=["add", "code", "describe", "reverse"], workers=2,
                        sft={"steps": 100, "batch_size": 8}, grpo={"steps": 10},
                        per_domain={"reverse": {"grpo": {"steps": 40}}})
    cost = {d: experts.expected_cost(cfg, d) for d in cfg.domains}
    assert min(cost["code"], cost["reverse"]) > cost["add"] > 0
    assert cost["reverse"] > experts.expected_cost(cfg.model_copy(update={"per_domain": {}}), "reverse")
    # describe has no checker: by default (rubric_rl none) its expert is its SFT checkpoint, no RL to pay for
    with_rl = cfg.model_copy(update={"rubric_rl": "hidden_checker"})
    assert experts.expected_cost(with_rl, "describe") > cost["describe"]
    started = []
    monkeypatch.setattr(experts, "run_all",
                        lambda fn, jobs, workers: [started.append(job[2]) or job[2] for job in jobs])
    assert list(experts.run(cfg, base="b")) == cfg.domains
    # then the models the report compares them with: short jobs for the workers the last experts leave idle
    assert started == sorted(cfg.domains, key=lambda d: -cost[d]) + ["general", "base"]
