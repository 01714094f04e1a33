"""Specialists: from the general SFT model, one expert per domain, SFT on its demonstrations then GRPO.

Each expert is saved as an HF folder (a LoRA adapter over the general SFT model by default, so
twelve experts cost twelve small adapters) with its domain recorded in `pluribus.json`; the
teacher pool of the OPD stage reads that record. Its SFT checkpoint is kept beside it, so the
effect of RL can be measured against it.
"""

from __future__ import annotations

from pathlib import Path

from pluribus.config import ExpertsConfig, GRPOConfig, SFTConfig, validate
from pluribus.stages import grpo, sft
from pluribus.world import DOMAINS, generate


def expert_paths(out_dir: str | Path, domain: str) -> tuple[Path, Path]:
    """(SFT checkpoint, final expert) folders of one domain's expert."""
    return Path(out_dir) / domain / "sft", Path(out_dir) / domain / "expert"


def run_one(cfg: ExpertsConfig, domain: str, reward_fn=None) -> Path:
    sft_out, expert_out = expert_paths(cfg.out_dir, domain)
    lora = None if cfg.lora is None else cfg.lora.model_dump()
    data = {"domains": [domain], "n_per_domain": cfg.n_demos, "seed": cfg.seed}
    sft_cfg = validate(SFTConfig, {"seed": cfg.seed, **cfg.sft, "model": cfg.model, "out": str(sft_out),
                                   "data": data, "lora": lora}, f"experts.sft ({domain})")
    sft.run(sft_cfg, meta={"domain": domain, "expert_stage": "sft"})
    grpo_cfg = validate(GRPOConfig, {"seed": cfg.seed, **cfg.grpo, "model": str(sft_out), "out": str(expert_out),
                                     "data": {**data, "n_per_domain": cfg.n_train}, "lora": lora},
                        f"experts.grpo ({domain})")
    records = generate(domain, "train", cfg.n_train, seed=cfg.seed + 1)
    return grpo.run(grpo_cfg, records=records, reward_fn=reward_fn, meta={"domain": domain, "expert_stage": "grpo"})


def run(cfg: ExpertsConfig) -> dict[str, Path]:
    return {d: run_one(cfg, d) for d in cfg.domains or list(DOMAINS)}
