"""A delta opened for one pass (apply, eval, export) reads its shards with positioned reads: a shard cut
short or rewritten after it was opened is an error or has no effect, never a SIGBUS."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_runtime_support import cached_fleet

from deltakit.core.apply import apply
from deltakit.errors import FormatError, IntegrityError
from deltakit.format.delta import load_delta
from deltakit.format.shard_reader import ShardReader


@pytest.fixture()
def delta(tmp_path: Path) -> Path:
    return Path(shutil.copytree(cached_fleet("llama")["delta"]["svd-2"], tmp_path / "d"))


def _shard(delta_dir: Path) -> Path:
    return next(delta_dir.glob("*.safetensors"))


def _stored_keys(opened) -> list[tuple[str, str]]:
    return [(key, e.shard) for e in opened.manifest.tensors.values() for key in e.stored.values()]


def test_reads_the_tensors_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.randn(4, 2).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    with open(path, "rb", buffering=0) as fh:
        reader = ShardReader(fh, path)
        assert set(reader.specs) == set(tensors)
        for name, tensor in tensors.items():
            got = reader.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


def test_a_damaged_header_is_a_format_error_and_closes_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # the data section one byte short of what the header says
    with open(path, "rb", buffering=0) as fh:
        with pytest.raises(FormatError, match="data section"):
            ShardReader(fh, path)
        assert fh.closed


def test_a_shard_cut_short_after_it_was_opened_is_an_integrity_error(delta):
    opened = load_delta(delta)
    keys = _stored_keys(opened)
    first = opened.stored_tensor(*keys[0])  # opens the shard
    os.truncate(_shard(delta), 64)
    with pytest.raises(IntegrityError, match="truncated"):
        for key in keys:
            opened.stored_tensor(*key)
    assert torch.isfinite(first.float()).all()


def test_tensors_read_do_not_change_when_the_shard_is_rewritten_in_place(delta):
    opened = load_delta(delta)
    keys = _stored_keys(opened)
    before = {key: opened.stored_tensor(*key).clone() for key in keys}
    held = {key: opened.stored_tensor(*key) for key in keys}
    shard = _shard(delta)
    with open(shard, "r+b") as fh:  # same size, every data byte flipped
        size = shard.stat().st_size
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in fh.read()))
        fh.seek(size // 2)
    for key in keys:
        assert torch.equal(held[key].view(torch.uint8), before[key].view(torch.uint8))


def test_apply_of_a_shard_cut_short_mid_run_ends_in_one_integrity_error(delta, tmp_path, monkeypatch):
    fleet = cached_fleet("llama")
    import deltakit.format.shard_reader as shard_reader

    real = shard_reader.ShardReader.get_tensor
    calls = []

    def cut_after_first(self, name):
        calls.append(name)
        if len(calls) == 2:
            os.truncate(_shard(delta), 64)
        return real(self, name)

    monkeypatch.setattr(shard_reader.ShardReader, "get_tensor", cut_after_first)
    with pytest.raises(IntegrityError):
        apply(fleet["base"], delta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [[2**70, 0], [2**40, 2**40, 0], [2**62, 1]])
def test_a_header_with_an_impossible_shape_is_a_format_error(tmp_path, shape):
    """A zero-byte tensor whose other dimensions no allocator could hold passes the offset checks; it is
    refused when the header is read, not left for torch to raise on."""
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with open(path, "rb", buffering=0) as fh, pytest.raises(FormatError, match="impossible shape"):
        ShardReader(fh, path)
