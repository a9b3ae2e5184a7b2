"""Rank allocation for model compression: which Linears become low-rank, at which rank, to remove a share
of the parameters.

Candidate ranks of an (out, in) matrix are the multiples of ``step`` from its floor
``max(step, ceil_step(min_rank_ratio · min(out, in)))`` up to, but excluding, the break-even rank
``out·in/(out+in)``: only ranks that actually reduce the parameter count are ever chosen.

Strategies (after Lillama's rank search):

- ``bottom``: walk the blocks from the first (after ``skip_first``) upwards; within a block lower every
  matrix one candidate at a time from its largest candidate rank to its floor, then go to the next block;
  stop as soon as the target is met. ``top`` does the same from the last block down.
- ``uniform``: every matrix gets ``floor_step(f · break_even)`` (at least its floor) with the largest common
  fraction ``f`` that meets the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deltakit.errors import BudgetError
from deltakit.lillama.lowrank import break_even_rank

STRATEGIES = ("bottom", "top", "uniform")


@dataclass(frozen=True)
class LinearSpec:
    """A Linear that may be factorised: its module path, block index and weight shape (out, in)."""

    name: str
    layer: int
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params_at(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)


def candidate_ranks(spec: LinearSpec, step: int, min_rank_ratio: float) -> list[int]:
    """Ascending candidate ranks of ``spec`` that reduce its parameter count (possibly empty)."""
    if step < 1:
        raise BudgetError(f"rank_step must be >= 1, got {step}")
    floor = max(step, step * math.ceil(min_rank_ratio * min(spec.out_features, spec.in_features) / step))
    limit = break_even_rank(spec.out_features, spec.in_features)
    return [r for r in range(floor, math.ceil(limit), step) if r < limit]


def _saving(spec: LinearSpec, rank: int | None) -> int:
    return 0 if rank is None else spec.dense_params - spec.params_at(rank)


def allocate_ranks(
    specs: list[LinearSpec],
    total_params: int,
    reduction: float,
    *,
    strategy: str = "bottom",
    step: int = 32,
    min_rank_ratio: float = 0.25,
    skip_first: int = 0,
) -> dict[str, int]:
    """``{module name: rank}`` removing at least ``reduction · total_params`` parameters.

    specs: the candidate Linears (model order); total_params: the model's parameter count (tied tensors once).
    Raises :class:`BudgetError` naming the largest reachable reduction when the target is out of reach.
    """
    if strategy not in STRATEGIES:
        raise BudgetError(f"strategy={strategy!r} is not valid; choose one of {', '.join(STRATEGIES)}")
    if not 0.0 < reduction < 1.0:
        raise BudgetError(f"reduction must be in (0, 1), got {reduction}")
    needed = math.ceil(reduction * total_params)
    cands = {s.name: candidate_ranks(s, step, min_rank_ratio) for s in specs if s.layer >= skip_first}
    eligible = [s for s in specs if cands.get(s.name)]
    reachable = sum(_saving(s, cands[s.name][0]) for s in eligible)
    if reachable < needed:
        raise BudgetError(
            f"lillama cannot remove {reduction:.1%} of the parameters: the largest reachable reduction is "
            f"{reachable / total_params:.2%} (every chosen matrix at its smallest rank with rank_step={step}, "
            f"min_rank_ratio={min_rank_ratio}, skip_first={skip_first}); lower reduction=, widen overrides[modules], "
            f"or lower min_rank_ratio"
        )
    if strategy == "uniform":
        return _uniform(eligible, cands, needed, step)
    order = sorted(
        (
            (s.layer if strategy == "bottom" else -s.layer, -r, i, s)
            for i, s in enumerate(eligible)
            for r in cands[s.name]
        ),
        key=lambda e: e[:3],
    )
    ranks: dict[str, int] = {}
    saved = 0
    for _, neg_rank, _, spec in order:
        rank = -neg_rank
        current = ranks.get(spec.name)
        if current is not None and current <= rank:
            continue
        saved += _saving(spec, rank) - _saving(spec, current)
        ranks[spec.name] = rank
        if saved >= needed:
            break
    return ranks


def _uniform(
    eligible: list[LinearSpec], cands: dict[str, list[int]], needed: int, step: int
) -> dict[str, int]:
    def ranks_at(fraction: float) -> dict[str, int]:
        out = {}
        for s in eligible:
            options = cands[s.name]
            want = step * math.floor(fraction * break_even_rank(s.out_features, s.in_features) / step)
            out[s.name] = max(options[0], min(want, options[-1]))
        return out

    def saving(ranks: dict[str, int]) -> int:
        return sum(_saving(s, ranks[s.name]) for s in eligible)

    low, high = 0.0, 1.0  # saving(ranks_at(low)) >= needed; find the largest such fraction
    for _ in range(60):
        mid = (low + high) / 2
        if saving(ranks_at(mid)) >= needed:
            low = mid
        else:
            high = mid
    return ranks_at(low)


def model_params_after(total_params: int, specs: list[LinearSpec], ranks: dict[str, int]) -> int:
    """Parameter count once the Linears in ``ranks`` are factorised."""
    by_name = {s.name: s for s in specs}
    return total_params - sum(_saving(by_name[n], r) for n, r in ranks.items())
