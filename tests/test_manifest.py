"""The delta manifest: JSON round trip (property-based), forward compatibility and refusals."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.errors import FormatError
from deltakit.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CodecInfo,
    FileEntry,
    Manifest,
    ModelIdentity,
    TensorEntry,
)

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | names
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
tensor_entries = (
    st.builds(
        TensorEntry,
        kind=st.just("unchanged"),
        dtype=st.sampled_from(["bfloat16", "float32", "float16"]),
        shape=st.lists(st.integers(1, 4096), min_size=1, max_size=2),
        role=st.sampled_from(["linear", "embedding", "lm_head", "norm", "bias", "other"]),
    )
    | st.builds(
        TensorEntry,
        kind=st.just("encoded"),
        dtype=st.sampled_from(["bfloat16", "float32"]),
        shape=st.lists(st.integers(0, 4096), min_size=2, max_size=2),
        params=st.dictionaries(names, json_values, max_size=3),
        stored=st.dictionaries(names, names, min_size=1, max_size=3),
        layout=st.sampled_from([None, "in_out"]),
    )
    | st.builds(
        TensorEntry,
        kind=st.just("passthrough"),
        dtype=st.sampled_from(["int64", "float16"]),
        shape=st.lists(st.integers(1, 64), max_size=3),
        value=names,
        in_base=st.booleans(),
    )
)
manifests = st.builds(
    Manifest,
    codec=st.builds(
        CodecInfo,
        name=names,
        version=st.integers(1, 9),
        config=st.dictionaries(names, json_values, max_size=4),
        budget=st.fixed_dictionaries(
            {"ratio": st.none() | st.floats(0.01, 1.0), "rank": st.none() | st.integers(1, 512)}
        ),
    ),
    base=st.builds(ModelIdentity, name=names, fingerprint=names),
    target=st.builds(ModelIdentity, name=names, fingerprint=names),
    tensors=st.dictionaries(names, tensor_entries, max_size=5),
    removed=st.lists(names, max_size=3),
    files=st.dictionaries(
        st.from_regex(r"[a-z0-9_-]{1,12}(/[a-z0-9_-][a-z0-9_.-]{0,7})?\.safetensors", fullmatch=True),
        st.builds(FileEntry, sha256=names, size=st.integers(0, 2**40)),
        max_size=3,
    ),
    stats=st.dictionaries(names, json_values, max_size=3),
)


def minimal() -> Manifest:
    return Manifest(
        codec=CodecInfo("dqrelo", 1, {"compensation": "refit"}, {"ratio": 0.125, "rank": None}),
        base=ModelIdentity("base", "sha256:" + "0" * 64),
        target=ModelIdentity("ft", "sha256:" + "1" * 64),
    )


@settings(max_examples=100, deadline=None)
@given(manifests)
def test_manifest_round_trips_through_json(manifest):
    text = manifest.to_json()
    again = Manifest.from_dict(json.loads(text))
    assert again == manifest
    assert again.to_json() == text


def test_to_dict_starts_with_format_and_version():
    data = minimal().to_dict()
    assert list(data)[:2] == ["format", "format_version"]
    assert data["format"] == FORMAT_NAME and data["format_version"] == FORMAT_VERSION


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10).map(lambda s: "x_" + s), json_values, min_size=1, max_size=3
    )
)
def test_unknown_top_level_keys_warn_and_are_ignored(extra):
    data = minimal().to_dict()
    data.update(extra)
    with pytest.warns(UserWarning, match="unknown manifest key"):
        manifest = Manifest.from_dict(data)
    assert manifest == Manifest.from_dict(minimal().to_dict())


def test_known_keys_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Manifest.from_dict(minimal().to_dict())


@settings(max_examples=20, deadline=None)
@given(st.integers(FORMAT_VERSION + 1, 10_000))
def test_newer_format_version_is_refused_with_upgrade_hint(version):
    data = minimal().to_dict()
    data["format_version"] = version
    with pytest.raises(FormatError, match="newer.*upgrade deltakit"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("fmt", [None, "safetensors", "deltakit.delta2", "DELTAKIT.DELTA"])
def test_wrong_format_name_is_refused(fmt):
    data = minimal().to_dict()
    data["format"] = fmt
    with pytest.raises(FormatError, match="not a deltakit delta"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("version", [None, "1", 1.0])
def test_non_integer_format_version_is_refused(version):
    data = minimal().to_dict()
    data["format_version"] = version
    with pytest.raises(FormatError, match="format_version"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("drop", ["codec", "base", "target"])
def test_missing_required_section_is_a_format_error(drop):
    data = minimal().to_dict()
    del data[drop]
    with pytest.raises(FormatError, match="malformed"):
        Manifest.from_dict(data)


def test_read_refuses_directory_without_manifest_and_invalid_json(tmp_path):
    with pytest.raises(FormatError, match="no manifest.json"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not a JSON object"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("section", ["codec", "base", "target"])
def test_unknown_keys_inside_sections_warn_and_are_ignored(section):
    data = minimal().to_dict()
    data[section]["revision"] = "abc123"  # a field a newer minor writer might add
    with pytest.warns(UserWarning, match=f"unknown {section} key.*revision"):
        manifest = Manifest.from_dict(data)
    assert manifest == Manifest.from_dict(minimal().to_dict())


# --- validation of the typed tensor table (format version 2) ----------------------------------------


def with_tensor(entry: dict) -> dict:
    data = minimal().to_dict()
    data["tensors"] = {"w": entry}
    return data


GOOD = {"kind": "encoded", "dtype": "bfloat16", "shape": [4, 8], "role": "linear", "stored": {"up": "w::up"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "zipped"}, "unknown kind 'zipped'"),
        ({"dtype": "float13"}, "unknown dtype 'float13'"),
        ({"dtype": 16}, "dtype must be a string"),
        ({"shape": [4, -1]}, "shape must be a list of non-negative integers"),
        ({"shape": "4x8"}, "shape must be a list of non-negative integers"),
        ({"shape": [4, True]}, "shape must be a list of non-negative integers"),
        ({"stored": {"up": 3}}, "stored must map local names to key strings"),
        ({"params": [1]}, "params must be an object"),
        ({"layout": "sideways"}, "layout"),
        ({"shard": 7}, "shard"),
        ({"kind": "passthrough"}, "value is for passthrough only"),
    ],
)
def test_malformed_tensor_entries_are_one_format_error(change, message):
    with pytest.raises(FormatError, match=message) as info:
        Manifest.from_dict(with_tensor({**GOOD, **change}))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("drop", ["kind", "dtype", "shape"])
def test_tensor_entry_without_a_required_key_is_refused(drop):
    entry = {k: v for k, v in GOOD.items() if k != drop}
    with pytest.raises(FormatError, match=f"lacks {drop}"):
        Manifest.from_dict(with_tensor(entry))


@pytest.mark.parametrize("name", [None, 3, ""])
def test_codec_name_must_be_a_non_empty_string(name):
    data = minimal().to_dict()
    data["codec"]["name"] = name
    with pytest.raises(FormatError, match="codec name"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("path", ["../outside.safetensors", "/abs.safetensors", "manifest.json", "a//b"])
def test_file_paths_leaving_the_delta_directory_are_refused(path):
    data = minimal().to_dict()
    data["files"] = {path: {"sha256": "0" * 64, "size": 1}}
    with pytest.raises(FormatError, match="unsafe or reserved"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_shard_outside_the_delta_directory_is_refused_even_without_a_file_table(shard):
    with pytest.raises(FormatError, match="unsafe or reserved"):
        Manifest.from_dict(with_tensor({**GOOD, "shard": shard}))


@pytest.mark.parametrize(
    "aux",
    [
        {"../config.json": {"source": "base", "sha256": "0" * 64, "size": 1}},
        {"config.json": {"source": "delta", "path": "../../x", "sha256": "0" * 64, "size": 1}},
        {"config.json": {"source": "elsewhere", "sha256": "0" * 64, "size": 1}},
    ],
    ids=["name", "path", "source"],
)
def test_aux_files_are_checked(aux):
    data = minimal().to_dict()
    data["aux_files"] = aux
    with pytest.raises(FormatError, match="unsafe or reserved|source must be"):
        Manifest.from_dict(data)


def test_shard_must_be_a_listed_file():
    data = with_tensor({**GOOD, "shard": "other.safetensors"})
    data["files"] = {"delta-00001.safetensors": {"sha256": "0" * 64, "size": 1}}
    with pytest.raises(FormatError, match="not among the manifest's files"):
        Manifest.from_dict(data)


def test_version_1_groups_are_folded_into_the_tensor_entries():
    data = minimal().to_dict()
    data["format_version"] = 1
    data["tensors"] = {
        "w": {"kind": "encoded", "dtype": "float32", "shape": [6, 4], "role": "embedding", "group": "w",
              "base_shape": [4, 4], "stored": {"extra_rows": "w::extra_rows"}, "shard": "d.safetensors"},
        "n": {"kind": "passthrough", "dtype": "float32", "shape": [4], "role": "norm", "in_base": True,
              "stored": {"value": "n"}, "shard": "d.safetensors"},
    }  # fmt: skip
    data["groups"] = {
        "w": {"members": ["w"], "params": {"rank": 2}, "stored": {"up": "w::up"}, "shard": "d.safetensors"}
    }
    manifest = Manifest.from_dict(data)
    w, n = manifest.tensors["w"], manifest.tensors["n"]
    assert manifest.format_version == FORMAT_VERSION == 2
    assert (w.params, w.stored, w.extra_rows) == ({"rank": 2}, {"up": "w::up"}, "w::extra_rows")
    assert w.shard == "d.safetensors" and w.base_shape == [4, 4]
    assert (n.value, n.in_base, n.stored) == ("n", True, {})
    assert "groups" not in manifest.to_dict()


@pytest.mark.parametrize(
    "groups",
    [{}, {"w": {"members": ["w", "v"], "params": {}, "stored": {}}}, {"w": "not an object"}],
    ids=["missing", "not-one-to-one", "not-an-object"],
)
def test_version_1_with_a_broken_group_table_is_a_format_error(groups):
    data = minimal().to_dict()
    data["format_version"] = 1
    data["tensors"] = {"w": {"kind": "encoded", "dtype": "float32", "shape": [4, 4], "group": "w"}}
    data["groups"] = groups
    with pytest.raises(FormatError, match="malformed version-1 manifest"):
        Manifest.from_dict(data)
