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

STAGES = ("pretrain", "sft", "eval")
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
    return run_dir


def _fingerprint_dir(path: Path) -> str:
    """Identity of a saved model: its DONE marker's key if the pipeline made it, else file sizes and mtimes."""
    done = path.parent / "DONE"
    if done.is_file():
        return done.read_text().strip()
    if not path.exists():
        return "missing"
    return _fingerprint(sorted((str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in path.rglob("*") if p.is_file()))
