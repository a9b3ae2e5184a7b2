"""Quantized low-rank factors (svd, dqrelo) and the mixed-precision deltacome codec, one matrix at a time."""

from __future__ import annotations

import math

import pytest
import torch
from manifest_support import copy_without_config_fields
from test_codecs_conformance import matrix_pair

import deltakit
from deltakit.codecs.base import Budget, EncodeContext, Encoded
from deltakit.errors import BudgetError, FormatError

BITS = (8, 4, 3, 2)


def _encode(name: str, ratio: float | None = None, rank: int | None = None, **config):
    codec = deltakit.get_codec(name)
    cfg = codec.config_class.from_dict(config)
    base, target = matrix_pair(torch.float32)
    enc = codec.encode(base, target, cfg, EncodeContext(budget=Budget(ratio=ratio, rank=rank), name="w"))
    return codec, cfg, enc, (target - base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", ["svd", "dqrelo"])
def test_quantized_factors_are_declared_exactly_and_fit_the_budget(name, bits):
    codec, cfg, enc, delta = _encode(name, ratio=1 / 8, factor_bits=bits, factor_group=32)
    declared = codec.stored_tensors(tuple(delta.shape), torch.float32, cfg, Budget(ratio=1 / 8))
    assert set(declared) == set(enc.tensors)
    for local, spec in declared.items():
        assert (
            tuple(enc.tensors[local].shape) == spec.shape
            and str(enc.tensors[local].dtype) == f"torch.{spec.dtype}"
        )
    budget = 2 * delta.numel() / 8
    assert enc.nbytes <= budget
    # the rank is the largest that fits: one more would exceed
    rows, cols = delta.shape
    fixed = (delta.numel() + 7) // 8 if name == "dqrelo" else 0
    assert fixed + cfg.pair_nbytes(rows, cols, enc.params["rank"] + 1) > budget
    assert (
        enc.params["factors"]["up"]["bits"] == bits and enc.params["factors"]["up"]["packing"] == "lsb-stream"
    )


@pytest.mark.parametrize("bits", BITS)
def test_quantization_error_of_the_product_is_within_its_model(bits):
    """At a fixed rank, quantized factors differ from the fp32 product by about √(2ε+ε²) of it (ε measured)."""
    _, cfg, quant, delta = _encode("svd", rank=16, factor_bits=bits, factor_rounding="rtn")
    _, _, exact, _ = _encode("svd", rank=16, factor_bits=16, factor_dtype="float32")
    svd = deltakit.get_codec("svd")
    product = svd.decode(exact)
    err = _rel(svd.decode(quant), product)
    assert 0 < err <= 1.5 * math.sqrt(cfg.rel_sq_error())


def test_more_factor_bits_at_the_same_rank_never_hurt():
    svd = deltakit.get_codec("svd")
    errors = [
        _rel(svd.decode(_encode("svd", rank=16, factor_bits=b)[2]), _encode("svd", rank=16)[3]) for b in BITS
    ]
    assert errors == sorted(errors)


def test_quantized_factors_buy_rank_and_lower_error_at_one_eighth():
    svd = deltakit.get_codec("svd")
    _, _, fp16, delta = _encode("svd", ratio=1 / 8, factor_bits=16)
    _, _, q4, _ = _encode("svd", ratio=1 / 8, factor_bits=4)
    assert q4.params["rank"] >= 3 * fp16.params["rank"]
    assert _rel(svd.decode(q4), delta) < _rel(svd.decode(fp16), delta)


def test_dqrelo_keeps_a_residual_just_above_one_sixteenth_with_quantized_factors():
    codec, _, enc, delta = _encode("dqrelo", ratio=1 / 16 + 1 / 64, factor_bits=3)
    assert enc.params["rank"] > 0
    bitdelta = deltakit.get_codec("bitdelta")
    _, _, signs, _ = _encode("bitdelta", ratio=1 / 16)
    assert _rel(codec.decode(enc), delta) < _rel(bitdelta.decode(signs), delta)


def test_dqrelo_below_one_sixteenth_names_the_codecs_that_go_lower():
    with pytest.raises(BudgetError, match="svd, deltacome and dare"):
        _encode("dqrelo", ratio=1 / 32, factor_bits=2)


def test_fp16_configs_without_factor_bits_still_mean_fp16():
    """A stored config without factor_bits (written before it existed) means fp16; a new one means 4 bits."""
    config_class = deltakit.get_codec("svd").config_class
    cfg = config_class.from_stored({"factor_dtype": "float16"})
    assert cfg.factor_bits == 16 and not cfg.quantized
    fresh = config_class.from_dict({"factor_dtype": "float16"})
    assert fresh.factor_bits == 4 and fresh.quantized


@pytest.mark.parametrize("name,config", [("svd", {"factor_bits": 4}), ("deltacome", {})])
def test_tampered_quantized_params_are_format_errors(name, config):
    codec, _, enc, _ = _encode(name, ratio=1 / 16, **config)
    params = dict(enc.params)
    if name == "svd":
        params["factors"] = {**params["factors"], "up": {**params["factors"]["up"], "shape": [7, 3]}}
    else:
        params["blocks"] = [{**params["blocks"][0], "bits": 5}, *params["blocks"][1:]]
    with pytest.raises(FormatError):
        codec.decode(Encoded(enc.tensors, params))
    short = dict(enc.tensors)
    short["up_codes"] = short["up_codes"][:-1]
    with pytest.raises(FormatError):
        codec.decode(Encoded(short, enc.params))


@pytest.mark.parametrize("ratio", [1 / 8, 1 / 16, 1 / 32, 1 / 64])
def test_deltacome_beats_fp16_svd_at_the_same_bytes(ratio):
    come, _, enc, delta = _encode("deltacome", ratio=ratio)
    svd, _, plain, _ = _encode("svd", ratio=ratio, factor_bits=16)
    assert enc.nbytes <= 2 * delta.numel() * ratio
    bits = [b["bits"] for b in enc.params["blocks"]]
    assert bits == sorted(bits, reverse=True) and len(set(bits)) == len(bits)
    assert _rel(come.decode(enc), delta) < _rel(svd.decode(plain), delta)


def test_deltacome_split_follows_the_budget():
    """A larger budget keeps more singular vectors at a higher width (the split is not a fixed table)."""
    splits = {
        r: {b["bits"]: b["rank"] for b in _encode("deltacome", ratio=r)[2].params["blocks"]}
        for r in (1 / 64, 1 / 8)
    }
    assert sum(splits[1 / 8].values()) > sum(splits[1 / 64].values())
    assert splits[1 / 8] != splits[1 / 64]


def test_deltacome_refuses_a_rank_budget_and_a_too_small_ratio():
    with pytest.raises(BudgetError, match="ratio"):
        _encode("deltacome", rank=4)
    with pytest.raises(BudgetError, match="no singular vector"):
        _encode("deltacome", ratio=1e-4)


@pytest.mark.parametrize(
    "name,config", [("svd", {"factor_bits": 3}), ("dqrelo", {"factor_bits": 4}), ("deltacome", {})]
)
def test_candidates_price_exactly_what_encode_stores(name, config):
    codec = deltakit.get_codec(name)
    cfg = codec.config_class.from_dict(config)
    base, target = matrix_pair(torch.float32)
    delta = target - base
    options = codec.candidates(tuple(delta.shape), codec.spectrum(delta, cfg), cfg)
    assert len(options) >= 5
    for c in options[:: max(1, len(options) // 4)]:
        enc = codec.encode(base, target, cfg, EncodeContext(budget=c.budget, name="w"))
        assert enc.nbytes + codec.param_bytes == c.nbytes
        # the modelled error tracks the measured one
        assert math.sqrt(c.error) / float(delta.norm()) == pytest.approx(
            _rel(codec.decode(enc), delta), abs=0.08
        )


@pytest.mark.parametrize("name", ["svd", "dqrelo"])
def test_deltas_written_without_factor_fields_decode_as_fp16_bit_exactly(name, llama_pair, tmp_path):
    """A manifest whose config predates factor_bits/factor_group/factor_rounding holds fp16 factors."""
    base, target = llama_pair
    fp16 = deltakit.compress(base, target, tmp_path / "fp16", method=name, overrides={"factor_bits": "16"})
    encoded = [e for e in fp16.manifest.tensors.values() if e.kind == "encoded" and e.params["rank"] > 0]
    assert encoded and all({"up", "down"} <= set(e.stored) and "factors" not in e.params for e in encoded)
    old = copy_without_config_fields(fp16.path, tmp_path / "old")
    loaded = deltakit.load_delta(old)
    codec = deltakit.get_codec(name)
    assert codec.config_class.from_stored(loaded.manifest.codec.config).factor_bits == 16
    assert codec.config_class().factor_bits == 4  # today's default differs: the stored default decides
    assert deltakit.verify(old)["files_checked"] >= 1
    now = deltakit.apply(base, fp16.path).state_dict
    then = deltakit.apply(base, old).state_dict
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)
