"""Weight-merging baseline: the experts' task vectors merged into their shared base, with no training.

What the OPD merge is measured against (DESIGN.md §1: OPD merges the experts "without the
conflicts of weight merging"). Each expert's task vector is its weights minus the base's, one
tensor per parameter; a LoRA expert is first folded into its own freshly loaded copy of the base
(peft's `merge_and_unload`). `pluribus.core.merge` combines the vectors (linear mean, task
arithmetic or TIES), and base + merged vector is saved as a full HF model.

Memory: the base, one expert at a time, and every expert's task vector in float32, so about
E + 2 models at the peak: fine for the tiny world and small real models. A streaming version
would read one tensor of each expert at a time instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pluribus.config import MergeConfig
from pluribus.core import linear_merge, task_arithmetic, ties_merge
from pluribus.errors import PluribusError
from pluribus.models import load, merge_lora, save


def _check_adapter_base(expert: Path, base: Path) -> None:
    """A LoRA expert's task vector means something only against the base it was trained over."""
    adapter_config = expert / "adapter_config.json"
    if not adapter_config.is_file():
        return
    recorded = Path(json.loads(adapter_config.read_text())["base_model_name_or_path"])
    if recorded.resolve() != base.resolve():
        raise PluribusError(f"merge: expert {expert} is a LoRA adapter over {recorded}, not over the merge base {base}")


def task_vectors(base_params: dict[str, Tensor], expert_paths: list[Path], base_path: Path) -> dict[str, list[Tensor]]:
    """Per parameter name, each expert's `weight − base weight` (float32), experts in the given order."""
    deltas: dict[str, list[Tensor]] = {name: [] for name in base_params}
    for path in expert_paths:
        _check_adapter_base(path, base_path)
        expert, _ = load(path, trainable=False)
        expert_params = {name: p.detach() for name, p in merge_lora(expert).named_parameters()}
        if expert_params.keys() != base_params.keys():
            odd = sorted(expert_params.keys() ^ base_params.keys())
            raise PluribusError(f"merge: expert {path} does not have the base's parameters (first difference: {odd[0]})")
        for name, base_weight in base_params.items():
            weight = expert_params[name]
            if weight.shape != base_weight.shape:
                raise PluribusError(f"merge: expert {path}: {name} is {tuple(weight.shape)}, "
                                    f"the base's is {tuple(base_weight.shape)}")
            deltas[name].append(weight.float() - base_weight.float())
        del expert, expert_params
    return deltas


def run(cfg: MergeConfig) -> Path:
    out, base_path = Path(cfg.out), Path(cfg.model)
    expert_paths = [Path(p) for p in cfg.experts]
    if any(out.resolve() == p.resolve() for p in [base_path, *expert_paths]):
        raise PluribusError(f"merge: out {out} would overwrite the base or an expert")
    base, tokenizer = load(base_path, trainable=False)
    base = merge_lora(base)  # the general SFT model may itself be an adapter
    base_params = dict(base.named_parameters())  # tied weights appear once
    deltas = task_vectors({name: p.detach() for name, p in base_params.items()}, expert_paths, base_path)
    combine = {"linear": lambda d: linear_merge(d, cfg.weights),
               "task_arithmetic": lambda d: task_arithmetic(d, cfg.scale),
               "ties": lambda d: ties_merge(d, cfg.density, cfg.scale)}[cfg.method]
    with torch.no_grad():
        for name, param in base_params.items():
            param.add_(combine(deltas.pop(name)).to(param.dtype))
    return save(base, tokenizer, out, {"stage": "merge", "method": cfg.method, "experts": cfg.experts,
                                        "config": cfg.model_dump()})
