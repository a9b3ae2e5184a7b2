"""Rate–distortion allocation of a byte budget across tensors (multiple-choice knapsack).

Each tensor offers candidate options ``(nbytes, error)`` (e.g. rank steps × bit widths, including a
zero-byte "drop" option if the caller allows it); :func:`allocate` picks exactly one per tensor to minimise
the total (optionally weighted) error with the total bytes at most the budget.

Method: exact dynamic programming over a byte grid of ``q`` bytes per cell, option costs rounded *up* to
whole cells, so the true total never exceeds the budget. ``q`` is the largest power of two with
``q * n_tensors <= resolution * budget``: rounding loses under ``resolution × budget`` bytes, i.e. the
result is at least as good as the true optimum at ``budget × (1 - resolution)``.

Guarantees (each property-tested):

- never over budget; deterministic (ties go to the cheaper option, then the lower index);
- monotone: a larger budget never gives a larger total error. Grids nest while ``q`` is fixed (a
  solution feasible on grid ``q`` at budget B is feasible at any B' > B), and when B crosses into a
  coarser grid the optimum at the top of every finer grid is kept as a candidate too;
- within ``largest option step + 2 × resolution × budget`` bytes of the budget when the options'
  errors strictly decrease with bytes and the budget is below the all-largest total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deltakit.errors import BudgetError, UsageError


@dataclass(frozen=True)
class Allocation:
    """One chosen option index per tensor, their total bytes and total (weighted) error."""

    choices: tuple[int, ...]
    nbytes: int
    error: float


@dataclass(frozen=True)
class _Item:
    """One tensor's Pareto-optimal options, sorted by bytes: (k,) int64 bytes, (k,) float64 error."""

    nbytes: torch.Tensor
    error: torch.Tensor
    index: tuple[int, ...]  # position of each kept option in the caller's list


def allocate(
    options: Sequence[Sequence[tuple[int, float]]],
    budget: int,
    *,
    weights: Sequence[float] | None = None,
    resolution: float = 2e-3,
) -> Allocation:
    """Choose one ``(nbytes, error)`` option per tensor minimising ``Σ weight × error`` within ``budget``.

    options: per tensor, a non-empty list of (non-negative int bytes, finite error >= 0).
    weights: per-tensor non-negative error weights (default 1). Raises BudgetError when even the
    cheapest options exceed the budget, UsageError on malformed input.
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise UsageError(f"budget must be a non-negative integer of bytes, got {budget!r}")
    if not 0 < resolution < 1:
        raise UsageError(f"resolution must lie in (0, 1), got {resolution!r}")
    items = _prepare(options, weights)
    cheapest = sum(int(item.nbytes[0]) for item in items)
    if cheapest > budget:
        raise BudgetError(f"budget={budget} bytes is below the {cheapest} bytes of the cheapest options")
    if sum(int(item.nbytes[-1]) for item in items) <= budget:
        return _result(items, [len(item.index) - 1 for item in items])
    threshold = len(items) / resolution  # grid q holds for budgets in [q * threshold, 2q * threshold)
    result = _allocate_on_grid(items, budget, _grid(budget, threshold), threshold)
    if result is None:  # the cheapest options fit in bytes but not in whole grid cells
        return _result(items, [0] * len(items))
    return result


def _allocate_on_grid(items: list[_Item], budget: int, q: int, threshold: float) -> Allocation | None:
    """Grid optimum at ``budget``, or the optimum at the top of the next finer grid where that is better.

    Keeping the finer grid's top as a candidate makes the result monotone in the budget. It can only win
    when that top lies within ``n*q`` bytes of the budget: the grid optimum here is at least as good as
    the true optimum at ``budget - n*q`` (its cells fit), so a lower top cannot beat it. None when no
    choice fits on the grid.
    """
    best = _solve(items, budget, q)
    if q > 1:
        top = math.ceil(q * threshold) - 1
        if top > budget - len(items) * q:
            candidate = _allocate_on_grid(items, top, q // 2, threshold)
            if best is None or (candidate is not None and candidate.error < best.error):
                best = candidate
    return best


def _grid(budget: int, threshold: float) -> int:
    """Largest power of two ``q`` with ``q * threshold <= budget`` (at least 1)."""
    q = 1
    while 2 * q * threshold <= budget:
        q *= 2
    return q


def _solve(items: list[_Item], budget: int, q: int) -> Allocation | None:
    """Exact optimum on the grid: option costs ``ceil(bytes / q)`` cells, ``budget // q`` cells in all.

    None when the cheapest options do not fit in the cells."""
    cells = budget // q
    best = torch.zeros(cells + 1, dtype=torch.float64)  # (cells + 1,) least error so far within u cells
    argmins: list[torch.Tensor] = []
    costs: list[torch.Tensor] = []
    for item in items:
        cost = ((item.nbytes + q - 1) // q).clamp(max=cells + 1)  # (k,) cells; cells + 1 = unaffordable
        width = int(cost.max())
        padded = torch.cat([torch.full((width,), math.inf, dtype=torch.float64), best])  # shift-in infinities
        new_best = torch.full((cells + 1,), math.inf, dtype=torch.float64)
        arg = torch.zeros(cells + 1, dtype=torch.int64)
        candidate = torch.empty(cells + 1, dtype=torch.float64)
        # one option at a time (buffers of cells + 1 stay in cache); strict < keeps the first minimum,
        # i.e. the cheaper option on ties
        for k, (c, e) in enumerate(zip(cost.tolist(), item.error.tolist(), strict=True)):
            start = width - c  # offset of u - cost in ``padded``
            torch.add(padded[start : start + cells + 1], e, out=candidate)
            better = candidate < new_best
            new_best = torch.where(better, candidate, new_best)
            arg.masked_fill_(better, k)
        best = new_best
        argmins.append(arg)
        costs.append(cost)
    if not math.isfinite(float(best[cells])):
        return None
    chosen = []
    u = cells
    for arg, cost in zip(reversed(argmins), reversed(costs), strict=True):
        k = int(arg[u])
        chosen.append(k)
        u -= int(cost[k])
    return _result(items, chosen[::-1])


def _result(items: list[_Item], kept: list[int]) -> Allocation:
    """Allocation in the caller's indices; the error sums in tensor order (as the DP does)."""
    error = 0.0
    for item, k in zip(items, kept, strict=True):
        error += float(item.error[k])
    nbytes = sum(int(item.nbytes[k]) for item, k in zip(items, kept, strict=True))
    return Allocation(tuple(item.index[k] for item, k in zip(items, kept, strict=True)), nbytes, error)


def _prepare(options: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None) -> list[_Item]:
    """Validate, weight and Pareto-prune each tensor's options (fewer bytes or strictly less error)."""
    if len(options) == 0:
        raise UsageError("options must list at least one tensor")
    if weights is not None and len(weights) != len(options):
        raise UsageError(f"weights must have one entry per tensor ({len(options)}), got {len(weights)}")
    items = []
    for t, opts in enumerate(options):
        weight = 1.0 if weights is None else float(weights[t])
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"weights[{t}] must be finite and >= 0, got {weight!r}")
        if len(opts) == 0:
            raise UsageError(f"options[{t}] is empty; every tensor needs at least one option")
        rows = []
        for k, (nbytes, error) in enumerate(opts):
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise UsageError(f"options[{t}][{k}] bytes must be a non-negative integer, got {nbytes!r}")
            if not math.isfinite(float(error)) or float(error) < 0:
                raise UsageError(f"options[{t}][{k}] error must be finite and >= 0, got {error!r}")
            rows.append((nbytes, weight * float(error), k))
        rows.sort()
        kept = []
        for row in rows:
            if not kept or row[1] < kept[-1][1]:
                kept.append(row)
        items.append(
            _Item(
                torch.tensor([r[0] for r in kept], dtype=torch.int64),
                torch.tensor([r[1] for r in kept], dtype=torch.float64),
                tuple(r[2] for r in kept),
            )
        )
    return items
