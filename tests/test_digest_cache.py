"""Remembered tensor digests: a base is hashed once, a changed or forged record is never trusted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakit
from deltakit.errors import BaseMismatchError
from deltakit.format import digest_cache, fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DELTAKIT_CACHE", str(root))
    monkeypatch.delenv(digest_cache.ENV_SWITCH, raising=False)
    return root / "digests"


@pytest.fixture
def hashed(monkeypatch):
    """Names of the tensors hashed since the fixture started."""
    names: list[str] = []
    real = fingerprint.tensor_digest

    def counting(name, tensor):
        names.append(name)
        return real(name, tensor)

    monkeypatch.setattr(fingerprint, "tensor_digest", counting)
    return names


@pytest.fixture
def pair(llama_pair, tmp_path):
    base, finetune = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(llama_pair[0], base)
    shutil.copytree(llama_pair[1], finetune)
    return base, finetune


def test_a_base_applied_to_again_is_not_hashed_again(pair, cache, hashed, tmp_path):
    base, finetune = pair
    delta = deltakit.compress(base, finetune, tmp_path / "delta", method="dqrelo")
    base_names = set(load_file(base / "model.safetensors"))
    assert base_names <= set(hashed)  # compress hashed the base (and the fine-tune) once
    hashed.clear()
    first = deltakit.apply(base, delta)  # remembered from compress; a lossy output is not hashed
    assert hashed == []
    hashed.clear()
    second = deltakit.apply(base, delta, fingerprint_output=True)
    assert len(hashed) == len(second.state_dict)  # the output's tensors only
    assert first.base_fingerprint == second.base_fingerprint == delta.manifest.base.fingerprint
    assert len(list(cache.glob("*.json"))) == 2  # base and fine-tune, one record per file


def test_compress_writes_the_same_delta_with_and_without_remembered_digests(pair, cache, tmp_path):
    base, finetune = pair
    cold = deltakit.compress(base, finetune, tmp_path / "a", method="svd")
    warm = deltakit.compress(base, finetune, tmp_path / "b", method="svd")
    assert cold.manifest.base == warm.manifest.base and cold.manifest.target == warm.manifest.target
    assert (tmp_path / "a" / "delta-00001.safetensors").read_bytes() == (
        tmp_path / "b" / "delta-00001.safetensors"
    ).read_bytes()


def test_a_changed_base_is_hashed_again_and_refused(pair, cache, tmp_path):
    base, finetune = pair
    delta = deltakit.compress(base, finetune, tmp_path / "delta", method="dqrelo")
    deltakit.apply(base, delta)  # the base's digests are remembered
    tensors = load_file(base / "model.safetensors")
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1  # same size, other bytes
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError):
        deltakit.apply(base, delta)


@pytest.mark.parametrize(
    "forge",
    [
        lambda record: "not json {",
        lambda record: json.dumps([record]),
        lambda record: json.dumps({**record, "identity": [0, 0, 0, 0, 0]}),
        lambda record: json.dumps({**record, "path": "/elsewhere/model.safetensors"}),
        lambda record: json.dumps({**record, "digests": {k: "zz" for k in record["digests"]}}),
        lambda record: json.dumps({**record, "digests": "all good"}),
    ],
)
def test_a_forged_or_broken_record_is_ignored(pair, cache, tmp_path, hashed, forge):
    base, finetune = pair
    delta = deltakit.compress(base, finetune, tmp_path / "delta", method="dqrelo")
    record_path = next(p for p in cache.glob("*.json") if "base" in json.loads(p.read_text())["path"])
    record = json.loads(record_path.read_text())
    record_path.write_text(forge(record))
    hashed.clear()
    report = deltakit.apply(base, delta)
    assert report.base_fingerprint == delta.manifest.base.fingerprint
    assert set(load_file(base / "model.safetensors")) <= set(hashed)  # hashed, not taken from the record
    assert json.loads(record_path.read_text())["identity"] == record["identity"]  # rewritten on save


def test_forged_digests_with_the_right_identity_are_what_the_switch_is_for(
    pair, cache, tmp_path, monkeypatch
):
    """A record is trusted while the file's identity holds; DELTAKIT_DIGEST_CACHE=0 ignores records."""
    base, finetune = pair
    delta = deltakit.compress(base, finetune, tmp_path / "delta", method="dqrelo")
    record_path = next(p for p in cache.glob("*.json") if "base" in json.loads(p.read_text())["path"])
    record = json.loads(record_path.read_text())
    record["digests"] = {k: "0" * 64 for k in record["digests"]}
    record_path.write_text(json.dumps(record))
    with pytest.raises(BaseMismatchError):
        deltakit.apply(base, delta)
    monkeypatch.setenv(digest_cache.ENV_SWITCH, "0")
    assert deltakit.apply(base, delta).base_fingerprint == delta.manifest.base.fingerprint


def test_the_switch_turns_the_cache_off(pair, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(digest_cache.ENV_SWITCH, "0")
    deltakit.compress(*pair, tmp_path / "delta", method="dqrelo")
    assert not cache.exists()


def test_in_memory_sources_use_no_cache(cache):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 24, generator=g)}
    target = {"w": base["w"] + 0.1}
    deltakit.apply(base, deltakit.compress(base, target, method="svd"))
    assert not cache.exists()


def test_records_beyond_the_limit_are_pruned_oldest_first(pair, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(digest_cache, "MAX_RECORDS", 3)
    cache.mkdir(parents=True)
    for i in range(5):
        (cache / f"old{i}.json").write_text("{}")
    deltakit.compress(*pair, tmp_path / "delta", method="dqrelo")  # writes two records
    names = sorted(p.name for p in cache.glob("*.json"))
    assert len(names) == 3 and not {"old0.json", "old1.json", "old2.json", "old3.json"} & set(names)
