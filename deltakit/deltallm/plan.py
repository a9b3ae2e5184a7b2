"""The sharing plan: which decoder blocks share which matrices with which anchor, and at what delta rank.

Structure is inferred from tensor names and shapes (``<prefix>.layers.<i>.mlp.gate_proj.weight`` ...),
never from per-architecture tables: a checkpoint whose blocks lack the Llama-style projections is refused
with the names that were looked for.

Layouts over the *middle* blocks ``[keep_first, num_layers - keep_last)``:

- ``sequential``: groups of ``1 + followers`` consecutive blocks; the first of each group is the anchor and
  the ``followers`` blocks after it use ``W_anchor + A B``. A trailing group may be shorter.
- ``alternating``: anchor, follower, anchor, follower, ... (the same as ``sequential`` with one follower).

Parameter counts are exact element counts (tied embeddings counted once).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deltakit.errors import BudgetError, ConfigError, FormatError

LAYOUTS = ("sequential", "alternating")
SHARES = ("mlp", "attention", "both")
MLP_KINDS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<index>\d+)\.(?P<rest>.+)\.weight$")


def kinds_for(share: str) -> tuple[str, ...]:
    """Module suffixes (inside a block) shared for ``share`` (``mlp``, ``attention`` or ``both``)."""
    if share == "mlp":
        return MLP_KINDS
    if share == "attention":
        return ATTENTION_KINDS
    if share == "both":
        return ATTENTION_KINDS + MLP_KINDS
    raise ConfigError(f"share={share!r} is not valid; choose one of {', '.join(SHARES)}")


@dataclass(frozen=True)
class ModelLayout:
    """What the plan needs to know about a checkpoint: its blocks, their matrix shapes, its size.

    prefix: the module path of the block list (``model.layers``); num_layers: block count;
    shapes: ``{kind: (out, in)}`` for each Llama-style projection (identical in every block);
    total_params: element count of every tensor (tied lm_head counted once).
    """

    prefix: str
    num_layers: int
    shapes: dict[str, tuple[int, int]]
    total_params: int
    layer_params: int

    @classmethod
    def from_specs(cls, specs: Iterable[tuple[str, tuple[int, ...]]], tied: bool = False) -> ModelLayout:
        """Build from ``(tensor name, shape)`` pairs (a checkpoint's header); ``tied``: lm_head is embed.

        Raises FormatError naming the expected projections when the blocks are not Llama-style.
        """
        specs = list(specs)
        total = 0
        per_layer: dict[int, dict[str, tuple[int, ...]]] = {}
        prefixes: set[str] = set()
        layer_sizes: dict[int, int] = {}
        for name, shape in specs:
            if tied and name == "lm_head.weight":
                continue
            numel = math.prod(shape)
            total += numel
            match = _LAYER_RE.match(name) or re.match(r"^(?P<prefix>.*?\blayers)\.(?P<index>\d+)\.", name)
            if match is None:
                continue
            index = int(match["index"])
            prefixes.add(match["prefix"])
            layer_sizes[index] = layer_sizes.get(index, 0) + numel
            rest = match.groupdict().get("rest")
            if rest is not None and name.endswith(".weight") and len(shape) == 2:
                per_layer.setdefault(index, {})[rest] = tuple(shape)
        if len(prefixes) != 1 or not per_layer:
            raise FormatError(
                f"cannot find one list of decoder blocks (<prefix>.layers.<i>...) in the checkpoint; found prefixes "
                f"{sorted(prefixes) or 'none'}"
            )
        num_layers = max(per_layer) + 1
        if sorted(per_layer) != list(range(num_layers)):
            raise FormatError(f"decoder blocks are not numbered 0..{num_layers - 1}: {sorted(per_layer)}")
        shapes: dict[str, tuple[int, int]] = {}
        wanted = ATTENTION_KINDS + MLP_KINDS
        for kind in wanted:
            seen = {per_layer[i].get(kind) for i in range(num_layers)}
            if None in seen:
                found = ", ".join(sorted(per_layer[0]))
                raise FormatError(
                    f"deltallm needs Llama-style blocks with {', '.join(wanted)} (nn.Linear, (out, in) weights); "
                    f"block 0 has {found}"
                )
            if len(seen) != 1:
                raise FormatError(f"{kind} has different shapes across blocks: {sorted(seen)}")
            shapes[kind] = seen.pop()  # (out, in)
        return cls(
            prefix=prefixes.pop(),
            num_layers=num_layers,
            shapes=shapes,
            total_params=total,
            layer_params=max(layer_sizes.values()),
        )


@dataclass(frozen=True)
class SharingPlan:
    """Which blocks share which matrices, and the delta rank.

    anchor_of: ``{follower block: anchor block}``; kinds: shared module suffixes; shapes: ``{kind: (out, in)}``.
    A follower's matrix ``kind`` is ``W_anchor[kind] + A @ B`` with A (out, rank), B (rank, in).
    """

    layout: str
    share: str
    followers_per_anchor: int
    keep_first: int
    keep_last: int
    rank: int
    prefix: str
    num_layers: int
    kinds: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    anchor_of: dict[int, int]
    total_params: int
    groups: list[list[int]] = field(default_factory=list)

    # -- structure -------------------------------------------------------------------------------

    @property
    def followers(self) -> list[int]:
        return sorted(self.anchor_of)

    @property
    def anchors(self) -> list[int]:
        return sorted(set(self.anchor_of.values()))

    def module_name(self, layer: int, kind: str) -> str:
        """Module path of ``kind`` in block ``layer`` (``model.layers.3.mlp.up_proj``)."""
        return f"{self.prefix}.{layer}.{kind}"

    def shared_modules(self) -> list[tuple[str, str]]:
        """``(follower module, anchor module)`` for every shared matrix, in block then kind order."""
        return [
            (self.module_name(f, k), self.module_name(self.anchor_of[f], k))
            for f in self.followers
            for k in self.kinds
        ]

    def role(self, layer: int) -> str:
        """``kept`` (first/last blocks), ``anchor``, ``follower`` or ``intact`` (middle block sharing nothing)."""
        if layer in self.anchor_of:
            return "follower"
        if layer in self.anchor_of.values():
            return "anchor"
        if layer < self.keep_first or layer >= self.num_layers - self.keep_last:
            return "kept"
        return "intact"

    # -- sizes -----------------------------------------------------------------------------------

    def removed_params(self, rank: int | None = None) -> int:
        """Elements removed at ``rank`` (default: the plan's): shared weights minus the delta factors."""
        r = self.rank if rank is None else rank
        per_follower = sum(o * i - r * (o + i) for o, i in (self.shapes[k] for k in self.kinds))
        return per_follower * len(self.anchor_of)

    def delta_params(self) -> int:
        """Elements of all A, B factors."""
        return self.rank * sum(o + i for o, i in (self.shapes[k] for k in self.kinds)) * len(self.anchor_of)

    @property
    def compressed_params(self) -> int:
        return self.total_params - self.removed_params()

    @property
    def reduction(self) -> float:
        """Fraction of the original parameters removed."""
        return self.removed_params() / self.total_params

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "share": self.share,
            "followers_per_anchor": self.followers_per_anchor,
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
            "rank": self.rank,
            "prefix": self.prefix,
            "num_layers": self.num_layers,
            "kinds": list(self.kinds),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "anchor_of": {str(f): a for f, a in sorted(self.anchor_of.items())},
            "groups": self.groups,
            "total_params": self.total_params,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharingPlan:
        return cls(
            layout=d["layout"],
            share=d["share"],
            followers_per_anchor=int(d["followers_per_anchor"]),
            keep_first=int(d["keep_first"]),
            keep_last=int(d["keep_last"]),
            rank=int(d["rank"]),
            prefix=d["prefix"],
            num_layers=int(d["num_layers"]),
            kinds=tuple(d["kinds"]),
            shapes={k: (int(v[0]), int(v[1])) for k, v in d["shapes"].items()},
            anchor_of={int(f): int(a) for f, a in d["anchor_of"].items()},
            total_params=int(d["total_params"]),
            groups=[list(g) for g in d.get("groups", [])],
        )


def group_blocks(
    num_layers: int, layout: str, followers_per_anchor: int, keep_first: int, keep_last: int
) -> list[list[int]]:
    """Groups ``[anchor, follower, ...]`` over the middle blocks; a one-block group shares nothing."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not valid; choose one of {', '.join(LAYOUTS)}")
    if followers_per_anchor < 1:
        raise ConfigError(f"followers_per_anchor must be >= 1, got {followers_per_anchor}")
    if keep_first < 0 or keep_last < 0:
        raise ConfigError("keep_first and keep_last must be >= 0")
    size = 2 if layout == "alternating" else 1 + followers_per_anchor
    middle = list(range(keep_first, max(keep_first, num_layers - keep_last)))
    return [middle[i : i + size] for i in range(0, len(middle), size)]


def build_plan(
    layout_info: ModelLayout,
    *,
    layout: str,
    share: str,
    followers_per_anchor: int = 1,
    keep_first: int = 2,
    keep_last: int = 2,
    rank: int | None = None,
    reduction: float | None = None,
) -> SharingPlan:
    """The sharing plan for a model, at a given ``rank`` or the largest rank meeting ``reduction``.

    Exactly one of rank / reduction. With ``reduction``, the rank is the largest r >= 1 whose removed
    parameters are at least ``reduction * total``; BudgetError names the largest reachable reduction otherwise.
    """
    kinds = kinds_for(share)
    groups = group_blocks(layout_info.num_layers, layout, followers_per_anchor, keep_first, keep_last)
    anchor_of = {f: g[0] for g in groups for f in g[1:]}
    base = SharingPlan(
        layout=layout,
        share=share,
        followers_per_anchor=1 if layout == "alternating" else followers_per_anchor,
        keep_first=keep_first,
        keep_last=keep_last,
        rank=0,
        prefix=layout_info.prefix,
        num_layers=layout_info.num_layers,
        kinds=kinds,
        shapes={k: layout_info.shapes[k] for k in kinds},
        anchor_of=anchor_of,
        total_params=layout_info.total_params,
        groups=groups,
    )
    if (rank is None) == (reduction is None):
        raise ConfigError(
            "give either a delta rank (overrides[rank]=R) or a target reduction=R, not both or neither"
        )
    if not anchor_of:
        raise BudgetError(
            f"no block can share weights: the model has {layout_info.num_layers} blocks and keeps the first "
            f"{keep_first} and last {keep_last}; lower keep_first/keep_last"
        )
    max_rank = min(min(o, i) for o, i in base.shapes.values())
    if rank is not None:
        if not 1 <= rank <= max_rank:
            raise ConfigError(f"rank must be in 1..{max_rank} for these matrices, got {rank}")
        return _with_rank(base, rank)
    assert reduction is not None
    if not 0.0 < reduction < 1.0:
        raise BudgetError(f"reduction must be in (0, 1), got {reduction}")
    target = reduction * layout_info.total_params
    best = base.removed_params(1)
    if best < target:
        raise BudgetError(
            f"reduction {reduction:g} is unreachable with layout={layout}, share={share}, "
            f"followers_per_anchor={base.followers_per_anchor}, keep_first={keep_first}, keep_last={keep_last}: "
            f"at most {best / layout_info.total_params:.4f} (rank 1, {len(anchor_of)} follower blocks); "
            f"share more matrices (share=both) or use more followers per anchor (layout=sequential)"
        )
    per_rank = sum(o + i for o, i in base.shapes.values()) * len(anchor_of)  # elements per unit of rank
    r = int((base.removed_params(0) - target) // per_rank)
    r = max(1, min(r, max_rank))
    while r > 1 and base.removed_params(r) < target:  # guard against float round-off
        r -= 1
    return _with_rank(base, r)


def _with_rank(plan: SharingPlan, rank: int) -> SharingPlan:
    d = plan.to_dict()
    d["rank"] = rank
    return SharingPlan.from_dict(d)
