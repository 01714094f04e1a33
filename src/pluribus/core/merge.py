"""Weight merging of task vectors: linear average, task arithmetic, TIES-Merging.

A task vector is an expert's weights minus the base's, one tensor per parameter; each function
here takes the E experts' deltas of one parameter (same shape) and returns the merged delta that
is added back to the base. Computed in float32 at least (float64 stays float64).

- `linear_merge`: `Σ_e w_e δ_e / Σ_e w_e` (model soups, Wortsman et al. 2022).
- `task_arithmetic`: `λ Σ_e δ_e` (Ilharco et al. 2023).
- `ties_merge`: TIES-Merging (Yadav et al. 2023): trim each δ_e to its largest-magnitude entries,
  elect a sign per entry, average the kept entries that agree with it (disjoint mean), times λ.

Where `ties_merge` departs from the paper, and why:
- Trimming is per parameter tensor, not over the whole model's flattened task vector (mergekit
  does the same): every matrix keeps its `density` share, and one parameter at a time is in memory.
- Exactly `k = round(density · n)` entries (half to even, at least one) are kept per expert;
  among entries of equal magnitude at the threshold the lower flat index wins. The paper's code
  keeps every entry tied with the k-th, so its count depends on the values; a fixed count is
  deterministic and the same on every device.
- Where the kept values of an entry sum to exactly 0 the elected sign is 0 and the entry is 0. The
  paper's code falls back to the sign of the whole vector's sum there; an exact cancel almost never
  happens in trained weights, and 0 is the neutral choice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["linear_merge", "task_arithmetic", "ties_merge"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _stack(deltas: list[Tensor]) -> Tensor:
    """The deltas as one `[E, *shape]` tensor in the compute dtype, after checking they can merge."""
    _require(len(deltas) > 0, "deltas: need at least one task vector, got none")
    shape = deltas[0].shape
    for i, delta in enumerate(deltas):
        _require(delta.shape == shape,
                 f"deltas must all have one shape: delta 0 is {tuple(shape)}, delta {i} is {tuple(delta.shape)}")
    dtype = torch.float32
    for delta in deltas:
        dtype = torch.promote_types(dtype, delta.dtype)
    return torch.stack([delta.to(dtype) for delta in deltas])


def linear_merge(deltas: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """Weighted mean `Σ_e w_e δ_e / Σ_e w_e` of E deltas of one shape; `weights=None`: uniform.

    Weights must be ≥ 0 with a positive sum (they are normalised, so only their ratios matter).
    """
    deltas_E_X = _stack(deltas)
    E = deltas_E_X.shape[0]
    if weights is None:
        weights = [1.0] * E
    _require(len(weights) == E, f"weights: got {len(weights)} for {E} deltas")
    _require(all(math.isfinite(w) and w >= 0 for w in weights), f"weights must be finite and ≥ 0, got {list(weights)}")
    total = sum(weights)
    _require(total > 0, "weights must not all be 0")
    weights_E = torch.tensor([w / total for w in weights], dtype=deltas_E_X.dtype, device=deltas_E_X.device)
    return torch.tensordot(weights_E, deltas_E_X, dims=1)


def task_arithmetic(deltas: list[Tensor], scale: float) -> Tensor:
    """`scale · Σ_e δ_e` over E deltas of one shape."""
    _require(math.isfinite(scale), f"scale must be finite, got {scale}")
    return scale * _stack(deltas).sum(0)


def _kept_count(density: float, numel: int) -> int:
    """How many entries of a tensor with `numel` entries TIES keeps: `round(density · numel)`, at least 1."""
    return min(numel, max(1, round(density * numel)))


def _top_magnitude_mask(values_N: Tensor, k: int) -> Tensor:
    """Bool `[N]`: the k entries of largest |value|; at the threshold, lower indices first."""
    N = values_N.shape[0]
    if k >= N:
        return torch.ones(N, dtype=torch.bool, device=values_N.device)
    magnitude_N = values_N.abs()
    threshold = magnitude_N.kthvalue(N - k + 1).values  # the k-th largest magnitude
    above_N = magnitude_N > threshold
    at_N = magnitude_N == threshold
    room = k - above_N.sum()
    return above_N | (at_N & (at_N.cumsum(0) <= room))


def ties_merge(deltas: list[Tensor], density: float, scale: float = 1.0) -> Tensor:
    """TIES-Merging of E deltas of one shape: trim, elect sign, disjoint mean, times `scale`.

    Trim: each delta keeps its `round(density · numel)` entries (at least 1) of largest magnitude,
    the rest become 0; ties at the threshold go to the lower flat index. Elect: per entry, the sign
    of the sum of the trimmed values. Disjoint mean: per entry, the mean of the nonzero trimmed
    values with the elected sign; 0 where there is none.
    """
    _require(0 < density <= 1, f"density must be in (0, 1], got {density}")
    _require(math.isfinite(scale), f"scale must be finite, got {scale}")
    deltas_E_N = _stack(deltas).reshape(len(deltas), -1)
    k = _kept_count(density, deltas_E_N.shape[1])
    trimmed_E_N = torch.stack([torch.where(_top_magnitude_mask(d_N, k), d_N, 0.0) for d_N in deltas_E_N])
    sign_N = trimmed_E_N.sum(0).sign()
    agree_E_N = trimmed_E_N.sign() == sign_N  # a trimmed 0 agrees only with an elected 0, and adds 0 there
    count_N = agree_E_N.sum(0).clamp_min(1)
    merged_N = torch.where(agree_E_N, trimmed_E_N, 0.0).sum(0) / count_N
    return (scale * merged_N).reshape(deltas[0].shape)
