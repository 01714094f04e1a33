"""The OPD loss over a batch of cached teacher states, backpropagated one teacher head at a time.

`Σ_E w_E · mean(KL_t over the positions routed to E)` (Eq. 29) with the exact per-position KL of
`pluribus.core.reverse_kl_chunked`, combined by `pluribus.core.weighted_teacher_loss`: this module
only schedules them. A single `loss.backward()` would keep every teacher's head alive until the
end (the chunked KL saves its inputs for its backward). Instead the student's hidden states are cut
from its graph; each teacher's term is computed and backpropagated into that cut while its head
(possibly read from disk) is the only one loaded; then the accumulated gradient goes through the
student's trunk once. Same gradient, at most one teacher head held, one backward through the trunk.
Teachers that share one head in memory (LoRA teachers over one base) are scored in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pluribus.core import reverse_kl_chunked, weighted_teacher_loss
from pluribus.teachers.pool import TeacherGroup, TeacherHead, TeacherStates


def distill_backward(student_hidden_N_D: Tensor, student_head_V_D: Tensor, states: TeacherStates,
                     weights_E: Tensor, chunk_size: int = 1024, student_bias_V: Tensor | None = None,
                     forward_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Backpropagate Eq. 29 into the student; return `(loss, kl_mean_E, tokens_E)`, detached.

    student_hidden_N_D: the student's final-norm hidden states at the N response positions, in the
        batch's order (samples ordered by teacher), attached to the student's graph.
    student_head_V_D / student_bias_V: the student's output head (parameters: their gradient
        accumulates in `.grad`).
    forward_weight: α of `reverse_kl_chunked` (0: Eq. 29's reverse KL; the means are then of the mixed divergence).
    A teacher with no positions has mean 0 and 0 tokens. When a teacher's term is not finite the
    loss comes back non-finite and nothing reaches the trunk; gradients already accumulated in the
    head must then be discarded by the caller (`optimizer.zero_grad`).
    """
    N = student_hidden_N_D.shape[0]
    if states.teacher_index_N.shape[0] != N:
        raise ValueError(f"student has {N} response positions, the teacher states {states.teacher_index_N.shape[0]}")
    E = weights_E.shape[0]
    cut_N_D = student_hidden_N_D.detach().requires_grad_(student_hidden_N_D.requires_grad)
    loss = torch.zeros((), dtype=torch.float64, device="cpu")  # what is reported: accumulated on the host
    kl_mean_E = torch.zeros(E, dtype=torch.float64, device="cpu")
    for groups in _sharing_a_head(states.groups):
        teacher_weight_V_D, teacher_bias_V = groups[0].head.load()
        student_n_D = _cat([cut_N_D[group.rows] for group in groups])
        kl_n = reverse_kl_chunked(student_n_D, student_head_V_D,
                                  _cat([group.hidden_N_D.to(cut_N_D.device) for group in groups]),
                                  teacher_weight_V_D, chunk_size, student_bias_V=student_bias_V,
                                  teacher_bias_V=teacher_bias_V, forward_weight=forward_weight)
        del teacher_weight_V_D, teacher_bias_V
        index_n = _cat([states.teacher_index_N[group.rows] for group in groups]).to(kl_n.device)
        term, means_E = weighted_teacher_loss(kl_n, torch.ones_like(kl_n, dtype=torch.bool), index_n,
                                              weights_E.to(kl_n.device))
        loss += term.detach().double().cpu()
        kl_mean_E += means_E.double().cpu()
        if not torch.isfinite(term):
            return loss, kl_mean_E, _tokens(states, E)
        if term.requires_grad:
            term.backward()
    if cut_N_D.grad is not None:
        student_hidden_N_D.backward(cut_N_D.grad)
    return loss, kl_mean_E, _tokens(states, E)


def _sharing_a_head(groups: list[TeacherGroup]) -> list[list[TeacherGroup]]:
    """The groups in order, consecutive ones whose heads are one tensor in memory (LoRA teachers over one base,
    their head not adapted) taken together: one chunked pass for all of them instead of one each (12 LoRA
    teachers: 12 passes over the same head)."""
    batches: list[list[TeacherGroup]] = []
    for group in groups:
        if batches and _same_head(batches[-1][0].head, group.head):
            batches[-1].append(group)
        else:
            batches.append([group])
    return batches


def _same_head(a: TeacherHead, b: TeacherHead) -> bool:
    def key(t: Tensor | None):
        return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)

    return a.weight_file is None and b.weight_file is None and key(a.weight_V_D) == key(b.weight_V_D) \
        and key(a.bias_V) == key(b.bias_V)


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _tokens(states: TeacherStates, E: int) -> Tensor:
    return torch.bincount(states.teacher_index_N, minlength=E)
