"""Reading and writing Hugging Face checkpoints lazily, one tensor at a time.

Readers: a directory holding ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model*.bin`` (loaded only through
``torch.load(weights_only=True, mmap=True)``: no pickled code runs); or an in-memory state dict.
The writer streams tensors into shards whose headers are planned from known specs, so writing a
model never holds more than one tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from deltakit.errors import FormatError, TensorMismatchError
from deltakit.format.paths import AUX_FILE_NAMES, check_relpath
from deltakit.format.safetensors_io import (
    ST_TO_DTYPE,
    StreamingSafetensorsWriter,
    TensorSpec,
    checked_spans,
    decode_header,
    header_length,
    read_header,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: files in a model directory that hold weights (everything else is copied as-is)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEXES = (SAFETENSORS_INDEX, BIN_INDEX)


class TensorSource(Protocol):
    """Anything that lists tensors and hands them out one at a time."""

    def names(self) -> list[str]: ...

    def spec(self, name: str) -> TensorSpec: ...

    def get(self, name: str) -> torch.Tensor: ...


class StateDictSource:
    """A :class:`TensorSource` over an in-memory ``{name: tensor}`` dict (tensors not copied)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict | None = None):
        self._tensors = tensors
        self.config = config or {}
        self.path: Path | None = None

    def names(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        tensor = self._tensors[name]
        return TensorSpec(name, tensor.dtype, tuple(tensor.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors


class CheckpointReader:
    """Lazy reader over a Hugging Face model directory.

    Tensor names, dtypes and shapes come from the safetensors headers without loading data;
    :meth:`get` returns one tensor on the CPU. A safetensors file whose header checks out
    (:func:`~deltakit.format.safetensors_io.checked_spans`) is mapped copy-on-write, and its tensors are
    views of the mapping: nothing is copied (SmolLM2-135M apply about 5% faster, docs/speed.md),
    and writing to one changes this process's pages, never the file. As with any memory map, a file cut
    short while its tensors are in use can end the process (SIGBUS); deltas, which come from elsewhere,
    are read with positioned reads instead (:mod:`deltakit.format.shard_reader`). Other files, and
    tensors whose bytes are not aligned for their dtype, are copied out by safetensors.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(f"{self.path} is not a model directory")
        self._file_of: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int, dict] | None] = {}
        files = self._weight_files()
        for file in files:
            if file.suffix == ".safetensors":
                self._index_safetensors(file)
            else:
                self._index_bin(file)
        if not self._specs:
            raise FormatError(f"{self.path} holds no tensors")
        config_path = self.path / "config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.exists() else {}

    def _weight_files(self) -> list[Path]:
        for index_name in WEIGHT_INDEXES:
            index = self.path / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                    raise FormatError(f"{index} is not a valid index: {exc}") from None
                if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()
                ):
                    raise FormatError(f"{index} is not a valid index: weight_map must map names to files")
                files = sorted({self.path / check_relpath(f) for f in weight_map.values()})
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise FormatError(f"{index} names missing shard(s): {', '.join(missing)}")
                return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        files = sorted(self.path.glob("pytorch_model*.bin"))
        if files:
            return files
        raise FormatError(
            f"{self.path} has no model weights (looked for *.safetensors, {SAFETENSORS_INDEX}, "
            "pytorch_model*.bin)"
        )

    def _index_safetensors(self, file: Path) -> None:
        header = read_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = ST_TO_DTYPE.get(entry["dtype"])
            if dtype is None:
                raise FormatError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
            self._add(name, file, TensorSpec(name, dtype, tuple(entry["shape"])))

    def _index_bin(self, file: Path) -> None:
        for name, tensor in self._load_bin(file).items():
            self._add(name, file, TensorSpec(name, tensor.dtype, tuple(tensor.shape)))

    def _add(self, name: str, file: Path, spec: TensorSpec) -> None:
        if name in self._specs:
            raise FormatError(f"{self.path}: tensor {name} appears in two files")
        self._file_of[name] = file
        self._specs[name] = spec

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise FormatError(f"cannot read {file} as a weights-only checkpoint: {exc}") from None
            if not isinstance(state, dict):
                raise FormatError(f"{file} does not hold a state dict")
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def names(self) -> list[str]:
        return list(self._specs)

    def file_of(self) -> dict[str, Path]:
        """Tensor name -> the weight file holding it."""
        return dict(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise TensorMismatchError(f"{self.path} has no tensor {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor on the CPU, in its stored dtype."""
        file = self._file_of.get(name)
        if file is None:
            raise TensorMismatchError(f"{self.path} has no tensor {name!r}")
        if file.suffix != ".safetensors":
            return self._load_bin(file)[name]
        mapped = self._mapped(file, name)
        if mapped is not None:
            return mapped
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = safe_open(str(file), framework="pt", device="cpu")
                self._handles[file] = handle
            return handle.get_tensor(name)
        except Exception as exc:
            raise FormatError(f"cannot read tensor {name} from {file}: {exc}") from None

    def _mapped(self, file: Path, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a view of ``file``'s copy-on-write mapping, or None when it cannot be one."""
        if file not in self._maps:
            self._maps[file] = _map_safetensors(file)
        mapped = self._maps[file]
        if mapped is None or name not in mapped[2]:
            return None
        mapping, data_start, spans = mapped
        spec, start, stop = spans[name]
        size = spec.dtype.itemsize
        if start == stop:
            return torch.empty(spec.shape, dtype=spec.dtype)
        if (data_start + start) % size:
            return None
        count = (stop - start) // size
        return torch.frombuffer(mapping, dtype=spec.dtype, count=count, offset=data_start + start).view(
            spec.shape
        )

    def aux_files(self) -> list[Path]:
        """The directory's config/tokenizer files: names in :data:`AUX_FILE_NAMES`, plain files only.

        Symbolic links, dotfiles and any other file (notes, caches, weights) are left out.
        """
        return sorted(
            p for p in self.path.iterdir() if p.name in AUX_FILE_NAMES and not p.is_symlink() and p.is_file()
        )


def _map_safetensors(file: Path) -> tuple[mmap.mmap, int, dict] | None:
    """(``file`` mapped copy-on-write, the offset of its data section, its checked tensor spans), or None
    when its header does not check out or it cannot be mapped (safetensors then reads it)."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            length = header_length(fh.read(8), file, size)
            spans = checked_spans(file, decode_header(fh.read(length), file), size - 8 - length)
            if size - 8 - length == 0:
                return None
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY), 8 + length, spans
    except (FormatError, OSError, ValueError):
        return None


def open_checkpoint(source: Path | str | dict | TensorSource) -> TensorSource:
    """A :class:`TensorSource` over a directory, a state dict, or an existing source."""
    if isinstance(source, dict):
        return StateDictSource(source)
    if isinstance(source, (str, Path)):
        return CheckpointReader(source)
    return source


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


class CheckpointWriter:
    """Stream tensors into a Hugging Face checkpoint directory (sharded safetensors + index).

    specs: every tensor to write, in the order :meth:`write` will receive them.
    writeback: start the disk writes as the bytes arrive (for a directory that will be fsynced).
    The directory must exist (use :func:`deltakit.format.atomic.atomic_directory`).
    """

    def __init__(
        self,
        out_dir: Path,
        specs: list[TensorSpec],
        max_shard_bytes: int = 5 * 1024**3,
        *,
        writeback: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.writeback = writeback
        self.shards = plan_shards(specs, max_shard_bytes)
        count = len(self.shards)
        if count == 1:
            self.shard_names = ["model.safetensors"]
        else:
            self.shard_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._shard_of = {s.name: i for i, shard in enumerate(self.shards) for s in shard}
        self._current: StreamingSafetensorsWriter | None = None
        self._current_index = -1
        self.total_bytes = sum(s.nbytes for s in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index = self._shard_of.get(name)
        if index is None:
            raise TensorMismatchError(f"tensor {name!r} was not planned for this checkpoint")
        if index != self._current_index:
            if self._current is not None:
                self._current.close()
            self._current_index = index
            self._current = StreamingSafetensorsWriter(
                self.out_dir / self.shard_names[index],
                self.shards[index],
                metadata={"format": "pt"},
                digest=False,
                writeback=self.writeback,
            )
        assert self._current is not None
        self._current.write(name, tensor)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        if len(self.shards) > 1:
            weight_map = {s.name: self.shard_names[i] for i, shard in enumerate(self.shards) for s in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(files: Iterable[Path], out_dir: Path) -> None:
    """Copy config/tokenizer files next to the weights."""
    for file in files:
        shutil.copyfile(file, Path(out_dir) / file.name)
