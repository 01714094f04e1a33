"""pluribus.core.distill against naive float64 references (loops over the vocabulary) and hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pluribus.core import (
    reverse_kl,
    reverse_kl_chunked,
    reverse_kl_topk_tail,
    sampled_token_advantages,
    sampled_token_pg_loss,
    teacher_weights,
    weighted_teacher_loss,
)

F64 = torch.float64
TOL = 1e-6


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=F64) * scale).to(dtype).requires_grad_()


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=0)


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 99) -> list[torch.Tensor | None]:
    """Gradients of a random weighting of `output`, so every element's gradient is checked."""
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(output.dtype)
    return list(torch.autograd.grad((output * weights).sum(), inputs, allow_unused=True))


def _assert_values_and_grads(actual, expected, inputs, tol: float = TOL) -> None:
    _close(actual, expected, tol)
    for grad_actual, grad_expected in zip(_grads(actual, inputs), _grads(expected, inputs)):
        _close(grad_actual, grad_expected, tol)


# ---------------------------------------------------------------- naive references (loops, float64)

def ref_log_softmax(logits_V: torch.Tensor) -> list[torch.Tensor]:
    V = logits_V.shape[0]
    shift = max(float(logits_V[v].detach()) for v in range(V))
    log_total = torch.log(sum(torch.exp(logits_V[v] - shift) for v in range(V)))
    return [logits_V[v] - shift - log_total for v in range(V)]


def ref_reverse_kl(student_B_T_V: torch.Tensor, teacher_B_T_V: torch.Tensor) -> torch.Tensor:
    B, T, V = student_B_T_V.shape
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            logp_s = ref_log_softmax(student_B_T_V[b, t])
            logp_t = ref_log_softmax(teacher_B_T_V[b, t].detach())
            row.append(sum(torch.exp(logp_s[v]) * (logp_s[v] - logp_t[v]) for v in range(V)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_forward_kl(student_B_T_V: torch.Tensor, teacher_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position, loops over the vocabulary."""
    B, T, V = student_B_T_V.shape
    return torch.stack([torch.stack([
        sum(torch.exp(logp_t[v]) * (logp_t[v] - logp_s[v]) for v in range(V))
        for logp_s, logp_t in ((ref_log_softmax(student_B_T_V[b, t]), ref_log_softmax(teacher_B_T_V[b, t].detach()))
                               for t in range(T))]) for b in range(B)])


def ref_topk_tail(student_B_T_V: torch.Tensor, teacher_B_T_V: torch.Tensor, k: int) -> torch.Tensor:
    B, T, V = student_B_T_V.shape
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            logp_s = ref_log_softmax(student_B_T_V[b, t])
            logp_t = ref_log_softmax(teacher_B_T_V[b, t].detach())
            top = sorted(range(V), key=lambda v: -float(logp_s[v].detach()))[:k]
            kl = sum(torch.exp(logp_s[v]) * (logp_s[v] - logp_t[v]) for v in top)
            tail_s = 1 - sum(torch.exp(logp_s[v]) for v in top)
            tail_t = 1 - sum(torch.exp(logp_t[v]) for v in top)
            if k < V:
                kl = kl + tail_s * (torch.log(tail_s) - torch.log(tail_t))
            row.append(kl)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_weighted_teacher_loss(kl_N, mask_N, teacher_index_N, weights_E):
    loss, means = 0.0, []
    for e in range(weights_E.shape[0]):
        mine = [kl_N[i] for i in range(kl_N.shape[0]) if mask_N[i] and int(teacher_index_N[i]) == e]
        mean = sum(mine) / len(mine) if mine else torch.zeros((), dtype=F64)
        means.append(mean)
        loss = loss + weights_E[e] * mean
    return loss, torch.stack(means)


# ---------------------------------------------------------------- reverse_kl

def test_reverse_kl_matches_loop_reference():
    student, teacher = _randn(2, 3, 7, seed=1, scale=2.0), _randn(2, 3, 7, seed=2, scale=2.0)
    actual = reverse_kl(student, teacher)
    assert actual.shape == (2, 3)
    _assert_values_and_grads(actual, ref_reverse_kl(student, teacher), [student])


def test_reverse_kl_matches_torch_kl_div():
    student, teacher = _randn(4, 5, 9, seed=3, scale=3.0), _randn(4, 5, 9, seed=4, scale=3.0)
    # kl_div(input, target) = Σ target·(log target − input): KL(s ‖ t) takes t as input, s as target.
    independent = torch.nn.functional.kl_div(
        torch.log_softmax(teacher.detach(), -1), torch.log_softmax(student, -1), log_target=True, reduction="none"
    ).sum(-1)
    _assert_values_and_grads(reverse_kl(student, teacher), independent, [student])


def test_reverse_kl_hand_worked():
    student = torch.tensor([math.log(0.5), math.log(0.5)], dtype=F64)
    teacher = torch.tensor([math.log(0.25), math.log(0.75)], dtype=F64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    _close(reverse_kl(student, teacher), torch.tensor(expected, dtype=F64))
    # Not symmetric: the forward direction gives a different number.
    assert abs(reverse_kl(teacher, student).item() - expected) > 1e-3


def test_reverse_kl_gives_teacher_no_gradient():
    student, teacher = _randn(3, 6, seed=5), _randn(3, 6, seed=6)
    grad_student, grad_teacher = torch.autograd.grad(reverse_kl(student, teacher).sum(), [student, teacher], allow_unused=True)
    assert grad_teacher is None
    assert grad_student.abs().sum() > 0


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    vocab=st.integers(2, 12),
    scale=st.floats(0.1, 20.0),
    shift=st.floats(-50.0, 50.0),
)
def test_reverse_kl_nonnegative_and_zero_iff_equal(seed, vocab, scale, shift):
    student = _randn(3, vocab, seed=seed, scale=scale).detach()
    teacher = _randn(3, vocab, seed=seed + 1, scale=scale).detach()
    kl = reverse_kl(student, teacher)
    assert (kl >= -1e-12).all()
    # Equal distributions (logits equal up to a per-row constant) give 0; distinct ones do not.
    assert reverse_kl(student, student + shift).abs().max() < 1e-9
    distinct = (torch.softmax(student, -1) - torch.softmax(teacher, -1)).abs().amax(-1) > 1e-3
    assert (kl[distinct] > 0).all()


def test_reverse_kl_any_leading_shape_and_float32():
    student, teacher = _randn(2, 3, 4, 10, seed=7, scale=2.0), _randn(2, 3, 4, 10, seed=8, scale=2.0)
    expected = reverse_kl(student, teacher)
    assert expected.shape == (2, 3, 4)
    _close(reverse_kl(student.reshape(-1, 10), teacher.reshape(-1, 10)).reshape(2, 3, 4), expected)
    kl32 = reverse_kl(student.float(), teacher.float())
    assert kl32.dtype == torch.float32
    _close(kl32, expected.float(), 1e-5)
    kl16 = reverse_kl(student.bfloat16(), teacher.bfloat16())
    assert kl16.dtype == torch.float32  # computed at float32, not in bf16


def test_reverse_kl_stable_for_large_logits():
    student, teacher = _randn(4, 8, seed=9, scale=1e4, dtype=torch.float32), _randn(4, 8, seed=10, scale=1e4, dtype=torch.float32)
    kl = reverse_kl(student, teacher)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()


def test_reverse_kl_temperature_scales_both_logits():
    student, teacher = _randn(3, 7, seed=11), _randn(3, 7, seed=12)
    _assert_values_and_grads(reverse_kl(student, teacher, temperature=0.5), ref_reverse_kl((student / 0.5)[None], (teacher / 0.5)[None])[0], [student])


def test_reverse_kl_masked_vocabulary_entries_give_no_nan():
    student = _randn(2, 5, seed=13).detach()
    teacher = _randn(2, 5, seed=14).detach()
    student[:, 0] = float("-inf")  # e.g. padded vocabulary rows, masked in both models
    teacher[:, 0] = float("-inf")
    student.requires_grad_()
    kl = reverse_kl(student, teacher)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    expected = reverse_kl(student.detach()[:, 1:], teacher[:, 1:])
    _close(kl, expected)
    assert torch.isfinite(grad).all()
    # The teacher ruling out a token the student still uses is an infinite KL, not a NaN.
    teacher[0, 1] = float("-inf")
    assert reverse_kl(student.detach(), teacher)[0].item() == float("inf")
    # NaN logits are not hidden.
    assert torch.isnan(reverse_kl(torch.full((5,), float("nan")), teacher[1])).all()


# ---------------------------------------------------------------- reverse_kl_chunked

def _heads(N=10, D_s=4, D_t=6, V=11, dtype=F64, bias=True, seed=20):
    student_hidden = _randn(N, D_s, seed=seed, dtype=dtype)
    student_head = _randn(V, D_s, seed=seed + 1, dtype=dtype)
    student_bias = _randn(V, seed=seed + 2, dtype=dtype) if bias else None
    teacher_hidden = _randn(N, D_t, seed=seed + 3, dtype=dtype)
    teacher_head = _randn(V, D_t, seed=seed + 4, dtype=dtype)
    teacher_bias = _randn(V, seed=seed + 5, dtype=dtype) if bias else None
    return student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias


def _unchunked(student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias, temperature=1.0):
    student_logits = student_hidden @ student_head.T + (0 if student_bias is None else student_bias)
    teacher_logits = teacher_hidden @ teacher_head.T + (0 if teacher_bias is None else teacher_bias)
    return reverse_kl(student_logits, teacher_logits, temperature)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 10, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_equals_unchunked(chunk_size, bias):
    inputs = _heads(bias=bias)
    student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias = inputs
    chunked = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size,
                                 student_bias_V=student_bias, teacher_bias_V=teacher_bias, temperature=0.7)
    wrt = [t for t in (student_hidden, student_head, student_bias) if t is not None]
    _assert_values_and_grads(chunked, _unchunked(*inputs, temperature=0.7), wrt, tol=1e-9)


def test_chunked_equals_unchunked_with_small_row_blocks(monkeypatch):
    # Real vocabularies split each chunk into row blocks for the in-place steps; force that here.
    import pluribus.core.distill as distill

    monkeypatch.setattr(distill, "_BLOCK_ELEMENTS", 25)  # 2 rows of V=11 per block
    inputs = _heads()
    student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias = inputs
    chunked = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, 7,
                                 student_bias_V=student_bias, teacher_bias_V=teacher_bias)
    _assert_values_and_grads(chunked, _unchunked(*inputs), [student_hidden, student_head, student_bias], tol=1e-9)


def test_chunked_matches_loop_reference():
    student_hidden, student_head, _, teacher_hidden, teacher_head, _ = _heads(N=6, V=7, bias=False)
    chunked = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=4)
    expected = ref_reverse_kl((student_hidden @ student_head.T)[None], (teacher_hidden @ teacher_head.T)[None])[0]
    _assert_values_and_grads(chunked, expected, [student_hidden, student_head])


@pytest.mark.parametrize("forward_weight", [0.3, 1.0])
def test_chunked_with_a_forward_share_matches_loop_references(forward_weight):
    student_hidden, student_head, _, teacher_hidden, teacher_head, _ = _heads(N=6, V=7, bias=False)
    mixed = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=4,
                               forward_weight=forward_weight)
    student, teacher = (student_hidden @ student_head.T)[None], (teacher_hidden @ teacher_head.T)[None]
    expected = ((1 - forward_weight) * ref_reverse_kl(student, teacher) + forward_weight * ref_forward_kl(student, teacher))[0]
    _assert_values_and_grads(mixed, expected, [student_hidden, student_head])
    assert ref_forward_kl(student, teacher).sub(ref_reverse_kl(student, teacher)).abs().max() > 1e-2  # two divergences


def test_chunked_forward_share_with_bias_temperature_and_small_row_blocks(monkeypatch):
    import pluribus.core.distill as distill

    monkeypatch.setattr(distill, "_BLOCK_ELEMENTS", 25)  # 2 rows of V=11 per block
    inputs = _heads()
    student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias = inputs
    mixed = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, 7, student_bias_V=student_bias,
                               teacher_bias_V=teacher_bias, temperature=0.7, forward_weight=0.6)
    student = ((student_hidden @ student_head.T + student_bias) / 0.7)[None]
    teacher = ((teacher_hidden @ teacher_head.T + teacher_bias) / 0.7)[None]
    expected = (0.4 * ref_reverse_kl(student, teacher) + 0.6 * ref_forward_kl(student, teacher))[0]
    _assert_values_and_grads(mixed, expected, [student_hidden, student_head, student_bias])
    with pytest.raises(ValueError, match="forward_weight must be in"):
        reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, forward_weight=1.5)


def test_chunked_forward_kl_ignores_tokens_the_teacher_rules_out():
    # A vocabulary entry the teacher gives -inf: its forward term is 0·(−∞) and must add 0, as the tokens the
    # student rules out do in the reverse KL; the reverse KL there is +inf and must take no part at α = 1.
    student_hidden, student_head, _, teacher_hidden, teacher_head, _ = _heads(N=5, V=6, bias=False)
    teacher_bias = torch.zeros(6, dtype=F64)
    teacher_bias[0] = float("-inf")
    forward = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, 2,
                                 teacher_bias_V=teacher_bias, forward_weight=1.0)
    assert torch.isfinite(forward).all()
    (grad,) = torch.autograd.grad(forward.sum(), [student_hidden], retain_graph=True)
    assert torch.isfinite(grad).all()
    student = (student_hidden @ student_head.T)[None]
    teacher = (teacher_hidden @ teacher_head.T)[None].detach().clone()
    teacher[..., 0] = -1e4  # probability 0 in float64: the same terms
    _assert_values_and_grads(forward, ref_forward_kl(student, teacher)[0], [student_hidden, student_head])


def test_chunked_gives_teacher_no_gradient():
    student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias = _heads()
    kl = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, 3,
                            student_bias_V=student_bias, teacher_bias_V=teacher_bias)
    grads = torch.autograd.grad(kl.sum(), [teacher_hidden, teacher_head, teacher_bias], allow_unused=True)
    assert grads == [None, None, None] or grads == (None, None, None)


def test_chunked_float32_close_to_float64():
    inputs64 = _heads(N=33, D_s=8, D_t=8, V=50)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    kl64 = reverse_kl_chunked(inputs64[0], inputs64[1], inputs64[3], inputs64[4], 8, student_bias_V=inputs64[2], teacher_bias_V=inputs64[5])
    kl32 = reverse_kl_chunked(inputs32[0], inputs32[1], inputs32[3], inputs32[4], 8, student_bias_V=inputs32[2], teacher_bias_V=inputs32[5])
    assert kl32.dtype == torch.float32
    _close(kl32, kl64.float(), 1e-4)
    grads64 = _grads(kl64, [inputs64[0], inputs64[1], inputs64[2]])
    grads32 = _grads(kl32, [inputs32[0], inputs32[1], inputs32[2]])
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == torch.float32
        _close(g32, g64.float(), 1e-4)


def test_chunked_saves_only_its_inputs_for_backward():
    # A plain autograd graph would keep [N, V] log-softmaxes alive until backward; N·V here is
    # larger than every input, so any saved logits show up.
    N, V, D = 16, 200, 3
    student_hidden, student_head, _, teacher_hidden, teacher_head, _ = _heads(N=N, D_s=D, D_t=D, V=V, bias=False)
    saved_numels: list[int] = []

    def pack(tensor):
        saved_numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kl = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=4)
    input_numel = sum(t.numel() for t in (student_hidden, student_head, teacher_hidden, teacher_head))
    assert saved_numels, "the hook saw nothing: the test would prove nothing"
    assert sum(saved_numels) <= input_numel + N < N * V
    kl.sum().backward()
    assert student_head.grad is not None


def test_chunked_masked_vocabulary_entries_give_no_nan():
    student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias = _heads()
    with torch.no_grad():
        student_bias[0] = float("-inf")  # a vocabulary entry both models rule out
        teacher_bias[0] = float("-inf")
    kl = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, 4,
                            student_bias_V=student_bias, teacher_bias_V=teacher_bias)
    grads = torch.autograd.grad(kl.sum(), [student_hidden, student_head, student_bias])
    assert torch.isfinite(kl).all() and all(torch.isfinite(g).all() for g in grads)
    expected = _unchunked(student_hidden.detach(), student_head.detach()[1:], student_bias.detach()[1:],
                          teacher_hidden, teacher_head.detach()[1:], teacher_bias.detach()[1:])
    _close(kl, expected, 1e-9)


def test_chunked_rejects_mismatched_shapes():
    student_hidden, student_head, _, teacher_hidden, teacher_head, _ = _heads()
    with pytest.raises(ValueError, match="positions"):
        reverse_kl_chunked(student_hidden[:-1], student_head, teacher_hidden, teacher_head)
    with pytest.raises(ValueError, match="student head"):
        reverse_kl_chunked(student_hidden, student_head[:-1], teacher_hidden, teacher_head)
    with pytest.raises(ValueError, match="chunk_size"):
        reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=0)


# ---------------------------------------------------------------- sampled-token estimator (ablation)

def test_sampled_token_advantages_and_pg_loss_hand_worked():
    student = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[math.log(0.25), math.log(0.4), float("-inf")]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    advantages = sampled_token_advantages(student, teacher)
    assert not advantages.requires_grad
    _close(advantages[:, :2], torch.tensor([[-math.log(2.0), math.log(2.0)]], dtype=F64))
    loss = sampled_token_pg_loss(student, advantages, mask)
    expected = -(-math.log(2.0) * math.log(0.5) + math.log(2.0) * math.log(0.2)) / 2
    _close(loss, torch.tensor(expected, dtype=F64))
    (grad,) = torch.autograd.grad(loss, student)
    _close(grad, torch.tensor([[math.log(2.0) / 2, -math.log(2.0) / 2, 0.0]], dtype=F64))


def test_sampled_token_pg_loss_matches_reference():
    logprobs, teacher = _randn(3, 5, seed=30), _randn(3, 5, seed=31).detach()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    advantages = sampled_token_advantages(logprobs, teacher)
    terms = [advantages[b, t] * logprobs[b, t] for b in range(3) for t in range(5) if mask[b, t]]
    expected = -sum(terms) / len(terms)
    _assert_values_and_grads(sampled_token_pg_loss(logprobs, advantages, mask), expected, [logprobs])


# ---------------------------------------------------------------- top-k + tail (ablation)

@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_tail_matches_loop_reference(k):
    student, teacher = _randn(2, 3, 7, seed=40, scale=2.0), _randn(2, 3, 7, seed=41, scale=2.0)
    actual = reverse_kl_topk_tail(student, teacher, k)
    _assert_values_and_grads(actual, ref_topk_tail(student, teacher, k), [student])
    assert (actual >= 0).all()
    assert (actual <= reverse_kl(student, teacher) + 1e-12).all()  # merging buckets never adds divergence


def test_topk_tail_with_full_vocabulary_equals_reverse_kl():
    student, teacher = _randn(2, 4, 9, seed=42), _randn(2, 4, 9, seed=43)
    _assert_values_and_grads(reverse_kl_topk_tail(student, teacher, 9), reverse_kl(student, teacher), [student])


def test_topk_tail_hand_worked():
    student = torch.tensor([0.5, 0.3, 0.2], dtype=F64).log()
    teacher = torch.tensor([0.25, 0.25, 0.5], dtype=F64).log()
    # top-1 of the student is token 0; tail buckets 0.5 and 0.75.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    _close(reverse_kl_topk_tail(student, teacher, 1), torch.tensor(expected, dtype=F64))


def test_topk_tail_stays_finite_when_top_k_hold_all_the_mass():
    # In float32, 1 − Σ top-k p rounds to 0 or below here; the logsumexp tail does not.
    student = torch.tensor([[30.0, 0.0, -30.0, -60.0]], requires_grad=True)
    teacher = torch.tensor([[29.0, 0.0, -20.0, -50.0]])
    kl = reverse_kl_topk_tail(student, teacher, 2)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    exact = reverse_kl(student.detach().double(), teacher.double())
    _close(kl, exact.float(), 1e-5)


# ---------------------------------------------------------------- weighted multi-teacher loss (Eq. 29)

def test_weighted_teacher_loss_hand_worked():
    kl = torch.tensor([1.0, 3.0, 2.0, 10.0, 4.0], dtype=F64, requires_grad=True)
    mask = torch.tensor([True, True, True, False, True])
    teacher = torch.tensor([0, 0, 2, 2, 2])
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    loss, means = weighted_teacher_loss(kl, mask, teacher, weights)
    # teacher 0: mean(1, 3) = 2; teacher 1: no tokens; teacher 2: mean(2, 4) = 3 (the 10 is masked).
    _close(loss, torch.tensor(0.5 * 2 + 2.0 * 3, dtype=F64))
    _close(means, torch.tensor([2.0, 0.0, 3.0], dtype=F64))
    assert not means.requires_grad
    (grad,) = torch.autograd.grad(loss, kl)
    _close(grad, torch.tensor([0.25, 0.25, 1.0, 0.0, 1.0], dtype=F64))


def test_weighted_teacher_loss_matches_reference():
    kl = _randn(12, seed=50).abs().detach().requires_grad_()
    mask = torch.rand(12, generator=torch.Generator().manual_seed(51)) < 0.8
    teacher = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(52))
    weights = torch.tensor([1.0, 0.5, 2.0, 0.25], dtype=F64)
    loss, means = weighted_teacher_loss(kl, mask, teacher, weights)
    expected, expected_means = ref_weighted_teacher_loss(kl, mask, teacher, weights)
    _assert_values_and_grads(loss, expected, [kl])
    _close(means, expected_means.detach())


def test_weighted_teacher_loss_rejects_bad_teacher_index():
    kl, mask = torch.ones(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        weighted_teacher_loss(kl, mask, torch.tensor([0, 1, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="integer"):
        weighted_teacher_loss(kl, mask, torch.tensor([0.0, 1.0, 1.0]), torch.ones(2))


def ref_aggregated_loss(kl_per_sequence, teacher_per_sequence, weights_E, aggregation):
    """Loops over samples and tokens: the objective each `aggregation` names, from first principles."""
    if aggregation == "teacher_mean":
        kl = torch.cat(kl_per_sequence)
        index = torch.tensor([e for e, seq in zip(teacher_per_sequence, kl_per_sequence) for _ in seq])
        return ref_weighted_teacher_loss(kl, torch.ones_like(kl, dtype=torch.bool), index, weights_E)[0]
    total = torch.zeros((), dtype=F64)
    for e, seq in zip(teacher_per_sequence, kl_per_sequence):
        for value in seq:
            total = total + weights_E[e] * value
    if aggregation == "sequence_sum":
        return total / len(kl_per_sequence)
    return total / sum(len(seq) for seq in kl_per_sequence)


@pytest.mark.parametrize("aggregation", ["teacher_mean", "sequence_sum", "token_mean"])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_teacher_weights_make_each_aggregation_over_ranks(aggregation, ranks):
    """The batch's samples split over `ranks`: the per-rank `weighted_teacher_loss` under `teacher_weights`, summed,
    is the loop reference over the whole batch, in value and gradient; a teacher may have no sample on a rank."""
    generator = torch.Generator().manual_seed(60)
    lengths = [int(n) for n in torch.randint(0, 7, (10,), generator=generator)]  # an empty response included
    lengths[3] = 0
    teachers = [int(e) for e in torch.randint(0, 3, (10,), generator=generator)] + [0]
    lengths.append(5)
    kl = _randn(sum(lengths), seed=61).abs().detach().requires_grad_()
    per_sequence = list(torch.split(kl, lengths))
    weights = torch.tensor([1.0, 0.5, 2.0, 0.25], dtype=F64)  # teacher 3 has no samples
    index = torch.tensor([e for e, n in zip(teachers, lengths) for _ in range(n)])
    global_tokens = torch.bincount(index, minlength=4)
    shards = [list(range(len(lengths)))[r::ranks] for r in range(ranks)]
    loss = torch.zeros((), dtype=F64)
    for shard in shards:
        rank_kl = torch.cat([per_sequence[i] for i in shard])
        rank_index = torch.tensor([teachers[i] for i in shard for _ in range(lengths[i])], dtype=torch.long)
        rank_tokens = torch.bincount(rank_index, minlength=4)
        w = teacher_weights(weights, rank_tokens, global_tokens, len(lengths), aggregation)
        loss = loss + weighted_teacher_loss(rank_kl, torch.ones_like(rank_kl, dtype=torch.bool), rank_index, w)[0]
    _assert_values_and_grads(loss, ref_aggregated_loss(per_sequence, teachers, weights, aggregation), [kl])


def test_teacher_weights_hand_worked():
    """Two samples: teacher 0 three tokens, teacher 1 one token; w = (1, 2)."""
    weights, tokens = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3, 1])
    _close(teacher_weights(weights, tokens, tokens, 2, "teacher_mean"), torch.tensor([1.0, 2.0], dtype=F64))
    _close(teacher_weights(weights, tokens, tokens, 2, "sequence_sum"), torch.tensor([1.5, 1.0], dtype=F64))
    _close(teacher_weights(weights, tokens, tokens, 2, "token_mean"), torch.tensor([0.75, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="aggregation must be one of"):
        teacher_weights(weights, tokens, tokens, 2, "mean")
