"""read_delta: a delta read whole into memory, checked on the bytes read (what the runtime keeps)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_runtime_support import cached_fleet

from deltakit.errors import FormatError, IntegrityError
from deltakit.format.delta import load_delta, read_delta
from deltakit.format.safetensors_io import tensors_from_bytes


@pytest.fixture()
def delta(tmp_path: Path) -> Path:
    return Path(shutil.copytree(cached_fleet("llama")["delta"]["svd-2"], tmp_path / "d"))


def _shard(delta_dir: Path) -> Path:
    return next(delta_dir.glob("*.safetensors"))


def test_the_tensors_are_those_on_disk_and_own_their_memory(delta):
    mapped, held = load_delta(delta), read_delta(delta)
    assert held.in_memory
    for entry in held.manifest.tensors.values():
        for key in entry.stored.values():
            a, b = mapped.stored_tensor(key, entry.shard), held.stored_tensor(key, entry.shard)
            assert a.dtype == b.dtype and torch.equal(a, b)
    _shard(delta).write_bytes(b"")  # the files no longer matter
    assert all(torch.isfinite(t.float()).all() for t in held._stored.values())


def test_files_that_differ_from_the_manifest_are_refused(delta):
    shard = _shard(delta)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        read_delta(delta)
    read_delta(delta, verify=False)  # the caller's choice: read as it is
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(IntegrityError, match="manifest says"):
        read_delta(delta)


def test_a_listed_file_that_is_a_link_is_refused(delta, tmp_path):
    shard = _shard(delta)
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(FormatError, match="symbolic link"):
        read_delta(delta)
    with pytest.raises(FormatError, match="symbolic link"):
        read_delta(delta, verify=False)


def test_a_damaged_header_is_one_format_error():
    with pytest.raises(FormatError, match="too short"):
        tensors_from_bytes(b"\x01", "x")
    with pytest.raises(FormatError, match="header length"):
        tensors_from_bytes((1 << 40).to_bytes(8, "little") + b"{}", "x")
    with pytest.raises(FormatError, match="damaged"):
        tensors_from_bytes((3).to_bytes(8, "little") + b"{x}", "x")
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(FormatError, match="spans 4 bytes"):
        tensors_from_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4, "x")


def test_an_entry_whose_key_is_not_in_its_own_shard_is_refused(delta):
    path = delta / "manifest.json"
    data = json.loads(path.read_text())
    entry = next(e for e in data["tensors"].values() if e.get("stored"))
    local = next(iter(entry["stored"]))
    entry["stored"][local] = "no-such-key"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="holds no single tensor 'no-such-key'"):
        read_delta(delta)
