"""Deltas on disk and in memory: writing shards, reading them back, checking their hashes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit.codecs.base import Codec, Encoded
from deltakit.codecs.registry import get_codec
from deltakit.errors import FormatError, IntegrityError, TensorMismatchError, UnknownCodecError
from deltakit.format.manifest import ENCODED, MANIFEST_NAME, PASSTHROUGH, UNCHANGED, Manifest
from deltakit.format.safetensors_io import dtype_from_name, file_sha256

SHARD_PATTERN = "delta-{:05d}.safetensors"


class ShardWriter:
    """Collects stored tensors and writes them to ``delta-NNNNN.safetensors`` shards.

    Memory stays at one shard (``max_shard_bytes``); tensors are written as given (not copied).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._index = 1
        self.files: dict[str, dict[str, Any]] = {}
        self.stored_bytes = 0

    @property
    def current_shard(self) -> str:
        return SHARD_PATTERN.format(self._index)

    def add(self, key: str, tensor: torch.Tensor) -> str:
        """Queue ``tensor`` under ``key``; returns the shard file it will be written to."""
        if key in self._buffer:
            raise FormatError(f"stored tensor key {key!r} written twice")
        shard = self.current_shard
        tensor = tensor.detach().to("cpu").contiguous()
        self._buffer[key] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        self._buffer_bytes += nbytes
        self.stored_bytes += nbytes
        return shard

    def maybe_flush(self) -> None:
        """Write the current shard once it has reached the size limit (call between groups)."""
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.out_dir / self.current_shard
        save_file(self._buffer, str(path), metadata={"format": "deltakit"})
        self.files[path.name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        self._buffer = {}
        self._buffer_bytes = 0
        self._index += 1


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    (Path(out_dir) / MANIFEST_NAME).write_text(manifest.to_json())


def verify_files(delta_dir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists: present, right size, right sha256; nothing unlisted."""
    delta_dir = Path(delta_dir)
    for rel, entry in manifest.files.items():
        path = delta_dir / rel
        if not path.is_file():
            raise IntegrityError(f"{delta_dir}: file {rel} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(
                f"{delta_dir}: {rel} is {size} bytes, manifest says {entry['size']} (truncated?)"
            )
        if file_sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{delta_dir}: {rel} does not match its sha256 (corrupted)")


class Delta:
    """A delta ready to apply: its manifest plus access to the stored tensors.

    Built by :func:`load_delta` from a directory, or by :func:`deltakit.compress` in memory (then
    ``stored`` holds the tensors). Stored tensors are loaded lazily, per group.
    """

    def __init__(
        self, manifest: Manifest, path: Path | None = None, stored: dict[str, torch.Tensor] | None = None
    ):
        self.manifest = manifest
        self.path = Path(path) if path is not None else None
        self._stored = stored
        self._handles: dict[str, Any] = {}
        self.codec: Codec = get_codec(manifest.codec.name)
        if self.codec.version < manifest.codec.version:
            raise FormatError(
                f"delta uses {self.codec.name} codec version {manifest.codec.version}; this deltakit has "
                f"version {self.codec.version}: upgrade deltakit"
            )

    def _stored_tensor(self, key: str, shard: str | None) -> torch.Tensor:
        if self._stored is not None:
            return self._stored[key]
        if self.path is None or shard is None:
            raise FormatError(f"stored tensor {key!r} has no shard")
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.path / shard), framework="pt", device="cpu")
            self._handles[shard] = handle
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise FormatError(f"{self.path / shard}: cannot read {key!r} ({exc})") from None

    def encoded(self, group: str) -> Encoded:
        """The :class:`Encoded` form of one group."""
        entry = self.manifest.groups[group]
        tensors = {
            local: self._stored_tensor(key, entry.get("shard")) for local, key in entry["stored"].items()
        }
        return Encoded(tensors, entry["params"])

    def tensor_names(self) -> list[str]:
        return list(self.manifest.tensors)

    def reconstruct(
        self, name: str, base: torch.Tensor | None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The fine-tuned tensor ``name``, rebuilt from ``base`` (None for tensors the base lacks).

        Checks the base tensor's shape against the manifest; the result has the target's dtype and shape.
        """
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise TensorMismatchError(f"the delta has no tensor {name!r}")
        dtype = dtype_from_name(entry["dtype"])
        shape = tuple(entry["shape"])
        kind = entry["kind"]
        if kind == PASSTHROUGH:
            return self._stored_tensor(entry["stored"]["value"], entry.get("shard")).to(device)
        if base is None:
            raise TensorMismatchError(f"base model lacks tensor {name!r} that the delta modifies")
        base_shape = tuple(entry.get("base_shape", shape))
        if tuple(base.shape) != base_shape:
            raise TensorMismatchError(
                f"tensor {name}: base has shape {list(base.shape)}, the delta expects {list(base_shape)}"
            )
        if kind == UNCHANGED:
            return base.to(device=device, dtype=dtype)
        if kind != ENCODED:
            raise FormatError(f"tensor {name}: unknown kind {kind!r}")
        rebuilt = self.codec.reconstruct(self.encoded(entry["group"]), base, dtype, device)
        if "extra_rows" in entry.get("stored", {}):
            extra = self._stored_tensor(entry["stored"]["extra_rows"], entry.get("shard")).to(
                device=device, dtype=dtype
            )
            rebuilt = torch.cat([rebuilt, extra], dim=0)
        if tuple(rebuilt.shape) != shape:
            raise FormatError(f"tensor {name}: rebuilt shape {list(rebuilt.shape)} != recorded {list(shape)}")
        return rebuilt

    def delta_fp32(
        self, name: str, base: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """Dense fp32 delta of an encoded tensor (None for unchanged ones); base shape rows only."""
        entry = self.manifest.tensors[name]
        if entry["kind"] != ENCODED:
            return None
        return self.codec.decode(self.encoded(entry["group"]), device, base=base)


def load_delta(path: Path | str, *, verify: bool = True) -> Delta:
    """Open a delta directory; with ``verify`` (default) every file's size and sha256 are checked first."""
    path = Path(path)
    manifest = Manifest.read(path)
    if verify:
        verify_files(path, manifest)
    try:
        return Delta(manifest, path)
    except UnknownCodecError as exc:
        raise UnknownCodecError(f"{path}: {exc}") from None


def fp16_delta_bytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """A JSON-friendly summary (used by ``deltakit inspect``)."""
    kinds: dict[str, int] = {}
    for entry in manifest.tensors.values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    return {
        "codec": manifest.codec.name,
        "codec_version": manifest.codec.version,
        "config": manifest.codec.config,
        "budget": manifest.codec.budget,
        "base": {"name": manifest.base.name, "fingerprint": manifest.base.fingerprint},
        "target": {"name": manifest.target.name, "fingerprint": manifest.target.fingerprint},
        "format_version": manifest.format_version,
        "tensor_kinds": kinds,
        "stats": manifest.stats,
        "files": {k: v["size"] for k, v in manifest.files.items()},
    }
