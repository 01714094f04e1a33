"""Overlong penalty (DAPO's "soft overlong punishment"), the dial behind reasoning-effort experts.

DAPO (Yu et al., 2025, Eq. 13) adds to the task reward a length term

    R_length(L) = 0                              if L <= L_max - L_cache
                = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
                = -1                             if L > L_max

so a response is free up to the soft limit, then loses reward linearly to -1 at the hard limit
`L_max` (the generation budget). Penalised rewards therefore lie in [-1, 1], not [0, 1]: GRPO's
advantage `r - mean(r)` needs no particular range.

DeepSeek-V4 (§5) trains separate specialists per reasoning-effort mode that "differ in length
penalty and context window". In pluribus an effort mode is a `LengthPenalty` (and the matching
generation budget) given to that expert's GRPO stage: a low-effort expert gets a small `max_tokens`
and so learns short answers, a high-effort one a large budget; the experts are then merged by
OPD like any others. The report gives no numbers, so there are no presets here.

Where `cache_tokens` is 0 the penalty is a hard cliff: 0 up to `max_tokens`, -1 beyond.
"""

from __future__ import annotations

from dataclasses import dataclass

from pluribus.errors import PluribusError


@dataclass(frozen=True)
class LengthPenalty:
    """A DAPO overlong penalty: free up to `max_tokens - cache_tokens`, -1 at `max_tokens`."""

    max_tokens: int
    """The hard limit L_max (response tokens): at and beyond it the penalty is -1."""
    cache_tokens: int
    """The width L_cache of the linear ramp that ends at `max_tokens`."""

    def __post_init__(self) -> None:
        _check_limits(self.max_tokens, self.cache_tokens)

    def __call__(self, num_tokens: int) -> float:
        return length_penalty(num_tokens, self.max_tokens, self.cache_tokens)

    def apply(self, reward: float, num_tokens: int) -> float:
        return apply_length_penalty(reward, num_tokens, self.max_tokens, self.cache_tokens)


def length_penalty(num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's R_length for a response of `num_tokens` tokens: 0, then linear down to -1, in [-1, 0]."""
    _check_limits(max_tokens, cache_tokens)
    soft_limit = max_tokens - cache_tokens
    if num_tokens <= soft_limit:
        return 0.0
    if num_tokens >= max_tokens:  # also covers cache_tokens == 0 (a hard cliff)
        return -1.0
    return (soft_limit - num_tokens) / cache_tokens


def apply_length_penalty(reward: float, num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """The task reward plus the overlong penalty (DAPO adds the two): in [-1, 1] for a reward in [0, 1]."""
    return reward + length_penalty(num_tokens, max_tokens, cache_tokens)


def _check_limits(max_tokens: int, cache_tokens: int) -> None:
    if max_tokens <= 0:
        raise PluribusError(f"length penalty: max_tokens must be positive, got {max_tokens}")
    if not 0 <= cache_tokens <= max_tokens:
        raise PluribusError(f"length penalty: cache_tokens must be in [0, max_tokens={max_tokens}], "
                            f"got {cache_tokens}")
