"""Truncated SVD: randomized close to exact on low-rank + noise, exact option, fp32 output on bf16 input.

Timings (4096x4096 at rank 128) live in benchmarks/synthetic_comparison.py, not here.
"""

from __future__ import annotations

import pytest
import torch

from deltakit.ops.svd import truncated_svd


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g))[0]
    s = torch.linspace(10.0, 1.0, rank)
    return (u * s) @ v.T + noise * torch.randn(rows, cols, generator=g) / (rows * cols) ** 0.25


def err(svd, matrix: torch.Tensor) -> float:
    return float((svd.U @ torch.diag(svd.S) @ svd.Vh - matrix).norm() / matrix.norm())


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])  # tall and wide (the wide one is transposed)
def test_randomized_svd_is_close_to_exact_on_low_rank_plus_noise(shape):
    matrix = low_rank_plus_noise(*shape, rank=16, noise=0.05)
    exact = truncated_svd(matrix, 16, method="exact")
    approx = truncated_svd(matrix, 16, method="randomized", oversample=10, power_iters=2, seed=3)
    assert approx.U.shape == (shape[0], 16) and approx.S.shape == (16,) and approx.Vh.shape == (16, shape[1])
    assert err(approx, matrix) <= err(exact, matrix) * 1.01 + 1e-6
    assert torch.allclose(approx.S, exact.S, rtol=1e-3)
    # orthonormal factors
    assert torch.allclose(approx.U.T @ approx.U, torch.eye(16), atol=1e-4)
    assert torch.allclose(approx.Vh @ approx.Vh.T, torch.eye(16), atol=1e-4)


def test_exact_recovers_a_rank_r_matrix():
    matrix = low_rank_plus_noise(120, 80, rank=8, noise=0.0)
    assert err(truncated_svd(matrix, 8, method="exact"), matrix) < 1e-5
    assert err(truncated_svd(matrix, 8, method="randomized"), matrix) < 1e-5


def test_exact_singular_values_match_torch_linalg():
    matrix = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    svd = truncated_svd(matrix, 10, method="exact")
    assert torch.allclose(svd.S, torch.linalg.svdvals(matrix)[:10], rtol=1e-5)
    assert svd.S.is_contiguous() and svd.U.is_contiguous() and svd.Vh.is_contiguous()


def test_singular_values_are_sorted_and_non_negative():
    matrix = low_rank_plus_noise(500, 400, rank=20, noise=0.3, seed=5)
    svd = truncated_svd(matrix, 12, method="randomized", seed=0)
    assert (svd.S >= 0).all()
    assert torch.all(svd.S[:-1] >= svd.S[1:])


def test_bf16_input_gives_fp32_factors_and_does_not_mutate():
    matrix = low_rank_plus_noise(256, 128, rank=4, noise=0.01).to(torch.bfloat16)
    copy = matrix.clone()
    svd = truncated_svd(matrix, 4)
    assert svd.U.dtype == svd.S.dtype == svd.Vh.dtype == torch.float32
    assert torch.equal(matrix, copy)
    assert err(svd, matrix.float()) < 0.05


def test_randomized_svd_is_deterministic_under_a_seed_and_varies_with_it():
    matrix = torch.randn(400, 300, generator=torch.Generator().manual_seed(2))
    a = truncated_svd(matrix, 8, seed=11, power_iters=0)
    b = truncated_svd(matrix, 8, seed=11, power_iters=0)
    c = truncated_svd(matrix, 8, seed=12, power_iters=0)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    assert not torch.equal(a.S, c.S)  # a pure-noise matrix: the sketch depends on the seed


def test_rank_is_clamped_and_zero_rank_is_empty():
    matrix = torch.randn(10, 6)
    assert truncated_svd(matrix, 50).rank == 6
    empty = truncated_svd(matrix, 0)
    assert empty.rank == 0 and empty.U.shape == (10, 0) and empty.Vh.shape == (0, 6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(3, 4, 5), 2)
    with pytest.raises(ValueError, match="randomized"):
        truncated_svd(torch.randn(4, 4), 2, method="lanczos")
