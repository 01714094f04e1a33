"""On-policy distillation losses: exact full-vocabulary reverse KL, chunked through the output heads.

DeepSeek-V4 (§5.2, Eq. 29): `L_OPD(θ) = Σ_i w_i · KL(π_θ ‖ π_Ei)` on trajectories sampled from the
student, each sample scored by the teacher of its domain, over the full vocabulary at every
position: `KL_t = Σ_v p_θ(v) (log p_θ(v) − log p_E(v))`, gradient through p_θ only.

Where this departs from the report, and why:
- V4 computes the exact KL with a fused kernel. `reverse_kl_chunked` gets the same bound on memory
  in plain PyTorch: an autograd.Function that walks the positions in chunks, keeps only its inputs
  (hidden states and heads) and the `[N]` KL, and rebuilds each chunk's logits again in backward.
  Nothing of size `[N, V]` ever exists; the peak is about two `[chunk, V]` buffers. The price is
  the two head matmuls done again in backward (six matmuls instead of four).
- Like V4's teacher scheduling, the teacher side enters as cached last-layer hidden states and the
  teacher's output head, so `|V|` logits exist for at most one chunk of one teacher at a time.
- `reverse_kl_topk_tail` (ablation only) takes the tail bucket's log-mass as a logsumexp over the
  tokens outside the top k instead of `log(1 − Σ_topk p)`: the subtraction cancels to 0 or below
  once the top k hold nearly all the mass, which is where top-k reverse KL turns NaN in practice.
- `sampled_token_advantages` / `sampled_token_pg_loss` ship the per-token estimator that V4 rejects
  for its gradient variance, for the ablation that shows why.
- Where the student gives a token probability 0 its term is 0, even if the teacher's log-prob there
  is -inf (a masked or padded vocabulary entry); the plain formula gives 0·∞ = NaN. A NaN in the
  logits still propagates.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pluribus.core.grpo import aggregate

__all__ = [
    "reverse_kl",
    "reverse_kl_chunked",
    "sampled_token_advantages",
    "sampled_token_pg_loss",
    "reverse_kl_topk_tail",
    "weighted_teacher_loss",
]

# Row blocks for the in-place steps of a chunk: temporaries of about 16 MiB (float32), not [C, V].
_BLOCK_ELEMENTS = 1 << 22


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits lose the small probabilities that decide a KL; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _kl_from_logprobs(student_logprobs_X_V: Tensor, teacher_logprobs_X_V: Tensor) -> Tensor:
    """`Σ_v p_s (log p_s − log p_t)` over the last axis, with the 0·(−∞) terms set to 0."""
    student_probs_X_V = student_logprobs_X_V.exp()
    # The guard goes on the difference, not the product: a where() after the product would still
    # send 0·∞ = NaN into the gradient of p_s.
    log_ratio_X_V = torch.where(student_probs_X_V == 0, 0.0, student_logprobs_X_V - teacher_logprobs_X_V)
    return (student_probs_X_V * log_ratio_X_V).sum(-1)


def reverse_kl(student_logits_B_T_V: Tensor, teacher_logits_B_T_V: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact per-position KL(student ‖ teacher) `[...]` in nats for logits `[..., V]`.

    Both logits are divided by `temperature`. Computed in float32 at least (float64 stays float64).
    The teacher is detached: gradient flows to the student logits only.
    """
    _require(student_logits_B_T_V.dim() >= 1, "student logits need a vocabulary axis")
    _require(
        student_logits_B_T_V.shape == teacher_logits_B_T_V.shape,
        f"student and teacher logits must have the same shape [..., V], got {tuple(student_logits_B_T_V.shape)} and {tuple(teacher_logits_B_T_V.shape)}",
    )
    _require(temperature > 0, f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits_B_T_V.dtype)
    student_logprobs = torch.log_softmax(student_logits_B_T_V.to(dtype) / temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits_B_T_V.detach().to(dtype) / temperature, dim=-1)
    return _kl_from_logprobs(student_logprobs, teacher_logprobs)


def _rows_per_block(vocab: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, vocab))


def _log_softmax_(logits_C_V: Tensor) -> Tensor:
    # torch has no in-place log_softmax; a block of rows at a time keeps the temporary small.
    for block in logits_C_V.split(_rows_per_block(logits_C_V.shape[-1])):
        block.sub_(torch.logsumexp(block, dim=-1, keepdim=True))
    return logits_C_V


def _head_logprobs(hidden_C_D: Tensor, head_V_D: Tensor, bias_V: Tensor | None, temperature: float) -> Tensor:
    logits_C_V = hidden_C_D @ head_V_D.T if bias_V is None else torch.addmm(bias_V, hidden_C_D, head_V_D.T)
    if temperature != 1.0:
        logits_C_V.div_(temperature)
    return _log_softmax_(logits_C_V)


def _chunk_kl_terms(
    student_hidden_C_D: Tensor,
    student_head_V_D: Tensor,
    student_bias_V: Tensor | None,
    teacher_hidden_C_D: Tensor,
    teacher_head_V_D: Tensor,
    teacher_bias_V: Tensor | None,
    temperature: float,
    forward: Literal["", "kl", "probs"] = "",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`(p_s, p_s ⊙ (log p_s − log p_t), extra)`, the first two `[C, V]` built in place in two buffers; extra:
    with `forward="kl"` KL(t ‖ s) `[C]` (the forward pass's value), with `"probs"` p_t `[C, V]` (the backward's
    gradient; a third buffer), else None."""
    student_C_V = _head_logprobs(student_hidden_C_D, student_head_V_D, student_bias_V, temperature)
    terms_C_V = _head_logprobs(teacher_hidden_C_D, teacher_head_V_D, teacher_bias_V, temperature)
    teacher_C_V = terms_C_V.exp() if forward else None
    terms_C_V.neg_().add_(student_C_V)
    rows = _rows_per_block(student_C_V.shape[-1])
    forward_C = None
    if forward == "kl":
        # Σ p_t (log p_t − log p_s), a token the teacher gives probability 0 adding 0 (not 0·∞); block by block,
        # so the temporaries stay small.
        forward_C = torch.cat([(teacher_block * diff_block.masked_fill(teacher_block == 0, 0.0)).sum(-1).neg_()
                               for teacher_block, diff_block in zip(teacher_C_V.split(rows), terms_C_V.split(rows))])
    student_C_V.exp_()
    terms_C_V.mul_(student_C_V)
    # Same guard as _kl_from_logprobs; here the product is already formed, and no autograd runs
    # through it, so the fill after the product is safe. NaN logits give NaN p_s and stay NaN.
    # Block by block, so the bool mask is never a third [C, V] buffer.
    for probs_block, terms_block in zip(student_C_V.split(rows), terms_C_V.split(rows)):
        terms_block.masked_fill_(probs_block == 0, 0.0)
    return student_C_V, terms_C_V, teacher_C_V if forward == "probs" else forward_C


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_hidden_N_D: Tensor,
        student_head_V_D: Tensor,
        student_bias_V: Tensor | None,
        teacher_hidden_N_Dt: Tensor,
        teacher_head_V_Dt: Tensor,
        teacher_bias_V: Tensor | None,
        chunk_size: int,
        temperature: float,
        forward_weight: float,
    ) -> Tensor:
        dtype = _compute_dtype(student_hidden_N_D.dtype)
        student_head = student_head_V_D.to(dtype)
        student_bias = None if student_bias_V is None else student_bias_V.to(dtype)
        teacher_head = teacher_head_V_Dt.to(dtype)
        teacher_bias = None if teacher_bias_V is None else teacher_bias_V.to(dtype)
        N = student_hidden_N_D.shape[0]
        kl_N = torch.empty(N, dtype=dtype, device=student_hidden_N_D.device)  # KL(s ‖ t): the backward needs it
        out_N = kl_N if not forward_weight else torch.empty_like(kl_N)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            student_probs_C_V, terms_C_V, forward_C = _chunk_kl_terms(
                student_hidden_N_D[rows].to(dtype), student_head, student_bias,
                teacher_hidden_N_Dt[rows].to(dtype), teacher_head, teacher_bias, temperature,
                "kl" if forward_weight else "",
            )
            del student_probs_C_V
            kl_N[rows] = terms_C_V.sum(-1)
            del terms_C_V
            if forward_C is not None:  # at α = 1 the reverse KL takes no part (an infinite one would give 0·∞)
                out_N[rows] = (forward_C if forward_weight == 1
                               else (1 - forward_weight) * kl_N[rows] + forward_weight * forward_C)
        ctx.save_for_backward(student_hidden_N_D, student_head_V_D, student_bias_V,
                              teacher_hidden_N_Dt, teacher_head_V_Dt, teacher_bias_V, kl_N)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.forward_weight = forward_weight
        return out_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl_N: Tensor):  # type: ignore[override]
        student_hidden_N_D, student_head_V_D, student_bias_V, teacher_hidden_N_Dt, teacher_head_V_Dt, teacher_bias_V, kl_N = ctx.saved_tensors
        need_hidden, need_head, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_head = grad_bias = None
        if not (need_hidden or need_head or need_bias):
            return None, None, None, None, None, None, None, None, None

        dtype = kl_N.dtype
        temperature, forward_weight = ctx.temperature, ctx.forward_weight
        student_head = student_head_V_D.to(dtype)
        student_bias = None if student_bias_V is None else student_bias_V.to(dtype)
        teacher_head = teacher_head_V_Dt.to(dtype)
        teacher_bias = None if teacher_bias_V is None else teacher_bias_V.to(dtype)
        if need_hidden:
            grad_hidden = torch.empty(student_hidden_N_D.shape, dtype=dtype, device=kl_N.device)
        if need_head:
            grad_head = torch.zeros(student_head_V_D.shape, dtype=dtype, device=kl_N.device)
        if need_bias:
            grad_bias = torch.zeros(student_head_V_D.shape[0], dtype=dtype, device=kl_N.device)
        # Division by the temperature is the last link of the chain into the raw logits.
        grad_kl_N = grad_kl_N.to(dtype) / temperature

        for start in range(0, kl_N.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            student_hidden_C_D = student_hidden_N_D[rows].to(dtype)
            student_probs_C_V, grad_logits_C_V, teacher_probs_C_V = _chunk_kl_terms(
                student_hidden_C_D, student_head, student_bias,
                teacher_hidden_N_Dt[rows].to(dtype), teacher_head, teacher_bias, temperature,
                "probs" if forward_weight else "",
            )
            # d KL(s ‖ t) / d z_s = p_s ⊙ (log p_s − log p_t − KL); the buffer already holds the first part.
            grad_logits_C_V.addcmul_(student_probs_C_V, kl_N[rows].unsqueeze(-1), value=-1.0)
            if teacher_probs_C_V is not None:  # d KL(t ‖ s) / d z_s = p_s − p_t
                forward_grad_C_V = student_probs_C_V.sub_(teacher_probs_C_V)
                if forward_weight == 1:
                    grad_logits_C_V.copy_(forward_grad_C_V)
                else:
                    grad_logits_C_V.mul_(1 - forward_weight).add_(forward_grad_C_V, alpha=forward_weight)
                del forward_grad_C_V
            del student_probs_C_V, teacher_probs_C_V
            grad_logits_C_V.mul_(grad_kl_N[rows].unsqueeze(-1))
            if need_hidden:
                torch.mm(grad_logits_C_V, student_head, out=grad_hidden[rows])
            if need_head:
                grad_head.addmm_(grad_logits_C_V.T, student_hidden_C_D)
            if need_bias:
                grad_bias.add_(grad_logits_C_V.sum(0))
            del grad_logits_C_V

        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(student_hidden_N_D.dtype)
        if grad_head is not None:
            grad_head = grad_head.to(student_head_V_D.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(student_bias_V.dtype)
        return grad_hidden, grad_head, grad_bias, None, None, None, None, None, None


def reverse_kl_chunked(
    student_hidden_N_D: Tensor,
    student_head_V_D: Tensor,
    teacher_hidden_N_D: Tensor,
    teacher_head_V_D: Tensor,
    chunk_size: int = 1024,
    student_bias_V: Tensor | None = None,
    teacher_bias_V: Tensor | None = None,
    temperature: float = 1.0,
    forward_weight: float = 0.0,
) -> Tensor:
    """Exact per-position KL(student ‖ teacher) `[N]`, logits rebuilt from hidden states `chunk_size` rows at a time.

    Equals `reverse_kl(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, temperature)` in value and in the
    gradients to `student_hidden_N_D`, `student_head_V_D` and `student_bias_V`; the teacher gets
    none. The teacher's hidden size may differ from the student's; the vocabularies must match.
    Peak extra memory: about two `[chunk_size, V]` buffers in the compute dtype (float32 at least)
    plus one `[V, D]` gradient of the head, in forward and in backward alike.

    forward_weight α (an extension, not V4's Eq. 29, which is α = 0): the per-position divergence becomes
    `(1 − α)·KL(s ‖ t) + α·KL(t ‖ s)`, both exact over the vocabulary at the student's own positions (α = 1:
    GKD's on-policy forward KL, β = 0). The reverse KL's gradient into a token the student gives probability
    p_s is at most ~p_s, so a token the teacher wants and the student rarely samples is learnt slowly; the
    forward KL's is `p_s − p_t`. With α > 0 a third `[chunk_size, V]` buffer holds p_t.
    """
    _require(student_hidden_N_D.dim() == 2 and teacher_hidden_N_D.dim() == 2, "hidden states must be 2-D [N, D]")
    _require(student_head_V_D.dim() == 2 and teacher_head_V_D.dim() == 2, "output heads must be 2-D [V, D]")
    N, D_s = student_hidden_N_D.shape
    V, D_t = teacher_head_V_D.shape
    _require(teacher_hidden_N_D.shape[0] == N, f"student has {N} positions, teacher {teacher_hidden_N_D.shape[0]}")
    _require(student_head_V_D.shape == (V, D_s), f"student head must be [V={V}, D={D_s}], got {tuple(student_head_V_D.shape)}")
    _require(teacher_hidden_N_D.shape[1] == D_t, f"teacher hidden size {teacher_hidden_N_D.shape[1]} does not match its head's {D_t}")
    for name, bias in (("student_bias_V", student_bias_V), ("teacher_bias_V", teacher_bias_V)):
        _require(bias is None or bias.shape == (V,), f"{name} must have shape [{V}]")
    _require(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    _require(temperature > 0, f"temperature must be > 0, got {temperature}")
    _require(0 <= forward_weight <= 1, f"forward_weight must be in [0, 1], got {forward_weight}")
    return _ChunkedKL.apply(
        student_hidden_N_D, student_head_V_D, student_bias_V,
        teacher_hidden_N_D.detach(), teacher_head_V_D.detach(),
        None if teacher_bias_V is None else teacher_bias_V.detach(),
        chunk_size, float(temperature), float(forward_weight),
    )


def sampled_token_advantages(student_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor) -> Tensor:
    """Ablation: per-token advantage `[B, T]` = `−(log p_θ(y_t) − log p_E(y_t))`, detached."""
    _require(
        student_logprobs_B_T.shape == teacher_logprobs_B_T.shape,
        f"shapes differ: {tuple(student_logprobs_B_T.shape)} and {tuple(teacher_logprobs_B_T.shape)}",
    )
    return (teacher_logprobs_B_T - student_logprobs_B_T).detach()


def sampled_token_pg_loss(logprobs_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Ablation: policy-gradient loss `−mean(A_t · log p_θ(y_t))` over the masked tokens (scalar).

    The advantages are constants (detached). Its expected gradient is that of the reverse KL; its
    variance is why V4 distils over the full vocabulary instead.
    """
    _require(logprobs_B_T.shape == advantages_B_T.shape, "logprobs_B_T and advantages_B_T must have the same shape [B, T]")
    # Padding may hold -inf log-probs; zero both factors so no NaN reaches value or gradient.
    logprobs_B_T = torch.where(mask_B_T, logprobs_B_T, 0.0)
    advantages_B_T = torch.where(mask_B_T, advantages_B_T.detach(), 0.0)
    return -aggregate(advantages_B_T * logprobs_B_T, mask_B_T, "token_mean")


def reverse_kl_topk_tail(student_logits_B_T_V: Tensor, teacher_logits_B_T_V: Tensor, k: int) -> Tensor:
    """Ablation: KL `[...]` over the student's top-k tokens plus one tail bucket per distribution.

    Bucket probabilities: `p(v)` for the k tokens where the student's logits are largest, and the
    rest `1 − Σ_topk p` in one bucket, the same token set for both. Gradient to the student only.
    With `k = V` the tail is empty and this equals `reverse_kl`.
    """
    _require(
        student_logits_B_T_V.shape == teacher_logits_B_T_V.shape,
        f"student and teacher logits must have the same shape [..., V], got {tuple(student_logits_B_T_V.shape)} and {tuple(teacher_logits_B_T_V.shape)}",
    )
    V = student_logits_B_T_V.shape[-1]
    _require(1 <= k <= V, f"k must be in [1, {V}], got {k}")
    dtype = _compute_dtype(student_logits_B_T_V.dtype)
    student_logprobs = torch.log_softmax(student_logits_B_T_V.to(dtype), dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits_B_T_V.detach().to(dtype), dim=-1)
    top_index = student_logprobs.detach().topk(k, dim=-1).indices
    outside_top = torch.ones_like(student_logprobs, dtype=torch.bool).scatter_(-1, top_index, False)

    def buckets(logprobs: Tensor) -> Tensor:
        tail = torch.where(outside_top, logprobs, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logprobs.gather(-1, top_index), tail], dim=-1)

    return _kl_from_logprobs(buckets(student_logprobs), buckets(teacher_logprobs))


def weighted_teacher_loss(
    kl_N: Tensor, mask_N: Tensor, teacher_index_N: Tensor, weights_E: Tensor
) -> tuple[Tensor, Tensor]:
    """Eq. 29: `Σ_E w_E · mean(KL over the masked tokens routed to teacher E)` (scalar), and the `[E]` means.

    A teacher with no tokens in the batch contributes 0 and logs a mean of 0. The means come back
    detached, for logging.
    """
    _require(kl_N.dim() == 1, f"kl_N must be 1-D [N], got shape {tuple(kl_N.shape)}")
    _require(mask_N.dtype == torch.bool and mask_N.shape == kl_N.shape, "mask_N must be a bool tensor of shape [N]")
    _require(teacher_index_N.shape == kl_N.shape and not teacher_index_N.is_floating_point(), "teacher_index_N must be an integer tensor of shape [N]")
    _require(weights_E.dim() == 1, f"weights_E must be 1-D [E], got shape {tuple(weights_E.shape)}")
    E = weights_E.shape[0]
    if kl_N.numel():
        _require(
            int(teacher_index_N.min()) >= 0 and int(teacher_index_N.max()) < E,
            f"teacher_index_N must lie in [0, {E}), got [{int(teacher_index_N.min())}, {int(teacher_index_N.max())}]",
        )
    kl_N = torch.where(mask_N, kl_N, 0.0)
    index_N = teacher_index_N.long()
    sums_E = kl_N.new_zeros(E).index_add(0, index_N, kl_N)
    counts_E = kl_N.new_zeros(E).index_add(0, index_N, mask_N.to(kl_N.dtype))
    means_E = sums_E / counts_E.clamp_min(1)
    return (weights_E.to(means_E.dtype) * means_E).sum(), means_E.detach()


AGGREGATIONS = ("teacher_mean", "sequence_sum", "token_mean")


def teacher_weights(
    weights_E: Tensor, tokens_E: Tensor, global_tokens_E: Tensor, global_sequences: int, aggregation: str = "teacher_mean"
) -> Tensor:
    """The `[E]` weights that make `weighted_teacher_loss` over this rank's tokens, summed over ranks, the objective.

    tokens_E / global_tokens_E: each teacher's tokens on this rank / on every rank (equal with one process);
    global_sequences: the samples of the global batch.

    - `teacher_mean` (Eq. 29 as written): `Σ_E w_E · mean(KL over the tokens routed to E)`; every teacher weighs
      w_E however many tokens its samples have.
    - `sequence_sum`: `Σ_E w_E · Σ(KL over E's tokens) / global_sequences`, the mean over samples of each
      sample's summed per-token KL: the KL between the student's and the teacher's distributions over whole
      responses (exact: the per-token KLs are full-vocabulary and the tokens are the student's), so a long
      response weighs its length.
    - `token_mean`: `Σ_E w_E · Σ(KL over E's tokens) / (all tokens of the global batch)`: every token alike.
    """
    _require(aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    _require(weights_E.shape == tokens_E.shape == global_tokens_E.shape, "weights_E, tokens_E and global_tokens_E must all be [E]")
    tokens_E = tokens_E.to(weights_E.dtype)
    if aggregation == "teacher_mean":
        return weights_E * tokens_E / global_tokens_E.to(weights_E.dtype).clamp_min(1)
    total = max(global_sequences, 1) if aggregation == "sequence_sum" else max(int(global_tokens_E.sum()), 1)
    return weights_E * tokens_E / total
