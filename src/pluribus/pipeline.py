"""`pluribus run CONFIG`: the recipe's stages in order, under runs/NAME/STAGE/, resumable.

Each stage folder gets the stage's outputs, `config.json` (the snapshot it ran with, inputs
included) and, written last, `DONE`. A stage whose DONE matches its current config and inputs is
skipped; anything else is (re)run. Stage configs inside the pipeline YAML are the stage configs
minus the paths, which the pipeline fills in.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field
from rich.console import Console

from pluribus.config import EvalConfig, PretrainConfig, SFTConfig, Strict, read_yaml, validate

STAGES = ("pretrain", "sft", "eval", "experts", "opd", "mixed_rl", "merge_<method>", "offpolicy", "compare")
SMOKE_DOMAINS = ["reverse", "max", "case"]


class PipelineConfig(Strict):
    name: str = Field(..., min_length=1, pattern=r"^[\w.-]+$")
    out_dir: str = "runs"
    base_model: str | None = Field(None, description="an HF folder to start from instead of pretraining")
    domains: list[str] = Field(default_factory=list, description="empty: all world domains")
    seed: int = 0
    pretrain: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    experts: dict[str, Any] | None = Field(None, description="ExpertsConfig fields; absent: stop after eval")
    opd: dict[str, Any] | None = Field(None, description="OPDConfig fields (teachers: each domain's expert)")
    baselines: dict[str, Any] = Field(default_factory=dict, description="mixed_rl (GRPO fields), merge (list of "
                                      "MergeConfig fields), offpolicy (OffPolicyConfig fields); each optional")
    smoke: dict[str, Any] = Field(default_factory=dict, description="overrides applied with --smoke")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_pipeline(path: str | Path, smoke: bool = False) -> PipelineConfig:
    raw = read_yaml(path)
    cfg = validate(PipelineConfig, raw, str(path))
    if smoke:
        cfg = validate(PipelineConfig, _merge(raw | {"domains": SMOKE_DOMAINS}, cfg.smoke), f"{path} (smoke)")
    return cfg


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage(run_dir: Path, name: str, snapshot: dict, body: Callable[[Path], Any]) -> Any:
    """Run `body(stage_dir)` unless DONE says the same snapshot finished; DONE is written last."""
    stage_dir = run_dir / name
    done = stage_dir / "DONE"
    key = _fingerprint(snapshot)
    if done.is_file() and done.read_text().strip() == key:
        print(f"[{name}] done earlier, skipped")
        return None
    stage_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    (stage_dir / "config.json").write_text(json.dumps(snapshot, indent=2, default=str))
    start = time.time()
    result = body(stage_dir)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(key)
    os.replace(tmp, done)
    print(f"[{name}] finished in {time.time() - start:.0f}s")
    return result


def run_pipeline(path: str | Path, smoke: bool = False) -> Path:
    from pluribus.stages import evaluate, pretrain, sft
    from pluribus.world import DOMAINS

    cfg = load_pipeline(path, smoke)
    where = f"{path}{' (smoke)' if smoke else ''}"
    run_dir = Path(cfg.out_dir) / cfg.name
    domains = cfg.domains or list(DOMAINS)

    if cfg.base_model:
        base = Path(cfg.base_model)
    else:
        pre = validate(PretrainConfig, {"seed": cfg.seed, **cfg.pretrain, "out": str(run_dir / "pretrain" / "model")},
                       f"{where}: pretrain")
        base = Path(pre.out)
        _stage(run_dir, "pretrain", pre.model_dump(), lambda d: pretrain.run(pre))

    sft_cfg = validate(SFTConfig, _merge({"seed": cfg.seed, "data": {"domains": domains, "seed": cfg.seed}}, cfg.sft)
                       | {"model": str(base), "out": str(run_dir / "sft" / "model")}, f"{where}: sft")
    _stage(run_dir, "sft", sft_cfg.model_dump() | {"input": _fingerprint_dir(base)}, lambda d: sft.run(sft_cfg))

    models = {"base": base, "sft": Path(sft_cfg.out)}
    results: dict[str, Any] = {}

    def do_eval(stage_dir: Path):
        for label, model_path in models.items():
            ecfg = validate(EvalConfig, {"seed": cfg.seed, "domains": domains, **cfg.eval, "model": str(model_path)},
                            f"{where}: eval")
            scores = evaluate.run(ecfg)
            results[label] = evaluate.as_json(scores)
            Console(width=120).print(evaluate.table(scores, title=label))
        (stage_dir / "scores.json").write_text(json.dumps(results, indent=2))

    _stage(run_dir, "eval", {"eval": cfg.eval, "domains": domains,
                             "inputs": {k: _fingerprint_dir(v) for k, v in models.items()}}, do_eval)
    if cfg.experts is not None:
        _merge_stages(cfg, where, run_dir, domains, models)
    return run_dir


def _merge_stages(cfg: PipelineConfig, where: str, run_dir: Path, domains: list[str], models: dict[str, Path]) -> None:
    """Experts, then the OPD merge and its baselines from the same start, then the headline comparison."""
    from pluribus.config import ExpertsConfig, GRPOConfig, MergeConfig, OffPolicyConfig, OPDConfig
    from pluribus.report import headline
    from pluribus.stages import experts, grpo, merge, offpolicy, opd

    sft_path = models["sft"]
    seed = {"seed": cfg.seed}
    ecfg = validate(ExpertsConfig, {**seed, "domains": domains, **cfg.experts,
                                    "model": str(sft_path), "out_dir": str(run_dir / "experts")}, f"{where}: experts")
    _stage(run_dir, "experts", ecfg.model_dump() | {"input": _fingerprint_dir(sft_path)},
           lambda d: (experts.run(ecfg), experts.report(ecfg, base=str(models["base"]))))
    experts_key = (run_dir / "experts" / "DONE").read_text().strip()
    final = {d: str(experts.expert_paths(ecfg.out_dir, d)[1]) for d in domains}
    data = {"domains": domains, "seed": cfg.seed}
    start = {"model": str(sft_path)}

    students: dict[str, tuple[Any, Callable[[], Any]]] = {}  # label = stage folder -> (config, run)
    if cfg.opd is not None:
        ocfg = validate(OPDConfig, _merge({**seed, "data": data}, cfg.opd) | start | {
            "out": str(run_dir / "opd" / "model"),
            "teachers": [{"path": final[d], "domains": [d]} for d in domains]}, f"{where}: opd")
        students["opd"] = (ocfg, lambda: opd.run(ocfg))
    if "mixed_rl" in cfg.baselines:
        gcfg = validate(GRPOConfig, _merge({**seed, "data": data}, cfg.baselines["mixed_rl"]) | start | {
            "out": str(run_dir / "mixed_rl" / "model")}, f"{where}: baselines.mixed_rl")
        students["mixed_rl"] = (gcfg, lambda: grpo.run(gcfg))
    for item in cfg.baselines.get("merge", []):
        name = f"merge_{item.get('method', '')}"
        mcfg = validate(MergeConfig, {**item, **start, "experts": [final[d] for d in domains],
                                      "out": str(run_dir / name / "model")}, f"{where}: baselines.merge")
        students[name] = (mcfg, lambda mcfg=mcfg: merge.run(mcfg))
    if "offpolicy" in cfg.baselines:
        fcfg = validate(OffPolicyConfig, {**seed, **cfg.baselines["offpolicy"], **start, "experts": final,
                                          "out": str(run_dir / "offpolicy" / "model")}, f"{where}: baselines.offpolicy")
        students["offpolicy"] = (fcfg, lambda: offpolicy.run(fcfg))
    for label, (scfg, body) in students.items():
        _stage(run_dir, label, scfg.model_dump() | {"input": experts_key}, lambda d, body=body: body())

    n = int(cfg.eval.get("n", EvalConfig.model_fields["n"].default))
    compared = {"base": models["base"], "sft": sft_path,
                **{label: Path(scfg.out) for label, (scfg, _) in students.items()}}

    def compare(stage_dir: Path):
        evaluated = json.loads((run_dir / "eval" / "scores.json").read_text())  # same prompts: not redone
        report = json.loads((run_dir / "experts" / "report.json").read_text())
        scores = {label: {s["domain"]: s["pass1_greedy"] for s in evaluated[label]} for label in ("base", "sft")}
        scores["expert"] = {d: report["experts"][d]["final"][d] for d in domains}
        scores |= {label: experts.pass1(Path(scfg.out), domains, n, cfg.seed) for label, (scfg, _) in students.items()}
        (stage_dir / "scores.json").write_text(json.dumps(scores, indent=2))
        md, _ = headline(scores, "expert", "opd" if "opd" in scores else list(scores)[-1], out_dir=stage_dir)
        Console(width=160).print(md.read_text())

    _stage(run_dir, "compare", {"n": n, "domains": domains, "experts": experts_key,
                                "inputs": {k: _fingerprint_dir(v) for k, v in compared.items()}}, compare)


def _fingerprint_dir(path: Path) -> str:
    """Identity of a saved model: its DONE marker's key if the pipeline made it, else file sizes and mtimes."""
    done = path.parent / "DONE"
    if done.is_file():
        return done.read_text().strip()
    if not path.exists():
        return "missing"
    return _fingerprint(sorted((str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in path.rglob("*") if p.is_file()))
