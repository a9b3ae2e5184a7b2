"""The conformance suite every registered codec passes (future codecs are picked up automatically).

Per codec: round-trip error within the bound the codec declares (``max_error``, or its closed-form
``expected_error``), encoded size on budget at each reachable ratio, the stored tensors it declares
(dry run), its factored view, determinism under a seed, no mutation of inputs, CPU decode, dtype
preservation through compress/apply, and strict key checks at apply time. Codecs that need calibration
data are skipped.
"""

from __future__ import annotations

import dataclasses
import math

import fixtures_models as fm
import pytest
import torch

import deltakit
from deltakit.codecs.base import Budget, CodecConfig, EncodeContext, Encoded
from deltakit.errors import BudgetError, TensorMismatchError

ALL_CODECS = deltakit.list_codecs()
CODECS = [
    pytest.param(name, marks=pytest.mark.skip(reason=f"{name} needs calibration data"))
    if deltakit.get_codec(name).needs_data
    else name
    for name in ALL_CODECS
]
RATIOS = (1 / 8, 1 / 16, 1 / 32)
ROWS, COLS = 256, 768  # non-square, so a transposed factor cannot pass by accident


def matrix_pair(dtype: torch.dtype, seed: int = 0, rows: int = ROWS, cols: int = COLS):
    """(base, target) of ``dtype`` whose delta is a structured mix (low rank + sign + sparse + dense)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    target = base + 1e-3 * fm.structured_delta(rows, cols, g)
    return base.to(dtype), target.to(dtype)


def probe_ratio(codec) -> float | None:
    """1/8 when the codec reaches it, else its default ratio (None for unbudgeted codecs)."""
    if codec.default_ratio is None and codec.ratio_range is None:
        return None
    try:
        codec.check_budget(Budget(ratio=1 / 8))
        return 1 / 8
    except BudgetError:
        return codec.default_ratio


def encode(
    name: str,
    base,
    target,
    *,
    ratio=None,
    seed: int = 0,
    config: CodecConfig | None = None,
    tensor_name: str = "model.layers.0.mlp.up_proj.weight",
) -> Encoded:
    codec = deltakit.get_codec(name)
    budget = Budget(ratio=ratio)
    codec.check_budget(budget)
    ctx = EncodeContext(budget=budget, seed=seed, name=tensor_name)
    return codec.encode(base, target, config or codec.config_class(), ctx)


def true_delta(base, target) -> torch.Tensor:
    return target.float() - base.float()


def config_variants(name: str) -> list[tuple[str, CodecConfig]]:
    """The default config plus one config per non-default value of every field with choices."""
    cls = deltakit.get_codec(name).config_class
    default = cls()
    variants = [("default", default)]
    for f in dataclasses.fields(cls):
        for choice in f.metadata.get("choices", ()):
            if choice != getattr(default, f.name):
                variants.append((f"{f.name}={choice}", dataclasses.replace(default, **{f.name: choice})))
    return variants


def test_every_builtin_codec_is_registered():
    assert {"dqrelo", "bitdelta", "svd", "dare", "lossless"} <= set(ALL_CODECS)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_trip_error_is_within_the_codec_bound(name, dtype):
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(dtype)
    ratio = probe_ratio(codec)
    encoded = encode(name, base, target, ratio=ratio)
    delta = codec.decode(encoded, "cpu", base=base)
    err = fm.rel_error(delta, true_delta(base, target))
    expected = codec.expected_error(encoded)
    if expected is not None:  # e.g. DARE's drop-and-rescale: unbiased with a known variance
        assert err == pytest.approx(expected, rel=0.05)
    else:
        assert err <= codec.max_error, f"{name} at ratio {ratio}: error {err:.4f} > {codec.max_error}"
    rebuilt = codec.reconstruct(encoded, base, dtype)
    assert rebuilt.dtype == dtype and rebuilt.shape == base.shape
    if codec.max_error == 0.0:
        assert err == 0.0
        assert torch.equal(rebuilt.view(torch.uint8), target.view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(ROWS, COLS), (384, 640)])
def test_declared_stored_tensors_match_what_encode_stores(name, shape):
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.bfloat16, rows=shape[0], cols=shape[1])
    config = codec.config_class()
    for ratio in (probe_ratio(codec), *RATIOS):
        budget = Budget(ratio=ratio)
        try:
            codec.check_budget(budget)
            declared = codec.stored_tensors(shape, base.dtype, config, budget)
        except BudgetError:
            continue
        encoded = encode(name, base, target, ratio=ratio)
        assert declared.keys() == encoded.tensors.keys(), f"{name} at ratio {ratio}"
        for local, info in declared.items():
            tensor = encoded.tensors[local]
            assert str(tensor.dtype).removeprefix("torch.") == info.dtype, (name, local)
            assert info.shape is None or tuple(tensor.shape) == info.shape, (name, local, info.shape)


@pytest.mark.parametrize("name", CODECS)
def test_factored_view_decodes_to_the_same_delta(name):
    """A codec's factored view (scale·S + up·down), where it has one, is exactly what decode gives."""
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.float32)
    encoded = encode(name, base, target, ratio=probe_ratio(codec))
    view = codec.factored(encoded)
    if view is None:
        pytest.skip(f"{name} has no factored view")
    rebuilt = torch.zeros(view.shape)
    if view.signs is not None:
        from deltakit.ops.bitpack import unpack_signs

        rebuilt += unpack_signs(view.signs, view.shape, "cpu") * view.scale
    if view.up is not None:
        rebuilt += view.up.float() @ view.down.float()
    assert torch.allclose(rebuilt, codec.decode(encoded, base=base), atol=1e-6)


@pytest.mark.parametrize("name", CODECS)
def test_more_bytes_never_give_more_error(name):
    codec = deltakit.get_codec(name)
    if codec.default_ratio is None and codec.ratio_range is None:
        pytest.skip(f"{name} has no size budget")
    base, target = matrix_pair(torch.float32)
    errors = {}
    for ratio in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
        try:
            encoded = encode(name, base, target, ratio=ratio)
        except BudgetError:
            continue
        errors[ratio] = fm.rel_error(codec.decode(encoded, base=base), true_delta(base, target))
    if len(errors) < 2:
        pytest.skip(f"{name} reaches fewer than two ratios")
    values = list(errors.values())  # ratios ascending
    assert all(a >= b - 1e-6 for a, b in zip(values, values[1:], strict=False)), errors


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(ROWS, COLS), (384, 640), (640, 384)])
def test_encoded_size_matches_the_requested_budget(name, shape):
    codec = deltakit.get_codec(name)
    if codec.default_ratio is None and codec.ratio_range is None:
        pytest.skip(f"{name} has no size budget")
    base, target = matrix_pair(torch.bfloat16, rows=shape[0], cols=shape[1])
    reached = 0
    for ratio in RATIOS:
        try:
            encoded = encode(name, base, target, ratio=ratio)
        except BudgetError:
            continue
        reached += 1
        budget = ratio * 2 * base.numel()
        param_bytes = 4 * sum(isinstance(v, float) for v in encoded.params.values())
        assert encoded.nbytes + param_bytes <= budget * 1.01, f"{name} over budget at ratio {ratio}"
        # low-rank codecs lose up to one rank to flooring: a few percent at these shapes
        assert encoded.nbytes >= budget * 0.93, f"{name} at ratio {ratio}: {encoded.nbytes} of {budget:.0f}"
    assert reached >= 1, f"{name} reaches none of {RATIOS}"


def test_budget_out_of_range_is_refused():
    base, target = matrix_pair(torch.float32)
    with pytest.raises(BudgetError, match="1/16|0.0625"):
        encode("dqrelo", base, target, ratio=1 / 32)
    with pytest.raises(BudgetError, match="0.0625"):
        encode("bitdelta", base, target, ratio=1 / 8)
    with pytest.raises(BudgetError, match="smallest reachable"):
        encode("svd", base, target, ratio=1e-4)


@pytest.mark.parametrize("name", CODECS)
def test_encode_is_deterministic_under_a_seed(name):
    codec = deltakit.get_codec(name)
    for label, config in config_variants(name):
        base, target = matrix_pair(torch.bfloat16)
        first = encode(name, base, target, ratio=probe_ratio(codec), seed=5, config=config)
        second = encode(name, base.clone(), target.clone(), ratio=probe_ratio(codec), seed=5, config=config)
        assert first.params == second.params, label
        assert first.tensors.keys() == second.tensors.keys(), label
        for key in first.tensors:
            a, b = first.tensors[key], second.tensors[key]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (label, key)


@pytest.mark.parametrize("name", CODECS)
def test_every_config_choice_round_trips(name):
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.float32)
    ratio = probe_ratio(codec)
    reference = fm.rel_error(
        codec.decode(encode(name, base, target, ratio=ratio), base=base), true_delta(base, target)
    )
    for label, config in config_variants(name):
        encoded = encode(name, base, target, ratio=ratio, config=config)
        err = fm.rel_error(codec.decode(encoded, base=base), true_delta(base, target))
        assert math.isfinite(err), label
        # a choice may trade error for speed or size, but not by much: within 10% of the default
        # (or better: dare's magnitude mode and fp32 factors are far more accurate than the defaults).
        # Factors wider than the default (8 bits, or the float factors of factor_bits=16) buy less rank
        # at the same bytes (a quarter for fp16 against 4 bits): they must decode, not match its error.
        default_bits = getattr(codec.config_class(), "factor_bits", None)
        if label.startswith("factor_bits=") and int(label.split("=")[1]) > (default_bits or 99):
            assert err < 1.0, label
        else:
            assert err <= reference * 1.10 + 1e-6, f"{name} {label}: {err:.4f} vs default {reference:.4f}"
        assert type(config).from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", CODECS)
def test_encode_and_decode_do_not_mutate_inputs(name):
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.bfloat16)
    base_copy, target_copy = base.clone(), target.clone()
    encoded = encode(name, base, target, ratio=probe_ratio(codec))
    assert torch.equal(base, base_copy) and torch.equal(target, target_copy)
    stored = {k: v.clone() for k, v in encoded.tensors.items()}
    params = repr(encoded.params)
    codec.decode(encoded, "cpu", base=base)
    codec.reconstruct(encoded, base, torch.bfloat16)
    assert torch.equal(base, base_copy)
    assert all(torch.equal(stored[k], encoded.tensors[k]) for k in stored)
    assert repr(encoded.params) == params


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_decode_on_cpu_gives_dense_fp32_delta(name, device):
    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.bfloat16)
    encoded = encode(name, base, target, ratio=probe_ratio(codec))
    assert all(t.device.type == "cpu" for t in encoded.tensors.values())
    delta = codec.decode(encoded, device, base=base)
    assert delta.dtype == torch.float32 and delta.shape == base.shape and delta.device.type == "cpu"
    assert torch.isfinite(delta).all()


@pytest.mark.parametrize("name", CODECS)
def test_encoded_params_are_json_serialisable(name):
    import json

    codec = deltakit.get_codec(name)
    base, target = matrix_pair(torch.float32)
    encoded = encode(name, base, target, ratio=probe_ratio(codec))
    assert json.loads(json.dumps(encoded.params)) == encoded.params


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_compress_apply_preserves_dtypes(name, dtype, state_pair):
    base = {k: v.to(dtype) for k, v in state_pair[0].items()}
    target = {k: v.to(dtype) for k, v in state_pair[1].items()}
    delta = deltakit.compress(base, target, method=name)
    report = deltakit.apply(base, delta)
    assert report.state_dict.keys() == target.keys()
    for key, tensor in report.state_dict.items():
        assert tensor.dtype == dtype, key
        assert tensor.shape == target[key].shape, key
    assert torch.equal(report.state_dict["model.embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert torch.equal(
        report.state_dict["model.layers.0.input_layernorm.weight"],
        target["model.layers.0.input_layernorm.weight"],
    )
    # the output is hashed by default only when the codec can restore the fine-tune exactly
    assert report.matches_target is (True if name == "lossless" else None)
    assert (report.output_fingerprint is None) == (name != "lossless")
    checked = deltakit.apply(base, delta, fingerprint_output=True)
    assert checked.matches_target == (name == "lossless")
    assert checked.output_fingerprint is not None


@pytest.mark.parametrize("name", CODECS)
def test_apply_refuses_a_base_with_a_missing_or_extra_tensor(name, state_pair):
    base, target = state_pair
    delta = deltakit.compress(base, target, method=name)
    missing = {k: v for k, v in base.items() if k != "model.layers.0.self_attn.q_proj.weight"}
    with pytest.raises(TensorMismatchError, match="missing 1 tensor.*q_proj"):
        deltakit.apply(missing, delta)
    extra = {**base, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(TensorMismatchError, match="does not know.*k_proj"):
        deltakit.apply(extra, delta)


@pytest.mark.parametrize("name", CODECS)
def test_codec_describes_itself(name):
    info = deltakit.get_codec(name).describe()
    assert info["name"] == name and isinstance(info["version"], int) and info["summary"]
    for field in info["config"]:
        assert field["help"], f"{name}.{field['name']} has no help text"


# --- the done-when comparison -----------------------------------------------------------------------


def realistic_delta_pair(seed: int, rows: int = 1024, cols: int = 1024):
    """A delta that is "not very low-rank": half its energy in a rank-32 part with a decaying spectrum,
    the rest heavy-tailed dense (Student-t, 4 d.o.f.) plus 5% in sparse outliers; no planted sign part."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    delta = 1e-3 * fm.structured_delta(
        rows, cols, g, rank=32, lowrank=0.5, sign=0.0, sparse=0.05, dense=0.45, heavy_tail_df=4
    )
    return base, base + delta


@pytest.mark.parametrize("seed", [0, 1])
def test_dqrelo_beats_bitdelta_svd_and_dare_on_a_realistic_delta(seed):
    """At 1/8, dqrelo has the lowest error; at 1/16 it is exactly BitDelta (rank 0: signs only).

    Measured (seed 0): dqrelo 1/8 0.555, svd 1/8 0.645, dare 1/8 2.65 (magnitude mode 0.765),
    bitdelta 1/16 0.653. On a delta with 70% of its energy low-rank svd almost ties (0.501 vs 0.490),
    see docs/synthetic_comparison.md.
    """
    base, target = realistic_delta_pair(seed)
    truth = true_delta(base, target)

    def error(name, ratio, **config):
        codec = deltakit.get_codec(name)
        encoded = encode(name, base, target, ratio=ratio, config=codec.config_class(**config))
        return fm.rel_error(codec.decode(encoded), truth), encoded

    # the paper's setting: fp16 factors and the scale re-fit (with 4-bit factors on both sides svd gets
    # four times the rank and ties dqrelo here: 0.480 vs 0.492)
    paper = {"factor_bits": 16, "compensation": "refit"}
    dq8, _ = error("dqrelo", 1 / 8, **paper)
    dq16, dq16_enc = error("dqrelo", 1 / 16, **paper)
    bd16, bd16_enc = error("bitdelta", 1 / 16)
    svd8, _ = error("svd", 1 / 8, factor_bits=16)
    dare8, _ = error("dare", 1 / 8)
    dare8_mag, _ = error("dare", 1 / 8, mode="magnitude")
    # same size: dqrelo at 1/16 has no rank left and stores exactly BitDelta's signs and scale
    assert dq16_enc.params["rank"] == 0
    assert torch.equal(dq16_enc.tensors["signs"], bd16_enc.tensors["signs"])
    assert dq16 == pytest.approx(bd16, rel=1e-6)
    # at 1/8 dqrelo wins, each margin well above run-to-run noise
    assert dq8 < 0.9 * svd8, (dq8, svd8)
    assert dq8 < 0.9 * dare8_mag < dare8, (dq8, dare8_mag, dare8)
    assert dq8 < 0.9 * bd16, (dq8, bd16)
