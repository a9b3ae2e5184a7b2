"""Mixed-precision split: model-optimal, exact bytes, within budget, monotone, better than one width."""

from __future__ import annotations

import itertools
import math

import fixtures_models as fm
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.errors import BudgetError, UsageError
from deltakit.ops.factors import factors_nbytes, quantize_factors
from deltakit.ops.mixed import measure_error_factors, mixed_nbytes, split_mixed_precision
from deltakit.ops.svd import truncated_svd

EPS = {8: 0.0001, 4: 0.01, 3: 0.035, 2: 0.12}


def _model(sigma: list[float], bits: tuple[int, ...]) -> float:
    return sum(
        s * s * (1.0 if b == 0 else min(1.0, 2 * EPS[b] + EPS[b] ** 2))
        for s, b in zip(sigma, bits, strict=True)
    )


def _counts(bits: tuple[int, ...]) -> dict[int, int]:
    return {b: bits.count(b) for b in (8, 4, 3, 2)}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=5),
    st.integers(12, 40),
    st.integers(12, 40),
    st.integers(0, 900),
)
def test_split_matches_brute_force_over_every_assignment(values, rows, cols, budget):
    sigma = sorted(values, reverse=True)
    best = None
    for bits in itertools.product((0, 2, 3, 4, 8), repeat=len(sigma)):
        # the split keeps 2 bytes per width for partial code bytes; the brute force gets the same slack
        if mixed_nbytes(rows, cols, _counts(bits), 16) + 8 > budget:
            continue
        err = _model(sigma, bits)
        best = err if best is None else min(best, err)
    if budget < 8:
        with pytest.raises(BudgetError):
            split_mixed_precision(
                torch.tensor(sigma, dtype=torch.float64), rows, cols, budget, group_size=16, error_factors=EPS
            )
        return
    split = split_mixed_precision(
        torch.tensor(sigma, dtype=torch.float64), rows, cols, budget, group_size=16, error_factors=EPS
    )
    assert split.nbytes <= budget and split.nbytes == mixed_nbytes(rows, cols, split.counts, 16)
    assert list(split.bits) == sorted(split.bits, reverse=True)
    assert math.isclose(split.model_error, _model(sigma, split.bits), rel_tol=1e-9, abs_tol=1e-12)
    assert best is not None and split.model_error <= best * (1 + 1e-9) + 1e-12


def test_more_budget_never_raises_the_model_error():
    sigma = torch.linspace(5, 0.1, 60)
    errors = [
        split_mixed_precision(sigma, 64, 128, b, group_size=32, error_factors=EPS).model_error
        for b in range(100, 30000, 1900)
    ]
    assert all(later <= earlier for earlier, later in itertools.pairwise(errors))


def test_split_bytes_equal_the_stored_blocks_and_beat_a_single_width():
    g = torch.Generator().manual_seed(0)
    rows, cols = 192, 512
    delta = fm.structured_delta(rows, cols, g, rank=48, lowrank=0.6, sign=0.0, sparse=0.1, heavy_tail_df=4)
    svd = truncated_svd(delta, 150, method="exact")
    budget = rows * cols * 2 // 16  # 1 bit per weight
    split = split_mixed_precision(svd.S, rows, cols, budget, group_size=32)

    def reconstruct(counts: dict[int, int]) -> tuple[float, int]:
        out, pos, nbytes = torch.zeros(rows, cols), 0, 0
        for bits, n in counts.items():
            if n:
                root = svd.S[pos : pos + n].sqrt()
                q = quantize_factors(
                    svd.U[:, pos : pos + n] * root, root[:, None] * svd.Vh[pos : pos + n], bits, 32
                )
                out, pos, nbytes = out + q.product(), pos + n, nbytes + q.nbytes
        return float((out - delta).norm() / delta.norm()), nbytes

    mixed_error, stored = reconstruct(split.counts)
    assert stored == split.nbytes <= budget
    assert sum(split.counts.values()) > 0 and len([n for n in split.counts.values() if n]) >= 2
    for bits in (2, 3, 4, 8):
        n = max(k for k in range(151) if factors_nbytes(rows, cols, k, bits, 32) <= budget)
        uniform_error, _ = reconstruct({bits: n})
        assert mixed_error < uniform_error


def test_error_factors_are_measured_and_ordered():
    eps = measure_error_factors((8, 4, 3, 2), 64)
    assert 0 < eps[8] < eps[4] < eps[3] < eps[2] < 0.25
    sample = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavier tails
    assert measure_error_factors((2,), 64, sample=sample)[2] != eps[2]


def test_split_rejects_bad_input():
    with pytest.raises(UsageError, match="non-increasing"):
        split_mixed_precision(torch.tensor([1.0, 2.0]), 8, 8, 100)
    with pytest.raises(UsageError, match="bit_widths"):
        split_mixed_precision(torch.tensor([1.0]), 8, 8, 100, bit_widths=(5,))
    with pytest.raises(UsageError, match="budget"):
        split_mixed_precision(torch.tensor([1.0]), 8, 8, -3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 10, allow_nan=False), min_size=1, max_size=40),
    st.integers(12, 200),
    st.integers(12, 200),
    st.integers(100, 20000),
)
def test_lagrangian_split_is_within_budget_and_never_beats_the_exact_one(values, rows, cols, budget):
    import deltakit.ops.mixed as mixed

    sigma = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    exact = split_mixed_precision(sigma, rows, cols, budget, group_size=16, error_factors=EPS)
    saved = mixed.EXACT_CELLS
    mixed.EXACT_CELLS = 0  # force the Lagrangian search
    try:
        lagrangian = split_mixed_precision(sigma, rows, cols, budget, group_size=16, error_factors=EPS)
    finally:
        mixed.EXACT_CELLS = saved
    assert lagrangian.nbytes <= budget
    assert list(lagrangian.bits) == sorted(lagrangian.bits, reverse=True)
    assert math.isclose(lagrangian.model_error, _model(sigma.tolist(), lagrangian.bits), rel_tol=1e-9)
    assert lagrangian.model_error >= exact.model_error * (1 - 1e-9) - 1e-12


def test_hull_splits_trade_bytes_for_error_and_match_the_exact_split_at_their_bytes():
    from deltakit.ops.mixed import lagrangian_splits

    sigma = torch.linspace(5, 0.1, 60) ** 2
    hull = lagrangian_splits(sigma, 64, 128, group_size=32, error_factors=EPS)
    assert len(hull) > 10
    assert all(b.nbytes > a.nbytes and b.model_error < a.model_error for a, b in itertools.pairwise(hull))
    for split in hull[:: max(1, len(hull) // 8)]:
        assert math.isclose(split.model_error, _model(sigma.tolist(), split.bits), rel_tol=1e-9)
        exact = split_mixed_precision(sigma, 64, 128, split.nbytes + 8, group_size=32, error_factors=EPS)
        assert exact.model_error <= split.model_error * (1 + 1e-9)


def test_large_splits_use_the_lagrangian_search_within_budget():
    import deltakit.ops.mixed as mixed

    sigma = torch.logspace(0, -3, 576, dtype=torch.float64)
    budget = 400_000  # most of a 1536x576 fp16 delta: far more staircases than EXACT_CELLS
    per_vector = [(1536 + 576) * b + 16 * (24 + 9) for b in (8, 4, 3)] + [0]
    assert mixed._staircases(576, per_vector[:3] + [1], 8 * budget) > mixed.EXACT_CELLS
    split = split_mixed_precision(sigma, 1536, 576, budget)
    assert split.nbytes <= budget and split.counts[8] > 0
