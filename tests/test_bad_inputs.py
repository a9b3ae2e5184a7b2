"""Bad inputs through the Python API: each is a specific DeltakitError, never a silent fallback."""

from __future__ import annotations

import json
import os
import threading

import fixtures_models as fm
import pytest
import torch

import deltakit
from deltakit.errors import (
    BaseMismatchError,
    BudgetError,
    ConfigError,
    FormatError,
    IntegrityError,
    NonFiniteError,
    TensorMismatchError,
    UnknownCodecError,
    UsageError,
)


@pytest.fixture(scope="module")
def saved_delta(tmp_path_factory, llama_pair):
    """A dqrelo delta on disk (tests copy it before damaging it)."""
    out = tmp_path_factory.mktemp("saved") / "delta"
    deltakit.compress(llama_pair[0], llama_pair[1], out, method="dqrelo")
    return out


@pytest.fixture
def delta_copy(saved_delta, tmp_path):
    import shutil

    dst = tmp_path / "delta"
    shutil.copytree(saved_delta, dst)
    return dst


def shard_of(delta_dir):
    return sorted(delta_dir.glob("delta-*.safetensors"))[0]


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, llama_pair):
    """A checkpoint dir with the Llama base's names, shapes and files, one value changed: another model."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("other") / "base"
    shutil.copytree(llama_pair[0], out)
    state = fm.load_state(llama_pair[0])
    state["model.norm.weight"][0] += 1.0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- wrong base -------------------------------------------------------------------------------------


def test_wrong_base_is_refused_and_leaves_no_output(other_base, saved_delta, tmp_path):
    with pytest.raises(BaseMismatchError, match="fingerprint.*force=True"):
        deltakit.apply(other_base, saved_delta, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_force_applies_to_a_wrong_base_with_a_warning(other_base, saved_delta, tmp_path):
    with pytest.warns(UserWarning, match="applying anyway"):
        report = deltakit.apply(other_base, saved_delta, tmp_path / "out", force=True)
    assert (tmp_path / "out").is_dir() and report.base_fingerprint != deltakit.load_delta(
        saved_delta
    ).manifest.base.fingerprint


def test_verify_with_wrong_base_raises(other_base, saved_delta):
    with pytest.raises(BaseMismatchError):
        deltakit.verify(saved_delta, base=other_base)


# --- damaged delta files ----------------------------------------------------------------------------


def corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage", [corrupt_byte, truncate], ids=["corrupted", "truncated"])
def test_damaged_shard_raises_integrity_error_everywhere(damage, delta_copy, llama_pair, tmp_path):
    damage(shard_of(delta_copy))
    with pytest.raises(IntegrityError, match="corrupted" if damage is corrupt_byte else "truncated"):
        deltakit.load_delta(delta_copy)
    with pytest.raises(IntegrityError):
        deltakit.verify(delta_copy)
    with pytest.raises(IntegrityError):
        deltakit.apply(llama_pair[0], delta_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the safetensors JSON header: reading the file fails before any hash check
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [corrupt_byte, corrupt_header], ids=["payload", "header"])
@pytest.mark.parametrize("to_disk", [True, False], ids=["to-disk", "in-memory"])
def test_apply_checks_sha256s_beside_the_rebuild_and_reports_the_mismatch(
    damage, to_disk, delta_copy, llama_pair, tmp_path
):
    """apply hashes the delta's files on a background thread while it rebuilds: a damaged file is still
    an IntegrityError, on disk (nothing written) and in memory (no state dict returned), also when the
    damage makes the rebuild itself fail first (a broken header)."""
    damage(shard_of(delta_copy))
    out = tmp_path / "out" if to_disk else None
    with pytest.raises(IntegrityError, match="corrupted") as caught:
        deltakit.apply(llama_pair[0], delta_copy, out)
    assert caught.value.__cause__ is not caught.value
    assert not (tmp_path / "out").exists()


def _slow_sha256(monkeypatch, seconds_per_kib: float) -> None:
    """The background check hashes 1 KiB per read, each taking ``seconds_per_kib``."""
    import functools
    import hashlib
    import time
    import types

    from deltakit.format import delta as delta_format

    original = delta_format.check_sha256s

    class Slow:
        def __init__(self):
            self._inner = hashlib.sha256()

        def update(self, block):
            time.sleep(seconds_per_kib)
            self._inner.update(block)

        def hexdigest(self):
            return self._inner.hexdigest()

    monkeypatch.setattr(delta_format, "hashlib", types.SimpleNamespace(sha256=Slow))
    monkeypatch.setattr(delta_format, "check_sha256s", functools.partial(original, chunk=1024))


def _verify_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("deltakit-verify")]


def test_an_interrupted_apply_stops_its_background_check(monkeypatch, delta_copy, llama_pair, tmp_path):
    """Ctrl-C during apply: the sha256 check on its thread stops at its next read instead of hashing
    the rest of the delta (which the interpreter would wait for at exit)."""
    import time

    assert shard_of(delta_copy).stat().st_size > 20 * 1024  # > 1 s of slowed hashing
    _slow_sha256(monkeypatch, 0.05)

    def interrupt(index, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deltakit.apply(llama_pair[0], delta_copy, tmp_path / "out", progress=interrupt)
    deadline = time.monotonic() + 0.5
    while _verify_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _verify_threads()
    assert not (tmp_path / "out").exists()


def test_a_usage_error_does_not_wait_for_the_background_check(monkeypatch, delta_copy, llama_pair, tmp_path):
    import time

    _slow_sha256(monkeypatch, 0.05)
    start = time.monotonic()
    with pytest.raises(UsageError, match="floating"):
        deltakit.apply(llama_pair[0], delta_copy, tmp_path / "out", dtype=torch.int8)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("replacement", ["symlink", "fifo"])
def test_a_file_swapped_after_the_listing_is_refused_by_the_sha256_check(delta_copy, tmp_path, replacement):
    """Between the listing (sizes) and the background sha256 read, a shard replaced by a symbolic link
    to a same-content file, or by a FIFO, is an IntegrityError, not a read through the link or a hang."""
    import shutil

    from deltakit.format.delta import check_listed_files, check_sha256s
    from deltakit.format.manifest import Manifest

    checks = check_listed_files(delta_copy, Manifest.read(delta_copy))
    shard = shard_of(delta_copy)
    elsewhere = tmp_path / "same-bytes.safetensors"
    shutil.copyfile(shard, elsewhere)
    shard.unlink()
    if replacement == "symlink":
        shard.symlink_to(elsewhere)
    else:
        os.mkfifo(shard)
    with pytest.raises(IntegrityError, match="cannot be read|no longer a plain file"):
        check_sha256s(delta_copy, checks)


def test_missing_shard_raises_integrity_error(delta_copy):
    shard_of(delta_copy).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        deltakit.load_delta(delta_copy)


def test_newer_manifest_format_version_is_refused(delta_copy, llama_pair):
    manifest = json.loads((delta_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (delta_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="newer"):
        deltakit.load_delta(delta_copy)
    with pytest.raises(FormatError, match="newer"):
        deltakit.apply(llama_pair[0], delta_copy)


def test_unknown_codec_in_manifest_is_refused(delta_copy):
    manifest = json.loads((delta_copy / "manifest.json").read_text())
    manifest["codec"]["name"] = "zipzap"
    (delta_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnknownCodecError, match="zipzap.*known methods"):
        deltakit.load_delta(delta_copy)


def test_newer_codec_version_is_refused(delta_copy):
    manifest = json.loads((delta_copy / "manifest.json").read_text())
    manifest["codec"]["version"] = 99
    (delta_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="upgrade"):
        deltakit.load_delta(delta_copy)


def test_not_a_delta_directory(tmp_path):
    with pytest.raises(FormatError, match="manifest.json"):
        deltakit.load_delta(tmp_path)


# --- key and shape mismatches -----------------------------------------------------------------------


def test_apply_to_base_missing_or_with_extra_tensors(saved_delta, llama_pair):
    state = fm.load_state(llama_pair[0])
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(TensorMismatchError, match="missing 1.*lm_head.weight"):
        deltakit.apply(missing, saved_delta)
    with pytest.raises(TensorMismatchError, match="does not know.*extra.weight"):
        deltakit.apply({**state, "extra.weight": torch.zeros(2, 2)}, saved_delta)


def test_apply_to_base_with_wrong_shape(saved_delta, llama_pair):
    state = fm.load_state(llama_pair[0])
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    with pytest.raises(TensorMismatchError, match="up_proj.*shape"):
        deltakit.apply(state, saved_delta)


def test_shape_mismatch_at_compress_time(state_pair):
    base, target = state_pair
    target = {**target, "model.layers.0.mlp.up_proj.weight": torch.zeros(96, 65)}
    with pytest.raises(TensorMismatchError, match="up_proj.*differ"):
        deltakit.compress(base, target)


def test_shrunken_embedding_is_a_mismatch_not_a_resize(state_pair):
    base, target = state_pair
    target = {**target, "model.embed_tokens.weight": target["model.embed_tokens.weight"][:100]}
    with pytest.raises(TensorMismatchError, match="embed_tokens"):
        deltakit.compress(base, target)


# --- non-finite values ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["base", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_refused(state_pair, where, bad, tmp_path):
    base, target = (dict(d) for d in state_pair)
    victim = base if where == "base" else target
    tensor = victim["model.layers.0.self_attn.q_proj.weight"].clone()
    tensor[3, 5] = bad
    victim["model.layers.0.self_attn.q_proj.weight"] = tensor
    with pytest.raises(NonFiniteError, match="q_proj"):
        deltakit.compress(base, target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_bf16_vector_is_refused(state_pair):
    base, target = (dict(d) for d in state_pair)
    norm = target["model.layers.0.input_layernorm.weight"].to(torch.bfloat16).clone()
    norm[0] = float("nan")
    target["model.layers.0.input_layernorm.weight"] = norm
    with pytest.raises(NonFiniteError):
        deltakit.compress(base, target)


# --- method, config and budget ----------------------------------------------------------------------


def test_unknown_method_lists_known_ones(state_pair):
    with pytest.raises(UnknownCodecError) as info:
        deltakit.compress(*state_pair, method="qlora9000")
    for name in deltakit.list_codecs():
        assert name in str(info.value)
    with pytest.raises(UnknownCodecError):
        deltakit.get_codec("qlora9000")


def test_unknown_config_key_via_overrides(state_pair):
    with pytest.raises(ConfigError, match="bogus.*valid keys.*compensation"):
        deltakit.compress(*state_pair, method="dqrelo", overrides={"bogus": "1"})


def test_unknown_config_key_via_dict(state_pair):
    with pytest.raises(ConfigError, match="bogus"):
        deltakit.compress(*state_pair, method="svd", config={"bogus": 1})


@pytest.mark.parametrize("overrides", [{"compensation": "magic"}, {"rounds": "two"}, {"svd_method": "qr"}])
def test_bad_config_values_name_the_choices(state_pair, overrides):
    with pytest.raises(ConfigError):
        deltakit.compress(*state_pair, method="dqrelo", overrides=overrides)


def test_overrides_parse_types(state_pair):
    delta = deltakit.compress(
        *state_pair,
        method="dqrelo",
        overrides={"rounds": "3", "compensation": "alternate", "factor_dtype": "float32"},
    )
    assert delta.manifest.codec.config["rounds"] == 3
    assert delta.manifest.codec.config["factor_dtype"] == "float32"


def test_config_of_another_codec_is_refused(state_pair):
    svd_config = deltakit.get_codec("svd").config_class()
    with pytest.raises(UsageError, match="does not belong"):
        deltakit.compress(*state_pair, method="dqrelo", config=svd_config)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("dqrelo", {"ratio": 1 / 32}),
        ("bitdelta", {"ratio": 1 / 8}),
        ("dqrelo", {"ratio": 1.5}),
        ("dqrelo", {"ratio": 0.0}),
        ("svd", {"rank": 0}),
        ("dare", {"rank": 4}),
        ("bitdelta", {"rank": 2}),
    ],
)
def test_unreachable_budgets_raise_budget_error(state_pair, method, kwargs):
    with pytest.raises(BudgetError):
        deltakit.compress(*state_pair, method=method, **kwargs)


def test_ratio_and_rank_together_are_refused(state_pair):
    with pytest.raises(BudgetError, match="not both"):
        deltakit.compress(*state_pair, method="svd", ratio=0.1, rank=2)


def test_cuda_device_without_cuda_is_a_usage_error(state_pair):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UsageError, match="no CUDA"):
        deltakit.compress(*state_pair, device="cuda")


# --- output directories and atomicity ---------------------------------------------------------------


def test_existing_output_dir_needs_overwrite(state_pair, tmp_path):
    out = tmp_path / "delta"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists.*overwrite"):
        deltakit.compress(*state_pair, out)
    assert (out / "keep.txt").exists()
    deltakit.compress(*state_pair, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_existing_apply_output_needs_overwrite(state_pair, tmp_path):
    delta = deltakit.compress(*state_pair, tmp_path / "delta")
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        deltakit.apply(state_pair[0], delta, tmp_path / "out")
    deltakit.apply(state_pair[0], delta, tmp_path / "out", overwrite=True)
    assert list((tmp_path / "out").glob("*.safetensors"))


def _count_disk_syncs(monkeypatch) -> dict[str, int]:
    """Count fsync and sync_file_range calls made through deltakit's atomic writes."""
    import deltakit.format.atomic as atomic
    import deltakit.format.safetensors_io as sio

    calls = {"fsync": 0, "writeback": 0}
    real_fsync, real_writeback = os.fsync, sio.start_writeback

    def fsync(fd):
        calls["fsync"] += 1
        return real_fsync(fd)

    def writeback(*args):
        calls["writeback"] += 1
        return real_writeback(*args)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(sio, "start_writeback", writeback)
    monkeypatch.setattr(sio, "WRITEBACK_BYTES", 1)  # ask for writeback after every tensor
    return calls


def test_apply_without_sync_writes_the_same_bytes_and_never_syncs(state_pair, tmp_path, monkeypatch):
    delta = deltakit.compress(*state_pair, tmp_path / "delta")
    calls = _count_disk_syncs(monkeypatch)
    synced = deltakit.apply(state_pair[0], delta, tmp_path / "synced")
    assert calls["fsync"] >= 3 and calls["writeback"] >= 1  # files, the directory, its parent
    calls.update(fsync=0, writeback=0)
    unsynced = deltakit.apply(state_pair[0], delta, tmp_path / "unsynced", sync=False)
    assert calls == {"fsync": 0, "writeback": 0}
    assert unsynced.output_fingerprint == synced.output_fingerprint
    for path in (tmp_path / "synced").iterdir():
        assert path.read_bytes() == (tmp_path / "unsynced" / path.name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta", "synced", "unsynced"]  # no temps left


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_compress_leaves_no_output_and_no_temp_dir(llama_pair, tmp_path, monkeypatch, overwrite):
    codec_cls = type(deltakit.get_codec("dqrelo"))
    original = codec_cls.encode
    calls, lock = {"n": 0}, threading.Lock()

    def failing_encode(self, *args, **kwargs):
        with lock:  # encode runs on several worker threads
            calls["n"] += 1
            failing = calls["n"] > 3
        if failing:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(codec_cls, "encode", failing_encode)
    out = tmp_path / "delta"
    if overwrite:  # a previous delta under the same name must survive the failed run untouched
        out.mkdir()
        (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="disk on fire"):
        deltakit.compress(
            llama_pair[0], llama_pair[1], out, method="dqrelo", overwrite=overwrite, max_shard_bytes=1
        )  # flush a shard after every tensor: files exist mid-run
    # the run stops at the failing tensor; tensors queued behind it that workers had already started
    # finish first (ordered_map keeps at most 2 * workers + 2 in flight, the failing one included)
    assert 4 <= calls["n"] <= 4 + 2 * torch.get_num_threads() + 1
    assert out.exists() == overwrite
    if overwrite:
        assert os.listdir(out) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["delta"] if overwrite else [])


def test_stale_temp_dir_of_a_dead_process_is_cleaned(state_pair, tmp_path):
    stale = tmp_path / ".delta.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"\0" * 10)
    deltakit.compress(*state_pair, tmp_path / "delta")
    assert not stale.exists()
