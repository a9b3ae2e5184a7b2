"""Size targets and the allocation of a delta's bytes across its tensors.

A size target is one of ``size`` (bytes of the whole delta), ``bits_per_weight`` (coded bits per weight
of the encoded matrices) or, with ``allocation="rd"``, ``ratio``. A first pass (:func:`survey`) reads every
tensor pair once and records which tensors are encoded, what passthrough tensors cost and, for the
rate–distortion allocation, each encoded matrix's :meth:`Codec.spectrum`. Then:

- ``uniform``: the largest single ratio whose dry-run bytes (:meth:`Codec.stored_tensors` shapes plus
  :attr:`Codec.param_bytes`) fit, found by bisection: the same ratio everywhere, as with ``ratio=``;
- ``rd``: each matrix offers :meth:`Codec.candidates` ``(bytes, modelled squared error)``;
  :func:`deltakit.ops.allocate.allocate` picks one per matrix minimising the summed squared Frobenius
  error within the bytes. Data-free, every matrix's error weighs the same; with a :class:`Weighting`
  (calibration data, see :mod:`deltakit.core.activations`) each matrix's error is multiplied by the
  average input energy of its layer, an estimate of the output error it causes.

What a target counts: ``size`` = encoded tensor bytes + 4 bytes per float param + passthrough tensor
bytes (the delta's ``stats.stored_bytes``); manifest JSON and safetensors headers are not counted.
``bits_per_weight`` = (encoded tensor bytes + float params) × 8 / weights of the encoded matrices, i.e.
``16 × ratio``; ``ratio`` counts the same bytes against the fp16 delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakit.codecs.base import FP16_BYTES, Budget, Codec, CodecConfig
from deltakit.errors import BudgetError, UsageError
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED
from deltakit.models.checkpoint import TensorSource
from deltakit.models.roles import EMBEDDING, LM_HEAD, TensorRole, infer_roles
from deltakit.ops.allocate import allocate
from deltakit.ops.workers import ordered_map, tensor_bytes

ALLOCATIONS = ("uniform", "rd")


def grown(base: torch.Tensor, target: torch.Tensor, role: TensorRole) -> bool:
    """Whether ``target`` is ``base`` with rows appended (a resized embedding or head)."""
    return (
        target.ndim == 2
        and base.ndim == 2
        and target.shape[1] == base.shape[1]
        and target.shape[0] > base.shape[0]
        and role.role in (EMBEDDING, LM_HEAD)
    )


def classify(
    t: torch.Tensor,
    b: torch.Tensor | None,
    role: TensorRole,
    exclude_roles: tuple[str, ...],
    equal: bool | None = None,
) -> tuple[str, bool]:
    """(kind, grown) of one fine-tune tensor: unchanged, passthrough or encoded (shape errors are the
    caller's to raise). equal: ``torch.equal(b, t)`` when the caller already knows it (see
    :func:`deltakit.ops.finite.scan_pair`), else computed here."""
    if b is None:
        return PASSTHROUGH, False
    same_shape = tuple(b.shape) == tuple(t.shape)
    if equal is None:
        equal = same_shape and b.dtype == t.dtype and torch.equal(b, t)
    if equal:
        return UNCHANGED, False
    is_grown = not same_shape and grown(b, t, role)
    if t.ndim != 2 or not t.is_floating_point() or role.role in exclude_roles:
        return PASSTHROUGH, is_grown
    return ENCODED, is_grown


@dataclass
class Survey:
    """What the first pass found: per encoded matrix its shape, squared norm and (rd) spectrum."""

    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    norms2: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    passthrough_bytes: int = 0

    @property
    def fp16_bytes(self) -> int:
        return sum(FP16_BYTES * r * c for r, c in self.shapes.values())


@dataclass(frozen=True)
class Weighting:
    """Per encoded matrix the weight of its squared error in the rd allocation (positive, finite; mean 1
    over the measured matrices) and the input energy it came from (None: not measured, weight 1)."""

    weights: dict[str, float]
    energy: dict[str, float | None]
    #: calibration tokens the statistics were collected on
    tokens: int = 0
    #: what the weights are, as the manifest's ``stats.allocation_weighting`` records it
    source: str = "calibration"


@dataclass
class Plan:
    """The outcome: the manifest's budget, a budget per encoded tensor and the rows ``inspect`` shows."""

    budget: Budget
    per_tensor: dict[str, Budget]
    info: dict[str, dict[str, Any]]
    target_bytes: int
    allocation: str
    #: the weighting the rd allocation used; None: data-free (every matrix weighs 1)
    weighting: Weighting | None = None


def survey(
    codec: Codec,
    config: CodecConfig,
    base_src: TensorSource,
    target_src: TensorSource,
    exclude_roles: tuple[str, ...],
    device: torch.device,
    spectra: bool,
    workers: int = 1,
) -> Survey:
    """Read every tensor pair once; record encoded shapes, passthrough bytes and (``spectra``) spectra.

    workers: tensors surveyed side by side on CPU threads (one torch thread each; the figures do not
    depend on it). Tensors are read in this thread, in order."""
    out = Survey()
    names, base_names = target_src.names(), set(base_src.names())
    roles = infer_roles({n: target_src.spec(n) for n in names})

    def read(name: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        return name, target_src.get(name), base_src.get(name) if name in base_names else None

    def measure(
        item: tuple[str, torch.Tensor, torch.Tensor | None],
    ) -> tuple[str, str, int, tuple, float, Any]:
        """(name, kind, passthrough bytes, encoded shape, squared norm, spectrum) of one tensor pair."""
        name, t, b = item
        kind, is_grown = classify(t, b, roles[name], exclude_roles)
        if kind == PASSTHROUGH:
            return name, kind, t.numel() * t.element_size(), (), 0.0, None
        if kind != ENCODED:
            return name, kind, 0, (), 0.0, None
        rows = b.shape[0]
        extra = (t.shape[0] - rows) * t.shape[1] * t.element_size() if is_grown else 0
        delta = t[:rows].to(device=device, dtype=torch.float32) - b.to(device=device, dtype=torch.float32)
        norm2 = float((delta.double() ** 2).sum())
        spectrum = codec.spectrum(delta, config) if spectra else None
        if spectra and spectrum is None:
            raise UsageError(f"allocation='rd' needs a codec with candidates; {codec.name} has none")
        return name, kind, extra, (int(rows), int(t.shape[1])), norm2, spectrum

    items = (read(name) for name in names)
    for name, kind, passthrough, shape, norm2, spectrum in ordered_map(
        measure, items, workers, cost=tensor_bytes
    ):
        out.passthrough_bytes += passthrough
        if kind != ENCODED:
            continue
        out.shapes[name] = shape
        out.norms2[name] = norm2
        if spectra:
            out.spectra[name] = spectrum
    return out


def coded_target(
    found: Survey, *, size: int | None, bits_per_weight: float | None, ratio: float | None
) -> int:
    """Bytes the encoded matrices (tensors + float params) may take under the given target."""
    if size is not None:
        left = size - found.passthrough_bytes
        if left < 0:
            raise BudgetError(
                f"size={size} bytes is below the {found.passthrough_bytes} bytes of tensors stored exactly"
            )
        return left
    weights = found.fp16_bytes // FP16_BYTES
    if bits_per_weight is not None:
        return math.floor(bits_per_weight * weights / 8)
    if ratio is None:
        raise UsageError("a size target needs size=, bits_per_weight= or ratio=")
    return math.floor(ratio * found.fp16_bytes)


def dry_run_bytes(codec: Codec, config: CodecConfig, shape: tuple[int, int], budget: Budget) -> int:
    """Exact bytes ``codec`` stores for ``shape`` under ``budget`` (declared shapes + float params)."""
    total = codec.param_bytes
    declared = codec.stored_tensors(shape, torch.float32, config, budget)
    if not declared:
        raise BudgetError(f"{codec.name} cannot predict the size of its tensors; give ratio= instead")
    for name, spec in declared.items():
        if spec.shape is None:
            raise BudgetError(
                f"{codec.name} cannot predict the size of {name}; use allocation='rd' or give ratio="
            )
        total += math.prod(spec.shape) * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    return total


#: what a too-small size target error suggests
LOWER_HINT = "give a larger target, or a codec that goes lower (`deltakit methods` shows the codecs' ranges)"


def _bits_per_weight(nbytes: int, found: Survey) -> float:
    """``nbytes`` as bits per weight of the encoded matrices."""
    return 8 * nbytes / max(1, found.fp16_bytes // FP16_BYTES)


def plan_uniform(codec: Codec, config: CodecConfig, found: Survey, target: int) -> Plan:
    """The largest single ratio whose dry-run bytes fit ``target`` (bisection over the reachable range)."""
    low, high = codec.ratio_range or (0.0, 1.0)

    def fits(ratio: float) -> bool:
        try:
            budget = Budget(ratio=ratio)
            return sum(dry_run_bytes(codec, config, s, budget) for s in found.shapes.values()) <= target
        except BudgetError as exc:
            if "cannot predict" in str(exc):
                raise
            return False

    ratio = high
    if not fits(high):
        for _ in range(50):  # invariant: ``high`` does not fit; ``low`` fits or is the range's floor
            mid = (low + high) / 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        ratio = low
        if ratio <= 0 or not fits(ratio):
            raise BudgetError(
                f"{codec.name} cannot fit its encoded matrices in {target} bytes "
                f"({_bits_per_weight(target, found):.3g} bits per weight) at any single ratio; "
                f"{LOWER_HINT}"
            )
    budget = Budget(ratio=ratio)
    return Plan(budget, dict.fromkeys(found.shapes, budget), {}, target, "uniform")


def _reference_budget(codec: Codec, config: CodecConfig, found: Survey, target: int) -> Budget:
    """The manifest's budget: the target ratio when every shape accepts it, else rank 1 (it declares the
    stored names decode checks; the chosen budgets are in each tensor's params)."""
    ratio = min(1.0, max(target / max(found.fp16_bytes, 1), 1e-9))
    for budget in (Budget(ratio=ratio), Budget(rank=1)):
        try:
            codec.check_budget(budget)
            for shape in found.shapes.values():
                codec.stored_tensors(shape, torch.float32, config, budget)
            return budget
        except BudgetError:
            continue
    raise BudgetError(f"{codec.name} cannot reach {target} bytes for its encoded matrices")


def plan_rd(
    codec: Codec, config: CodecConfig, found: Survey, target: int, weighting: Weighting | None = None
) -> Plan:
    """Rate–distortion allocation over each matrix's candidates (see the module docstring).

    weighting: per-matrix error weights (every encoded matrix needs one); None weighs all the same.
    """
    reference = _reference_budget(codec, config, found, target)
    names = list(found.shapes)
    options = []
    for name in names:
        shape = found.shapes[name]
        names_ref = set(codec.stored_tensors(shape, torch.float32, config, reference))
        kept = [
            c
            for c in codec.candidates(shape, found.spectra[name], config) or []
            if set(codec.stored_tensors(shape, torch.float32, config, c.budget)) == names_ref
        ]
        if not kept:
            raise BudgetError(f"{codec.name} offers no size option for {name} {list(shape)}")
        options.append(kept)
    cheapest = sum(min(c.nbytes for c in opts) for opts in options)
    if cheapest > target:
        raise BudgetError(
            f"{codec.name} needs at least {cheapest} bytes ({_bits_per_weight(cheapest, found):.3g} bits per "
            f"weight) for its encoded matrices, above the target's {target} "
            f"({_bits_per_weight(target, found):.3g}); {LOWER_HINT}"
        )
    weights = None
    if weighting is not None:
        missing = [n for n in names if n not in weighting.weights]
        if missing:
            raise UsageError(f"weighting has no weight for {missing[0]} ({len(missing)} matrices missing)")
        weights = [weighting.weights[n] for n in names]
    chosen = allocate([[(c.nbytes, c.error) for c in opts] for opts in options], target, weights=weights)
    per_tensor, info = {}, {}
    for name, opts, k in zip(names, options, chosen.choices, strict=True):
        c, norm2 = opts[k], found.norms2[name]
        per_tensor[name] = c.budget
        predicted = math.sqrt(c.error / norm2) if norm2 > 0 else 0.0
        info[name] = {
            "option": c.label,
            "bytes": c.nbytes,
            "predicted_error": predicted,
            **c.budget.to_dict(),
        }
        if weighting is not None:
            info[name].update(weight=weighting.weights[name], input_energy=weighting.energy.get(name))
    return Plan(reference, per_tensor, info, target, "rd", weighting)


def relative_error(delta: torch.Tensor, decoded: torch.Tensor) -> float:
    """‖Δ − decoded‖ / ‖Δ‖ in float64 (0 for a zero delta)."""
    norm = float(delta.double().norm())
    return float((delta.double() - decoded.double()).norm()) / norm if norm > 0 else 0.0
