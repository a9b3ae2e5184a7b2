"""Mixed-precision split of one matrix's singular vectors (Delta-CoMe's idea, data-free).

Given the singular values ``σ`` of a matrix (rows, cols) and a byte budget, choose how many singular
vectors are stored at each bit width (8, 4, 3, 2 by default) and how many are dropped.

Error model. Vector ``i`` is stored as the balanced pair ``u_i √σ_i`` (rows) and ``√σ_i v_i`` (cols).
Quantizing both at ``b`` bits with a relative squared error ``ε_b`` per factor changes the product by
``σ_i (δu vᵀ + u δvᵀ + δu δvᵀ)``, whose squared norm is about ``σ_i² (2 ε_b + ε_b²)`` (the three terms are
near-orthogonal for random rounding errors); a dropped vector costs ``σ_i²``. Errors of different vectors
add. ``ε_b`` is measured, not tabled: by default on a seeded Gaussian sample with the same group size and
clipping (:func:`measure_error_factors`), or on any tensor the caller passes (e.g. the matrix's own factors).

Choice. Every vector costs the same bytes at a given width, so in an optimal split the widths never
increase with ``i`` (swapping widths towards larger ``σ`` cannot raise the model error): the split is a
staircase ``n_8, n_4, n_3, n_2``. When there are at most :data:`EXACT_CELLS` staircases, all of them
within the budget are enumerated (the last width takes as many vectors as still fit, which never hurts
since ``2 ε + ε² < 1``) and the one with the least model error wins. Larger searches (high budgets on
wide matrices, where the enumeration grows with the cube of the rank) take the best Lagrangian split
within the budget instead (:func:`lagrangian_splits`: each vector independently picks the width that
minimises ``σ_i² f_b + λ·cost_b``, over every λ at which some vector changes width): optimal among the
splits on the lower convex hull of (bytes, error), and at most one vector's step from the exact optimum.
Bytes are counted exactly as :func:`deltakit.ops.factors.factors_nbytes` stores one block per width.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

from deltakit.errors import BudgetError, UsageError
from deltakit.ops.factors import factors_nbytes
from deltakit.ops.quant import SUPPORTED_BITS, dequantize, quantize

DEFAULT_BIT_WIDTHS = (8, 4, 3, 2)
#: staircases enumerated exactly at most (about 15 ms of search); beyond, the Lagrangian split
EXACT_CELLS = 250_000


@dataclass(frozen=True)
class MixedSplit:
    """Bits per singular vector (0 = dropped, non-increasing), counts per width, exact bytes, model error."""

    bits: tuple[int, ...]
    counts: dict[int, int]
    nbytes: int
    model_error: float


def measure_error_factors(
    bit_widths: tuple[int, ...] = DEFAULT_BIT_WIDTHS,
    group_size: int = 64,
    *,
    clip: str = "mse",
    sample: torch.Tensor | None = None,
) -> dict[int, float]:
    """Relative squared RTN error ``‖q(x) - x‖² / ‖x‖²`` per width, groups along the last axis.

    sample: a float tensor to measure on (default: a seed-0 (64, 4096) standard Gaussian).
    """
    if sample is None:
        return dict(_gaussian_error_factors(tuple(bit_widths), group_size, clip))
    return _error_factors(sample, bit_widths, group_size, clip)


@functools.lru_cache(maxsize=32)
def _gaussian_error_factors(
    bit_widths: tuple[int, ...], group_size: int, clip: str
) -> tuple[tuple[int, float], ...]:
    sample = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    return tuple(_error_factors(sample, bit_widths, group_size, clip).items())


def _error_factors(
    sample: torch.Tensor, bit_widths: tuple[int, ...], group_size: int, clip: str
) -> dict[int, float]:
    x = sample.to(torch.float32)
    norm = float((x**2).sum())
    if norm == 0:
        raise UsageError("sample must not be all zeros")
    out = {}
    for bits in bit_widths:
        rounded = dequantize(quantize(x, bits, group_size, -1, "symmetric", clip))
        out[bits] = float(((rounded - x) ** 2).sum()) / norm
    return out


def mixed_nbytes(rows: int, cols: int, counts: dict[int, int], group_size: int) -> int:
    """Exact stored bytes: one quantized factor pair per width with a non-zero count."""
    return sum(factors_nbytes(rows, cols, n, bits, group_size) for bits, n in counts.items() if n > 0)


def split_mixed_precision(
    singular_values: torch.Tensor,
    rows: int,
    cols: int,
    budget: int,
    *,
    bit_widths: tuple[int, ...] = DEFAULT_BIT_WIDTHS,
    group_size: int = 64,
    error_factors: dict[int, float] | None = None,
) -> MixedSplit:
    """Least-model-error split of the singular vectors into bit widths within ``budget`` bytes.

    singular_values: (r,) non-negative, non-increasing (as from an SVD). error_factors: ``ε_b`` per width
    (default :func:`measure_error_factors` for ``group_size``).
    """
    sigma = singular_values.detach().to(torch.float64).cpu().reshape(-1)
    widths = tuple(sorted(set(bit_widths), reverse=True))
    if not widths or any(b not in SUPPORTED_BITS for b in widths):
        raise UsageError(f"bit_widths must be drawn from {SUPPORTED_BITS}, got {bit_widths!r}")
    if sigma.numel() and (bool((sigma < 0).any()) or bool((sigma[1:] > sigma[:-1]).any())):
        raise UsageError("singular_values must be non-negative and non-increasing")
    if not isinstance(budget, int) or budget < 0:
        raise UsageError(f"budget must be a non-negative integer of bytes, got {budget!r}")
    eps = error_factors if error_factors is not None else measure_error_factors(widths, group_size)
    factor = torch.tensor([min(1.0, 2 * eps[b] + eps[b] ** 2) for b in widths], dtype=torch.float64)
    # cost of one vector in bits; the budget keeps 2 bytes per width for the codes' last partial bytes
    scale_bits = 16 * (math.ceil(rows / group_size) + math.ceil(cols / group_size))
    per_vector = [(rows + cols) * b + scale_bits for b in widths]
    bits_left = 8 * (budget - 2 * len(widths))
    if bits_left < 0:
        raise BudgetError(f"budget={budget} bytes is too small for any split")
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sigma**2, 0)])  # (r + 1,)
    if _staircases(sigma.numel(), per_vector, bits_left) <= EXACT_CELLS:
        counts, error = _best_staircase(prefix, factor, per_vector, bits_left)
    else:
        counts, error = _best_lagrangian(sigma, factor, per_vector, bits_left)
    return _as_split(sigma.numel(), widths, counts, error, rows, cols, group_size)


def _as_split(
    total: int,
    widths: tuple[int, ...],
    counts: list[int],
    error: float,
    rows: int,
    cols: int,
    group_size: int,
) -> MixedSplit:
    split = {b: n for b, n in zip(widths, counts, strict=True)}
    bits = [b for b, n in zip(widths, counts, strict=True) for _ in range(n)]
    bits += [0] * (total - len(bits))
    return MixedSplit(tuple(bits), split, mixed_nbytes(rows, cols, split, group_size), error)


def _staircases(total: int, per_vector: list[int], bits_left: int) -> int:
    """Upper bound on the staircases :func:`_best_staircase` visits (every width but the last free)."""
    cells = 1
    for cost in per_vector[:-1]:
        cells *= min(total, bits_left // cost) + 1
    return cells


def _lagrangian_counts(
    sigma: torch.Tensor, factor: torch.Tensor, per_vector: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every Lagrangian split: (counts (L, m), bits (L,), model error (L,)), one row per λ breakpoint.

    sigma: (r,) non-increasing. For a multiplier λ each vector takes the option (a width, or dropped)
    minimising ``σ² f + λ·cost``. Only options on the lower convex hull of (cost, f) are ever taken; hull
    option k beats option k - 1 when ``σ² > λ·s_k`` with ``s_k`` increasing along the hull, so the
    vectors taking option k or wider are a prefix of the spectrum and every split is a staircase. The
    splits change only at ``λ = σ_i² / s_k``; those λ (and 0) give all of them. O(r·m) memory.
    """
    sigma2 = sigma**2  # (r,) non-increasing
    r, m = sigma2.numel(), len(per_vector)
    options = sorted(
        (
            (0.0, 1.0, -1),
            *(
                (float(c), float(f), k)
                for k, (c, f) in enumerate(zip(per_vector, factor.tolist(), strict=True))
            ),
        )
    )
    hull: list[tuple[float, float, int]] = []  # lower convex hull, cost ascending
    for point in options:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    hull = [p for i, p in enumerate(hull) if i == 0 or p[1] < hull[i - 1][1]]  # strictly better only
    thresholds = torch.tensor(
        [(hull[k][0] - hull[k - 1][0]) / (hull[k - 1][1] - hull[k][1]) for k in range(1, len(hull))],
        dtype=torch.float64,
    )  # (H,) increasing
    lambdas = torch.unique(
        torch.cat([torch.zeros(1, dtype=torch.float64), (sigma2[:, None] / thresholds).reshape(-1)])
    )
    ascending = sigma2.flip(0).contiguous()
    # ends[:, k]: vectors taking hull option k + 1 or wider, i.e. with σ² > λ·s_k (strict: ties go cheaper)
    ends = r - torch.searchsorted(ascending, lambdas[:, None] * thresholds[None, :], right=True)  # (L, H)
    ends = torch.cat([ends, torch.zeros_like(ends[:, :1])], 1)  # (L, H + 1)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sigma2, 0)])  # (r + 1,)
    counts = torch.zeros(lambdas.numel(), m, dtype=torch.int64)
    bits = torch.zeros(lambdas.numel(), dtype=torch.float64)
    error = torch.full((lambdas.numel(),), float(prefix[-1]), dtype=torch.float64)
    for k in range(1, len(hull)):
        cost, f, width = hull[k]
        n = ends[:, k - 1] - ends[:, k]  # vectors taking exactly hull option k
        counts[:, width] = n
        bits += cost * n
        error -= (1 - f) * (prefix[ends[:, k - 1]] - prefix[ends[:, k]])
    return counts, bits, error


def _cross(o: tuple[float, ...], a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def lagrangian_splits(
    singular_values: torch.Tensor,
    rows: int,
    cols: int,
    *,
    levels: int | None = None,
    max_bytes: int | None = None,
    bit_widths: tuple[int, ...] = DEFAULT_BIT_WIDTHS,
    group_size: int = 64,
    error_factors: dict[int, float] | None = None,
) -> list[MixedSplit]:
    """Splits on the lower convex hull of (bytes, model error), fewest bytes first (no budget).

    One :func:`split_mixed_precision` search costs up to the cube of the rank; these cost one pass per
    λ breakpoint, which is what a cross-tensor allocator wants as its options. levels: keep at most this
    many, the largest hull split within each of ``levels`` geometrically spaced byte levels (default:
    all). max_bytes: drop splits above it. Other arguments as for :func:`split_mixed_precision`.
    """
    sigma = singular_values.detach().to(torch.float64).cpu().reshape(-1)
    widths = tuple(sorted(set(bit_widths), reverse=True))
    eps = error_factors if error_factors is not None else measure_error_factors(widths, group_size)
    factor = torch.tensor([min(1.0, 2 * eps[b] + eps[b] ** 2) for b in widths], dtype=torch.float64)
    scale_bits = 16 * (math.ceil(rows / group_size) + math.ceil(cols / group_size))
    per_vector = [(rows + cols) * b + scale_bits for b in widths]
    counts, _bits, error = _lagrangian_counts(sigma, factor, per_vector)
    nbytes = torch.zeros(counts.shape[0], dtype=torch.int64)
    for k, b in enumerate(widths):  # exactly mixed_nbytes, one width at a time
        n = counts[:, k]
        nbytes += (rows * n * b + 7) // 8 + (n * cols * b + 7) // 8
        nbytes += 2 * n * (math.ceil(rows / group_size) + math.ceil(cols / group_size))
    keep = counts.sum(1) > 0
    if max_bytes is not None:
        keep &= nbytes <= max_bytes
    size, err = nbytes.tolist(), error.tolist()
    order = sorted(torch.nonzero(keep).reshape(-1).tolist(), key=lambda i: (size[i], err[i]))
    hull: list[int] = []
    for i in order:  # fewer bytes first; a split is kept only when it lowers the error
        if not hull or (size[i] > size[hull[-1]] and err[i] < err[hull[-1]]):
            hull.append(i)
    if levels is not None and len(hull) > levels:
        sizes = [size[i] for i in hull]
        small, large = sizes[0], sizes[-1]
        picked = []
        for k in range(levels):
            level = small * (large / small) ** (k / max(1, levels - 1)) * (1 + 1e-9)
            picked.append(hull[bisect.bisect_right(sizes, level) - 1])  # largest split within the level
        hull = list(dict.fromkeys(picked))
    return [
        _as_split(sigma.numel(), widths, counts[i].tolist(), float(error[i]), rows, cols, group_size)
        for i in hull
    ]


def _best_lagrangian(
    sigma: torch.Tensor, factor: torch.Tensor, per_vector: list[int], bits_left: int
) -> tuple[list[int], float]:
    """Counts and model error of the least-error Lagrangian split within ``bits_left`` bits."""
    counts, bits, error = _lagrangian_counts(sigma, factor, per_vector)
    error = torch.where(bits <= bits_left, error, torch.full_like(error, float("inf")))
    k = int(torch.argmin(error))
    if not math.isfinite(float(error[k])):
        return [0] * len(per_vector), float((sigma**2).sum())
    return [int(c) for c in counts[k]], float(error[k])


def _best_staircase(
    prefix: torch.Tensor, factor: torch.Tensor, per_vector: list[int], bits_left: int
) -> tuple[list[int], float]:
    """Counts per width (widest first) and model error of the best staircase within ``bits_left`` bits.

    prefix: (r + 1,) cumulative σ². Every width but the last is an axis of one vectorised grid (at most
    :data:`EXACT_CELLS` cells, the caller's bound) and the last takes as many vectors as fit; ties go to
    the first cell in row-major order, i.e. the fewest vectors at the widest width.
    """
    total, m = prefix.numel() - 1, len(per_vector)
    axes = [torch.arange(min(total, bits_left // per_vector[k]) + 1) for k in range(m - 1)]
    counts = [g.to(torch.int64) for g in torch.meshgrid(*axes, indexing="ij")] if axes else []
    used = sum(counts, torch.tensor(0))
    spent = sum((c * per_vector[k] for k, c in enumerate(counts)), torch.tensor(0))
    feasible = (used <= total) & (spent <= bits_left)
    last = ((bits_left - spent).clamp(min=0) // per_vector[-1]).minimum(total - used).clamp(min=0)
    counts.append(last)
    err = torch.zeros_like(last, dtype=torch.float64) + prefix[-1]
    pos = torch.zeros_like(last)
    for k, c in enumerate(counts):  # infeasible cells are clamped here and masked below
        end = (pos + c).clamp(max=total)
        err = err + (factor[k] - 1) * (prefix[end] - prefix[pos])  # quantized instead of dropped
        pos = end
    err = torch.where(feasible, err, torch.full_like(err, float("inf"))).reshape(-1)
    k = int(torch.argmin(err))
    if float(err[k]) < float(prefix[-1]):
        return [int(c.reshape(-1)[k]) for c in counts], float(err[k])
    return [0] * m, float(prefix[-1])  # everything dropped
