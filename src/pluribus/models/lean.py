"""Lean forwards for Llama/Qwen2-family models: the rollout's decode steps and the trainers' packed batches.

On a small model, transformers' forward spends much of its time in Python (per layer a dozen module calls,
cache bookkeeping, a freshly built mask) and a training batch spends much of its compute on padding. Two
forwards here compute the same maths (RMSNorm with float32 statistics, default RoPE, scaled-dot-product
attention, the SiLU-gated MLP) without either:

- `LeanDecoder` (sampling, no grad): the model's weights read once per batch (a LoRA adapter folded in,
  `W + s·B·A`), fused q/k/v and gate/up matmuls, a KV cache allocated once, identical contexts prefilled once
  and distinct ones packed without padding, finished rows dropped from the cache. In float32 on a CPU its decode
  step runs through three fused native kernels a layer (`pluribus.models.kernels`) beside PyTorch's matmuls.
- `predicting_hidden_states` (training and teachers, grad flows): the model's own modules on each distinct
  token once, no padding: a prompt shared by a GRPO group's G rows runs once (its keys and values serve all
  G; their gradients add up, as if it ran G times), and only attention sees the rows laid out side by side
  (SDPA; in float32 on a CPU, native kernels for the attention, RMSNorm, RoPE and SiLU·up). It can run in two
  parts (`prompt_states`, then `prompts=`): the prompts first, whose keys and values then also fill the
  decoder's cache, so that on-policy distillation runs each prompt once a step, not twice (prefill, then the
  student's forward). The responses' projections need not run twice either: the decoder can record its own
  (`LeanDecoder.record`, `DecodedLinears`), and the forward then takes their values (`decoded=`), computing only
  what lies between them, with the linear's backward for each.

Both equal the HF forward up to float rounding (tests/test_rollout_lean.py, tests/test_models_lean.py: logits
within 1e-5, gradients within 1e-5 relative): where rounding differs a sampled token can differ only at a
~1e-6 tie of two Gumbel-perturbed logits. What they do not reproduce (another architecture, RoPE scaling,
sliding windows, other activations, adapters other than plain LoRA for decoding, sharded or wrapped models,
several torchrun processes) makes them answer None, and the callers use the HF forward; so does
PLURIBUS_LEAN=0 (to rule them out).
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pluribus.models import kernels as native

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Fused weights are copies; above this many parameters the copy's memory outweighs the saved op calls.
MAX_FUSED_PARAMETERS = 200_000_000
# Dense attention masks beyond this many entries (long sequences) cost more memory than padding saves.
MAX_MASK_ELEMENTS = 1 << 25
# Positions per packed prefill row: attention within a pack costs its length squared, so packs stay short.
PACK_TOKENS = 64
# Longest cache the native decode kernels take (their scores of one head live on the stack): beyond, PyTorch ops.
KERNEL_MAX_CONTEXT = 16_384
# Most bytes `LeanDecoder.record` sets aside for a rollout's projections (its slabs are sized for every row's longest
# response); beyond, nothing is recorded and the update computes them.
RECORD_MAX_BYTES = 1 << 30


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


def _supported(lm) -> float | None:
    """The RoPE base when the lean forwards reproduce `lm` (a plain, unsharded Llama/Qwen2), else None.
    PLURIBUS_LEAN=0 in the environment turns them off (everything runs through transformers' forward)."""
    if os.environ.get("PLURIBUS_LEAN", "1") == "0":
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        # FSDP2's shards need its hooks, and DDP must sample as FSDP2 does (a top-p cut-off can fall either
        # side of a float-rounding tie): several processes keep transformers' forward.
        return None
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return None
    layer_types = getattr(config, "layer_types", None) or []
    if (getattr(config, "hidden_act", None) != "silu" or getattr(config, "use_sliding_window", False)
            or any(t != "full_attention" for t in layer_types) or getattr(config, "pretraining_tp", 1) != 1):
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # FSDP2 (its hooks must run): the sharded root keeps its own parameters (the embedding) unsharded between
    # forwards while its layers stay sharded, so the embedding alone does not tell
    embed = lm.get_input_embeddings()
    if embed is None or isinstance(lm, FSDPModule) or isinstance(getattr(embed, "weight", None), DTensor):
        return None
    return _rope_theta(config)


def _dims(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _rms(x: Tensor, weight_D: Tensor, eps: float) -> Tensor:
    if x.dtype == torch.float32:  # one fused op, bit-identical to transformers' op-by-op form in float32
        return F.rms_norm(x, weight_D.shape, weight_D, eps)
    x32 = x.float()  # transformers' RMSNorm: float32 statistics, the weight applied in the input dtype
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x32.to(x.dtype)


def _inv_freq(theta: float, head_dim: int, device) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def _rope_table(inv_freq: Tensor, positions: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin `[positions, d]` for `_rotate`: cos and sin computed as transformers computes them for
    each position, the sine's first half negated."""
    freqs = torch.arange(positions, device=inv_freq.device)[:, None].float() * inv_freq
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-freqs, freqs), dim=-1).sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE: x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x, d/2)·[-sin₁, sin₂] (one roll instead
    of two slices, a negation and a cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask as the additive one SDPA would build from it (once, not once per layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


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
        self.heads, self.kv_heads, self.head_dim = _dims(config)
        self.eps = config.rms_norm_eps
        self.embed_V_D, self.layers, self.norm_D = embed_V_D, layers, norm_D
        self.head_V_D, self.head_bias_V = head_V_D, head_bias_V
        self.inv_freq = _inv_freq(theta, self.head_dim, embed_V_D.device)
        self.dtype = embed_V_D.dtype
        # Float32 on the CPU: a decode step through the native kernels (pluribus.models.kernels), which keep the
        # keys transposed, `[B, Hkv, d, L]`; elsewhere, or without a compiler, PyTorch ops and keys `[B, Hkv, L, d]`.
        self.kernels = native.cpu_kernels(self.head_dim) if (
            embed_V_D.device.type == "cpu" and self.dtype == torch.float32) else None
        # Each decode matmul's weight as the kernel before it reads it ahead (`_native_step`), worked out once: the
        # weights stay put for the batch. Per layer: q/k/v, output, gate/up, down; then the head after the last.
        self.spans = [tuple(native.warm_span(w) for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight,
                                                           layer.down_weight)) for layer in layers]
        self.head_span = native.warm_span(head_V_D)
        self.recorded: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None  # `record`
        self.recorded_rows = 0

    @classmethod
    def build(cls, model) -> "LeanDecoder | None":
        """The lean forward of `model` (its current weights, adapters folded in), or None if unsupported."""
        lm = _causal_lm(model)
        theta = _supported(lm)
        if theta is None or sum(p.numel() for p in lm.parameters()) > MAX_FUSED_PARAMETERS:
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
        return cls(lm.config, embed.weight, layers, decoder.norm.weight, *head_affine, theta)

    # --- the forward --------------------------------------------------------------------------------

    def _forward(self, ids_B_S: Tensor, position_B_S: Tensor, mask: Tensor, keys_values,
                 keep: Tensor | None = None) -> Tensor:
        """Hidden states `[B, S, D]` of S new tokens per row (`[len(keep), D]` with `keep`).

        mask: additive (0 where a query sees a key, -inf elsewhere), `[B, 1, S, K]`; for one new token per row
            (S = 1), `[B·Hkv, 1, K]`: each key head's row of the one-query attention's batched matmul.
        keys_values(layer, k_B_Hkv_S_d, v_B_Hkv_S_d) stores the new keys and values where they belong and returns
            the keys and values the queries attend to (K of them, as the mask has).
        keep: the flat indices (into B·S) of the positions whose hidden state is wanted. The last layer only
            needs every position's keys and values; its output projection and MLP run on these alone.
        """
        B, S = ids_B_S.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        # Queries and keys are adjacent in the fused projection: RoPE turns both at once, [B, S, H + Hkv, d].
        cos = self.cos_table[position_B_S][:, :, None]
        sin = self.sin_table[position_B_S][:, :, None]
        x = F.embedding(ids_B_S, self.embed_V_D)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            qkv = F.linear(_rms(x, layer.norm_attn_D, self.eps), layer.qkv_weight, layer.qkv_bias)
            qk = qkv[..., :(H + Hkv) * d].view(B, S, H + Hkv, d)
            qk = _rotate(qk, cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            keys, values = keys_values(index, qk[:, :, H:].transpose(1, 2),
                                       qkv[..., (H + Hkv) * d:].view(B, S, Hkv, d).transpose(1, 2))
            if S == 1:  # one query per row: its heads grouped by key head, two batched matmuls (faster than
                # SDPA's kernel at these sizes; equal to float rounding), the scale and mask fused into the first
                scores = torch.baddbmm(mask, q.reshape(B * Hkv, H // Hkv, d), keys.flatten(0, 1).transpose(1, 2),
                                       alpha=d ** -0.5).softmax(-1)
                attended = torch.bmm(scores, values.flatten(0, 1)).view(B, S, H * d)
            else:
                attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                          enable_gqa=H != Hkv).transpose(1, 2).reshape(B, S, H * d)
            if index == last and keep is not None:
                x, attended = x.reshape(B * S, -1)[keep], attended.reshape(B * S, -1)[keep]
            x = x + F.linear(attended, layer.o_weight, layer.o_bias)
            gate, up = F.linear(_rms(x, layer.norm_mlp_D, self.eps), layer.gate_up_weight,
                                layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate, inplace=True).mul_(up), layer.down_weight, layer.down_bias)
        return x

    def _logits(self, hidden_B_D: Tensor) -> Tensor:
        return F.linear(_rms(hidden_B_D, self.norm_D, self.eps), self.head_V_D, self.head_bias_V).float()

    def prefill(self, sequences: list[list[int]], max_new_tokens: int,
                prompts: "PromptStates | None" = None) -> Tensor:
        """Run each row's context (prompt, plus a resumed prefix) and allocate the cache for `max_new_tokens` more.

        Identical contexts (a GRPO group's G rows) run once, and the distinct ones without padding: through the
        native kernels, each token once in one packed list; else several to a row of at most PACK_TOKENS positions
        with a block-diagonal causal mask. Their keys and values land in one cache, each row's context
        right-aligned at the same column. Returns logits `[B, V]` predicting each row's next token.
        prompts: these contexts already run by the training forward (`prompt_states`, the same weights): their
            keys and values are copied into the cache instead (native kernels only).
        """
        device = self.embed_V_D.device
        distinct: dict[tuple[int, ...], int] = {}
        row_context = [distinct.setdefault(tuple(seq), len(distinct)) for seq in sequences]
        contexts = list(distinct)
        B, longest = len(sequences), max(len(c) for c in contexts)
        lengths = [len(contexts[c]) for c in row_context]
        self.cos_table, self.sin_table = _rope_table(self.inv_freq, longest + max_new_tokens, self.dtype)
        columns = longest + max_new_tokens
        if self.kernels is not None and columns > KERNEL_MAX_CONTEXT:
            self.kernels = None
        if self.kernels is not None:
            columns = -(-columns // native.BLOCK) * native.BLOCK
        shape = (B, self.kv_heads, columns, self.head_dim)
        key_shape = shape if self.kernels is None else (B, self.kv_heads, self.head_dim, columns)
        self.k_cache = [torch.zeros(key_shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        hidden_C_D = None
        if self.kernels is not None and prompts is not None and prompts.prompts == contexts:
            hidden_C_D = self._prefill_from(prompts, contexts, row_context, longest)
        elif self.kernels is not None:
            hidden_C_D = self._native_prefill(contexts, row_context, longest)
        if hidden_C_D is None:
            hidden_C_D = self._packed_prefill(contexts, row_context, longest)
        # Keys a position may see: the row's context, then everything generated.
        seen = torch.arange(longest, device=device)[None] >= longest - torch.tensor(lengths, device=device)[:, None]
        self.mask_B_K = _additive(torch.cat([seen, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device),
                                             torch.zeros(B, columns - longest - max_new_tokens, dtype=torch.bool,
                                                         device=device)], dim=1), self.dtype)
        self.next_position_B = torch.tensor(lengths, device=device)
        self.length = longest
        return self._logits(hidden_C_D[torch.tensor(row_context, device=device)])

    @staticmethod
    def _cache_rows(contexts: list[tuple[int, ...]], row_context: list[int]) -> tuple[Tensor, Tensor]:
        """Each row's context's start and length (int64) in a packed list of the contexts one after another."""
        length_C = torch.tensor([len(c) for c in contexts], device="cpu")
        rows = torch.tensor(row_context, device="cpu")
        return (length_C.cumsum(0) - length_C)[rows], length_C[rows]

    def _prefill_from(self, prompts: "PromptStates", contexts: list[tuple[int, ...]], row_context: list[int],
                      longest: int) -> Tensor:
        """`_native_prefill` from the contexts' `PromptStates` (their packed list is the same)."""
        start_B, length_B = self._cache_rows(contexts, row_context)
        for index, (keys, values) in enumerate(zip(prompts.keys_N_Hkv_d, prompts.values_N_Hkv_d)):
            self.kernels.write_cache(keys.detach(), values.detach(), start_B, length_B, longest, self.k_cache[index],
                                     self.v_cache[index])
        return prompts.last_C_D.detach()

    def _native_prefill(self, contexts: list[tuple[int, ...]], row_context: list[int], longest: int) -> Tensor | None:
        """The distinct contexts' last hidden states `[C, D]` through the native kernels (float32, CPU), each token
        once in one packed list (the training forward's layout, `_layout`; attention through its kernel), keys
        and values written into the cache as they are made; None where the layout is refused (long contexts)."""
        C = len(contexts)
        layout = _layout([list(c) for c in contexts], torch.zeros(C, 0, dtype=torch.long, device="cpu"),
                         torch.zeros(C, 0, dtype=torch.long, device="cpu"), self.dtype, None)
        if layout is None:
            return None
        (call,) = layout.attention  # every context is distinct, so each runs its own: one call
        kernels, (H, Hkv, d) = self.kernels, (self.heads, self.kv_heads, self.head_dim)
        N = layout.ids_N.shape[0]
        start_B, length_B = self._cache_rows(contexts, row_context)  # contexts one after another
        last_C = torch.tensor([len(c) for c in contexts], device="cpu").cumsum(0) - 1
        cos, sin = self.cos_table[layout.position_N], self.sin_table[layout.position_N]  # [N, d]
        x = F.embedding(layout.ids_N, self.embed_V_D)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(kernels.rms_norm(x, layer.norm_attn_D, self.eps), layer.qkv_weight, layer.qkv_bias)
            qk = kernels.rope(qkv[:, :(H + Hkv) * d].view(N, H + Hkv, d), cos, sin)  # queries and keys turned
            v = qkv[:, (H + Hkv) * d:].view(N, Hkv, d)
            kernels.write_cache(qk[:, H:], v, start_B, length_B, longest, self.k_cache[index], self.v_cache[index])
            attended = kernels.packed_attention(qk[:, :H], qk[:, H:], v, call.query_token_B_Q, call.key_token_B_K,
                                                call.mask_B_1_Q_K, call.queried_B)
            owner = layout.owner_N
            if index == len(self.layers) - 1:  # only each context's last position is read from here on
                x, owner = x[last_C], owner[last_C]
            x = x + F.linear(attended[owner], layer.o_weight, layer.o_bias)
            up = kernels.silu_mul(F.linear(kernels.rms_norm(x, layer.norm_mlp_D, self.eps), layer.gate_up_weight,
                                           layer.gate_up_bias))
            x = x + F.linear(up, layer.down_weight, layer.down_bias)
        return x

    def _packed_prefill(self, contexts: list[tuple[int, ...]], row_context: list[int], longest: int) -> Tensor:
        """The distinct contexts' last hidden states `[C, D]`, several contexts to a row of at most PACK_TOKENS
        positions under a block-diagonal causal mask (PyTorch ops)."""
        device = self.embed_V_D.device
        packs = _packs([len(c) for c in contexts])
        width = max(sum(len(contexts[c]) for c in pack) for pack in packs)
        # laid out on the host, then moved to the weights' device once
        ids = torch.zeros(len(packs), width, dtype=torch.long, device="cpu")
        position = torch.zeros(len(packs), width, dtype=torch.long, device="cpu")
        segment = torch.full((len(packs), width), -1, dtype=torch.long, device="cpu")
        where: list[tuple[int, int]] = [(0, 0)] * len(contexts)  # context → (pack, first column)
        for p, pack in enumerate(packs):
            column = 0
            for c in pack:
                n = len(contexts[c])
                ids[p, column:column + n] = torch.tensor(contexts[c], device="cpu")
                position[p, column:column + n] = torch.arange(n, device="cpu")
                segment[p, column:column + n] = c
                where[c] = (p, column)
                column += n
        # Where each row's context comes from in the packs (flattened) and goes to in the cache.
        lengths = [len(contexts[c]) for c in row_context]
        source = torch.tensor([where[c][0] * width + where[c][1] + j for c in row_context
                               for j in range(len(contexts[c]))], device="cpu")
        dest_row = torch.repeat_interleave(torch.arange(len(row_context), device="cpu"),
                                           torch.tensor(lengths, device="cpu"))
        dest_col = torch.tensor([longest - n + j for n in lengths for j in range(n)], device="cpu")
        source, dest_row, dest_col = source.to(device), dest_row.to(device), dest_col.to(device)

        def keys_values(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            keys = self.k_cache[layer] if self.kernels is None else self.k_cache[layer].transpose(2, 3)
            for cache, new in ((keys, k), (self.v_cache[layer], v)):  # cache: [B, Hkv, L, d] (a view)
                flat = new.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)
                cache.transpose(1, 2)[dest_row, dest_col] = flat[source]
            return k, v

        segment = segment.to(device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
        # A padding query sees itself, so its (unused) row stays finite instead of a softmax over nothing.
        mask = (same & causal) | torch.eye(width, dtype=torch.bool, device=device)
        # Each distinct context's last position: the only hidden states read (the others' keys and values are)
        last = torch.tensor([where[c][0] * width + where[c][1] + len(contexts[c]) - 1 for c in range(len(contexts))],
                            device=device)
        return self._forward(ids.to(device), position.to(device), _additive(mask[:, None], self.dtype),
                             keys_values, keep=last)

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed one token per cached row; logits `[B, V]` for the next."""
        if self.kernels is not None:
            return self._native_step(tokens_B)
        start = self.length

        def keys_values(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.k_cache[layer][:, :, start] = k[:, :, 0]
            self.v_cache[layer][:, :, start] = v[:, :, 0]
            return self.k_cache[layer][:, :, :start + 1], self.v_cache[layer][:, :, :start + 1]

        mask = self.mask_B_K[:, None, :start + 1].repeat_interleave(self.kv_heads, dim=0)  # [B·Hkv, 1, K]
        hidden = self._forward(tokens_B.to(self.embed_V_D.device)[:, None], self.next_position_B[:, None], mask,
                               keys_values)
        self.length += 1
        self.next_position_B = self.next_position_B + 1
        return self._logits(hidden[:, 0])

    def record(self, rows: int) -> bool:
        """Keep the projections' outputs of the next decode steps, up to `rows` rows in all (`decoded_linears`);
        False where the steps do not run through the native kernels (the one step that keeps them) or the room
        would take more than RECORD_MAX_BYTES."""
        self.recorded, self.recorded_rows = None, 0
        D = self.embed_V_D.shape[1]
        widths = [(layer.qkv_weight.shape[0], D, layer.gate_up_weight.shape[0], D) for layer in self.layers]
        if self.kernels is None or rows * sum(map(sum, widths)) * self.embed_V_D.element_size() > RECORD_MAX_BYTES:
            return False
        self.recorded = [tuple(torch.empty(rows, width, dtype=self.dtype, device=self.embed_V_D.device)
                               for width in layer_widths) for layer_widths in widths]
        return True

    def decoded_linears(self, rows_R: Tensor) -> DecodedLinears | None:
        """The recorded projections at recorded rows `rows_R` (in the order wanted), split as the model's modules
        are (`DecodedLinears`); None when nothing was recorded."""
        if self.recorded is None:
            return None
        H, Hkv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        layers = []
        for slabs in self.recorded:  # whole rows gathered (a column slice gathers ~1.7x slower), then split: views
            qkv, o, gate_up, down = (slab.index_select(0, rows_R) for slab in slabs)
            I = gate_up.shape[1] // 2
            layers.append(dict(q=qkv[:, :H], k=qkv[:, H:H + Hkv], v=qkv[:, H + Hkv:], o=o, gate=gate_up[:, :I],
                               up=gate_up[:, I:], down=down))
        return DecodedLinears(layers)

    def _native_step(self, tokens_B: Tensor) -> Tensor:
        """`step` through the native kernels: per layer four matmuls (PyTorch's) and three fused calls (RoPE, cache
        write and attention; residual add and RMSNorm; SiLU·up), the residual add folded into the next norm. Each
        fused call ends by reading through the weight of the matmul after it (`warm`): with a few dozen rows a
        matmul waits on its weight, which the step's other weights and caches have pushed out of the core's caches."""
        kernels, column, spans = self.kernels, self.length, self.spans
        B = tokens_B.shape[0]
        if self.recorded is not None and self.recorded_rows + B > self.recorded[0][0].shape[0]:
            self.recorded = None  # more rows than `record` made room for: what it holds is not the whole rollout
        at = slice(self.recorded_rows, self.recorded_rows + B)
        x = F.embedding(tokens_B, self.embed_V_D)  # the residual stream [B, D], updated in place
        normed = kernels.add_rms_norm(x, None, self.layers[0].norm_attn_D, self.eps, torch.empty_like(x),
                                      warm=spans[0][0])
        for index, layer in enumerate(self.layers):
            _, o_span, gate_up_span, down_span = spans[index]
            into = _NOWHERE if self.recorded is None else [slab[at] for slab in self.recorded[index]]
            qkv = _linear_into(normed, layer.qkv_weight, layer.qkv_bias, into[0])
            attended = kernels.attention(qkv, self.cos_table, self.sin_table, self.next_position_B,
                                         self.k_cache[index], self.v_cache[index], self.mask_B_K, column, self.heads,
                                         warm=o_span)
            kernels.add_rms_norm(x, _linear_into(attended, layer.o_weight, layer.o_bias, into[1]), layer.norm_mlp_D,
                                 self.eps, normed, warm=gate_up_span)
            up = kernels.silu_mul(_linear_into(normed, layer.gate_up_weight, layer.gate_up_bias, into[2]),
                                  warm=down_span)
            last = index + 1 == len(self.layers)
            following, span = (self.norm_D, self.head_span) if last else \
                (self.layers[index + 1].norm_attn_D, spans[index + 1][0])
            kernels.add_rms_norm(x, _linear_into(up, layer.down_weight, layer.down_bias, into[3]), following, self.eps,
                                 normed, warm=span)
        if self.recorded is not None:
            self.recorded_rows += B
        self.length += 1
        self.next_position_B = self.next_position_B + 1
        return F.linear(normed, self.head_V_D, self.head_bias_V)

    def keep_rows(self, rows: Tensor) -> None:
        """Drop every cached row but `rows` (indices, in their new order): finished rows stop costing compute."""
        rows = rows.to(self.embed_V_D.device)
        self.k_cache = [cache.index_select(0, rows) for cache in self.k_cache]
        self.v_cache = [cache.index_select(0, rows) for cache in self.v_cache]
        self.mask_B_K = self.mask_B_K.index_select(0, rows)
        self.next_position_B = self.next_position_B.index_select(0, rows)


_NOWHERE = (None,) * 4  # a decode step's four matmuls, none recorded


def _linear_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)` of a matrix `x`, written into `out` when given (the same BLAS call either way)."""
    if out is None:
        return F.linear(x, weight, bias)
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


def _packs(lengths: list[int]) -> list[list[int]]:
    """Contexts (by index) in packs of at most PACK_TOKENS positions (a longer one alone), longest first."""
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


# --- training: packed batches ----------------------------------------------------------------------------

@dataclass
class _Attention:
    """One attention call over some rows: each row's queries (a window of its columns) against all its columns.

    query_token_B_Q, key_token_B_K: the packed index of each query and each key column; 0 on padding.
    mask_B_1_Q_K: additive: a query sees the real keys up to its own column.
    queried_B: how many of a row's queries are real (its first ones); the rest are padding.
    """

    query_token_B_Q: Tensor
    key_token_B_K: Tensor
    mask_B_1_Q_K: Tensor
    queried_B: Tensor


@dataclass
class _Layout:
    """Where each distinct token of a batch sits: once in the packed `[N]` list, and in every row that sees it.
    Built on the host (CPU tensors, from Python lists); `predicting_hidden_states` moves it to the weights' device.

    ids_N, position_N: the distinct tokens, row by row: a row's prompt where it first appears (for its adapter),
        then the row's response tokens but the last; their positions in their rows. With `PromptStates`, only
        the response tokens: the prompts' come first in the packed list, `base` of them, already run.
    attention: the rows that run their prompt (all their columns are queries), then the rows whose prompt
        another row runs (only their response columns are queries): a group's G - 1 other rows do not
        attend from the prompt again.
    owner_N: where each distinct token's attention output is, in the attention calls' outputs laid end to end.
    predict_M: the packed index of the token that predicts each masked response token, row-major (below `base`:
        a prompt's last token, run with the prompts).
    adapter_tokens: (adapter, its slice of the N tokens), when the rows have adapters.
    adapter_predicting: (adapter, its slice of the M predicting positions), likewise.
    """

    ids_N: Tensor
    position_N: Tensor
    attention: list[_Attention]
    owner_N: Tensor
    predict_M: Tensor
    adapter_tokens: list[tuple[str, slice]] | None
    adapter_predicting: list[tuple[str, slice]] | None
    base: int = 0


def _layout(prompt_ids: list[list[int]], response_ids_B_T: Tensor, response_mask_B_T: Tensor,
            dtype: torch.dtype, adapters: Sequence[str] | None,
            prompts_run: list[tuple[int, ...]] | None = None) -> _Layout | None:
    mask_B_T = response_mask_B_T.bool()
    lengths_B = mask_B_T.sum(-1)
    if any(not p for p in prompt_ids) or not torch.equal(
            mask_B_T, torch.arange(mask_B_T.shape[1], device=mask_B_T.device)[None] < lengths_B[:, None]):
        return None  # an empty prompt, or a mask that is not a prefix of its row: not a rollout's
    if adapters is not None and [a for i, a in enumerate(adapters) if i == 0 or a != adapters[i - 1]] != \
            list(dict.fromkeys(adapters)):
        return None  # each adapter's rows must be contiguous, so its tokens are one slice
    lengths = lengths_B.tolist()
    responses = response_ids_B_T.tolist()
    start: dict[tuple, int] = {}  # (adapter, distinct prompt) → its first packed index
    base = 0  # packed tokens before this layout's own: the prompts already run, one after another
    for prompt in prompts_run or ():
        start[None, prompt] = base
        base += len(prompt)
    if prompts_run is not None and (adapters is not None or any((None, tuple(p)) not in start for p in prompt_ids)):
        return None
    ids: list[int] = []
    position: list[int] = []
    predict: list[int] = []
    rows: list[tuple[list[int], int, int]] = []  # per row: its columns' packed indices, its first query column
    bounds: dict[str, list[int]] = {}
    predicting: dict[str, list[int]] = {}
    for b, (prompt, n) in enumerate(zip(prompt_ids, lengths)):
        P, key = len(prompt), (None if adapters is None else adapters[b], tuple(prompt))
        runs_prompt = key not in start  # the first row with this prompt runs it, and owns its outputs
        if runs_prompt:
            start[key] = base + len(ids)
            ids += prompt
            position += range(P)
        own = range(base + len(ids), base + len(ids) + max(n - 1, 0))
        ids += responses[b][: len(own)]
        position += range(P, P + len(own))
        columns = list(range(start[key], start[key] + P)) + list(own)
        rows.append((columns, 0 if runs_prompt else P, b))
        predict += columns[P - 1: P - 1 + n]
        if adapters is not None:  # (base is 0)
            bounds.setdefault(adapters[b], [start[key], len(ids)])[1] = len(ids)
            predicting.setdefault(adapters[b], [len(predict) - n, len(predict)])[1] = len(predict)
    owner = torch.zeros(len(ids), dtype=torch.long, device="cpu")
    attention = []
    offset = 0
    for group in ([r for r in rows if r[1] == 0], [r for r in rows if r[1] > 0]):
        if not group:
            continue
        K = max(len(columns) for columns, _, _ in group)
        Q = max(max(len(columns) - first, 1) for columns, first, _ in group)
        if len(group) * Q * K > MAX_MASK_ELEMENTS:
            return None  # long sequences: a dense mask would cost more memory than padding saves
        # each row's columns and its query columns, padded with 0; one tensor each (not a write per row)
        keys = longs(chain.from_iterable(columns + [0] * (K - len(columns)) for columns, _, _ in group))
        queries = longs(chain.from_iterable(columns[first:] + [0] * (Q - len(columns) + first)
                                             for columns, first, _ in group))
        keys, queries = keys.view(len(group), K), queries.view(len(group), Q)
        length_G, first_G = (longs(v)[:, None, None] for v in
                             ([len(columns) for columns, _, _ in group], [first for _, first, _ in group]))
        column_K, query_Q = torch.arange(K, device="cpu"), torch.arange(Q, device="cpu")
        # query i (column first + i) sees the row's columns up to its own; a padding query sees all of them (its
        # row stays finite)
        seen = (column_K[None, None, :] < length_G) & (column_K[None, None, :] <= first_G + query_Q[None, :, None])
        queried = (length_G - first_G)[:, 0, 0]
        real = query_Q[None, :] < queried[:, None]  # [G, Q]: queries that are a token of the row
        owner[queries[real] - base] = offset + torch.arange(len(group) * Q, device="cpu").view(len(group), Q)[real]
        # queries index this layout's own tokens (keys: the prompts run before, then these); padding stays at 0
        attention.append(_Attention((queries - base).clamp_min_(0), keys, _additive(seen[:, None], dtype),
                                    queried.clamp(0, Q)))
        offset += len(group) * Q
    return _Layout(longs(ids), longs(position), attention, owner, longs(predict),
                   *(None if adapters is None else [(a, slice(lo, hi)) for a, (lo, hi) in where.items()]
                     for where in (bounds, predicting)), base=base)


def longs(values: Iterable[int]) -> Tensor:
    """A CPU int64 tensor of ints, through an array (`torch.tensor` of a list takes ~0.1 µs an element: a batch's
    layout holds several thousand)."""
    packed = array("q", values)
    return torch.frombuffer(packed, dtype=torch.long) if packed else torch.zeros(0, dtype=torch.long, device="cpu")


@dataclass
class DecodedLinears:
    """What a rollout's decode steps computed of its responses, kept so the update after it need not compute it
    again: per layer, the seven projections' outputs (`q`, `k`, `v` before RoPE, `o`, `gate`, `up`, `down`, each
    `[N, out]`) at the N tokens the decode fed, row by row, each row's response tokens but the last (the packed
    forward's own tokens after `prompt_states`). Valid only at the weights that sampled them, after the prompts'
    `PromptStates` at those weights: the decode attended to those prompts' keys and values."""

    layers: list[dict[str, Tensor]]


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class _KnownLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` whose value is already known (`out`, computed by the rollout's decode at the same
    weights): the forward returns it, the backward is the linear's (`dx = g·W`, `dW = gᵀ·x`, `db = Σ g`)."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (grad.mm(weight) if needs[0] else None, None, grad.t().mm(x) if needs[2] else None,
                grad.sum(0) if ctx.has_bias and needs[3] else None)


def _decoded_fits(decoded: DecodedLinears, decoder, N: int) -> bool:
    """Whether `decoded` stands for the projections of the N own tokens of a forward after the prompts (each own
    token, a response token but the last, predicts the next, so the last layer keeps all N, as the decode ran them):
    one record a layer, N rows, and every projection a plain `nn.Linear` (a LoRA layer's parts are not recorded)."""
    return len(decoded.layers) == len(decoder.layers) and all(decoded.layers[0][name].shape[0] == N
                                                              for name in PROJECTIONS) and all(
        type(getattr(block.self_attn if name in "qkvo" else block.mlp, f"{name}_proj")) is torch.nn.Linear
        for block in decoder.layers for name in PROJECTIONS)


def _lora_layers(model) -> list | None:
    """The LoRA layers of a peft model when every one is plain LoRA (`W x + s·B A x`), else None."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for m in layers:
        if getattr(m, "lora_variant", None) or getattr(m, "merged", False) or getattr(m, "disable_adapters", False) \
                or getattr(m, "fan_in_fan_out", False) or type(m.base_layer) is not torch.nn.Linear:
            return None
    return layers


def _project(module, x: Tensor, adapter_tokens: list[tuple[str, slice]] | None) -> Tensor:
    """`module(x)`; with `adapter_tokens`, a LoRA layer's base on every token and each adapter on its slice."""
    if adapter_tokens is None or not hasattr(module, "lora_A"):
        return module(x)
    out = module.base_layer(x)
    for adapter, tokens in adapter_tokens:
        if adapter in module.lora_A:
            a, b = module.lora_A[adapter], module.lora_B[adapter]
            low_rank = F.linear(module.lora_dropout[adapter](x[tokens]), a.weight, a.bias)
            if b.bias is None:  # two ops, not six: 12 teachers run 12 of these per projection
                out[tokens].addmm_(low_rank, b.weight.t(), alpha=module.scaling[adapter])
            else:
                out[tokens] += F.linear(low_rank, b.weight, b.bias) * module.scaling[adapter]
    return out


@dataclass
class PromptStates:
    """A batch's distinct prompts, run once through the training forward before its rollout (`prompt_states`) and
    kept for the step. The rollout's decoder fills its cache from their keys and values instead of running the
    prompts again (`LeanDecoder.prefill`), and `predicting_hidden_states(..., prompts=)` runs only the responses,
    attending to them; gradients reach the prompt tokens through them. Valid where one update follows each rollout
    at the weights that sampled it (on-policy distillation): both then run the same weights.

    prompts: the distinct prompts in the order of their first row; their tokens packed one prompt after another.
    keys_N_Hkv_d, values_N_Hkv_d: per layer, the packed prompt tokens' keys (after RoPE) and values.
    last_C_D: the last layer's output at each prompt's last token, before the final norm.
    """

    prompts: list[tuple[int, ...]]
    keys_N_Hkv_d: list[Tensor]
    values_N_Hkv_d: list[Tensor]
    last_C_D: Tensor


def prompt_states(model, prompt_ids: list[list[int]]) -> PromptStates | None:
    """`PromptStates` of the distinct prompts among `prompt_ids` through the model's own modules (grad flows when
    enabled), or None where the lean forward does not reproduce `model`, or where the model is in training mode
    with dropout (decoding from its keys and values would sample from a dropped-out model)."""
    lm = _causal_lm(model)
    if lm.training and (getattr(lm.config, "attention_dropout", 0.0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.modules())):
        return None
    distinct = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    empty = torch.zeros(len(distinct), 0, dtype=torch.long, device="cpu")
    keys: list[Tensor] = []
    values: list[Tensor] = []
    ends = torch.tensor([len(p) for p in distinct], device="cpu").cumsum(0) - 1
    last = _packed_forward(model, [list(p) for p in distinct], empty, empty, None, None, ends, (keys, values))
    return None if last is None else PromptStates(distinct, keys, values, last)


def prefill_takes_prompt_states(model) -> bool:
    """Whether `LeanDecoder.prefill` copies `PromptStates` in place of running the prompts: float32 weights on a
    CPU with the native kernels. Elsewhere it runs them anyway, so keeping the prompts' activations (and graph)
    across the rollout would cost memory and save nothing."""
    lm = _causal_lm(model)
    weight = getattr(lm.get_input_embeddings(), "weight", None)
    return (isinstance(weight, Tensor) and weight.device.type == "cpu" and weight.dtype == torch.float32
            and native.cpu_kernels(_dims(lm.config)[2]) is not None)


def predicting_hidden_states(model, prompt_ids: list[list[int]], response_ids_B_T: Tensor,
                             response_mask_B_T: Tensor, adapters: Sequence[str] | None = None,
                             prompts: PromptStates | None = None, decoded: DecodedLinears | None = None
                             ) -> Tensor | None:
    """Final-norm hidden states `[M, D]` at the positions predicting the M masked response tokens (row by row,
    each row's tokens in order), or None when the lean forward does not reproduce `model`.

    Runs the model's own modules (embedding, projections, LoRA layers, MLPs), so gradients reach its parameters
    when called with grad. Each distinct prompt and each response token runs through the linear layers once;
    attention gathers each row (its prompt, then its response) and masks causally; a prompt's queries attend
    once, from the row that runs it. The masks must be a prefix
    of each row (as `Rollout` holds them).
    adapters: for a peft model holding several LoRA adapters, each row's adapter (rows of one adapter
        contiguous). The base layers run once over every row and each adapter over its own rows: one forward
        for several teachers that share a base, none of them activated. Under no_grad only.
    prompts: the rows' prompts already run (`prompt_states`, same weights): only the responses run here.
    decoded: with `prompts`, the rollout's own projections of these responses (`DecodedLinears`, same weights):
        the forward takes their values and computes only what lies between them (norms, RoPE, attention, SiLU);
        the backward is the same. Ignored where a projection is not a plain `nn.Linear` (LoRA).
    """
    return _packed_forward(model, prompt_ids, response_ids_B_T, response_mask_B_T, adapters, prompts,
                           decoded=decoded)


def _packed_forward(model, prompt_ids: list[list[int]], response_ids_B_T: Tensor, response_mask_B_T: Tensor,
                    adapters: Sequence[str] | None, prompts: PromptStates | None, ends_C: Tensor | None = None,
                    keys_values: tuple[list[Tensor], list[Tensor]] | None = None,
                    decoded: DecodedLinears | None = None) -> Tensor | None:
    """`predicting_hidden_states`; or, with `ends_C` (packed indices), the last layer's output there before the
    final norm (`prompt_states`: responses empty), each layer's keys and values appended to `keys_values`."""
    lm = _causal_lm(model)
    theta = _supported(lm)
    if theta is None or (adapters is not None and (torch.is_grad_enabled() or _lora_layers(lm) is None)):
        return None
    decoder = lm.get_decoder()
    embed = lm.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    device, dtype = weight.device, weight.dtype
    if getattr(lm.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None  # flash attention and the like run packed rows without a dense mask: theirs is better
    layout = _layout(prompt_ids, response_ids_B_T.cpu(), response_mask_B_T.cpu(), dtype, adapters,
                     None if prompts is None else prompts.prompts)
    if layout is None:
        return None
    H, Hkv, d = _dims(lm.config)
    dropout = float(getattr(lm.config, "attention_dropout", 0.0) or 0.0) if lm.training else 0.0
    ids, position, owner, predict = (t.to(device) for t in (layout.ids_N, layout.position_N, layout.owner_N,
                                                             layout.predict_M))
    calls = [(a.query_token_B_Q.to(device), a.key_token_B_K.to(device), a.mask_B_1_Q_K.to(device), a.queried_B)
             for a in layout.attention]
    N = ids.shape[0]
    cos, sin = _rope_table(_inv_freq(theta, d, device), int(position.max()) + 1 if N else 1, dtype)
    cos, sin = cos[position][:, None], sin[position][:, None]  # [N, 1, d]
    from_prompts = None if prompts is None else predict < layout.base  # a row's first prediction: its prompt's last
    # token, already run
    if ends_C is not None:
        kept = ends_C.to(device)
    else:
        kept = predict if from_prompts is None else predict[~from_prompts] - layout.base
    slices = layout.adapter_tokens
    # float32 on a CPU: attention, RMSNorm, RoPE and SiLU·up through the native kernels (forward and backward, their
    # rows split over torch's threads; an OPD update -10% on one thread); elsewhere PyTorch's ops and SDPA
    kernels = native.cpu_kernels(d) if (device.type == "cpu" and dtype == torch.float32 and not dropout) else None
    if kernels is None:
        norm, rotate = _norm, _rotate
    else:
        def norm(module, x):
            return kernels.rms_norm(x, module.weight, _eps(module))

        rotate = kernels.rope

    if decoded is not None and not (prompts is not None and kept.shape[0] == N and _decoded_fits(decoded, decoder, N)):
        decoded = None  # the forward computes them

    def project(module, x, known: Tensor | None = None):
        if known is None:
            return _project(module, x, slices)
        return _KnownLinear.apply(x, known, module.weight, module.bias)

    x = embed(ids)  # [N, D]
    last = len(decoder.layers) - 1
    for index, block in enumerate(decoder.layers if N else ()):
        attn, mlp = block.self_attn, block.mlp
        known = {} if decoded is None else decoded.layers[index]  # the last layer's o/MLP: their kept rows
        h = norm(block.input_layernorm, x)
        q = rotate(project(attn.q_proj, h, known.get("q")).view(N, H, d), cos, sin)
        k = rotate(project(attn.k_proj, h, known.get("k")).view(N, Hkv, d), cos, sin)
        v = project(attn.v_proj, h, known.get("v")).view(N, Hkv, d)
        if keys_values is not None:
            keys_values[0].append(k)
            keys_values[1].append(v)
        if prompts is not None:  # the keys: the prompts' tokens, then these
            k, v = torch.cat([prompts.keys_N_Hkv_d[index], k]), torch.cat([prompts.values_N_Hkv_d[index], v])
        outputs = []
        for queries, keys, mask, queried in calls:  # [B, heads, Q or K, d] each
            if kernels is not None:
                outputs.append(kernels.packed_attention(q, k, v, queries, keys, mask, queried))
                continue
            out = F.scaled_dot_product_attention(_rows(q, queries).transpose(1, 2), _rows(k, keys).transpose(1, 2),
                                                 _rows(v, keys).transpose(1, 2), attn_mask=mask, dropout_p=dropout,
                                                 enable_gqa=H != Hkv)
            outputs.append(out.transpose(1, 2).reshape(-1, H * d))
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if index == last:  # only the predicting positions' output is read; the others' keys and values were all
            # the last layer needed of them: its output projection and MLP run on M tokens, not N
            x, attended, slices = _rows(x, kept), _rows(attended, owner[kept]), layout.adapter_predicting
        else:
            attended = _rows(attended, owner)
        x = x + project(attn.o_proj, attended, known.get("o"))
        h = norm(block.post_attention_layernorm, x)
        if slices is None and kernels is None and not known:
            x = x + mlp(h)
        else:  # transformers' Llama/Qwen2 MLP, its projections adapter by adapter where several adapters run
            gate, up = project(mlp.gate_proj, h, known.get("gate")), project(mlp.up_proj, h, known.get("up"))
            x = x + project(mlp.down_proj, F.silu(gate) * up if kernels is None else kernels.silu_mul_split(gate, up),
                            known.get("down"))
    if ends_C is not None:
        return x
    if prompts is not None:
        if not N:
            x = x[:0]
        ends = torch.tensor([len(p) for p in prompts.prompts], device=device).cumsum(0) - 1
        order = torch.empty_like(predict)
        order[from_prompts] = torch.searchsorted(ends, predict[from_prompts])
        order[~from_prompts] = len(ends) + torch.arange(int((~from_prompts).sum()), device=device)
        x = _rows(torch.cat([prompts.last_C_D, x]), order)
    return norm(decoder.norm, x)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """`x[index]` along the first dimension (shape `[*index.shape, *x.shape[1:]]`) by `index_select`, whose
    backward adds the gradients of repeated rows (a prompt shared by a GRPO group's rows, the first token every
    pretraining text starts with) in index order. `x[index]`'s backward adds them in parallel in whatever order
    the threads reach them, so with two or more threads the same batch gave other gradients from run to run."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def _eps(norm_module) -> float:
    return getattr(norm_module, "variance_epsilon", getattr(norm_module, "eps", 1e-6))


def _norm(module, x: Tensor) -> Tensor:
    return _rms(x, module.weight, _eps(module))
