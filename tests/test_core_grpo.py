"""pluribus.core.grpo against naive float64 references (explicit loops) and hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from pluribus.core import (
    aggregate,
    group_advantages,
    grpo_loss,
    kl_k3,
    kl_k3_unbiased,
    off_policy_sequence_mask,
    policy_loss_terms,
)

F64 = torch.float64
TOL = 1e-6


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=F64) * scale).requires_grad_()


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=0)


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 99) -> list[torch.Tensor]:
    """Gradients of a random weighting of `output`, so every element's gradient is checked."""
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return list(torch.autograd.grad((output * weights).sum(), inputs))


def _assert_values_and_grads(actual: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    _close(actual, expected)
    for grad_actual, grad_expected in zip(_grads(actual, inputs), _grads(expected, inputs)):
        _close(grad_actual, grad_expected)


def _stack_B_T(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.stack(row) for row in rows])


# ---------------------------------------------------------------- naive references (loops, float64)

def ref_group_advantages(rewards, group_size, scale, eps, valid):
    out = []
    for start in range(0, len(rewards), group_size):
        members = range(start, start + group_size)
        kept = [rewards[i] for i in members if valid[i]]
        mean = sum(kept) / len(kept) if kept else 0.0
        std = 0.0
        if len(kept) > 1:
            std = torch.sqrt(sum((r - mean) ** 2 for r in kept) / (len(kept) - 1))
        for i in members:
            if not valid[i]:
                out.append(torch.zeros((), dtype=F64))
            elif scale == "std":
                out.append((rewards[i] - mean) / (std + eps))
            else:
                out.append(rewards[i] - mean)
    return torch.stack(out)


def ref_policy_loss(logprobs, old, adv, eps_low, eps_high):
    rows, clipped = [], []
    for b in range(logprobs.shape[0]):
        row, clip_row = [], []
        for t in range(logprobs.shape[1]):
            ratio = torch.exp(logprobs[b, t] - old[b, t].detach())
            a = adv[b].detach()
            surrogate = ratio * a
            clipped_surrogate = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
            row.append(-torch.minimum(surrogate, clipped_surrogate))
            clip_row.append(bool(clipped_surrogate < surrogate))
        rows.append(row)
        clipped.append(clip_row)
    return _stack_B_T(rows), torch.tensor(clipped)


def ref_k3(logprobs, ref):
    rows = []
    for b in range(logprobs.shape[0]):
        row = []
        for t in range(logprobs.shape[1]):
            ratio = torch.exp(ref[b, t].detach() - logprobs[b, t])
            row.append(ratio - torch.log(ratio) - 1)
        rows.append(row)
    return _stack_B_T(rows)


def ref_k3_unbiased(logprobs, ref, old):
    rows = []
    k3 = ref_k3(logprobs, ref)
    for b in range(logprobs.shape[0]):
        rows.append([torch.exp(logprobs[b, t] - old[b, t].detach()) * k3[b, t] for t in range(logprobs.shape[1])])
    return _stack_B_T(rows)


def ref_off_policy_keep(logprobs, old, adv, mask, delta):
    keep = []
    for b in range(logprobs.shape[0]):
        terms = [float(old[b, t].detach() - logprobs[b, t].detach()) for t in range(logprobs.shape[1]) if mask[b, t]]
        mean = sum(terms) / len(terms) if terms else 0.0
        keep.append(not (float(adv[b]) < 0 and mean > delta))
    return torch.tensor(keep)


def ref_aggregate(values, mask, mode):
    if mode == "token_mean":
        terms = [values[b, t] for b in range(values.shape[0]) for t in range(values.shape[1]) if mask[b, t]]
        return sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64)
    seq_means = []
    for b in range(values.shape[0]):
        terms = [values[b, t] for t in range(values.shape[1]) if mask[b, t]]
        if terms:
            seq_means.append(sum(terms) / len(terms))
    return sum(seq_means) / len(seq_means) if seq_means else torch.zeros((), dtype=F64)


# ---------------------------------------------------------------- group_advantages

def test_group_advantages_hand_worked_mean_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75], dtype=F64)
    _close(group_advantages(rewards, 4), expected)


def test_group_advantages_hand_worked_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    std = math.sqrt(1 / 3)  # Bessel: 4 · 0.25 / 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64) / (std + 1e-6)
    expected[4:] = 0.0  # zero variance: every advantage 0, no division by eps blow-up
    rewards.requires_grad_()
    advantages = group_advantages(rewards, 4, scale="std")
    _close(advantages, expected)
    (grad,) = torch.autograd.grad(advantages[4:].sum() + advantages[0], rewards)
    assert torch.isfinite(grad).all()  # sqrt's slope at a zero variance stays out


@pytest.mark.parametrize("scale", ["none", "std"])
def test_group_advantages_match_reference(scale):
    rewards = _randn(12, seed=1)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    actual = group_advantages(rewards, 4, scale=scale, valid_N=valid)
    expected = ref_group_advantages(list(rewards), 4, scale, 1e-6, valid.tolist())
    _assert_values_and_grads(actual, expected, [rewards])


def test_group_advantages_mask_out_invalid_samples():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0, 5.0, 7.0], dtype=F64)
    valid = torch.tensor([True, False, True, True, False, False])
    advantages = group_advantages(rewards, 3, valid_N=valid)
    # group 1 mean over {1, 0}: 0.5; NaN and its slot stay out; group 2 has no valid sample.
    _close(advantages, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0], dtype=F64))
    changed = rewards.clone()
    changed[1] = 100.0
    _close(group_advantages(changed, 3, scale="std", valid_N=valid), group_advantages(rewards, 3, scale="std", valid_N=valid))


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="bool"):
        group_advantages(torch.zeros(4), 2, valid_N=torch.ones(4))


# ---------------------------------------------------------------- policy loss and clip fraction

def test_policy_loss_matches_reference():
    logprobs = _randn(3, 5, seed=2, scale=0.3)
    old = _randn(3, 5, seed=3, scale=0.3)
    adv = torch.tensor([1.3, -0.7, 0.0], dtype=F64)
    loss, clip_active = policy_loss_terms(logprobs, old, adv, 0.2, 0.28)
    expected, expected_clip = ref_policy_loss(logprobs, old, adv, 0.2, 0.28)
    _assert_values_and_grads(loss, expected, [logprobs])
    assert torch.equal(clip_active, expected_clip)
    assert clip_active.any() and not clip_active.all()


def _hand_clip_case():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]], dtype=F64)
    old = torch.full((2, 3), -1.0, dtype=F64)
    logprobs = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    return logprobs, old, adv


def test_policy_loss_hand_worked_clip():
    logprobs, old, adv = _hand_clip_case()
    loss, clip_active = policy_loss_terms(logprobs, old, adv, 0.2, 0.28)
    # A>0 clips above 1.28 only; A<0 clips below 0.8 only.
    _close(loss, torch.tensor([[-1.28, -0.5, -1.1], [1.5, 0.8, 1.0]], dtype=F64))
    assert clip_active.tolist() == [[True, False, False], [False, True, False]]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    _close(grad, torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 1.0]], dtype=F64))


# ---------------------------------------------------------------- KL estimators

def test_k3_hand_worked():
    logprobs = torch.tensor([[math.log(0.5)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25)]], dtype=F64)
    old = torch.tensor([[math.log(0.25)]], dtype=F64)
    _close(kl_k3(logprobs, ref), torch.tensor([[0.5 - math.log(0.5) - 1]], dtype=F64))
    _close(kl_k3_unbiased(logprobs, ref, old), torch.tensor([[2 * (0.5 - math.log(0.5) - 1)]], dtype=F64))


def test_k3_matches_reference_and_is_nonnegative():
    logprobs, ref = _randn(3, 4, seed=4), _randn(3, 4, seed=5)
    actual = kl_k3(logprobs, ref)
    _assert_values_and_grads(actual, ref_k3(logprobs, ref), [logprobs])
    assert (actual >= 0).all()
    assert torch.all(kl_k3(ref.detach(), ref) == 0)


def test_k3_keeps_precision_for_close_policies():
    logprobs = torch.tensor([[-1.0]], dtype=torch.float32)
    ref = logprobs - 1e-4
    # x²/2 for small x: exp(x) − x − 1 in float32 would cancel to ~1e-8 ± 6e-8.
    torch.testing.assert_close(kl_k3(logprobs, ref), torch.tensor([[5e-9]]), atol=0, rtol=1e-3)


def test_k3_unbiased_matches_reference():
    logprobs, ref, old = _randn(3, 4, seed=6), _randn(3, 4, seed=7), _randn(3, 4, seed=8)
    _assert_values_and_grads(kl_k3_unbiased(logprobs, ref, old), ref_k3_unbiased(logprobs, ref, old), [logprobs])


def test_k3_unbiased_gradient_is_ratio_times_log_ratio():
    logprobs, ref, old = _randn(3, 4, seed=9), _randn(3, 4, seed=10), _randn(3, 4, seed=11)
    (grad,) = torch.autograd.grad(kl_k3_unbiased(logprobs, ref, old).sum(), logprobs)
    ratio = torch.exp(logprobs - old).detach()
    (grad_k3,) = torch.autograd.grad(kl_k3(logprobs, ref).sum(), logprobs)
    k3 = kl_k3(logprobs, ref).detach()
    _close(grad, ratio * (logprobs - ref).detach())
    _close(grad, ratio * grad_k3 + ratio * k3)  # d(ρ·k3) = ρ·dk3 + k3·dρ, dρ = ρ·dlogπ


def _enumerated_policies(seed: int):
    """One categorical step over 6 tokens; every token is one 'time step', so sums are exact expectations."""
    theta = _randn(6, seed=seed)
    logprobs = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(_randn(6, seed=seed + 1).detach(), -1)
    old = torch.log_softmax(_randn(6, seed=seed + 2).detach(), -1)
    return theta, logprobs, ref, old


def test_k3_unbiased_is_unbiased_in_value_and_gradient():
    theta, logprobs, ref, old = _enumerated_policies(12)
    p, p_ref, p_old = logprobs.exp(), ref.exp(), old.exp()
    exact_kl = (p * (logprobs - ref)).sum()
    estimate = (p_old * kl_k3_unbiased(logprobs[None], ref[None], old[None])[0]).sum()
    _close(estimate, exact_kl)
    (grad_estimate,) = torch.autograd.grad(estimate, theta, retain_graph=True)
    (grad_exact,) = torch.autograd.grad(exact_kl, theta)
    _close(grad_estimate, grad_exact)

    # The reading with the ratio as a stop-gradient weight has the same value but follows the
    # forward KL(π_ref ‖ π_θ); this is why the ratio keeps its gradient here.
    theta, logprobs, ref, old = _enumerated_policies(12)
    detached_weight = torch.exp(logprobs - old).detach() * kl_k3(logprobs[None], ref[None])[0]
    (grad_detached,) = torch.autograd.grad((old.exp() * detached_weight).sum(), theta, retain_graph=True)
    (grad_forward_kl,) = torch.autograd.grad((ref.exp() * (ref - logprobs)).sum(), theta)
    _close(grad_detached, grad_forward_kl)
    assert (grad_detached - grad_exact).abs().max() > 1e-2


# ---------------------------------------------------------------- off-policy sequence mask

def test_off_policy_mask_drops_exactly_the_right_sequences():
    old = torch.zeros(5, 3, dtype=F64)
    log_ratio = torch.tensor(
        [
            [0.3, 0.3, -50.0],  # A<0, mean 0.3 > δ: dropped (the padded -50 must not count)
            [0.3, 0.3, 0.3],  # A>0: kept however far off-policy
            [0.3, -0.3, 0.1],  # A<0, mean 0.033 ≤ δ: kept
            [0.05, 9.0, 9.0],  # A<0, one token at 0.05: kept (padding 9 must not count)
            [2.0, 2.0, 2.0],  # A=0: kept, the rule is strict A<0
        ],
        dtype=F64,
    )
    logprobs = old - log_ratio  # log(π_old/π_θ) = log_ratio
    adv = torch.tensor([-1.0, 1.0, -1.0, -0.5, 0.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    keep = off_policy_sequence_mask(logprobs, old, adv, mask, delta=0.1)
    assert keep.tolist() == [False, True, True, True, True]
    assert torch.equal(keep, ref_off_policy_keep(logprobs, old, adv, mask, 0.1))
    assert off_policy_sequence_mask(logprobs, old, adv, mask, delta=0.5).all()


def test_off_policy_mask_matches_reference_on_random_batch():
    logprobs, old = _randn(8, 6, seed=13, scale=0.2), _randn(8, 6, seed=14, scale=0.2)
    adv = _randn(8, seed=15).detach()
    mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(16)) < 0.7
    keep = off_policy_sequence_mask(logprobs, old, adv, mask, delta=0.05)
    assert torch.equal(keep, ref_off_policy_keep(logprobs, old, adv, mask, 0.05))
    assert not keep.all()


# ---------------------------------------------------------------- aggregation

def test_aggregation_modes_hand_worked():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    token_mean = aggregate(values, mask, "token_mean")
    seq_mean = aggregate(values, mask, "seq_mean_token_mean")
    _close(token_mean, torch.tensor(16 / 4, dtype=F64))
    _close(seq_mean, torch.tensor((2 + 10) / 2, dtype=F64))  # the empty row is out of the outer mean
    (grad_token,) = torch.autograd.grad(token_mean, values)
    (grad_seq,) = torch.autograd.grad(seq_mean, values)
    _close(grad_token, mask.to(F64) / 4)
    _close(grad_seq, torch.tensor([[1 / 6] * 3, [1 / 2, 0, 0], [0, 0, 0]], dtype=F64))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_aggregation_matches_reference(mode):
    values = _randn(4, 6, seed=17)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [0] * 6, [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    _assert_values_and_grads(aggregate(values, mask, mode), ref_aggregate(values, mask, mode), [values])


def test_aggregation_of_empty_mask_is_zero():
    values = torch.full((2, 3), float("nan"), dtype=F64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert aggregate(values, mask, "token_mean").item() == 0.0
    assert aggregate(values, mask, "seq_mean_token_mean").item() == 0.0


# ---------------------------------------------------------------- grpo_loss

def ref_grpo_loss(logprobs, old, adv, mask, ref, kl_coef, kl_estimator, delta, aggregation):
    pg, clipped = ref_policy_loss(logprobs, old, adv, 0.2, 0.28)
    keep = torch.ones(logprobs.shape[0], dtype=torch.bool)
    if delta is not None:
        keep = ref_off_policy_keep(logprobs, old, adv, mask, delta)
    kept_mask = mask & keep[:, None]
    per_token = pg
    kl = torch.zeros((), dtype=F64)
    if ref is not None:
        kl_values = ref_k3(logprobs, ref) if kl_estimator == "k3" else ref_k3_unbiased(logprobs, ref, old)
        per_token = pg + kl_coef * kl_values
        kl = ref_aggregate(kl_values.detach(), kept_mask, "token_mean")
    loss = ref_aggregate(per_token, kept_mask, aggregation)
    clip_frac = ref_aggregate(clipped.to(F64), kept_mask, "token_mean")
    return loss, {"clip_frac": clip_frac, "kl": kl, "masked_seq_frac": (~keep).to(F64).mean()}


def _grpo_batch():
    logprobs = _randn(5, 6, seed=20, scale=0.3)
    # Sequence 1 (A<0) has drifted far from the sampler (mean log(π_old/π_θ) ≈ 0.5): dropped at δ=0.2.
    # Sequence 2 (A<0) has drifted less (≈ 0.1): kept.
    drift = torch.tensor([0.0, 0.5, 0.1, 0.9, 0.5], dtype=F64)[:, None]
    old = (logprobs.detach() + drift + _randn(5, 6, seed=21, scale=0.02).detach()).detach()
    ref = _randn(5, 6, seed=22, scale=0.3).detach()
    adv = torch.tensor([0.8, -1.2, -0.4, 0.0, 1.5], dtype=F64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
        dtype=torch.bool,
    )
    return logprobs, old, adv, mask, ref


@pytest.mark.parametrize(
    "kl_coef,kl_estimator,delta,aggregation",
    [
        (0.0, "k3", None, "token_mean"),
        (0.1, "k3", None, "token_mean"),
        (0.1, "k3_unbiased", 0.2, "token_mean"),
        (0.05, "k3_unbiased", None, "seq_mean_token_mean"),
        (0.0, "k3", 0.2, "seq_mean_token_mean"),
    ],
)
def test_grpo_loss_matches_reference(kl_coef, kl_estimator, delta, aggregation):
    logprobs, old, adv, mask, ref = _grpo_batch()
    kwargs = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, off_policy_delta=delta, aggregation=aggregation)
    loss, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs_B_T=ref, **kwargs)
    expected, expected_stats = ref_grpo_loss(logprobs, old, adv, mask, ref, kl_coef, kl_estimator, delta, aggregation)
    _close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logprobs)
    (grad_expected,) = torch.autograd.grad(expected, logprobs)
    _close(grad, grad_expected)
    for name in ("clip_frac", "kl", "masked_seq_frac"):
        _close(stats[name], expected_stats[name])
        assert not stats[name].requires_grad
    if delta is not None:
        assert stats["masked_seq_frac"] > 0  # the case must exercise the mask


def test_grpo_loss_hand_worked():
    logprobs, old, adv = _hand_clip_case()
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, stats = grpo_loss(logprobs, old, adv, mask)
    _close(loss, torch.tensor((-1.28 - 0.5 - 1.1 + 1.5 + 0.8 + 1.0) / 6, dtype=F64))
    _close(stats["clip_frac"], torch.tensor(2 / 6, dtype=F64))
    assert stats["kl"].item() == 0.0 and stats["masked_seq_frac"].item() == 0.0


def test_aggregation_modes_differ_with_unequal_lengths():
    logprobs, old, adv, mask, _ = _grpo_batch()
    token_loss, _ = grpo_loss(logprobs, old, adv, mask, aggregation="token_mean")
    seq_loss, _ = grpo_loss(logprobs, old, adv, mask, aggregation="seq_mean_token_mean")
    assert abs(token_loss.item() - seq_loss.item()) > 1e-3
    equal_mask = torch.ones_like(mask)
    token_loss, _ = grpo_loss(logprobs, old, adv, equal_mask, aggregation="token_mean")
    seq_loss, _ = grpo_loss(logprobs, old, adv, equal_mask, aggregation="seq_mean_token_mean")
    _close(token_loss, seq_loss.detach())


def test_grpo_dropped_sequences_contribute_nothing():
    logprobs, old, adv, mask, ref = _grpo_batch()
    loss, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs_B_T=ref, kl_coef=0.1, off_policy_delta=0.2)
    keep = off_policy_sequence_mask(logprobs, old, adv, mask, 0.2)
    assert keep.tolist() == [True, False, True, True, True]
    _close(stats["masked_seq_frac"], (~keep).to(F64).mean())
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.all(grad[~keep] == 0)
    assert torch.all(grad[keep][mask[keep]] != 0)
    loss_without, _ = grpo_loss(
        logprobs[keep], old[keep], adv[keep], mask[keep], ref_logprobs_B_T=ref[keep], kl_coef=0.1
    )
    _close(loss, loss_without)


def test_grpo_loss_ignores_garbage_in_padding():
    logprobs, old, adv, mask, ref = _grpo_batch()
    dirty = logprobs.detach().clone()
    dirty[~mask] = float("-inf")
    dirty_old, dirty_ref = old.clone(), ref.clone()
    dirty_old[~mask] = float("nan")
    dirty_ref[~mask] = float("inf")
    dirty.requires_grad_()
    kwargs = dict(kl_coef=0.1, kl_estimator="k3_unbiased", off_policy_delta=0.2)
    loss, stats = grpo_loss(dirty, dirty_old, adv, mask, ref_logprobs_B_T=dirty_ref, **kwargs)
    clean, clean_stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs_B_T=ref, **kwargs)
    _close(loss, clean)
    (grad_dirty,) = torch.autograd.grad(loss, dirty)
    (grad_clean,) = torch.autograd.grad(clean, logprobs)
    assert torch.isfinite(grad_dirty).all()
    _close(grad_dirty, grad_clean)
    _close(stats["kl"], clean_stats["kl"])


def test_grpo_loss_rejects_bad_input():
    logprobs, old, adv, mask, _ = _grpo_batch()
    with pytest.raises(ValueError, match="ref_logprobs_B_T"):
        grpo_loss(logprobs, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logprobs, old, adv, mask, kl_estimator="k2")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(logprobs, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="bool"):
        grpo_loss(logprobs, old, adv, mask.long())
