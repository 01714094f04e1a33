"""GRPO: group-relative advantages, the clipped policy loss, KL to the reference, off-policy masking.

Follows DeepSeekMath (Shao et al., 2024, §4.1) with the DeepSeek-V3.2 changes (2025, §3.1):
advantages centred on the group mean without division by the std, the unbiased KL estimate, and
off-policy sequence masking. Every function is a pure tensor function; `grpo_loss` composes them.

Where this departs from the papers, and why:
- Aggregation defaults to one token mean over every response token of the batch. Both papers write
  `1/G Σ_i 1/|o_i| Σ_t`, which gives a token of a long answer less weight than a token of a short
  one, so a long wrong answer is pushed down less than a short one (DAPO, Yu et al. 2025, §3.3).
  The papers' form is kept as `aggregation="seq_mean_token_mean"`.
- `eps_high` defaults to 0.28 against `eps_low` 0.2 ("clip-higher", DAPO §3.1): a symmetric clip
  stops low-probability tokens from gaining mass early and entropy collapses.
- The unbiased KL keeps the gradient through the importance ratio. V3.2 writes the estimator as
  `(π_θ/π_old) · k3` and says its gradient is unbiased; that holds only when the ratio is
  differentiated: `∇[ρ·k3] = ρ·(log π_θ − log π_ref)·∇log π_θ`, whose expectation over samples of
  π_old is `∇ KL(π_θ ‖ π_ref)`. With the ratio detached (a stop-gradient weight on ∇k3) the
  expectation is `∇ KL(π_ref ‖ π_θ)`, the forward KL; the values are the same either way.
  `tests/test_core_grpo.py` checks both expectations exactly on an enumerated distribution.
- Samples without a valid reward (an unparseable generative judgement) are left out of their
  group's mean and std and get advantage 0; the papers assume every sample has a reward.
- `scale="std"` uses the Bessel-corrected std of the valid samples, as TRL and verl do;
  DeepSeekMath does not say which.
- A sequence dropped by the off-policy mask leaves the normaliser as well as the sum (its tokens
  leave the mask); V3.2's formula keeps `1/G` and `1/|o_i|`, so dropping sequences there also
  shrinks the loss of the batch. Here the dropped fraction is logged instead.

Masks are bool. Positions outside the mask may hold anything (padding, -inf, NaN): `grpo_loss`
zeroes them before any `exp`, because NaN times a zero mask weight is still NaN, in values and in
gradients. V3.2's "keep the sampler's top-p/top-k mask" concerns how log-probs are computed, so it
lives with the callers that compute them, not here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["none", "std"]
Aggregation = Literal["token_mean", "seq_mean_token_mean"]
KLEstimator = Literal["k3", "k3_unbiased"]

__all__ = [
    "group_advantages",
    "policy_loss_terms",
    "kl_k3",
    "kl_k3_unbiased",
    "off_policy_sequence_mask",
    "aggregate",
    "grpo_loss",
]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_B_T(name: str, tensor: Tensor, shape_B_T: torch.Size) -> None:
    _require(tensor.shape == shape_B_T, f"{name} must have shape {tuple(shape_B_T)} [B, T], got {tuple(tensor.shape)}")


def _require_mask(name: str, mask: Tensor, shape: torch.Size) -> None:
    _require(mask.dtype == torch.bool, f"{name} must be a bool tensor, got {mask.dtype}")
    _require(mask.shape == shape, f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def group_advantages(
    rewards_N: Tensor,
    group_size: int,
    scale: AdvantageScale = "none",
    eps: float = 1e-6,
    valid_N: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages `[N]` for `N = num_groups × group_size` rewards.

    Samples `[g·G, (g+1)·G)` form group g. `"none"` (V3.2): `A_i = r_i − mean(r)`; `"std"`
    (DeepSeekMath): `(r_i − mean(r)) / (std(r) + eps)`, Bessel-corrected std. Mean and std run over
    the valid samples of the group only; invalid samples (`valid_N` False) get 0 and their reward
    may be anything, NaN included.
    """
    _require(rewards_N.dim() == 1, f"rewards_N must be 1-D [N], got shape {tuple(rewards_N.shape)}")
    _require(scale in ("none", "std"), f"scale must be 'none' or 'std', got {scale!r}")
    N = rewards_N.shape[0]
    _require(group_size >= 1 and N % group_size == 0, f"N={N} rewards do not split into groups of {group_size}")
    if not rewards_N.is_floating_point():
        rewards_N = rewards_N.to(torch.get_default_dtype())
    if valid_N is None:
        valid_N = torch.ones(N, dtype=torch.bool, device=rewards_N.device)
    _require_mask("valid_N", valid_N, rewards_N.shape)

    valid_P_G = valid_N.view(-1, group_size)
    rewards_P_G = torch.where(valid_P_G, rewards_N.view(-1, group_size), 0.0)
    count_P_1 = valid_P_G.sum(-1, keepdim=True)
    mean_P_1 = rewards_P_G.sum(-1, keepdim=True) / count_P_1.clamp_min(1)
    centred_P_G = torch.where(valid_P_G, rewards_P_G - mean_P_1, 0.0)
    if scale == "std":
        var_P_1 = centred_P_G.square().sum(-1, keepdim=True) / (count_P_1 - 1).clamp_min(1)
        # A group with zero variance has every centred reward 0, so any finite std gives the same
        # value; 1 there keeps sqrt's infinite slope at 0 out of the gradient.
        std_P_1 = torch.where(var_P_1 > 0, var_P_1, 1.0).sqrt()
        centred_P_G = centred_P_G / (std_P_1 + eps)
    return centred_P_G.reshape(N)


def policy_loss_terms(
    logprobs_B_T: Tensor,
    old_logprobs_B_T: Tensor,
    advantages_B: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss `[B, T]` (to minimise) and where the clip was active `[B, T]` bool.

    loss = `−min(ρ·A, clip(ρ, 1−eps_low, 1+eps_high)·A)` with `ρ = exp(logprobs − old_logprobs)`.
    The clip is active where the clipped term is the smaller one, i.e. where the token gets no
    gradient. Gradient flows through `logprobs_B_T` only.
    """
    _require(logprobs_B_T.dim() == 2, f"logprobs_B_T must be 2-D [B, T], got shape {tuple(logprobs_B_T.shape)}")
    _require_B_T("old_logprobs_B_T", old_logprobs_B_T, logprobs_B_T.shape)
    _require(advantages_B.shape == logprobs_B_T.shape[:1], f"advantages_B must have shape [{logprobs_B_T.shape[0]}], got {tuple(advantages_B.shape)}")
    _require(0 <= eps_low < 1 and eps_high >= 0, f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")

    ratio_B_T = torch.exp(logprobs_B_T - old_logprobs_B_T.detach())
    advantages_B_1 = advantages_B.detach().unsqueeze(-1)
    unclipped_B_T = ratio_B_T * advantages_B_1
    clipped_B_T = ratio_B_T.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages_B_1
    clip_active_B_T = clipped_B_T < unclipped_B_T
    return -torch.where(clip_active_B_T, clipped_B_T, unclipped_B_T), clip_active_B_T


def kl_k3(logprobs_B_T: Tensor, ref_logprobs_B_T: Tensor) -> Tensor:
    """Per-token k3 estimate `[B, T]` of KL(π_θ ‖ π_ref): `π_ref/π_θ − log(π_ref/π_θ) − 1` ≥ 0.

    Gradient flows through `logprobs_B_T` only. Works for any shape, not only `[B, T]`.
    """
    _require_B_T("ref_logprobs_B_T", ref_logprobs_B_T, logprobs_B_T.shape)
    log_ratio = ref_logprobs_B_T.detach() - logprobs_B_T
    # expm1 keeps the digits that exp(x) − 1 cancels away when the policies are close.
    return torch.expm1(log_ratio) - log_ratio


def kl_k3_unbiased(logprobs_B_T: Tensor, ref_logprobs_B_T: Tensor, old_logprobs_B_T: Tensor) -> Tensor:
    """V3.2's unbiased per-token KL estimate `[B, T]`: `(π_θ/π_old) · k3`, for tokens sampled from π_old.

    The ratio is differentiated (see the module docstring): the gradient is
    `ρ·(log π_θ − log π_ref)·∇log π_θ`, unbiased for `∇ KL(π_θ ‖ π_ref)`.
    """
    _require_B_T("old_logprobs_B_T", old_logprobs_B_T, logprobs_B_T.shape)
    ratio_B_T = torch.exp(logprobs_B_T - old_logprobs_B_T.detach())
    return ratio_B_T * kl_k3(logprobs_B_T, ref_logprobs_B_T)


def off_policy_sequence_mask(
    logprobs_B_T: Tensor,
    old_logprobs_B_T: Tensor,
    advantages_B: Tensor,
    mask_B_T: Tensor,
    delta: float,
) -> Tensor:
    """V3.2 off-policy sequence masking: keep-mask `[B]` bool.

    Drops sequence i when `A_i < 0` and the mean of `log(π_old/π_θ)` over its response tokens
    exceeds `delta`: a negative sample the policy has already moved far away from teaches little and
    destabilises. A sequence with no response tokens is kept (it contributes nothing anyway).
    """
    _require(logprobs_B_T.dim() == 2, f"logprobs_B_T must be 2-D [B, T], got shape {tuple(logprobs_B_T.shape)}")
    _require_B_T("old_logprobs_B_T", old_logprobs_B_T, logprobs_B_T.shape)
    _require_mask("mask_B_T", mask_B_T, logprobs_B_T.shape)
    _require(advantages_B.shape == logprobs_B_T.shape[:1], f"advantages_B must have shape [{logprobs_B_T.shape[0]}], got {tuple(advantages_B.shape)}")
    with torch.no_grad():
        log_ratio_B_T = torch.where(mask_B_T, old_logprobs_B_T - logprobs_B_T, 0.0)
        mean_B = log_ratio_B_T.sum(-1) / mask_B_T.sum(-1).clamp_min(1)
        return ~((advantages_B < 0) & (mean_B > delta))


def aggregate(values_B_T: Tensor, mask_B_T: Tensor, mode: Aggregation = "token_mean") -> Tensor:
    """Scalar mean of `values_B_T` over the masked positions.

    `"token_mean"`: one mean over every masked token of the batch. `"seq_mean_token_mean"`
    (DeepSeekMath): the mean over sequences of each sequence's token mean; sequences with no masked
    token are left out of the outer mean. An empty mask gives 0.
    """
    _require(values_B_T.dim() == 2, f"values_B_T must be 2-D [B, T], got shape {tuple(values_B_T.shape)}")
    _require_mask("mask_B_T", mask_B_T, values_B_T.shape)
    _require(mode in ("token_mean", "seq_mean_token_mean"), f"unknown aggregation {mode!r}")
    values_B_T = torch.where(mask_B_T, values_B_T, 0.0)
    if mode == "token_mean":
        return values_B_T.sum() / mask_B_T.sum().clamp_min(1)
    count_B = mask_B_T.sum(-1)
    seq_mean_B = values_B_T.sum(-1) / count_B.clamp_min(1)
    return seq_mean_B.sum() / (count_B > 0).sum().clamp_min(1)


def grpo_loss(
    logprobs_B_T: Tensor,
    old_logprobs_B_T: Tensor,
    advantages_B: Tensor,
    mask_B_T: Tensor,
    *,
    ref_logprobs_B_T: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    off_policy_delta: float | None = None,
    aggregation: Aggregation = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss (scalar, to minimise) and detached float stats.

    Per token: PPO-clip loss + `kl_coef` × KL estimate to the reference; sequences dropped by the
    off-policy mask (when `off_policy_delta` is set) leave the mask; then `aggregate`.
    Stats: `clip_frac` (token mean over the kept tokens), `kl` (token mean of the KL estimate over
    the kept tokens; 0 without a reference), `masked_seq_frac` (fraction of the B sequences dropped),
    `tokens` and `sequences` (the kept tokens, the kept sequences with a token: the normalisers of the
    two aggregations, which data-parallel training sums over ranks).
    """
    _require(logprobs_B_T.dim() == 2, f"logprobs_B_T must be 2-D [B, T], got shape {tuple(logprobs_B_T.shape)}")
    _require_B_T("old_logprobs_B_T", old_logprobs_B_T, logprobs_B_T.shape)
    _require_mask("mask_B_T", mask_B_T, logprobs_B_T.shape)
    _require(kl_estimator in ("k3", "k3_unbiased"), f"kl_estimator must be 'k3' or 'k3_unbiased', got {kl_estimator!r}")
    _require(kl_coef == 0.0 or ref_logprobs_B_T is not None, "kl_coef != 0 needs ref_logprobs_B_T")

    logprobs_B_T = torch.where(mask_B_T, logprobs_B_T, 0.0)
    old_logprobs_B_T = torch.where(mask_B_T, old_logprobs_B_T, 0.0)
    if ref_logprobs_B_T is not None:
        _require_B_T("ref_logprobs_B_T", ref_logprobs_B_T, logprobs_B_T.shape)
        ref_logprobs_B_T = torch.where(mask_B_T, ref_logprobs_B_T, 0.0)

    if off_policy_delta is None:
        keep_B = torch.ones(mask_B_T.shape[0], dtype=torch.bool, device=mask_B_T.device)
    else:
        keep_B = off_policy_sequence_mask(logprobs_B_T, old_logprobs_B_T, advantages_B, mask_B_T, off_policy_delta)
    mask_B_T = mask_B_T & keep_B.unsqueeze(-1)

    per_token_B_T, clip_active_B_T = policy_loss_terms(logprobs_B_T, old_logprobs_B_T, advantages_B, eps_low, eps_high)
    kl_stat = torch.zeros((), dtype=per_token_B_T.dtype, device=per_token_B_T.device)
    if ref_logprobs_B_T is not None:
        if kl_estimator == "k3":
            kl_B_T = kl_k3(logprobs_B_T, ref_logprobs_B_T)
        else:
            kl_B_T = kl_k3_unbiased(logprobs_B_T, ref_logprobs_B_T, old_logprobs_B_T)
        if kl_coef != 0.0:
            per_token_B_T = per_token_B_T + kl_coef * kl_B_T
        kl_stat = aggregate(kl_B_T.detach(), mask_B_T)

    loss = aggregate(per_token_B_T, mask_B_T, aggregation)
    stats = {
        "clip_frac": aggregate(clip_active_B_T.to(per_token_B_T.dtype), mask_B_T),
        "kl": kl_stat,
        "masked_seq_frac": (~keep_B).to(per_token_B_T.dtype).mean(),
        "tokens": mask_B_T.sum().to(per_token_B_T.dtype),
        "sequences": (mask_B_T.sum(-1) > 0).sum().to(per_token_B_T.dtype),
    }
    return loss, stats
