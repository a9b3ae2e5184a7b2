"""Decoding a delta: the one place where a tensor entry's kind decides how its tensor is rebuilt.

:class:`Decoder` binds a stored :class:`~deltakit.format.delta.Delta` to its codec. ``apply`` and the
runtime both go through it; the format package itself knows nothing of codecs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.base import Budget, Codec, Encoded, StoredTensor
from deltakit.codecs.registry import get_codec
from deltakit.errors import DeltakitError, FormatError, NonFiniteError, TensorMismatchError, UnknownCodecError
from deltakit.format import delta as storage
from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED, Manifest, TensorEntry
from deltakit.format.safetensors_io import dtype_from_name, dtype_name
from deltakit.ops.finite import all_finite


def codec_for(manifest: Manifest) -> Codec:
    """The codec a manifest names; unknown names and newer codec versions are errors."""
    codec = get_codec(manifest.codec.name)
    if codec.version < manifest.codec.version:
        raise FormatError(
            f"delta uses {codec.name} codec version {manifest.codec.version}; this deltakit has "
            f"version {codec.version}: upgrade deltakit"
        )
    return codec


def load_delta(path: Path | str, *, verify: bool = True) -> Delta:
    """Open a delta directory whose codec this deltakit knows; with ``verify`` every file's size and
    sha256 are checked first."""
    delta = storage.load_delta(path, verify=verify)
    try:
        codec_for(delta.manifest)
    except UnknownCodecError as exc:
        raise UnknownCodecError(f"{path}: {exc}") from None
    return delta


@dataclass
class Decoder:
    """A delta and its codec: encoded forms, dense deltas and rebuilt tensors."""

    delta: Delta
    codec: Codec
    #: the codec's declared stored tensors per (shape, dtype, config, budget): the layers of a model share
    #: a few shapes, and working them out took about a third of the per-tensor checks of an apply
    _declared_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, delta: Delta) -> Decoder:
        return cls(delta, codec_for(delta.manifest))

    def encoded(self, name: str) -> Encoded:
        """The :class:`Encoded` form of encoded tensor ``name`` (stored tensors loaded, checked finite).

        The stored tensors must be exactly the ones the codec declares for this shape and budget (when it
        declares them): same names, dtypes and shapes; anything else is a FormatError naming the
        expected ones. NaN/Inf in a stored floating tensor is a NonFiniteError.
        """
        entry = self.delta.entry(name)
        if entry.kind != ENCODED:
            raise FormatError(f"tensor {name}: kind {entry.kind!r} has no encoded form")
        self.check_entry(name)
        tensors = self.delta.codec_tensors(name)
        for local, tensor in tensors.items():
            _check_finite(f"tensor {name}: stored {local!r}", tensor)
        return Encoded(tensors, entry.params)

    def check_entry(self, name: str) -> None:
        """Check an entry's stored tensors against the manifest and the codec, reading headers only.

        encoded: the codec's declared names, dtypes and shapes (exactly; no broadcasting); ``params.shape``
        when given equals the shared shape. passthrough ``value``: the entry's dtype and shape. Grown
        ``extra_rows``: the entry's dtype and the new rows' shape.
        """
        entry = self.delta.entry(name)
        if entry.kind == PASSTHROUGH:
            self._check_exact(name, entry, entry.value, entry.shape)
            return
        if entry.kind != ENCODED:
            return
        self._check_stored(name, entry)
        _check_params(name, entry.params)
        shape = entry.params.get("shape")
        if shape is not None and shape != entry.shared_shape:
            raise FormatError(f"tensor {name}: params shape {shape!r} differs from {entry.shared_shape}")
        if entry.extra_rows is not None:
            if entry.base_shape is None or len(entry.shape) != 2 or len(entry.base_shape) != 2:
                raise FormatError(f"tensor {name}: extra_rows needs 2-D shape and base_shape")
            grown = [entry.shape[0] - entry.base_shape[0], entry.shape[1]]
            if grown[0] <= 0 or entry.base_shape[1] != entry.shape[1]:
                raise FormatError(
                    f"tensor {name}: base_shape {entry.base_shape} does not grow to {entry.shape}"
                )
            self._check_exact(name, entry, entry.extra_rows, grown)
        elif entry.base_shape is not None and entry.base_shape != entry.shape:
            raise FormatError(f"tensor {name}: base_shape differs from shape but no extra_rows are stored")

    def _check_exact(self, name: str, entry: TensorEntry, key: str | None, shape: list[int]) -> None:
        if key is None:
            raise FormatError(f"tensor {name}: no stored key")
        spec = self.delta.stored_spec(key, entry.shard)
        if list(spec.shape) != list(shape) or spec.dtype != dtype_from_name(entry.dtype):
            raise FormatError(
                f"tensor {name}: stored {key!r} is {dtype_name(spec.dtype)} {list(spec.shape)}, "
                f"the manifest says {entry.dtype} {list(shape)}"
            )

    def _declared(self, name: str, entry: TensorEntry) -> dict[str, StoredTensor]:
        manifest = self.delta.manifest
        try:
            config = self.codec.config_class.from_stored(manifest.codec.config)
            budget = _tensor_budget(entry) or Budget(**manifest.codec.budget)
            return self._declared_for(tuple(entry.shared_shape), dtype_from_name(entry.dtype), config, budget)
        except DeltakitError as exc:
            raise FormatError(
                f"tensor {name}: the codec cannot account for its stored tensors ({exc})"
            ) from None
        except (TypeError, ValueError, KeyError) as exc:
            raise FormatError(f"tensor {name}: malformed codec config or budget ({exc})") from None

    def _declared_for(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: Any, budget: Budget
    ) -> dict[str, StoredTensor]:
        """``codec.stored_tensors`` for these arguments, remembered when they can be hashed (the
        returned mapping is shared: read it, do not change it)."""
        key = (shape, dtype, config, budget)
        try:
            declared = self._declared_cache.get(key)
        except TypeError:  # a config holding unhashable values
            return self.codec.stored_tensors(shape, dtype, config, budget)
        if declared is None:
            declared = self.codec.stored_tensors(shape, dtype, config, budget)
            self._declared_cache[key] = declared
        return declared

    def _check_stored(self, name: str, entry: TensorEntry) -> None:
        declared = self._declared(name, entry)
        if declared and set(declared) != set(entry.stored):
            raise FormatError(
                f"tensor {name}: stores {sorted(entry.stored)}, codec {self.codec.name} expects {sorted(declared)}"
            )
        for local, want in declared.items():
            spec = self.delta.stored_spec(entry.stored[local], entry.shard)
            if dtype_name(spec.dtype) != want.dtype or (
                want.shape is not None and tuple(spec.shape) != tuple(want.shape)
            ):
                shape = list(want.shape) if want.shape is not None else "any shape"
                raise FormatError(
                    f"tensor {name}: stored {local!r} is {dtype_name(spec.dtype)} {list(spec.shape)}, "
                    f"codec {self.codec.name} expects {want.dtype} {shape}"
                )

    def check_base(self, name: str, entry: TensorEntry, base: torch.Tensor | None) -> torch.Tensor:
        """The base tensor, present and of the shape the delta expects."""
        if base is None:
            raise TensorMismatchError(f"base model lacks tensor {name!r} that the delta modifies")
        if list(base.shape) != entry.shared_shape:
            raise TensorMismatchError(
                f"tensor {name}: base has shape {list(base.shape)}, the delta expects {entry.shared_shape}"
            )
        return base

    def reconstruct(
        self, name: str, base: torch.Tensor | None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The fine-tuned tensor ``name`` rebuilt from ``base`` (None for tensors the base lacks).

        Checks the base tensor's shape against the manifest and the stored tensors against the codec; the
        result has the target's dtype and shape, on ``device``. base is not mutated. A codec failing on
        the stored data is a FormatError.
        """
        entry = self.delta.entry(name)
        dtype = dtype_from_name(entry.dtype)
        if entry.kind == PASSTHROUGH:
            self.check_entry(name)
            value = self.delta.exact(name)
            _check_finite(f"tensor {name}: stored value", value)
            return value.to(device)
        base = self.check_base(name, entry, base)
        if entry.kind == UNCHANGED:
            if base.dtype != dtype:
                raise TensorMismatchError(
                    f"tensor {name}: base is {dtype_name(base.dtype)}, the delta records it unchanged "
                    f"as {entry.dtype}"
                )
            return base.to(device=device)
        encoded = self.encoded(name)
        rebuilt = codec_call(name, lambda: self.codec.reconstruct(encoded, base, dtype, device))
        if entry.extra_rows is not None:
            extra = self.delta.exact(name, "extra_rows").to(device=device, dtype=dtype)
            _check_finite(f"tensor {name}: stored extra_rows", extra)
            rebuilt = torch.cat([rebuilt, extra], dim=0)
        if list(rebuilt.shape) != entry.shape or rebuilt.dtype != dtype:
            raise FormatError(f"tensor {name}: rebuilt shape {list(rebuilt.shape)} != recorded {entry.shape}")
        return rebuilt

    def delta_fp32(
        self, name: str, base: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """Dense fp32 delta of an encoded tensor (None for other kinds); base shape rows only."""
        if self.delta.entry(name).kind != ENCODED:
            return None
        encoded = self.encoded(name)
        return codec_call(name, lambda: self.codec.decode(encoded, device, base=base))


#: codec params with a fixed JSON type across the built-in codecs: counts are integers, scales numbers
_INT_PARAMS = ("rank", "keep", "seed")
_NUMBER_PARAMS = ("scale",)


def _check_params(name: str, params: dict) -> None:
    """The well-known params have their types: ``rank``/``keep``/``seed`` non-negative integers, ``scale``
    a number, ``shape`` a list of non-negative integers (JSON booleans are neither)."""
    for key, value in params.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key in _INT_PARAMS and not (is_int and value >= 0):
            raise FormatError(f"tensor {name}: params {key} must be a non-negative integer, not {value!r}")
        if key in _NUMBER_PARAMS and not (is_int or isinstance(value, float)):
            raise FormatError(f"tensor {name}: params {key} must be a number, not {value!r}")
        if key == "shape" and not (
            isinstance(value, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
        ):
            raise FormatError(f"tensor {name}: params shape must be a list of non-negative integers")


def _check_finite(what: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise NonFiniteError(f"{what} contains NaN or Inf")


def codec_call(name: str, call):
    """Run a codec's decode on stored data; its Python errors on bad params become one FormatError."""
    try:
        return call()
    except DeltakitError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError, OverflowError) as exc:
        text = str(exc).strip().splitlines()
        detail = text[0][:160] if text else type(exc).__name__
        raise FormatError(f"tensor {name}: the codec cannot decode its stored data ({detail})") from None


def _tensor_budget(entry: TensorEntry) -> Budget | None:
    """The budget a size target gave this tensor (``params.allocation``: ``ratio`` or ``rank``), if any.

    Under a size target each matrix has its own budget; the manifest's codec budget is the overall one.
    """
    allocation = entry.params.get("allocation")
    if allocation is None:
        return None
    if not isinstance(allocation, dict):
        raise TypeError("params.allocation is not an object")
    ratio, rank = allocation.get("ratio"), allocation.get("rank")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise TypeError("params.allocation.ratio is not a number")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError("params.allocation.rank is not an integer")
    return Budget(ratio=ratio, rank=rank)
