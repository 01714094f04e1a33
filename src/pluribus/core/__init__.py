"""The maths: GRPO advantages and losses, KL estimators, on-policy distillation losses, weight merging.

Pure tensor functions with shapes in their names; no I/O, no config objects (DESIGN.md §3–4).
"""

from pluribus.core.distill import (
    reverse_kl,
    reverse_kl_chunked,
    reverse_kl_topk_tail,
    sampled_token_advantages,
    sampled_token_pg_loss,
    teacher_weights,
    weighted_teacher_loss,
)
from pluribus.core.grpo import (
    aggregate,
    grpo_loss,
    group_advantages,
    kl_k3,
    kl_k3_unbiased,
    off_policy_sequence_mask,
    policy_loss_terms,
)
from pluribus.core.merge import linear_merge, task_arithmetic, ties_merge

__all__ = [
    "aggregate",
    "grpo_loss",
    "group_advantages",
    "kl_k3",
    "kl_k3_unbiased",
    "linear_merge",
    "off_policy_sequence_mask",
    "policy_loss_terms",
    "reverse_kl",
    "reverse_kl_chunked",
    "reverse_kl_topk_tail",
    "sampled_token_advantages",
    "sampled_token_pg_loss",
    "task_arithmetic",
    "ties_merge",
    "teacher_weights",
    "weighted_teacher_loss",
]
