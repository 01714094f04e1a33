"""`pluribus run CONFIG`: the recipe's stages in order, under runs/NAME/STAGE/, resumable.

Each stage folder gets the stage's outputs, `config.json` (the snapshot it ran with, inputs
included) and, written last, `DONE`. A stage whose DONE matches its current config and inputs is
skipped; anything else is (re)run. Stage configs inside the pipeline YAML are the stage configs
minus the paths, which the pipeline fills in. Every stage's config is validated before the first
stage runs (`plan_pipeline`), so a mistake anywhere in the YAML fails at once, naming its dotted
path, not after pretraining. The run ends by writing its report (`pluribus.report.write_report`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field, field_validator
from rich.console import Console

from pluribus import durable
from pluribus.config import (EvalConfig, ExpertsConfig, GRPOConfig, MergeConfig, OffPolicyConfig, OPDConfig,
                             PretrainConfig, SFTConfig, Strict, config_error, deep_merge, known_domains, read_yaml,
                             validate, validate_section)
from pluribus.crash import crash_point
from pluribus.errors import ConfigError
from pluribus.parallel import call, run_all

# In the order one worker runs them (the evaluation after the students; without experts, right after sft)
STAGES = ("pretrain", "sft", "experts", "opd", "mixed_rl", "merge_<method>", "offpolicy", "eval", "compare")
SMOKE_DOMAINS = ["reverse", "max", "case"]


class BaselinesConfig(Strict):
    """The merge's rivals, each from the general SFT model like the OPD student (unless `opd_start` says it
    starts from the off-policy student); each optional."""

    mixed_rl: dict[str, Any] | None = Field(None, description="GRPOConfig fields: one RL run on every domain")
    merge: list[dict[str, Any]] = Field(default_factory=list, description="MergeConfig fields, one per merge")
    offpolicy: dict[str, Any] | None = Field(None, description="OffPolicyConfig fields")


class PipelineConfig(Strict):
    name: str = Field(..., min_length=1, pattern=r"^[\w.-]+$")
    out_dir: str = "runs"
    base_model: str | None = Field(None, description="an HF folder to start from instead of pretraining")
    domains: list[str] = Field(default_factory=list, description="empty: all world domains")
    seed: int = 0
    workers: int = Field(1, ge=1, description="independent stages at once (the OPD student and the baselines; "
                                              "the final evaluations), each in its own process with cores/workers")
    pretrain: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    experts: dict[str, Any] | None = Field(None, description="ExpertsConfig fields; absent: stop after eval")
    opd: dict[str, Any] | None = Field(None, description="OPDConfig fields (teachers: each domain's expert)")
    opd_start: Literal["sft", "offpolicy"] = Field(
        "sft", description="the OPD student's start: the general SFT model (the recipe), or the off-policy baseline's "
                           "student, SFT on the experts' answers (distilled off-policy, then on-policy; docs/merge.md)")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    smoke: dict[str, Any] = Field(default_factory=dict, description="overrides applied with --smoke")

    _known_domains = field_validator("domains")(known_domains)


@dataclass(frozen=True)
class Plan:
    """Every stage's validated config, built before the first stage runs."""

    config: PipelineConfig
    run_dir: Path
    domains: list[str]
    base: Path  # the pretrained model, or base_model
    pretrain: PretrainConfig | None  # None: base_model given
    sft: SFTConfig
    eval: EvalConfig  # evaluates the base; each evaluated model swaps in its folder
    experts: ExpertsConfig | None  # None: stop after eval
    students: dict[str, BaseModel]  # stage folder -> config: OPD and the baselines, from the general SFT model
    after: dict[str, str] = field(default_factory=dict)  # student -> the student whose model it starts from


def load_pipeline(path: str | Path, smoke: bool = False) -> PipelineConfig:
    return plan_pipeline(path, smoke).config


def plan_pipeline(path: str | Path, smoke: bool = False) -> Plan:
    """Validate the YAML and every stage's config in it. With smoke, the config with the smoke
    overrides applied; a mistake an override makes is named by its place: `smoke.<field.path>`."""
    raw = read_yaml(path)
    plan = _plan(validate(PipelineConfig, raw, str(path)), str(path))
    if not smoke:
        return plan
    overrides, where = plan.config.smoke, f"{path} (smoke)"
    try:
        return _plan(validate(PipelineConfig, deep_merge(raw | {"domains": SMOKE_DOMAINS}, overrides), where), where)
    except ConfigError as e:
        if e.field and _sets(overrides, e.field.split(".")):
            raise config_error(str(path), f"smoke.{e.field}", e.problem or "") from None
        raise


def _sets(overrides: Any, keys: list[str]) -> bool:
    """Whether the nested overrides hold a value at the path `keys`."""
    for key in keys:
        if isinstance(overrides, dict) and key in overrides:
            overrides = overrides[key]
        elif isinstance(overrides, list) and key.isdigit() and int(key) < len(overrides):
            overrides = overrides[int(key)]
        else:
            return False
    return True


def _plan(cfg: PipelineConfig, where: str) -> Plan:
    from pluribus.world import DOMAINS

    run_dir = Path(cfg.out_dir) / cfg.name
    domains = cfg.domains or list(DOMAINS)
    seed = {"seed": cfg.seed}
    data = {"domains": domains, "seed": cfg.seed}

    def section(cls, name: str, fields: dict, defaults: dict, **filled):
        return validate_section(cls, fields, where, name, defaults, filled)

    def out(label: str) -> str:
        return str(run_dir / label / "model")

    pre = None if cfg.base_model else section(PretrainConfig, "pretrain", cfg.pretrain, seed, out=out("pretrain"))
    base = Path(cfg.base_model) if cfg.base_model else Path(pre.out)
    sft_cfg = section(SFTConfig, "sft", cfg.sft, {**seed, "data": data}, model=str(base), out=out("sft"))
    eval_cfg = section(EvalConfig, "eval", cfg.eval, {**seed, "domains": domains}, model=str(base))
    plan = Plan(cfg, run_dir, domains, base, pre, sft_cfg, eval_cfg, None, {})
    if cfg.experts is None:
        return plan

    start = {"model": sft_cfg.out}
    experts_cfg = section(ExpertsConfig, "experts", cfg.experts, {**seed, "domains": domains}, **start,
                          out_dir=str(run_dir / "experts"))
    final = {d: str(Path(experts_cfg.out_dir) / d / "expert") for d in domains}  # stages.experts.expert_paths
    students: dict[str, BaseModel] = {}
    baselines = cfg.baselines
    after = {"opd": "offpolicy"} if cfg.opd is not None and cfg.opd_start == "offpolicy" else {}
    if after and baselines.offpolicy is None:
        raise config_error(where, "opd_start", "offpolicy: the OPD student would start from the off-policy "
                                               "baseline's student, and baselines.offpolicy is not set")
    if cfg.opd is not None:
        opd_start = {"model": out("offpolicy")} if after else start
        students["opd"] = section(OPDConfig, "opd", cfg.opd, {**seed, "data": data}, **opd_start, out=out("opd"),
                                  teachers=[{"path": final[d], "domains": [d]} for d in domains])
    if baselines.mixed_rl is not None:
        students["mixed_rl"] = section(GRPOConfig, "baselines.mixed_rl", baselines.mixed_rl, {**seed, "data": data},
                                       **start, out=out("mixed_rl"))
    for i, item in enumerate(baselines.merge):
        label = f"merge_{item.get('method', '')}"
        if label in students:
            raise config_error(where, f"baselines.merge.{i}.method", f"a second {label} would overwrite the first")
        students[label] = section(MergeConfig, f"baselines.merge.{i}", item, {}, **start,
                                  experts=[final[d] for d in domains], out=out(label))
    if baselines.offpolicy is not None:
        students["offpolicy"] = section(OffPolicyConfig, "baselines.offpolicy", baselines.offpolicy, seed, **start,
                                        experts=final, out=out("offpolicy"))
    return Plan(cfg, run_dir, domains, base, pre, sft_cfg, eval_cfg, experts_cfg, students, after)


HOW_NOT_WHAT = ("checkpoint_every", "workers", "distributed")  # how a stage runs, never what it computes


def _identity(snapshot: Any) -> Any:
    """The snapshot less the HOW_NOT_WHAT fields, at any depth: what a stage's key is taken of."""
    if isinstance(snapshot, dict):
        return {k: _identity(v) for k, v in snapshot.items() if k not in HOW_NOT_WHAT}
    if isinstance(snapshot, (list, tuple)):
        return [_identity(v) for v in snapshot]
    return snapshot


def _done(run_dir: Path, name: str, snapshot: dict, say: bool = True) -> bool:
    """Whether the stage's DONE marker says this snapshot finished (and, with `say`, say so)."""
    done = durable.holds(run_dir / name / "DONE", durable.fingerprint(_identity(snapshot)))
    if done and say:
        print(f"[{name}] done earlier, skipped")
    return done


def _stage(run_dir: Path, name: str, snapshot: dict, body: Callable[[Path], Any],
           reusable: Callable[[dict], bool] = lambda previous: False) -> Any:
    """Run `body(stage_dir)` unless DONE says the same snapshot finished; DONE is written last.

    A stage folder holds the work of one snapshot: an interrupted run of the same snapshot resumes from
    the checkpoints in it, and a different snapshot (config or inputs changed) starts it afresh, unless
    `reusable(previous snapshot)` says the body itself tells what in the folder still holds (the experts:
    each expert's DONE holds its own key). A new checkpoint interval or worker count is the same snapshot.
    """
    if _done(run_dir, name, snapshot):
        return None
    stage_dir = run_dir / name
    done = stage_dir / "DONE"
    key = durable.fingerprint(_identity(snapshot))
    config = stage_dir / "config.json"
    if config.is_file():
        previous = json.loads(config.read_text())
        if durable.fingerprint(_identity(previous)) != key and not reusable(previous):
            shutil.rmtree(stage_dir)  # another snapshot's outputs and checkpoints: never to be resumed
    text = json.dumps(snapshot, indent=2, default=str)
    stage_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    durable.write_text(config, text)
    start = time.time()
    result = body(stage_dir)
    crash_point(stage_dir, "done")
    durable.write_text(done, key)
    print(f"[{name}] finished in {time.time() - start:.0f}s")
    return result


def run_pipeline(path: str | Path, smoke: bool = False) -> Path:
    plan = plan_pipeline(path, smoke)  # before the slow imports: a config mistake fails in a second
    from pluribus.report import write_report
    from pluribus.stages import pretrain, sft

    run_dir = plan.run_dir
    if plan.pretrain is not None:
        _stage(run_dir, "pretrain", plan.pretrain.model_dump(), lambda d: pretrain.run(plan.pretrain))
    _stage(run_dir, "sft", plan.sft.model_dump() | {"input": durable.fingerprint_dir(plan.base)},
           lambda d: sft.run(plan.sft))

    models = {"base": plan.base, "sft": Path(plan.sft.out)}
    evaluation = (run_dir, {"eval": plan.config.eval, "domains": plan.domains,
                            "inputs": {k: durable.fingerprint_dir(v) for k, v in models.items()}}, plan.eval, models)
    if plan.experts is None:
        _eval_stage(*evaluation)
    else:  # nothing before the comparison reads the evaluation: it runs beside the students (below)
        _merge_stages(plan, models, evaluation)
    print(f"report: {write_report(run_dir)}")
    return run_dir


def _eval_stage(run_dir: Path, snapshot: dict, eval_cfg: EvalConfig, models: dict[str, Path]) -> None:
    """The base's and the general SFT model's scores (`eval/scores.json`), each printed as a table."""
    from pluribus.stages import evaluate

    def do_eval(stage_dir: Path):
        results: dict[str, Any] = {}
        for label, model_path in models.items():
            scores = evaluate.run(eval_cfg.model_copy(update={"model": str(model_path)}))
            results[label] = evaluate.as_json(scores)
            Console(width=120).print(evaluate.table(scores, title=label))
        durable.write_text(stage_dir / "scores.json", json.dumps(results, indent=2))

    _stage(run_dir, "eval", snapshot, do_eval)


def _merge_stages(plan: Plan, models: dict[str, Path], evaluation: tuple) -> None:
    """Experts, then the OPD merge and its baselines from the same start (and the evaluation of the base and the
    general SFT model, `evaluation`: `_eval_stage`'s arguments), then the headline comparison."""
    from pluribus.report import headline, started_from, student_label
    from pluribus.stages import experts

    run_dir, domains, ecfg, workers = plan.run_dir, plan.domains, plan.experts, plan.config.workers
    start = durable.fingerprint_dir(models["sft"])
    # From the same general SFT model, an expert whose own config is unchanged is kept (its DONE holds its key,
    # experts.domain_key): one domain's per_domain change retrains that domain's expert alone.
    _stage(run_dir, "experts", ecfg.model_dump() | {"input": start},
           lambda d: (experts.run(ecfg, base=str(models["base"])), experts.report(ecfg, base=str(models["base"]))),
           reusable=lambda previous: previous.get("input") == start)
    experts_key = (run_dir / "experts" / "DONE").read_text().strip()
    n, seed = plan.eval.n, plan.config.seed
    scoring = (domains, n, seed)
    inputs = _student_inputs(plan, experts_key)
    todo = []
    for chain in _chains(plan):  # a chain whose every stage is done: skipped without a process
        stages = [(label, plan.students[label], inputs[label]) for label in chain]
        if all(_done(run_dir, label, _student_snapshot(scfg, key), say=False) for label, scfg, key in stages):
            for label, scfg, key in stages:
                _done(run_dir, label, _student_snapshot(scfg, key))  # say so, once
        else:
            todo.append((_student_stages, run_dir, stages, scoring))  # its stages say which of them are done
    # The evaluation last: it fills the worker that the baselines free while the OPD student trains on (the
    # quickstart: ~50 s idle), instead of holding both cores before the experts.
    todo += [] if _done(run_dir, "eval", evaluation[1]) else [(_eval_stage, *evaluation)]
    run_all(call, todo, workers)

    compared = models | {label: Path(scfg.out) for label, scfg in plan.students.items()}

    def compare(stage_dir: Path):
        evaluated = json.loads((run_dir / "eval" / "scores.json").read_text())  # same prompts: not redone
        report = json.loads((run_dir / "experts" / "report.json").read_text())
        scores = {label: {s["domain"]: s["pass1_greedy"] for s in evaluated[label]} for label in ("base", "sft")}
        scores["expert"] = {d: report["experts"][d]["final"][d] for d in domains}
        students = {label: _student_scores(run_dir / label, Path(scfg.out), *scoring, compute=False)
                    for label, scfg in plan.students.items()}
        missing = [label for label, s in students.items() if s is None]  # a student trained by an earlier run
        students |= dict(zip(missing, run_all(_student_scores, [(run_dir / label, Path(plan.students[label].out),
                                                                 *scoring) for label in missing], workers)))
        scores |= students
        durable.write_text(stage_dir / "scores.json", json.dumps(scores, indent=2))
        student = student_label(scores)
        md, _ = headline(scores, "expert", student, out_dir=stage_dir, start=started_from(run_dir, student), n=n)
        Console(width=160).print(md.read_text(), markup=False)

    _stage(run_dir, "compare", {"n": n, "domains": domains, "experts": experts_key,
                                "inputs": {k: durable.fingerprint_dir(v) for k, v in compared.items()}}, compare)


def _student_snapshot(scfg: BaseModel, input_key: str) -> dict:
    return scfg.model_dump() | {"input": input_key}


def _student_inputs(plan: Plan, experts_key: str) -> dict[str, str]:
    """What each student's stage is keyed on besides its config: the experts, and for a student that starts from
    another's model (`plan.after`), that one's key too, so a changed off-policy baseline re-runs the OPD after it."""
    inputs = dict.fromkeys(plan.students, experts_key)
    for label, source in plan.after.items():
        inputs[label] = durable.fingerprint([inputs[source], _identity(plan.students[source].model_dump())])
    return inputs


def _chains(plan: Plan) -> list[list[str]]:
    """The students as runs of stages, each run in one worker: a student that starts from another's model right
    after it. The runs in the order of their earliest student (the OPD student's first: the longest)."""
    order = list(plan.students)
    chains = [[label] for label in order if label not in plan.after]
    for follower, source in plan.after.items():
        next(chain for chain in chains if chain[-1] == source).append(follower)
    return sorted(chains, key=lambda chain: min(order.index(label) for label in chain))


def _student_stages(run_dir: Path, stages: list[tuple[str, BaseModel, str]], scoring: tuple[list[str], int, int]):
    """Students in turn (`stages`: label, config, input key; each after the one it starts from), each stage scored
    for the comparison in the same worker (`scoring`: domains, n, seed): the baselines finish before the OPD
    student, and their scoring takes time their worker would otherwise idle."""
    from pluribus.stages import grpo, merge, offpolicy, opd

    runs = {OPDConfig: opd.run, GRPOConfig: grpo.run, MergeConfig: merge.run, OffPolicyConfig: offpolicy.run}
    for label, scfg, input_key in stages:
        _stage(run_dir, label, _student_snapshot(scfg, input_key), lambda d, scfg=scfg: runs[type(scfg)](scfg))
        _student_scores(run_dir / label, Path(scfg.out), *scoring)


def _student_scores(stage_dir: Path, model: Path, domains: list[str], n: int, seed: int,
                    compute: bool = True) -> dict[str, float] | None:
    """A student's greedy pass@1 on the compared domains, kept as stage_dir/scores.json, and scores.key (the
    model's and the evaluation's key, written last), so the comparison reads them back; computed when missing
    or stale (None instead with compute=False)."""
    from pluribus.stages import experts

    key = durable.fingerprint({"model": durable.fingerprint_dir(model), "domains": domains, "n": n, "seed": seed})
    return durable.kept_json(stage_dir / "scores.json", key, lambda: experts.pass1(model, domains, n, seed), compute)
