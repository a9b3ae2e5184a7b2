"""A safetensors file read tensor by tensor with positioned reads, not memory-mapped.

A memory-mapped file cut short while it is mapped ends the process with SIGBUS when a missing page is
touched, and a file rewritten in place changes the tensors already handed out. A delta's shards are
hostile input that other processes may change while a delta is applied or evaluated, so they are read
with ``pread`` into buffers the tensors own: a file cut short is an :class:`IntegrityError`, and a
tensor once read never changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import torch

from deltakit.errors import IntegrityError
from deltakit.format.safetensors_io import TensorSpec, checked_spans, decode_header, header_length


class ShardReader:
    """The tensors of one safetensors file, each read when asked for.

    fh: the file, open for reading (the reader takes it over and closes it); label: the file's name in
    errors. The header is read and checked (:func:`~deltakit.format.safetensors_io.checked_spans`)
    against the file's size when the reader is made; FormatError otherwise.
    """

    def __init__(self, fh: BinaryIO, label: str | Path):
        self._fh = fh
        self.label = str(label)
        try:
            size = os.fstat(fh.fileno()).st_size
            length = header_length(os.pread(fh.fileno(), 8, 0), self.label, size)
            text = os.pread(fh.fileno(), length, 8)
            if len(text) != length:
                raise IntegrityError(f"{self.label} changed size while it was read")
            self._spans = checked_spans(self.label, decode_header(text, self.label), size - 8 - length)
        except BaseException:
            fh.close()
            raise
        self._data_start = 8 + length
        self.specs: dict[str, TensorSpec] = {name: spec for name, (spec, _, _) in self._spans.items()}

    def get_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (CPU, owning a copy of its bytes). KeyError for a name the file lacks;
        IntegrityError when the file no longer holds all of its bytes."""
        spec, start, stop = self._spans[name]
        if stop == start:
            return torch.empty(spec.shape, dtype=spec.dtype)
        raw = torch.empty(stop - start, dtype=torch.uint8)  # not zeroed: every byte is read into it
        with memoryview(raw.numpy()) as view:
            read = 0
            while read < len(view):
                got = os.preadv(self._fh.fileno(), [view[read:]], self._data_start + start + read)
                if not got:
                    raise IntegrityError(f"{self.label} changed size while it was read (truncated?)")
                read += got
        return raw.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        self._fh.close()

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
