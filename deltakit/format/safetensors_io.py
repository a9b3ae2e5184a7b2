"""Safetensors helpers: header reading, and a writer that streams tensors to disk one at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. The header of a safetensors
file only needs names, dtypes and shapes, so when those are known up front (they are, from the
base checkpoint and the delta manifest) the data can be written tensor by tensor, keeping memory
at one tensor.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from deltakit.errors import FormatError
from deltakit.format.atomic import start_writeback

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}
for _st, _dt in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _dt):
        DTYPE_TO_ST[getattr(torch, _dt)] = _st
        ST_TO_DTYPE[_st] = getattr(torch, _dt)

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: a shape whose dimensions (zeros counted as 1) span this many bytes or more is refused: torch cannot
#: allocate it, even with a zero dimension
MAX_SHAPE_BYTES = 1 << 62


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) -> ``torch.bfloat16``; raises FormatError if unknown."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def header_length(first: bytes, label: str | Path, size: int | None = None) -> int:
    """The header length that a safetensors file's first 8 bytes give. FormatError when there are fewer
    than 8, or the length exceeds MAX_HEADER_BYTES or (``size``: the file's bytes) runs past the end."""
    if len(first) < 8:
        raise FormatError(f"{label} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", bytes(first[:8]))
    if length > MAX_HEADER_BYTES or (size is not None and 8 + length > size):
        raise FormatError(f"{label} is not a safetensors file (header length {length})")
    return length


def decode_header(text: bytes, label: str | Path) -> Any:
    """The parsed JSON of a safetensors header; FormatError when it is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise FormatError(f"{label} has a damaged safetensors header: {exc}") from None


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor entries plus ``__metadata__``)."""
    with open(path, "rb") as fh:
        length = header_length(fh.read(8), path)
        return decode_header(fh.read(length), path)


def tensors_from_bytes(data: bytes | bytearray, label: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file held in ``data``, its header checked by
    :func:`checked_spans` (``label`` names it in errors). Each tensor owns a copy of its bytes (aligned
    for its dtype; ``data`` is not kept)."""
    length = header_length(data[:8], label, len(data))
    header = decode_header(bytes(data[8 : 8 + length]), label)
    spans = checked_spans(label, header, len(data) - 8 - length)
    view, tensors = memoryview(data), {}
    for name, (spec, begin, end) in spans.items():
        start, stop = 8 + length + begin, 8 + length + end
        if stop == start:
            tensors[name] = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(view[start:stop]), dtype=spec.dtype).reshape(
                spec.shape
            )
    return tensors


def checked_spans(path: str | Path, header: Any, data_size: int) -> dict[str, tuple[TensorSpec, int, int]]:
    """A parsed safetensors header checked against a data section of ``data_size`` bytes: every entry
    has a known dtype, a shape of non-negative integers spanning less than MAX_SHAPE_BYTES and data
    offsets that tile the data section exactly (in order, no gaps, no overlap, ending at its end), with
    a byte length equal to ``numel * element_size``. Returns name -> (spec, start, stop), the tensor's
    bytes at [start, stop) of the data section; one FormatError otherwise."""
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    spans: dict[str, tuple[TensorSpec, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spec, (start, stop) = _header_entry(path, name, entry)
        spans[name] = (spec, start, stop)
    end = 0
    for start, stop in sorted((start, stop) for _, start, stop in spans.values()):
        if start != end:
            raise FormatError(f"{path}: safetensors data offsets overlap or leave gaps")
        end = stop
    if end != data_size:
        raise FormatError(f"{path}: safetensors data section is {data_size} bytes, header says {end}")
    return spans


def _header_entry(path: str | Path, name: str, entry: Any) -> tuple[TensorSpec, tuple[int, int]]:
    ok = isinstance(entry, dict) and entry.get("dtype") in ST_TO_DTYPE
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ints = (list, tuple)
    ok = (
        ok
        and isinstance(shape, ints)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        and isinstance(offsets, ints)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    )
    if not ok:
        raise FormatError(f"{path}: malformed safetensors header entry {name[:80]!r}")
    spec = TensorSpec(name, ST_TO_DTYPE[entry["dtype"]], tuple(shape))
    extent = spec.dtype.itemsize  # bytes the shape spans with its zero dimensions taken as 1
    for dim in shape:
        extent *= max(dim, 1)
    if extent >= MAX_SHAPE_BYTES:  # a tensor no file holds, even empty (torch cannot allocate it)
        raise FormatError(f"{path}: tensor {name[:80]!r} has an impossible shape {list(shape)[:8]}")
    if offsets[1] - offsets[0] != spec.nbytes:
        raise FormatError(
            f"{path}: tensor {name[:80]!r} spans {offsets[1] - offsets[0]} bytes, not {spec.nbytes}"
        )
    return spec, (offsets[0], offsets[1])


#: bytes a streaming writer lets accumulate before asking the kernel to start writing them to disk
WRITEBACK_BYTES = 32 << 20


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive one at a time, in ``specs`` order.

    The header is written first from ``specs``; each :meth:`write` appends one tensor's bytes and
    checks its dtype and shape against the spec. With ``digest`` (a delta's shards, whose sha256 the
    manifest records) the sha256 of the whole file is computed on the way; without it (a rebuilt
    checkpoint) nothing is hashed. With ``writeback`` the kernel is asked to start writing each
    32 MiB to disk as it is written (the final fsync then has little left to do); leave it off when the
    file will not be fsynced. Use as a context manager; the file is complete only when every spec has
    been written.
    """

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        digest: bool = True,
        writeback: bool = True,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._hash = hashlib.sha256() if digest else None
        self.size = 0
        self._written_back = 0
        self._writeback = writeback
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": DTYPE_TO_ST[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self._fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._emit(struct.pack("<Q", len(blob)) + blob)

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)
        # overlap the disk writes with the work (only for a file that will be fsynced)
        if self._writeback and self.size - self._written_back >= WRITEBACK_BYTES:
            self._fh.flush()
            start_writeback(self._fh.fileno(), self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (must match the next spec's name, dtype and shape; any device)."""
        if self._next >= len(self.specs):
            raise FormatError(f"{self.path}: unexpected extra tensor {name!r}")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise FormatError(
                f"{self.path}: expected {spec.name} {dtype_name(spec.dtype)} {list(spec.shape)}, "
                f"got {name} {dtype_name(tensor.dtype)} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far (only with ``digest``)."""
        if self._hash is None:
            raise ValueError(f"{self.path}: written without digest=True, no sha256 was computed")
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            self._fh.close()
            raise FormatError(f"{self.path}: {len(missing)} tensor(s) never written, first {missing[0]}")
        self._fh.flush()
        self._fh.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
