"""What one module does inside a mixed-delta batch, worked out once per ``assign``.

A :class:`ModulePlan` holds, for one module, every delta of the batch that changes it (its rows, its
ops, which path it takes) and the low-rank factors of all those deltas stacked side by side, so one
call of the module's replaced forward does:

- low-rank parts of every delta at once while decoding: on the CPU one compiled call over every
  delta's factors at their stored width, each on its own rows (:mod:`deltakit.ops.lowrank_group`);
  elsewhere ``h = x A`` for all rows and all deltas' factors (one thin fp32 matmul), ``h`` masked to
  each row's own delta, then ``h B`` (rows of other deltas and base rows get an exact zero); per delta
  on its rows for long inputs;
- sign parts per delta on its rows, from the packed bits (:func:`deltakit.ops.signmm.sign_matmul`) on
  the CPU, or from a cached ±1 matrix elsewhere;
- bias changes, embedding rows, and dense re-runs (anything else) per delta on its rows.

All shares of a module are summed in fp32 and added to its output once. Ready-to-use tensors (fp32
factors, bias differences, rebuilt dense parameters, unpacked signs where the bit kernel does not apply) live in the executor's byte-bounded LRU keyed by (delta, parameter, form, dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltakit.errors import TensorMismatchError
from deltakit.runtime.prepared import PreparedDelta, TensorOp


def module_layout(module: nn.Module) -> str | None:
    """``out_in`` for nn.Linear, ``in_out`` for GPT-2 style Conv1D, ``embedding``, else None."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    return None


@dataclass(eq=False)
class Part:
    """One delta's change to one module: its rows, ops and path (``factored`` or ``dense``)."""

    prepared: PreparedDelta
    rows: slice | torch.Tensor  # batch rows using this delta (slice when consecutive)
    row_list: list[int]
    ops: dict[str, TensorOp]  # attribute -> op
    path: str

    @property
    def weight(self) -> TensorOp | None:
        return self.ops.get("weight")

    @property
    def bias(self) -> TensorOp | None:
        return self.ops.get("bias")


def part_path(module: nn.Module, factored: bool, ops: dict[str, TensorOp]) -> str:
    """``factored`` when the delta's share can be computed from the encoded form, else ``dense``.
    factored: the delta's :attr:`~.prepared.PreparedDelta.factored` (taken once per delta by the caller)."""
    layout = module_layout(module)
    weight, bias = ops.get("weight"), ops.get("bias")
    fast = (
        factored
        and layout is not None
        and set(ops) <= {"weight", "bias"}
        and (weight is None or weight.kind == "encoded")
        and (bias is None or (bias.kind == "passthrough" and layout != "embedding"))
    )
    return "factored" if fast else "dense"


@dataclass(eq=False)
class ModulePlan:
    """The parts of one module in one batch, split by path; ``stacked`` is the low-rank stack."""

    module: nn.Module
    layout: str | None
    batch: int
    parts: list[Part]
    #: (A (in, R), B (R, out), mask (batch, R)) fp32, built on the first call, dropped with the plan
    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    #: dense parts run once with a per-row weight: None until checked on the first call
    row_weight: bool | None = None
    #: (batch, dim) the per-row weights of that form
    row_weights: torch.Tensor | None = None
    #: the RMSNorm's epsilon, recorded with ``row_weights``
    row_eps: float = 0.0
    #: dtype of the module's output, recorded when the per-row form is checked
    out_dtype: torch.dtype | None = None
    #: whether the packed-bit sign kernel can take this batch's sign parts (CPU, library built)
    group_signs: bool = False
    #: tokens per row -> the kernel's :class:`~deltakit.ops.signmm.SignGroup` for those parts
    sign_groups: dict[int, Any] = field(default_factory=dict)
    #: tokens per row -> the :class:`~deltakit.ops.lowrank_group.LowRankGroup` of the low-rank parts
    low_rank_groups: dict[int, Any] = field(default_factory=dict)
    #: tokens per row -> the :class:`~deltakit.ops.mixed_shares.SharesCall` of the sign (and low-rank) parts
    share_calls: dict[int, Any] = field(default_factory=dict)
    factored_parts: list[Part] = field(init=False)
    dense_parts: list[Part] = field(init=False)
    #: factored parts whose low-rank factors go into the stack (linear layers only)
    low_rank_parts: list[Part] = field(init=False)
    #: factored parts whose sign products go through one packed-bit kernel call (``group_signs``,
    #: ``out_in``, ``in % 8 == 0``)
    grouped_sign_parts: list[Part] = field(init=False)
    #: factored parts with a share besides the low-rank and grouped sign parts (embedding rows, a sign part
    #: outside the group, a bias change)
    share_parts: list[Part] = field(init=False)

    def __post_init__(self) -> None:
        self.factored_parts = [p for p in self.parts if p.path == "factored"]
        self._check_shapes()
        self.dense_parts = [p for p in self.parts if p.path == "dense"]
        linear = self.layout in ("out_in", "in_out")
        self.low_rank_parts = [
            p
            for p in self.factored_parts
            if linear and p.weight is not None and p.weight.view is not None and p.weight.view.has_low_rank
        ]
        signed = [
            p
            for p in self.factored_parts
            if p.weight is not None and p.weight.view is not None and p.weight.view.signs is not None
        ]
        grouped = self.group_signs and self.layout == "out_in"
        self.grouped_sign_parts = [p for p in signed if grouped and p.weight.view.shape[1] % 8 == 0]
        ungrouped = {id(p) for p in signed} - {id(p) for p in self.grouped_sign_parts}
        self.share_parts = [
            p
            for p in self.factored_parts
            if p.bias is not None
            or (p.weight is not None and self.layout == "embedding")
            or id(p) in ungrouped
        ]

    def _check_shapes(self) -> None:
        """TensorMismatchError unless every factored part's weight view has the module weight's shape
        (the kernels take their sizes from the views and read the activations at the module's)."""
        weight = getattr(self.module, "weight", None)
        served = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        for part in self.factored_parts:
            op = part.weight
            if op is not None and op.view is not None and tuple(op.view.shape) != served:
                raise TensorMismatchError(
                    f"delta {part.prepared.name!r} changes {op.name} as a {list(op.view.shape)} matrix; "
                    f"the served model holds it as {list(served) if served else 'no weight'}"
                )


def factor_pair(op: TensorOp, layout: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(A (in, r), B (r, out))`` with ``x A B`` the low-rank share of ``op``: contiguous, in ``dtype``."""
    view = op.view
    assert view is not None and view.has_low_rank
    up, down = (
        view.up.to(device, torch.float32),
        view.down.to(device, torch.float32),
    )  # quantized: dequantized
    first, second = (down.T, up.T) if layout == "out_in" else (up, down)
    return first.to(dtype).contiguous(), second.to(dtype).contiguous()


def stack_mask(parts: list[Part], ranks: list[int], batch: int, device) -> torch.Tensor:
    """(batch, sum(ranks)) fp32 0/1: row i keeps the rank columns of its own delta only."""
    mask = torch.zeros(batch, sum(ranks), dtype=torch.float32)
    start = 0
    for part, rank in zip(parts, ranks, strict=True):
        mask[part.row_list, start : start + rank] = 1
        start += rank
    return mask.to(device)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama-family RMSNorm forward with a per-row weight: x (batch, ..., dim), weight broadcastable
    to x (e.g. (batch, 1, dim)) -> x's dtype. Same operations as ``LlamaRMSNorm.forward``."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)
