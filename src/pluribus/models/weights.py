"""A trainer's weights as an inference engine loads them: full weights, HF checkpoint names, LoRA folded in."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def base_model_path(path: str | Path) -> Path:
    """The folder of the full model that `pluribus.models.load(path)` builds on: an adapter's base, else `path`."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    return Path(json.loads(adapter.read_text())["base_model_name_or_path"]) if adapter.is_file() else path


@torch.no_grad()
def full_weights(model) -> dict[str, torch.Tensor]:
    """The plain model's weights under the names `save_pretrained` gives them, with a LoRA adapter folded in
    (W + scale·B·A computed aside: the model itself is left as it is)."""
    if not hasattr(model, "disable_adapter"):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
              for name, module in base.named_modules() if isinstance(module, LoraLayer) and not module.merged}
    weights = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        weights[key] = value + deltas[key] if key in deltas else value.detach()
    return weights
