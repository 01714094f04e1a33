"""pluribus.core.merge against naive float64 references (plain loops, element by element) and hand-worked examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pluribus.core import linear_merge, task_arithmetic, ties_merge

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _flat(deltas: list[torch.Tensor]) -> list[list[float]]:
    return [d.to(F64).flatten().tolist() for d in deltas]


def naive_linear(deltas, weights):
    flat = _flat(deltas)
    weights = weights or [1.0] * len(flat)
    total = sum(weights)
    out = [sum(w * values[i] for w, values in zip(weights, flat)) / total for i in range(len(flat[0]))]
    return torch.tensor(out, dtype=F64).reshape(deltas[0].shape)


def naive_task_arithmetic(deltas, scale):
    flat = _flat(deltas)
    out = [scale * sum(values[i] for values in flat) for i in range(len(flat[0]))]
    return torch.tensor(out, dtype=F64).reshape(deltas[0].shape)


def naive_ties(deltas, density, scale=1.0):
    flat = _flat(deltas)
    n = len(flat[0])
    k = min(n, max(1, round(density * n)))
    trimmed = []
    for values in flat:
        by_magnitude = sorted(range(n), key=lambda i: (-abs(values[i]), i))  # ties: lower index first
        keep = set(by_magnitude[:k])
        trimmed.append([values[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        total = sum(values[i] for values in trimmed)
        agreeing = [values[i] for values in trimmed
                    if (total > 0 and values[i] > 0) or (total < 0 and values[i] < 0)]
        out.append(scale * sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=F64).reshape(deltas[0].shape)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=0)


# --- against the naive references -------------------------------------------------------------

@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5], [0.0, 3.0, 1.0]])
def test_linear_merge_matches_naive(weights):
    deltas = [_randn(5, 7, seed=s) for s in range(3)]
    merged = linear_merge(deltas, weights)
    assert merged.shape == (5, 7) and merged.dtype == torch.float32
    _close(merged, naive_linear(deltas, weights))


@pytest.mark.parametrize("scale", [1.0, 0.3, -0.5])
def test_task_arithmetic_matches_naive(scale):
    deltas = [_randn(4, 3, 2, seed=s) for s in range(4)]
    _close(task_arithmetic(deltas, scale), naive_task_arithmetic(deltas, scale))


@pytest.mark.parametrize("density, scale, E", [(0.2, 1.0, 3), (0.5, 0.7, 2), (0.05, 2.0, 4), (1.0, 1.0, 3)])
def test_ties_merge_matches_naive(density, scale, E):
    deltas = [_randn(6, 9, seed=10 + s) for s in range(E)]
    merged = ties_merge(deltas, density, scale)
    assert merged.shape == (6, 9)
    _close(merged, naive_ties(deltas, density, scale))


def test_float64_in_float64_out_and_exact():
    deltas = [_randn(3, 4, seed=s, dtype=F64) for s in range(3)]
    merged = ties_merge(deltas, 0.5)
    assert merged.dtype == F64
    _close(merged, naive_ties(deltas, 0.5), tol=1e-12)
    _close(linear_merge(deltas, [1.0, 2.0, 3.0]), naive_linear(deltas, [1.0, 2.0, 3.0]), tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(E=st.integers(1, 4), n=st.integers(1, 12), density=st.floats(0.01, 1.0),
       data=st.data())
def test_ties_merge_matches_naive_on_small_integers(E, n, density, data):
    # Small integers: many equal magnitudes (ties at the threshold) and exact zero sums (cancelled signs).
    values = st.lists(st.integers(-3, 3), min_size=n, max_size=n)
    deltas = [torch.tensor(data.draw(values), dtype=torch.float32) for _ in range(E)]
    _close(ties_merge(deltas, density), naive_ties(deltas, density))


# --- hand-worked examples and edge cases --------------------------------------------------------

def test_ties_hand_worked():
    a = torch.tensor([3.0, -2.0, 1.0, 0.5])
    b = torch.tensor([-1.0, -4.0, 2.0, 0.25])
    # density 0.5 keeps 2 entries each: a → [3, -2, 0, 0], b → [0, -4, 2, 0].
    # signs: +, -, +, 0 → means: 3, (-2-4)/2, 2, nothing agrees → 0.
    assert ties_merge([a, b], 0.5).tolist() == [3.0, -3.0, 2.0, 0.0]
    assert ties_merge([a, b], 0.5, scale=2.0).tolist() == [6.0, -6.0, 4.0, 0.0]


def test_ties_density_one_with_agreeing_signs_is_the_mean():
    base = _randn(8, 5, seed=1).abs() + 0.1  # no zeros: every kept entry counts
    signs = torch.where(_randn(8, 5, seed=2) > 0, 1.0, -1.0)
    deltas = [signs * base * (1 + e) for e in range(3)]
    _close(ties_merge(deltas, 1.0), linear_merge(deltas, None))


def test_ties_disagreeing_minority_is_dropped_not_averaged():
    deltas = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([-2.5])]
    assert ties_merge(deltas, 1.0).tolist() == [1.5]  # sum 0.5 > 0: mean of 1 and 2, the -2.5 is out


def test_ties_ties_in_magnitude_keep_lower_index():
    delta = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    # density 0.4 → 2 of 5 entries; all magnitudes tie, so entries 0 and 1 stay.
    assert ties_merge([delta], 0.4).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    # Across experts each trims on its own: b keeps its two largest, whatever a kept.
    b = torch.tensor([0.5, 0.5, 2.0, 2.0, 2.0])
    assert ties_merge([delta, b], 0.4).tolist() == [1.0, -1.0, 2.0, 2.0, 0.0]


def test_ties_keeps_exactly_round_density_n_and_at_least_one():
    delta = torch.arange(1.0, 11.0)  # magnitudes 1..10
    assert int((ties_merge([delta], 0.3) != 0).sum()) == 3
    assert ties_merge([delta], 0.3).tolist()[-3:] == [8.0, 9.0, 10.0]
    assert int((ties_merge([delta], 0.01) != 0).sum()) == 1  # 0.1 entries rounds to 0: keep one


def test_zero_deltas_merge_to_zero():
    zeros = [torch.zeros(3, 4) for _ in range(3)]
    for merged in (linear_merge(zeros, None), task_arithmetic(zeros, 2.0), ties_merge(zeros, 0.2)):
        assert torch.equal(merged, torch.zeros(3, 4))
    one = _randn(3, 4, seed=5)
    # A zero expert halves the linear mean but leaves TIES alone (zeros never enter the disjoint mean).
    _close(linear_merge([one, torch.zeros(3, 4)], None), one / 2)
    _close(ties_merge([one, torch.zeros(3, 4)], 1.0), one)


def test_single_delta():
    one = _randn(2, 3, seed=7)
    _close(linear_merge([one], None), one)
    _close(linear_merge([one], [5.0]), one)
    _close(task_arithmetic([one], 0.5), one * 0.5)
    _close(ties_merge([one], 1.0), one)


def test_scalar_and_vector_parameters():
    scalars = [torch.tensor(1.5), torch.tensor(-0.5)]
    assert ties_merge(scalars, 0.2).shape == () and ties_merge(scalars, 0.2).item() == 1.5
    assert linear_merge(scalars, None).item() == 0.5


# --- input validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: linear_merge([], None),
    lambda: task_arithmetic([], 1.0),
    lambda: ties_merge([], 0.2),
])
def test_empty_list_is_an_error(call):
    with pytest.raises(ValueError, match="at least one task vector"):
        call()


@pytest.mark.parametrize("call", [
    lambda d: linear_merge(d, None),
    lambda d: task_arithmetic(d, 1.0),
    lambda d: ties_merge(d, 0.2),
])
def test_shape_mismatch_is_an_error(call):
    with pytest.raises(ValueError, match=r"one shape: delta 0 is \(2, 3\), delta 1 is \(3, 2\)"):
        call([torch.zeros(2, 3), torch.zeros(3, 2)])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01, float("nan")])
def test_density_outside_unit_interval_is_an_error(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ties_merge([torch.ones(3)], density)


@pytest.mark.parametrize("weights, match", [
    ([1.0], "got 1 for 2 deltas"),
    ([1.0, -1.0], "finite and ≥ 0"),
    ([1.0, float("inf")], "finite and ≥ 0"),
    ([0.0, 0.0], "must not all be 0"),
])
def test_bad_weights_are_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        linear_merge([torch.ones(2), torch.ones(2)], weights)


def test_non_finite_scale_is_an_error():
    with pytest.raises(ValueError, match="scale must be finite"):
        task_arithmetic([torch.ones(2)], float("nan"))
    with pytest.raises(ValueError, match="scale must be finite"):
        ties_merge([torch.ones(2)], 0.5, float("inf"))
