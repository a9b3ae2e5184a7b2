"""Truncated SVD: randomized (default) and exact, always computed in fp32.

The randomized algorithm (Halko, Martinsson & Tropp 2011) projects the matrix onto ``rank +
oversample`` random directions, sharpens the subspace with a few power iterations (re-orthonormalised
each time for stability) and takes an exact SVD of the small projected matrix. On a 4096×4096 matrix
at rank 128 it costs a few large matmuls instead of a full decomposition.

On the CPU the result is bit-identical whatever the thread count (``OMP_NUM_THREADS``,
``torch.set_num_threads``): MKL's QR and SVD (and possibly its matmuls, for some shapes) sum in an order
that depends on the number of threads, so the whole decomposition runs single-threaded on the CPU, with
the caller's thread count restored afterwards. CUDA results do not depend on the host thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.ops.threads import torch_threads


@dataclass(frozen=True)
class TruncatedSVD:
    """``matrix ≈ U @ diag(S) @ Vh`` with U (rows, r), S (r,), Vh (r, cols), all fp32."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.numel())


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    method: str = "randomized",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> TruncatedSVD:
    """Rank-``rank`` SVD of a 2-D matrix (any float dtype, any device; computed in fp32, not mutated).

    method: ``randomized`` or ``exact``. The randomized path falls back to the exact one when the
    requested rank is close to the matrix's smaller side, where it would save nothing. On the CPU it runs
    single-threaded so that the output bytes do not depend on the thread count.
    """
    if matrix.device.type != "cpu":
        return _truncated_svd(matrix, rank, method, oversample, power_iters, seed)
    with torch_threads(1):
        return _truncated_svd(matrix, rank, method, oversample, power_iters, seed)


def _truncated_svd(
    matrix: torch.Tensor, rank: int, method: str, oversample: int, power_iters: int, seed: int
) -> TruncatedSVD:
    """Body of :func:`truncated_svd` (thread count already fixed by the caller)."""
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if method not in ("randomized", "exact"):
        raise ValueError(f"unknown SVD method {method!r}; choose 'randomized' or 'exact'")
    a = matrix.to(torch.float32)
    rows, cols = a.shape
    rank = max(0, min(rank, rows, cols))
    if rank == 0:
        return TruncatedSVD(a.new_zeros(rows, 0), a.new_zeros(0), a.new_zeros(0, cols))
    sketch = rank + oversample
    if method == "exact" or sketch >= 0.5 * min(rows, cols):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return TruncatedSVD(u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())
    transpose = rows < cols  # work on the tall orientation so the sketch is the small side
    if transpose:
        a = a.T
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(a.shape[1], sketch, generator=generator).to(a.device)  # (in, k)
    q, _ = torch.linalg.qr(a @ omega)  # (out, k)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)  # (in, k)
        q, _ = torch.linalg.qr(a @ z)  # (out, k)
    b = q.T @ a  # (k, in)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub  # (out, k)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if transpose:
        u, vh = vh.T, u.T
    return TruncatedSVD(u.contiguous(), s.contiguous(), vh.contiguous())


def svd_factors(
    matrix: torch.Tensor,
    rank: int,
    *,
    method: str = "randomized",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced fp32 factors ``up`` = U√S (out, r) and ``down`` = √S·Vh (r, in), ``matrix ≈ up @ down``.

    matrix: (out, in), any float dtype and device (not mutated). Returned contiguous on its device.
    """
    svd = truncated_svd(
        matrix, rank, method=method, oversample=oversample, power_iters=power_iters, seed=seed
    )
    root = svd.S.sqrt()
    return (svd.U * root).contiguous(), (root[:, None] * svd.Vh).contiguous()  # (out, r), (r, in)
