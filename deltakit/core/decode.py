"""Decoding a delta: the one place where a tensor entry's kind decides how its tensor is rebuilt.

:class:`Decoder` binds a stored :class:`~deltakit.format.delta.Delta` to its codec. ``apply`` and the
runtime both go through it; the format package itself knows nothing of codecs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.codecs.base import Budget, Codec, Encoded
from deltakit.codecs.registry import get_codec
from deltakit.errors import DeltakitError, FormatError, TensorMismatchError, UnknownCodecError
from deltakit.format import delta as storage
from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED, Manifest, TensorEntry
from deltakit.format.safetensors_io import dtype_from_name


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

    @classmethod
    def of(cls, delta: Delta) -> Decoder:
        return cls(delta, codec_for(delta.manifest))

    def encoded(self, name: str) -> Encoded:
        """The :class:`Encoded` form of encoded tensor ``name`` (stored tensors loaded lazily).

        The stored names must be the ones the codec declares for this shape and budget (when it declares
        them): a missing or extra stored tensor is a FormatError naming the expected ones.
        """
        entry = self.delta.entry(name)
        if entry.kind != ENCODED:
            raise FormatError(f"tensor {name}: kind {entry.kind!r} has no encoded form")
        self._check_stored(name, entry)
        return Encoded(self.delta.codec_tensors(name), entry.params)

    def _check_stored(self, name: str, entry: TensorEntry) -> None:
        manifest = self.delta.manifest
        try:
            config = self.codec.config_class.from_dict(manifest.codec.config, strict=False)
            budget = Budget(**manifest.codec.budget)
            declared = self.codec.stored_tensors(
                tuple(entry.shared_shape), dtype_from_name(entry.dtype), config, budget
            )
        except DeltakitError as exc:
            raise FormatError(
                f"tensor {name}: the codec cannot account for its stored tensors ({exc})"
            ) from None
        except TypeError as exc:
            raise FormatError(f"tensor {name}: malformed codec config or budget ({exc})") from None
        if declared and set(declared) != set(entry.stored):
            raise FormatError(
                f"tensor {name}: stores {sorted(entry.stored)}, codec {self.codec.name} expects {sorted(declared)}"
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

        Checks the base tensor's shape against the manifest; the result has the target's dtype and shape,
        on ``device``. base is not mutated.
        """
        entry = self.delta.entry(name)
        if entry.kind == PASSTHROUGH:
            return self.delta.exact(name).to(device)
        base = self.check_base(name, entry, base)
        dtype = dtype_from_name(entry.dtype)
        if entry.kind == UNCHANGED:
            return base.to(device=device, dtype=dtype)
        rebuilt = self.codec.reconstruct(self.encoded(name), base, dtype, device)  # (base rows, cols)
        if entry.extra_rows is not None:
            extra = self.delta.exact(name, "extra_rows").to(device=device, dtype=dtype)
            rebuilt = torch.cat([rebuilt, extra], dim=0)
        if list(rebuilt.shape) != entry.shape:
            raise FormatError(f"tensor {name}: rebuilt shape {list(rebuilt.shape)} != recorded {entry.shape}")
        return rebuilt

    def delta_fp32(
        self, name: str, base: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """Dense fp32 delta of an encoded tensor (None for other kinds); base shape rows only."""
        if self.delta.entry(name).kind != ENCODED:
            return None
        return self.codec.decode(self.encoded(name), device, base=base)
