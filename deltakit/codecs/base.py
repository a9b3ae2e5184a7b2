"""The codec contract: config dataclasses, the encoded form, and the Codec interface.

A codec turns one *group* of tensors (one weight matrix for per-matrix codecs) into a small set of
named tensors plus JSON parameters (:class:`Encoded`), and turns that back into a dense fp32 delta.
Codecs are pure: ``encode`` never mutates its inputs and depends only on them, the config and the
seed it is given. Applying a delta (``weight = base + delta`` in fp32, cast to the target dtype) is
written once in :mod:`deltakit.core.apply`; a codec may override :meth:`Codec.reconstruct` when it can do
better (``lossless`` restores the exact bits).
"""

from __future__ import annotations

import dataclasses
import math
import typing
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from deltakit.errors import BudgetError, ConfigError
from deltakit.ops.quant import QuantizedTensor, dequantize

FP16_BYTES = 2


def config_field(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying the help text (and allowed values) shown by ``deltakit methods``."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CodecConfig:
    """Base of every codec's config: a frozen dataclass that round-trips through JSON."""

    #: values of fields whose default changed, for stored configs written before the field existed
    STORED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True) -> CodecConfig:
        """Build a config from JSON values; unknown keys raise (``strict``) or are dropped."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown and strict:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)} for {cls.__name__}; "
                f"valid keys: {', '.join(known) or '(none)'}"
            )
        kwargs = {k: v for k, v in values.items() if k in known}
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> CodecConfig:
        """The config a delta's manifest records. A key the manifest lacks means what it meant when that
        delta was written (:attr:`STORED_DEFAULTS`, e.g. fp16 factors before quantized factors existed),
        not today's default; unknown keys are dropped."""
        return cls.from_dict({**cls.STORED_DEFAULTS, **values}, strict=False)

    def with_overrides(self, overrides: dict[str, str]) -> CodecConfig:
        """Return a copy with ``key=value`` strings (from ``--set``) parsed to each field's type."""
        known = {f.name: f for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        values = self.to_dict()
        for key, raw in overrides.items():
            if key not in known:
                raise ConfigError(
                    f"unknown overrides key {key!r} for {type(self).__name__}; "
                    f"valid keys: {', '.join(known) or '(none)'}"
                )
            values[key] = _parse_value(key, raw, hints[key])
        return type(self).from_dict(values)

    def validate(self) -> None:
        """Check field values; raise :class:`ConfigError` naming the valid choices."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"{f.name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}"
                )

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One dict per field: name, type, default, help, choices (for ``deltakit methods``)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            out.append(
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "default": f.default,
                    "help": f.metadata.get("help", ""),
                    "choices": list(f.metadata["choices"]) if "choices" in f.metadata else None,
                }
            )
        return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse a ``--set`` string to ``tp`` (bool, int, float, str, or an Optional of those)."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return parse_fraction(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"overrides[{key}]={raw!r}: expected a value of type {_type_name(tp)}") from None


def parse_fraction(raw: str) -> float:
    """Parse ``0.125`` or a fraction such as ``1/8``; ValueError (ZeroDivisionError for ``1/0``) otherwise."""
    if "/" in raw:
        num, den = raw.split("/", 1)
        return float(num) / float(den)
    return float(raw)


@dataclass(frozen=True)
class Budget:
    """How large an encoded group may be.

    ``ratio`` is the size of the encoded tensors divided by the size of the same delta in fp16
    (``2 * numel`` bytes); ``rank`` fixes the rank directly for low-rank codecs. At most one is set;
    with neither, the codec uses its own default ratio.
    """

    ratio: float | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None and self.rank is not None:
            raise BudgetError("give either a ratio or a rank, not both")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.rank is not None and self.rank < 1:
            raise BudgetError(f"rank must be >= 1, got {self.rank}")

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "rank": self.rank}


@dataclass
class Encoded:
    """A group in encoded form.

    ``tensors``: named tensors to store (any dtype; sign bits are packed uint8).
    ``params``: JSON-serialisable parameters (scales, ranks, shapes, seeds).
    """

    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class StoredTensor:
    """What a codec declares it stores under one local name: dtype name and shape (None: data-dependent)."""

    dtype: str
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class Candidate:
    """One way to encode a matrix for cross-tensor allocation.

    nbytes: exact stored bytes (tensors + 4 bytes per float param). error: modelled squared Frobenius
    error of the decoded delta (absolute, so errors of different matrices add). budget: the per-tensor
    budget that makes :meth:`Codec.encode` produce exactly this option. label: e.g. ``"rank 12 @ 4 bits"``.
    """

    nbytes: int
    error: float
    budget: Budget
    label: str = ""


class FactoredView:
    """An encoded matrix as ``scale·S + up·down``, the form the runtime's batched kernels use.

    shape: (rows, cols) of the stored layout. signs: packed ±1 matrix S (uint8, 8 per byte, row-major)
    or None. up: (rows, r), down: (r, cols), both or neither: float factors as stored. quantized: for
    group-quantized factors, the stored ``(up, down)`` (:class:`~deltakit.ops.quant.QuantizedTensor`),
    given instead of ``up`` and ``down`` (or with them, when they are its dequantized values). Tensors
    are the encoded ones, not copies: a view of quantized factors holds their codes only, and
    :attr:`up` / :attr:`down` dequantize them to fp32 on each access (kernels that can read the codes,
    the CPU's single-pass rebuild and mixed batches, take :attr:`quantized`; :attr:`float_factors` gives
    the float factors held, if any, without dequantizing).
    """

    __slots__ = ("shape", "signs", "scale", "_up", "_down", "quantized")

    def __init__(
        self,
        shape: tuple[int, int],
        signs: torch.Tensor | None = None,
        scale: float = 0.0,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
        quantized: tuple[QuantizedTensor, QuantizedTensor] | None = None,
    ) -> None:
        self.shape, self.signs, self.scale = shape, signs, scale
        self._up, self._down, self.quantized = up, down, quantized
        self._check()

    def __repr__(self) -> str:
        return f"FactoredView(shape={self.shape}, signs={self.signs is not None}, rank={self.rank})"

    @property
    def has_low_rank(self) -> bool:
        """Whether the view has a low-rank part (float or quantized factors)."""
        return self._up is not None or self.quantized is not None

    @property
    def rank(self) -> int:
        """The rank of the low-rank part (0 without one)."""
        if self._up is not None:
            return int(self._up.shape[1])
        return int(self.quantized[0].shape[1]) if self.quantized is not None else 0

    @property
    def float_factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The float ``(up, down)`` the view holds, (None, None) when it holds quantized ones only."""
        return self._up, self._down

    @property
    def up(self) -> torch.Tensor | None:
        """(rows, r) factor: as held, or the quantized one dequantized to fp32 (a new tensor each time)."""
        if self._up is None and self.quantized is not None:
            return dequantize(self.quantized[0])
        return self._up

    @property
    def down(self) -> torch.Tensor | None:
        """(r, cols) factor: as held, or the quantized one dequantized to fp32 (a new tensor each time)."""
        if self._down is None and self.quantized is not None:
            return dequantize(self.quantized[1])
        return self._down

    def _check(self) -> None:
        if (self._up is None) != (self._down is None):
            raise ValueError("a factored view has both low-rank factors or neither")
        if self.signs is None and not self.has_low_rank:
            raise ValueError("a factored view has a sign part, low-rank factors or both")
        rows, cols = self.shape
        if self.signs is not None and (
            self.signs.dtype != torch.uint8 or self.signs.numel() < (rows * cols + 7) // 8
        ):
            raise ValueError(
                f"{self.signs.numel()} {self.signs.dtype} sign bytes cannot hold a {self.shape} matrix"
            )
        shapes = None
        if self._up is not None:
            shapes = tuple(self._up.shape), tuple(self._down.shape)
        elif self.quantized is not None:
            shapes = tuple(self.quantized[0].shape), tuple(self.quantized[1].shape)
        if shapes is not None:
            up, down = shapes
            if len(up) != 2 or len(down) != 2 or up[0] != rows or down[1] != cols or up[1] != down[0]:
                raise ValueError(
                    f"factors {list(up)} and {list(down)} do not make a {list(self.shape)} matrix"
                )
            if self.quantized is not None and (
                tuple(self.quantized[0].shape) != up or tuple(self.quantized[1].shape) != down
            ):
                raise ValueError("a factored view's quantized factors must have the shapes of up and down")


@dataclass(frozen=True)
class Calibration:
    """Where a data-aware codec gets its calibration tokens (see :mod:`deltakit.distill.data`)."""

    sources: tuple[str, ...]
    #: None: up to 65 536, or all of a shorter text (:func:`deltakit.distill.data.token_batches`)
    tokens: int | None = None
    seq_len: int = 256
    seed: int = 0

    def batches(self, tokenizer: Any) -> torch.Tensor:
        """(windows, seq_len) int64 token windows."""
        from deltakit.distill.data import calibration_batches

        return calibration_batches(
            self.sources, tokenizer, seq_len=self.seq_len, tokens=self.tokens, seed=self.seed
        )


@dataclass
class EncodeContext:
    """What a codec may use besides the tensors: the budget, the compute device and a seed."""

    budget: Budget
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    #: name of the tensor being encoded (codecs derive per-tensor seeds from it)
    name: str = ""
    #: what the codec's :meth:`Codec.prepare` returned for this run (None for data-free codecs)
    prepared: Any = None

    def tensor_seed(self) -> int:
        """A seed that differs per tensor but is fixed for a given (seed, name)."""
        return (self.seed * 1_000_003 + zlib.crc32(self.name.encode())) % (2**63)


class Codec(ABC):
    """A delta codec. Subclasses set the class attributes and implement encode/decode.

    Register a subclass with :func:`deltakit.codecs.register_codec`.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_class: ClassVar[type[CodecConfig]] = CodecConfig
    summary: ClassVar[str] = ""
    #: default ratio of the fp16 delta when neither ratio nor rank is given (None: size not budgeted)
    default_ratio: ClassVar[float | None] = None
    #: smallest and largest ratio the codec can reach (None: any)
    ratio_range: ClassVar[tuple[float, float] | None] = None
    #: whether the codec needs calibration data (data-aware codecs are run through deltakit.distill)
    needs_data: ClassVar[bool] = False
    #: largest relative Frobenius error of the decoded delta the conformance suite accepts on its probe
    #: matrix at 1/8 of the fp16 delta (or the default ratio); 1.0 means "better than no delta at all",
    #: 0.0 means exact (the suite then also checks the rebuilt weight bit for bit)
    max_error: ClassVar[float] = 1.0
    #: bytes of float params an encoded matrix carries (4 per top-level float, as the delta counts them)
    param_bytes: ClassVar[int] = 0
    #: whether compress may run :meth:`encode` (and :meth:`spectrum`) for several tensors at once on CPU
    #: threads, each at one torch thread. True needs encode to be a function of its arguments (no state
    #: kept between calls, nothing shared mutated); a codec that cannot promise it sets False and its
    #: tensors are encoded one after another
    concurrent_encode: ClassVar[bool] = True

    @abstractmethod
    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: CodecConfig, ctx: EncodeContext
    ) -> Encoded:
        """Encode one matrix.

        base, target: same shape (2-D), any float dtype, any device; not mutated.
        Returns tensors on the CPU. May run on a worker thread beside other tensors' calls (see
        :attr:`concurrent_encode`).
        """

    @abstractmethod
    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense fp32 delta of the group's shape, on ``device``.

        base: the base tensor, needed only by codecs that store bits relative to it (``lossless``).
        """

    def prepare(
        self,
        base: Any,
        target: Any,
        config: CodecConfig,
        budget: Budget,
        calibration: Calibration | None,
        device: torch.device,
        seed: int,
        progress: Any = None,
    ) -> Any:
        """Whole-model work before the per-tensor :meth:`encode` calls (data-aware codecs distil here).

        base, target: :class:`deltakit.models.checkpoint.TensorSource` objects with a ``path`` when they
        are directories. Returns what :meth:`encode` needs from that work; the caller hands it back to
        every :meth:`encode` call as ``ctx.prepared`` (the codec itself keeps no state). Default: None.
        """
        return None

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: CodecConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        """The tensors :meth:`encode` stores for a ``dtype`` matrix of ``shape`` under ``budget`` (dry run).

        Shapes are exact where the size is known before encoding, ``None`` where it depends on the data
        (entropy-coded streams). The default declares nothing (an empty dict means "not declared").
        """
        return {}

    def spectrum(self, delta: torch.Tensor, config: CodecConfig) -> torch.Tensor | None:
        """What :meth:`candidates` needs from one fp32 delta (out, in): by default None (no allocation).

        Low-rank codecs return the singular values of the part their factors approximate.
        """
        return None

    def candidates(
        self, shape: tuple[int, int], spectrum: torch.Tensor, config: CodecConfig
    ) -> list[Candidate] | None:
        """The options a cross-tensor allocator may choose from for a matrix of ``shape``, whose
        :meth:`spectrum` is ``spectrum``; None when the codec does not take part in allocation."""
        return None

    @property
    def allocatable(self) -> bool:
        """Whether the codec offers :meth:`candidates` (takes part in rate–distortion allocation)."""
        return type(self).candidates is not Codec.candidates

    def expected_error(self, encoded: Encoded) -> float | None:
        """The relative error the codec is designed to have on ``encoded`` when it is known in closed form
        (DARE's drop-and-rescale); None otherwise, and :attr:`max_error` bounds it instead."""
        return None

    def factored(self, encoded: Encoded) -> FactoredView | None:
        """The encoded form as ``scale·S + up·down`` for the runtime's batched path (None: no such view)."""
        return None

    def rescaled(
        self, encoded: Encoded, scale: float | None, components: torch.Tensor | None
    ) -> Encoded | None:
        """``encoded`` with its :meth:`factored` view changed to ``scale·S + up·diag(components)·down``.

        scale: the new sign-part scale (None: keep). components: (r,) fp32 multipliers >= 0 of the view's
        low-rank components, column k of ``up`` times ``components[k]`` (None: keep). The result stores
        the same tensors (keys, dtypes, shapes) and the same params, so the delta's size is unchanged;
        ``encoded`` is not mutated. None when the codec cannot rescale its parts (scale refinement then
        refuses it); codecs with a factored view implement it.
        """
        return None

    def reconstruct(
        self, encoded: Encoded, base: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The rebuilt weight: ``base + decode(encoded)`` computed in fp32, cast to ``dtype``.

        base: the base tensor (not mutated).
        """
        delta = self.decode(encoded, device, base=base)
        return (base.to(device=device, dtype=torch.float32) + delta).to(dtype)

    def check_budget(self, budget: Budget) -> None:
        """Raise :class:`BudgetError` when the ratio is outside what the codec can reach."""
        if budget.ratio is not None and self.ratio_range is not None:
            low, high = self.ratio_range
            if not (low * (1 - 1e-9) <= budget.ratio <= high * (1 + 1e-9)):
                reach = (
                    format_ratio(low) if low == high else f"from {format_ratio(low)} to {format_ratio(high)}"
                )
                raise BudgetError(
                    f"{self.name} cannot reach ratio {format_ratio(budget.ratio)}; "
                    f"it reaches {reach} of the fp16 delta"
                )

    def effective_ratio(self, budget: Budget) -> float | None:
        return budget.ratio if budget.ratio is not None or budget.rank is not None else self.default_ratio

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``deltakit methods`` shows: name, version, summary, sizes, data needs, config fields."""
        info = describe_plugin(cls)
        info["default_ratio"] = cls.default_ratio
        info["ratio_range"] = list(cls.ratio_range) if cls.ratio_range else None
        return info


def describe_plugin(cls: Any) -> dict[str, Any]:
    """The fields codecs and model compressors describe alike."""
    return {
        "name": cls.name,
        "version": cls.version,
        "summary": cls.summary,
        "needs_data": cls.needs_data,
        "config": cls.config_class.describe(),
    }


def format_ratio(ratio: float) -> str:
    """``0.0625`` -> ``"0.0625 (1/16)"``; the fraction is shown when 1/ratio is a whole number."""
    inverse = 1 / ratio
    if abs(inverse - round(inverse)) < 1e-6 and round(inverse) > 1:
        return f"{ratio:g} (1/{round(inverse)})"
    return f"{ratio:g}"


def rank_for_bytes(rows: int, cols: int, nbytes: float, bytes_per_value: int = FP16_BYTES) -> int:
    """Largest rank whose two factors (rows×r and r×cols at ``bytes_per_value``) fit in ``nbytes``.

    Same formula as the D-QRELO paper's r = n·m·ρ/(n+m), floored so the budget is never exceeded.
    """
    return max(0, math.floor(nbytes / (bytes_per_value * (rows + cols))))
