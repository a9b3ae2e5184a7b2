"""The delta manifest: JSON round trip (property-based), forward compatibility and refusals."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.errors import FormatError
from deltakit.format.manifest import FORMAT_NAME, FORMAT_VERSION, CodecInfo, Manifest, ModelIdentity

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
tensor_entries = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["unchanged", "encoded", "passthrough"]),
        "dtype": st.sampled_from(["bfloat16", "float32", "float16"]),
        "shape": st.lists(st.integers(1, 4096), min_size=1, max_size=2),
        "role": st.sampled_from(["linear", "embedding", "lm_head", "norm", "bias", "other"]),
    }
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
    groups=st.dictionaries(names, st.dictionaries(names, json_values, max_size=3), max_size=3),
    removed=st.lists(names, max_size=3),
    files=st.dictionaries(
        names, st.fixed_dictionaries({"sha256": names, "size": st.integers(0, 2**40)}), max_size=3
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
