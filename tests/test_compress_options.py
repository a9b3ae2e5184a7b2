"""The compress options object and compressing straight into the registry (the library side of --to)."""

from __future__ import annotations

import pytest
import torch

import deltakit
from deltakit.errors import UsageError
from deltakit.publish import compress_to_registry
from deltakit.registry import Registry


def test_options_object_and_keywords_give_the_same_delta(state_pair):
    base, target = state_pair
    options = deltakit.CompressOptions(method="svd", rank=3, seed=2)
    by_object = deltakit.compress(base, target, options=options)
    by_keywords = deltakit.compress(base, target, method="svd", rank=3, seed=2)
    assert by_object.manifest.tensors == by_keywords.manifest.tensors
    assert by_object.manifest.codec == by_keywords.manifest.codec
    # keywords replace the object's fields
    replaced = deltakit.compress(base, target, options=options, rank=2)
    assert {e.params["rank"] for e in replaced.manifest.tensors.values() if e.kind == "encoded"} == {2}


def test_unknown_option_names_the_valid_ones(state_pair):
    with pytest.raises(UsageError, match="unknown compress option.*rnak.*valid:.*rank"):
        deltakit.compress(*state_pair, rnak=3)


def test_compress_without_base_points_to_compress_model(state_pair):
    with pytest.raises(UsageError, match="compress_model"):
        deltakit.compress(None, state_pair[1])


def test_compress_model_refuses_a_delta_only_codec(tmp_path, state_pair):
    with pytest.raises(UsageError, match="dqrelo compresses deltas only; pass base="):
        deltakit.compress_model(tmp_path / "model", tmp_path / "out", method="dqrelo")


@pytest.mark.parametrize("keep", [False, True], ids=["staged", "kept"])
def test_compress_to_registry_pushes_and_cleans_its_staging(llama_pair, tmp_path, keep):
    base, target = llama_pair
    registry = Registry.open(tmp_path / "reg")
    output = tmp_path / "delta" if keep else None
    delta, pushed = compress_to_registry(
        base, target, "chat:v1", registry=registry, output=output, method="svd"
    )
    assert pushed["ref"] == "chat:v1" and pushed["codec"] == "svd"
    assert (delta.path is not None) == keep and (tmp_path / "delta").is_dir() == keep
    rebuilt = deltakit.apply(base, registry.resolve_delta("chat:v1")).state_dict
    direct = deltakit.apply(base, deltakit.compress(base, target, method="svd")).state_dict
    assert rebuilt.keys() == direct.keys() and all(torch.equal(rebuilt[k], direct[k]) for k in direct)


def test_stored_tensors_other_than_the_codec_declares_are_refused(state_pair):
    from deltakit.errors import FormatError

    base, target = state_pair
    delta = deltakit.compress(base, target, method="dqrelo")
    name = next(n for n, e in delta.manifest.tensors.items() if e.kind == "encoded")
    entry = delta.manifest.tensors[name]
    # as a tampered manifest would say
    entry.stored = {k: v for k, v in entry.stored.items() if k != "up_codes"}
    with pytest.raises(
        FormatError,
        match=r"stores \['down_codes', 'down_scales', 'signs', 'up_scales'\], codec dqrelo expects "
        r"\['down_codes', 'down_scales', 'signs', 'up_codes', 'up_scales'\]",
    ):
        deltakit.apply(base, delta)
