"""Property-based fuzzing of deltas: a mutated manifest or shard gives a clean error or the right output.

"Clean error": a :class:`deltakit.errors.DeltakitError` with a one-line message and a known exit code;
any other exception fails the test. "Right output": the tensors of a correct apply, byte for byte. Two
kinds of mutation can produce a *different* valid model, because nothing in a delta directory
authenticates the manifest itself (the registry's content address does that): a change of a value that
names or parametrises stored content (``params``, ``dtype``, ``value``, ``stored``, ``extra_rows``) and
a changed shard whose sha256 the mutation rewrote too. For those the output must still have the
reference's tensor names and shapes and be finite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltakit
from deltakit.errors import DeltakitError
from deltakit.format.safetensors_io import file_sha256

EXIT_CODES = set(range(1, 10))
CONTENT_FIELDS = {"params", "dtype", "value", "stored", "extra_rows"}
SHARD = "delta-00001.safetensors"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_pair) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    base, ft = llama_pair
    delta = root / "delta"
    deltakit.compress(base, ft, delta, method="dqrelo", ratio=0.25)
    reference = deltakit.apply(base, delta).state_dict
    return {"base": base, "delta": delta, "reference": reference}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into the JSON tree, the root excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _mutate(data: dict, path: tuple, op: str, new: Any) -> None:
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = new
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):  # rename a key
        parent[f"{last}{new!s:.6}"] = parent.pop(last)
    else:
        parent.insert(last, new)


def _rehash(delta: Path) -> None:
    data = json.loads((delta / "manifest.json").read_text())
    for rel in data["files"]:
        data["files"][rel] = {"sha256": file_sha256(delta / rel), "size": (delta / rel).stat().st_size}
    (delta / "manifest.json").write_text(json.dumps(data))


def _outcome(setup: dict, delta: Path, may_differ: bool) -> None:
    """Apply the mutated delta and check the property."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = deltakit.apply(setup["base"], delta, force=False)
    except DeltakitError as exc:
        assert exc.exit_code in EXIT_CODES
        assert "\n" not in str(exc) and str(exc)
        return
    reference = setup["reference"]
    out = report.state_dict
    assert set(out) == set(reference)
    equal = all(out[n].dtype == t.dtype and torch.equal(out[n].view(torch.uint8), t.view(torch.uint8))
                for n, t in reference.items() if out[n].shape == t.shape)  # fmt: skip
    if equal and all(out[n].shape == t.shape for n, t in reference.items()):
        return
    assert may_differ, "a mutation gave a different model without an error"
    for name, tensor in reference.items():
        assert list(out[name].shape) == list(tensor.shape)
        if out[name].is_floating_point():
            assert bool(torch.isfinite(out[name]).all())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10**6), op=st.sampled_from(["replace", "delete", "rename"]), new=json_values)
def test_fuzz_manifest(setup, pick, op, new):
    with tempfile.TemporaryDirectory() as tmp:
        delta = Path(tmp) / "delta"
        shutil.copytree(setup["delta"], delta)
        data = json.loads((delta / "manifest.json").read_text())
        paths = _paths(data)
        path = paths[pick % len(paths)]
        _mutate(data, path, op, new)
        (delta / "manifest.json").write_text(json.dumps(data))
        may_differ = path[0] == "tensors" and len(path) > 2 and path[2] in CONTENT_FIELDS
        _outcome(setup, delta, may_differ)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    header=st.booleans(),
    rehash=st.booleans(),
)
def test_fuzz_shard_bytes(setup, flips, header, rehash):
    """Random bytes of the shard (in its header or anywhere), with or without rewriting its sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        delta = Path(tmp) / "delta"
        shutil.copytree(setup["delta"], delta)
        shard = delta / SHARD
        raw = bytearray(shard.read_bytes())
        span = 8 + int.from_bytes(raw[:8], "little") if header else len(raw)
        for where, value in flips:
            raw[int(where * span)] = value
        shard.write_bytes(bytes(raw))
        if rehash:
            _rehash(delta)
        changed = bytes(raw) != (setup["delta"] / SHARD).read_bytes()
        if changed and not rehash:
            with pytest.raises(DeltakitError) as info:
                deltakit.apply(setup["base"], delta)
            assert info.value.exit_code == 4
            return
        _outcome(setup, delta, may_differ=changed)
