"""A lean forward for decoding Llama/Qwen2-family models: the rollout engine's fast path.

On a small model, transformers' forward spends most of a decode step in Python: per layer a dozen
module calls, cache bookkeeping and a freshly built attention mask, each a few microseconds, around
matmuls that take less than that. `LeanDecoder` runs the same maths from the model's own weights
with a KV cache allocated once per batch, one boolean mask per batch, fused q/k/v and gate/up
matmuls, and no module calls.

The maths is transformers' Llama/Qwen2 forward (RMSNorm in float32, rotary embeddings with the
default RoPE, scaled-dot-product attention, SiLU-gated MLP), so its logits equal the HF forward's
up to float rounding (checked in tests/test_rollout.py). Where the rounding differs, a sampled
token can differ from the HF path's only where two Gumbel-perturbed logits tie to ~1e-6.

A LoRA adapter (peft) is folded into its base weight once per batch, `W + s·B·A`, instead of running
`x·Aᵀ·Bᵀ` beside every projection: the same function, cheaper per step. Anything the lean path does
not reproduce exactly (another architecture, RoPE scaling, sliding windows, other activations, other
adapter kinds) makes `LeanDecoder.build` return None, and the rollout uses the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Fused weights are copies; above this many parameters the copy's memory outweighs the saved op calls.
MAX_FUSED_PARAMETERS = 200_000_000
# Positions per packed prefill row: attention within a pack costs its length squared, so packs stay short.
PACK_TOKENS = 64


@dataclass
class _Layer:
    norm_attn_D: Tensor
    qkv_weight: Tensor  # [(H + 2·Hkv)·d, D]
    qkv_bias: Tensor | None
    o_weight: Tensor
    o_bias: Tensor | None
    norm_mlp_D: Tensor
    gate_up_weight: Tensor  # [2·I, D]
    gate_up_bias: Tensor | None
    down_weight: Tensor
    down_bias: Tensor | None


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear(module) -> tuple[Tensor, Tensor | None] | None:
    """(weight `[out, in]`, bias) of a plain linear layer or a plain-LoRA-wrapped one (adapters folded in)."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "get_delta_weight"):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base.weight, base.bias
    if getattr(module, "lora_variant", None) or getattr(module, "fan_in_fan_out", False):
        return None  # DoRA and other variants are not `W + s·B·A`
    weight = base.weight
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight, base.bias


def _cat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor | None:
    if all(t is None for t in tensors):
        return None
    return torch.cat([torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if t is None else t
                      for t, w in zip(tensors, like)])


def _rope_theta(config) -> float | None:
    """The RoPE base when the config uses the default RoPE (no scaling), else None."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        return None
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class LeanDecoder:
    """Prefill and one-token decode steps of a supported model over a batch, with its own KV cache.

    Build with `LeanDecoder.build(model)` (None when the model is not supported), then per batch
    `prefill` once and `step` once per generated token. Call under `torch.no_grad()`.
    """

    def __init__(self, config, embed_V_D: Tensor, layers: list[_Layer], norm_D: Tensor, head_V_D: Tensor,
                 head_bias_V: Tensor | None, theta: float):
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed_V_D, self.layers, self.norm_D = embed_V_D, layers, norm_D
        self.head_V_D, self.head_bias_V = head_V_D, head_bias_V
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float,
                                                      device=embed_V_D.device) / self.head_dim))
        self.dtype = embed_V_D.dtype

    @classmethod
    def build(cls, model) -> "LeanDecoder | None":
        """The lean forward of `model` (its current weights, adapters folded in), or None if unsupported."""
        lm = _causal_lm(model)
        config = getattr(lm, "config", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        theta = _rope_theta(config)
        layer_types = getattr(config, "layer_types", None) or []
        if (theta is None or getattr(config, "hidden_act", None) != "silu" or getattr(config, "use_sliding_window", False)
                or any(t != "full_attention" for t in layer_types) or getattr(config, "pretraining_tp", 1) != 1):
            return None
        if sum(p.numel() for p in lm.parameters()) > MAX_FUSED_PARAMETERS:
            return None
        decoder = lm.get_decoder()
        embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        head_affine = _linear(head)
        if type(embed) is not torch.nn.Embedding or head_affine is None:
            return None
        layers = []
        for block in decoder.layers:
            attn, mlp = block.self_attn, block.mlp
            projections = [_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                 mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if any(p is None for p in projections):
                return None
            (q, qb), (k, kb), (v, vb), (o, ob), (g, gb), (u, ub), (d, db) = projections
            layers.append(_Layer(block.input_layernorm.weight, torch.cat([q, k, v]), _cat([qb, kb, vb], [q, k, v]),
                                 o, ob, block.post_attention_layernorm.weight, torch.cat([g, u]),
                                 _cat([gb, ub], [g, u]), d, db))
        return cls(config, embed.weight, layers, decoder.norm.weight, *head_affine, theta)

    # --- the forward --------------------------------------------------------------------------------

    def _rms(self, x: Tensor, weight_D: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op, bit-identical to the op-by-op form in float32
            return F.rms_norm(x, weight_D.shape, weight_D, self.eps)
        # transformers' RMSNorm op for op: float32 statistics, weight applied in the input dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight_D * x32.to(x.dtype)

    def _forward(self, ids_B_S: Tensor, position_B_S: Tensor, mask_B_1_S_K: Tensor, keys_values) -> Tensor:
        """Hidden states `[B, S, D]` of S new tokens per row.

        mask_B_1_S_K: additive (0 where a query sees a key, -inf elsewhere).
        keys_values(layer, k_B_Hkv_S_d, v_B_Hkv_S_d) stores the new keys and values where they belong and returns
        the keys and values the queries attend to (K of them, as the mask has).
        """
        B, S = ids_B_S.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        # Queries and keys are adjacent in the fused projection: RoPE turns both at once, [B, S, H + Hkv, d].
        cos = self.cos_table[position_B_S][:, :, None]
        sin = self.sin_table[position_B_S][:, :, None]
        x = F.embedding(ids_B_S, self.embed_V_D)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._rms(x, layer.norm_attn_D), layer.qkv_weight, layer.qkv_bias)
            qk = qkv[..., :(H + Hkv) * d].view(B, S, H + Hkv, d)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q = qk[:, :, :H].transpose(1, 2)
            keys, values = keys_values(index, qk[:, :, H:].transpose(1, 2),
                                       qkv[..., (H + Hkv) * d:].view(B, S, Hkv, d).transpose(1, 2))
            if S == 1 and H != Hkv:  # one query: its heads grouped by key head, as transformers does
                attended = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, d), keys, values,
                                                          attn_mask=mask_B_1_S_K).reshape(B, H, 1, d)
            else:
                attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_B_1_S_K,
                                                          enable_gqa=H != Hkv)
            x = x + F.linear(attended.transpose(1, 2).reshape(B, S, H * d), layer.o_weight, layer.o_bias)
            gate, up = F.linear(self._rms(x, layer.norm_mlp_D), layer.gate_up_weight,
                                layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down_weight, layer.down_bias)
        return x

    def _logits(self, hidden_B_D: Tensor) -> Tensor:
        return F.linear(self._rms(hidden_B_D, self.norm_D), self.head_V_D, self.head_bias_V).float()

    def prefill(self, sequences: list[list[int]], max_new_tokens: int) -> Tensor:
        """Run each row's context (prompt, plus a resumed prefix) and allocate the cache for `max_new_tokens` more.

        Identical contexts (a GRPO group's G rows) run once, and the distinct ones run packed without padding,
        several to a row of at most PACK_TOKENS positions with a block-diagonal causal mask. Their keys and values
        land in one cache, each row's context right-aligned at the same column. Returns logits `[B, V]`
        predicting each row's next token.
        """
        device = self.embed_V_D.device
        distinct: dict[tuple[int, ...], int] = {}
        row_context = [distinct.setdefault(tuple(seq), len(distinct)) for seq in sequences]
        contexts = list(distinct)
        packs = _packs([len(c) for c in contexts])
        width = max(sum(len(contexts[c]) for c in pack) for pack in packs)
        ids = torch.zeros(len(packs), width, dtype=torch.long)
        position = torch.zeros(len(packs), width, dtype=torch.long)
        segment = torch.full((len(packs), width), -1, dtype=torch.long)
        where: list[tuple[int, int]] = [(0, 0)] * len(contexts)  # context → (pack, first column)
        for p, pack in enumerate(packs):
            column = 0
            for c in pack:
                n = len(contexts[c])
                ids[p, column:column + n] = torch.tensor(contexts[c])
                position[p, column:column + n] = torch.arange(n)
                segment[p, column:column + n] = c
                where[c] = (p, column)
                column += n
        B, longest = len(sequences), max(len(c) for c in contexts)
        self.cos_table, self.sin_table = self._rope_table(longest + max_new_tokens)
        # Where each row's context comes from in the packs (flattened) and goes to in the cache.
        lengths = [len(contexts[c]) for c in row_context]
        source = torch.tensor([where[c][0] * width + where[c][1] + j for c in row_context
                               for j in range(len(contexts[c]))])
        dest_row = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))
        dest_col = torch.tensor([longest - n + j for n in lengths for j in range(n)])
        shape = (B, self.kv_heads, longest + max_new_tokens, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        source, dest_row, dest_col = source.to(device), dest_row.to(device), dest_col.to(device)

        def keys_values(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            for cache, new in ((self.k_cache[layer], k), (self.v_cache[layer], v)):
                flat = new.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)
                cache.transpose(1, 2)[dest_row, dest_col] = flat[source]
            return k, v

        segment = segment.to(device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
        # A padding query sees itself, so its (unused) row stays finite instead of a softmax over nothing.
        mask = (same & causal) | torch.eye(width, dtype=torch.bool, device=device)
        hidden = self._forward(ids.to(device), position.to(device), self._additive(mask[:, None]), keys_values)
        last = torch.tensor([where[c][0] * width + where[c][1] + len(contexts[c]) - 1 for c in row_context],
                            device=device)
        # Keys a position may see: the row's context, then everything generated.
        seen = torch.arange(longest, device=device)[None] >= longest - torch.tensor(lengths, device=device)[:, None]
        self.mask_B_K = self._additive(torch.cat([seen, torch.ones(B, max_new_tokens, dtype=torch.bool,
                                                                   device=device)], dim=1))
        self.next_position_B = torch.tensor(lengths, device=device)
        self.length = longest
        return self._logits(hidden.reshape(-1, hidden.shape[-1])[last])

    def _additive(self, mask: Tensor) -> Tensor:
        """A boolean attention mask as the additive one SDPA would build from it (once, not once per layer)."""
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def _rope_table(self, positions: int) -> tuple[Tensor, Tensor]:
        """cos and sin `[positions, d]`, computed as transformers computes them for each position."""
        freqs = torch.arange(positions, device=self.inv_freq.device)[:, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed one token per cached row; logits `[B, V]` for the next."""
        start = self.length

        def keys_values(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.k_cache[layer][:, :, start] = k[:, :, 0]
            self.v_cache[layer][:, :, start] = v[:, :, 0]
            return self.k_cache[layer][:, :, :start + 1], self.v_cache[layer][:, :, :start + 1]

        mask = self.mask_B_K[:, None, None, :start + 1]
        hidden = self._forward(tokens_B.to(self.embed_V_D.device)[:, None], self.next_position_B[:, None], mask,
                               keys_values)
        self.length += 1
        self.next_position_B = self.next_position_B + 1
        return self._logits(hidden[:, 0])

    def keep_rows(self, rows: Tensor) -> None:
        """Drop every cached row but `rows` (indices, in their new order): finished rows stop costing compute."""
        rows = rows.to(self.embed_V_D.device)
        self.k_cache = [cache.index_select(0, rows) for cache in self.k_cache]
        self.v_cache = [cache.index_select(0, rows) for cache in self.v_cache]
        self.mask_B_K = self.mask_B_K.index_select(0, rows)
        self.next_position_B = self.next_position_B.index_select(0, rows)


def _packs(lengths: list[int]) -> list[list[int]]:
    """Contexts (by index) grouped into packs of at most PACK_TOKENS positions (a longer context alone), longest first."""
    capacity = max(PACK_TOKENS, max(lengths))
    packs: list[list[int]] = []
    room: list[int] = []
    for c in sorted(range(len(lengths)), key=lambda c: -lengths[c]):
        for p, free in enumerate(room):
            if lengths[c] <= free:
                packs[p].append(c)
                room[p] -= lengths[c]
                break
        else:
            packs.append([c])
            room.append(capacity - lengths[c])
    return packs
