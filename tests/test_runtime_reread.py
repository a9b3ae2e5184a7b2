"""A delta read again after it left the runtime's caches must be the delta that was checked.

The runtime validates a delta once (every tensor decoded onto the served base); the mixed-batch kernels
then take their sizes from its views. A directory changed on disk after that would reach them unchecked,
so every later read compares the manifest with the first one and checks the files' sha256s again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_runtime_support import cached_fleet

from deltakit.errors import IntegrityError
from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


def _copy(fleet: dict, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fleet["delta"][name], tmp_path / name))


def _edit_manifest(delta_dir: Path, edit) -> None:
    path = delta_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _uncached_runtime(fleet: dict, deltas: dict[str, Path]) -> HotSwapRuntime:
    rt = HotSwapRuntime.from_pretrained(fleet["base"], host_cache_bytes=0, device_cache_bytes=0)
    for name, path in deltas.items():
        rt.add_delta(name, path)  # read, checked and validated; nothing stays cached
    return rt


def _bigger_rank_claim(data: dict) -> None:
    """A change the checks at the first read would refuse: one factored entry claims another shape."""
    entry = next(e for e in data["tensors"].values() if e.get("kind") == "encoded" and len(e["shape"]) == 2)
    entry["shape"] = [entry["shape"][0], entry["shape"][1] // 2]


@pytest.mark.parametrize("edit", [_bigger_rank_claim, lambda d: d["stats"].update(note="edited")])
def test_a_manifest_changed_after_the_first_read_is_refused_by_swaps_and_mixed_batches(fleet, tmp_path, edit):
    live = _copy(fleet, "bitdelta-1", tmp_path)
    rt = _uncached_runtime(fleet, {"bd": live, "svd": fleet["delta"]["svd-2"]})
    _edit_manifest(live, edit)
    with pytest.raises(IntegrityError, match="changed on disk since it was loaded"):
        rt.activate("bd")
    assert rt.active is None
    ids = torch.zeros(2, 3, dtype=torch.long)
    executor = MultiDeltaExecutor(rt)
    with (
        pytest.raises(IntegrityError, match="changed on disk"),
        executor.assign(["svd", "bd"]),
        torch.no_grad(),
    ):
        rt.model(input_ids=ids)


def test_a_shard_changed_after_the_first_read_is_refused_by_its_sha256(fleet, tmp_path):
    live = _copy(fleet, "svd-2", tmp_path)
    rt = _uncached_runtime(fleet, {"svd": live})
    shard = next(live.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # a value's last byte: the header still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        rt.activate("svd")


def test_a_delta_added_without_verify_is_read_again_without_it(fleet, tmp_path):
    live = _copy(fleet, "svd-2", tmp_path)
    rt = HotSwapRuntime.from_pretrained(fleet["base"], host_cache_bytes=0, device_cache_bytes=0)
    rt.add_delta("svd", live, verify=False)
    shard = next(live.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    rt.activate("svd")  # the caller's choice holds for later reads too (the manifest is still compared)
    rt.activate(None)
    _edit_manifest(live, lambda d: d["stats"].update(note="edited"))
    with pytest.raises(IntegrityError, match="changed on disk"):
        rt.activate("svd")


def test_a_prefetch_of_a_changed_delta_is_dropped_and_the_swap_reports_it(fleet, tmp_path, caplog):
    live = _copy(fleet, "svd-2", tmp_path)
    rt = _uncached_runtime(fleet, {"svd": live})
    _edit_manifest(live, lambda d: d["stats"].update(note="edited"))
    thread = rt.prefetch(["svd"])
    assert thread is not None
    thread.join(timeout=60)
    assert "changed on disk" in caplog.text
    with pytest.raises(IntegrityError, match="changed on disk"):
        rt.activate("svd")


def test_an_unchanged_delta_is_read_again_with_the_same_bits(fleet, tmp_path):
    live = _copy(fleet, "dqrelo-0", tmp_path)
    rt = _uncached_runtime(fleet, {"dq": live})
    first = rt.activate("dq")
    state = {n: p.detach().clone() for n, p in rt.model.named_parameters()}
    rt.activate(None)
    again = rt.activate("dq")
    assert first.read_bytes > 0 and again.read_bytes == first.read_bytes
    assert all(torch.equal(p, state[n]) for n, p in rt.model.named_parameters())


def test_a_cached_delta_keeps_the_bytes_it_was_checked_with_when_its_files_change_in_place(fleet, tmp_path):
    """The runtime keeps a delta read into memory, not mapped from its files: a shard rewritten in place
    (same size) or cut short while the delta is cached changes nothing it serves, and ends no process."""
    live = _copy(fleet, "svd-2", tmp_path)
    rt = HotSwapRuntime.from_pretrained(fleet["base"])  # default caches: the delta stays cached
    rt.add_delta("svd", live)
    rt.activate("svd")
    state = {n: p.detach().clone() for n, p in rt.model.named_parameters()}
    rt.activate(None)
    shard = next(live.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(b ^ 0x55 for b in data[header:])
    with open(shard, "r+b") as fh:  # in place: the same file, as `cp` over it or `rsync --inplace` do
        fh.write(data)
    stats = rt.activate("svd")
    assert stats.host_cache_hit
    assert all(torch.equal(p, state[n]) for n, p in rt.model.named_parameters())
    rt.activate(None)
    with open(shard, "r+b") as fh:
        fh.truncate(header)
    rt.activate("svd")
    assert all(torch.equal(p, state[n]) for n, p in rt.model.named_parameters())


def test_a_delta_compressed_again_from_the_same_inputs_is_the_same_delta(fleet, tmp_path):
    live = _copy(fleet, "svd-2", tmp_path)
    rt = _uncached_runtime(fleet, {"svd": live})
    _edit_manifest(live, lambda d: d.update(created="2030-01-01T00:00:00+00:00"))
    rt.activate("svd")  # only the creation time differs


def test_a_prefetch_for_an_earlier_registration_is_not_served(fleet, tmp_path):
    """A prefetch still reading when its delta is removed stores its copy after the removal; a delta
    added again under that name must not take it."""
    first, second = _copy(fleet, "svd-2", tmp_path), _copy(fleet, "dqrelo-0", tmp_path)
    rt = _uncached_runtime(fleet, {"m": first})
    rt.prefetch(["m"]).join(timeout=60)
    late = rt.prefetcher._ready["m"]
    rt.remove_delta("m")
    rt.prefetcher._ready["m"] = late  # as a read finishing after the removal stores it
    rt.add_delta("m", second)  # the same name, another delta
    stats = rt.activate("m")
    assert not stats.prefetched
    want = _uncached_runtime(fleet, {"dq": second})
    want.activate("dq")
    assert all(torch.equal(p, q) for p, q in zip(rt.model.parameters(), want.model.parameters(), strict=True))
