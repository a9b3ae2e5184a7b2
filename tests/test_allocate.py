"""Rate–distortion allocator: optimal on small cases, never over budget, monotone, within 1%, deterministic."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.errors import BudgetError, UsageError
from deltakit.ops.allocate import allocate

option = st.tuples(st.integers(0, 40), st.floats(0, 10, allow_nan=False))
small_problem = st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=4)


def _brute(options, budget, weights=None):
    weights = weights or [1.0] * len(options)
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        nbytes = sum(options[t][k][0] for t, k in enumerate(combo))
        error = sum(weights[t] * options[t][k][1] for t, k in enumerate(combo))
        if nbytes <= budget and (best is None or error < best):
            best = error
    return best


@settings(max_examples=300, deadline=None)
@given(small_problem, st.integers(0, 120))
def test_small_problems_are_solved_exactly(options, budget):
    best = _brute(options, budget)
    if best is None:
        with pytest.raises(BudgetError):
            allocate(options, budget)
        return
    result = allocate(options, budget)
    assert result.nbytes <= budget
    assert result.nbytes == sum(options[t][k][0] for t, k in enumerate(result.choices))
    assert math.isclose(result.error, best, rel_tol=1e-9, abs_tol=1e-12)


@st.composite
def large_problem(draw):
    """Byte counts in the millions, so the DP runs on a coarse grid (q > 1)."""
    n = draw(st.integers(1, 6))
    options = []
    for _ in range(n):
        k = draw(st.integers(1, 6))
        nbytes = draw(st.lists(st.integers(0, 2_000_000), min_size=k, max_size=k))
        errors = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=k, max_size=k))
        options.append(list(zip(nbytes, errors, strict=True)))
    return options


@settings(max_examples=50, deadline=None)
@given(large_problem(), st.lists(st.integers(0, 12_000_000), min_size=2, max_size=5))
def test_never_over_budget_and_monotone_in_the_budget(options, budgets):
    cheapest = sum(min(b for b, _ in opts) for opts in options)
    results = []
    for budget in sorted(b + cheapest for b in budgets):
        result = allocate(options, budget)
        assert result.nbytes <= budget
        results.append(result.error)
    assert all(later <= earlier for earlier, later in itertools.pairwise(results))


@settings(max_examples=25, deadline=None)
@given(large_problem())
def test_monotone_across_grid_boundaries(options):
    cheapest = sum(min(b for b, _ in opts) for opts in options)
    threshold = len(options) / 2e-3  # allocate's grid q holds for budgets in [q * threshold, 2q * threshold)
    budgets = sorted(
        {cheapest + d for q in (1, 2, 4, 8, 16, 64) for d in (int(q * threshold) - 2, int(q * threshold) + 2)}
    )
    errors = [allocate(options, b).error for b in budgets if b >= cheapest]
    assert all(later <= earlier for earlier, later in itertools.pairwise(errors))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**16), st.floats(0.05, 0.95))
def test_budget_is_used_within_one_percent_when_steps_are_fine(n, seed, fraction):
    # every tensor: 200 options of 1000-byte steps with strictly decreasing error
    options = [[(1000 * j, (seed % 7 + t + 1) * 0.98**j) for j in range(200)] for t in range(n)]
    total = n * 199_000
    budget = int(fraction * total)
    if budget < 200_000:  # keep steps (1000 bytes) under 0.5% of the budget
        budget = 200_000
    result = allocate(options, budget)
    assert 0.99 * budget <= result.nbytes <= budget


def test_deterministic_and_weights_steer_the_bytes():
    options = [[(0, 4.0), (100, 2.0), (200, 1.0)], [(0, 4.0), (100, 2.0), (200, 1.0)]]
    assert allocate(options, 200) == allocate(options, 200)
    heavy_first = allocate(options, 200, weights=[10.0, 1.0])
    assert heavy_first.choices == (2, 0)
    heavy_second = allocate(options, 200, weights=[1.0, 10.0])
    assert heavy_second.choices == (0, 2)
    assert allocate(options, 200, weights=[0.0, 1.0]).choices[0] == 0  # a zero weight gets the cheapest


def test_everything_fits_picks_the_least_error_options():
    options = [[(5, 3.0), (10, 1.0), (20, 1.0)], [(1, 2.0), (3, 0.5)]]
    result = allocate(options, 10**6)
    assert result.choices == (1, 1) and result.nbytes == 13 and result.error == 1.5


def test_infeasible_and_malformed_inputs_raise_one_line_errors():
    with pytest.raises(BudgetError, match="budget=5"):
        allocate([[(10, 1.0)]], 5)
    for options, budget, match in [
        ([], 10, "at least one tensor"),
        ([[]], 10, "empty"),
        ([[(-1, 1.0)]], 10, "bytes"),
        ([[(1.5, 1.0)]], 10, "bytes"),
        ([[(1, float("nan"))]], 10, "error"),
        ([[(1, 1.0)]], -1, "budget"),
    ]:
        with pytest.raises(UsageError, match=match):
            allocate(options, budget)
    with pytest.raises(UsageError, match="weights"):
        allocate([[(1, 1.0)]], 10, weights=[1.0, 2.0])
