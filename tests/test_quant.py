"""Integer-code packing and group-wise quantization: property tests plus fixed examples and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.errors import FormatError, UsageError
from deltakit.ops import quant
from deltakit.ops.intpack import pack_codes, packed_nbytes, unpack_codes
from deltakit.ops.quant import (
    SCHEMES,
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    quantize,
    quantized_nbytes,
)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=200))
    return torch.tensor(values, dtype=torch.int64), bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_codes_round_trips_for_every_width_and_length(case):
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_nbytes(codes.numel(), bits),)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)  # 3 bits really cost 3 bits
    assert torch.equal(unpack_codes(packed, bits, codes.numel()), codes.to(torch.uint8))
    used = (codes.numel() * bits) % 8
    if used:
        assert int(packed[-1]) >> used == 0  # padding bits are zero: the bytes are deterministic


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 3, 8, 13, 64, 1001])
def test_whole_codes_per_byte_give_the_bit_stream_bytes(bits, numel):
    """Widths that divide 8 pack and unpack whole codes per byte: the bytes of the LSB-first bit stream,
    from uint8 codes (packed in uint8 arithmetic) as from wider integers."""
    from deltakit.ops.bitpack import pack_bits, unpack_bits

    codes = torch.randint(0, 1 << bits, (numel,), generator=torch.Generator().manual_seed(numel))
    stream = ((codes[:, None] >> torch.arange(bits)) & 1).reshape(-1).bool()
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, pack_bits(stream))
    assert torch.equal(pack_codes(codes.to(torch.uint8).reshape(-1, 1), bits), packed)
    weights = 1 << torch.arange(bits)
    from_stream = (unpack_bits(packed, numel * bits).reshape(numel, bits).long() * weights).sum(1)
    assert torch.equal(unpack_codes(packed, bits, numel), from_stream.to(torch.uint8))


def test_three_bit_codes_straddle_bytes_lsb_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    stream = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert packed.tolist() == list(stream.to_bytes(3, "little"))
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


def test_pack_rejects_out_of_range_codes_and_unpack_rejects_wrong_lengths():
    with pytest.raises(UsageError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)
    for bits in (1, 2, 4):  # the uint8 form checks too
        with pytest.raises(UsageError, match="codes must lie"):
            pack_codes(torch.tensor([0, 1 << bits, 0], dtype=torch.uint8), bits)
    with pytest.raises(UsageError, match="bits"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(FormatError, match="packed codes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)  # needs 4 bytes


@st.composite
def quant_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 2**16))
    heavy = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if heavy:  # heavy tails: Student-t-like ratio of Gaussians
        x = x / (torch.rand(shape, generator=g) + 0.05)
    x = x * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    group = draw(st.integers(1, 12))
    axis = draw(st.integers(-ndim, ndim - 1))
    scheme = draw(st.sampled_from(SCHEMES))
    return x, bits, group, axis, scheme


def _element_scales(q: QuantizedTensor) -> torch.Tensor:
    """Each element's group scale, shaped like the tensor."""
    moved = list(q.shape)
    length = moved.pop(q.axis)
    per = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :length]  # (lanes, length)
    return per.reshape(moved + [length]).movedim(-1, q.axis)


@settings(max_examples=300, deadline=None)
@given(quant_case())
def test_rtn_error_is_within_half_a_step_and_bytes_are_exact(case):
    x, bits, group, axis, scheme = case
    q = quantize(x, bits, group, axis, scheme)
    out = dequantize(q)
    assert out.shape == x.shape and out.dtype == torch.float32
    step = _element_scales(q)
    assert bool(((x - out).abs() <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()).all())
    assert q.nbytes == quantized_nbytes(x.shape, bits, group, axis, scheme)
    stored = sum(t.numel() * t.element_size() for t in q.to_tensors("w.").values())
    assert stored == q.nbytes
    again = QuantizedTensor.from_tensors(q.to_tensors("w."), q.params(), "w.")
    assert torch.equal(dequantize(again), out)


def test_quantize_is_deterministic_and_does_not_mutate():
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    copy = x.clone()
    a, b = quantize(x, 3, 16, axis=0), quantize(x, 3, 16, axis=0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert torch.equal(x, copy)


def test_more_bits_give_smaller_error_and_8_bits_is_close():
    x = torch.randn(128, 96, generator=torch.Generator().manual_seed(4))
    errors = [float((dequantize(quantize(x, b, 32)) - x).norm() / x.norm()) for b in SUPPORTED_BITS]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_zero_groups_and_tiny_values_dequantize_within_bound():
    x = torch.zeros(4, 8)
    x[0, :4] = 1e-9
    q = quantize(x, 2, 4)
    out = dequantize(q)
    assert float((out - x).abs().max()) <= float(q.scales.float().max()) / 2 + 1e-12
    assert torch.equal(out[1:], torch.zeros(3, 8))


def test_quantize_rejects_bad_arguments():
    x = torch.randn(4, 4)
    for kwargs, match in [
        ({"bits": 5, "group_size": 4}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bits": 4, "group_size": 4, "scheme": "nf4"}, "scheme"),
        ({"bits": 4, "group_size": 4, "axis": 2}, "axis"),
    ]:
        with pytest.raises(UsageError, match=match):
            quantize(x, **kwargs)
    with pytest.raises(UsageError, match="finite"):
        quantize(torch.tensor([1.0, float("nan")]), 4, 2)
    with pytest.raises(UsageError, match="fp16"):
        quantize(torch.tensor([1e30]), 4, 1)


def test_from_tensors_rejects_hostile_fields():
    q = quantize(torch.randn(10, 6), 3, 4, axis=0, scheme="asymmetric")
    tensors, params = q.to_tensors("p."), q.params()
    bad_params = [
        dict(params, bits=5),
        dict(params, bits=True),
        dict(params, shape=[10, -6]),
        dict(params, shape="10x6"),
        dict(params, axis=2),
        dict(params, group_size=0),
        dict(params, scheme="nf4"),
        dict(params, packing="msb"),
        dict(params, shape=[10, 7]),  # codes no longer fit
    ]
    for bad in bad_params:
        with pytest.raises(FormatError):
            QuantizedTensor.from_tensors(tensors, bad, "p.")
    for name, value in [
        ("p.codes", tensors["p.codes"][:-1]),
        ("p.scales", tensors["p.scales"].float()),
        ("p.scales", torch.full_like(tensors["p.scales"], float("inf"))),
        ("p.zeros", torch.full_like(tensors["p.zeros"], float("nan"))),
    ]:
        with pytest.raises(FormatError):
            QuantizedTensor.from_tensors(dict(tensors, **{name: value}), params, "p.")
    missing = {k: v for k, v in tensors.items() if k != "p.zeros"}
    with pytest.raises(FormatError, match="missing"):
        QuantizedTensor.from_tensors(missing, params, "p.")


@settings(max_examples=100, deadline=None)
@given(quant_case())
def test_mse_clipping_never_has_a_larger_squared_error_than_absmax(case):
    x, bits, group, axis, scheme = case
    full = dequantize(quantize(x, bits, group, axis, scheme, clip="absmax"))
    clipped = dequantize(quantize(x, bits, group, axis, scheme, clip="mse"))
    assert float(((clipped - x) ** 2).sum()) <= float(((full - x) ** 2).sum()) * (1 + 1e-5) + 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_bytes():
    x = torch.randn(96, 200, generator=torch.Generator().manual_seed(5))
    for bits in SUPPORTED_BITS:
        cpu = quantize(x, bits, 32, axis=0, clip="absmax")
        gpu = quantize(x.cuda(), bits, 32, axis=0, clip="absmax")
        assert gpu.codes.is_cuda and torch.equal(gpu.codes.cpu(), cpu.codes)
        assert torch.equal(gpu.scales.cpu(), cpu.scales)
        assert torch.allclose(dequantize(gpu).cpu(), dequantize(cpu), rtol=0, atol=1e-6)
        clipped = quantize(x.cuda(), bits, 32, axis=0, clip="mse")
        reference = dequantize(quantize(x, bits, 32, axis=0, clip="mse"))
        gpu_error = float((dequantize(clipped).cpu() - x).norm())
        assert abs(gpu_error - float((reference - x).norm())) <= 1e-4 * float(x.norm())


def test_a_group_longer_than_the_lane_dequantizes_without_padding_to_it():
    """A stored group size may exceed the lane (one group holds it all); dequantize then allocates for
    the lane, not for the group size a hostile manifest may set to 2**31."""
    from dataclasses import replace

    x = torch.randn(6, 40)
    q = quantize(x, 4, 64, 1, "asymmetric")
    huge = replace(q, group_size=1 << 31)
    value = dequantize(huge)
    assert torch.equal(value, dequantize(q))
    assert value.untyped_storage().nbytes() <= 2 * x.numel() * 4


def test_layout_problem_names_what_the_stored_tensors_lack():
    from dataclasses import replace

    from deltakit.ops.quant import layout_problem

    q = quantize(torch.randn(6, 40), 3, 16, 1, "asymmetric")
    assert layout_problem(q) is None
    assert "codes" in layout_problem(replace(q, codes=q.codes[:-1]))
    assert "scales" in layout_problem(replace(q, scales=q.scales.T))
    assert "zeros" in layout_problem(replace(q, zeros=None))
    assert "bits" in layout_problem(replace(q, bits=5))
    assert "axis" in layout_problem(replace(q, axis=2))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_compiled_dequantize_gives_the_torch_bits(bits, scheme, monkeypatch):
    """The compiled loop (CPU) writes exactly torch's ``code * step + origin`` values, in every layout:
    lanes of odd length (4-bit codes starting mid-byte), a factor's lanes as columns (axis 0 of a
    matrix, written tile by tile), 3-D tensors, groups longer than the lane and of one value."""
    import deltakit.ops.quant as quant

    if quant.native_library() is None:
        pytest.skip("no C compiler: dequantize is the torch form")
    cases = [((37, 11), 0), ((37, 11), 1), ((576, 96), 0), ((96, 576), 1), ((70, 17), 0)]
    cases += [
        ((5, 7, 9), 1),
        ((3, 4, 130), 2),
        ((130,), 0),
        ((33,), 0),
        ((2, 1), 0),
        ((1, 5), 1),
        ((1, 1), 0),
    ]
    generator = torch.Generator().manual_seed(bits)
    for shape, axis in cases:
        for group_size in (1, 3, 16, 64, 1000):
            q = quantize(torch.randn(shape, generator=generator) * 3, bits, group_size, axis, scheme)
            compiled = dequantize(q)
            with monkeypatch.context() as patched:
                patched.setattr(quant, "native_library", lambda: None)
                reference = dequantize(q)
            assert compiled.shape == reference.shape == shape
            assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32)), (
                shape,
                axis,
                group_size,
            )


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_compiled_clip_search_chooses_as_the_torch_search(bits, scheme, monkeypatch):
    """``clip="mse"`` on the CPU runs the compiled search: the same codes, scales and offsets as the
    torch search, with padded last groups, all-zero groups and groups of one value."""
    import deltakit.ops.quant as quant

    if quant.native_library() is None:
        pytest.skip("no C compiler: the clip search is the torch form")
    generator = torch.Generator().manual_seed(10 + bits)
    for shape, axis in (((37, 11), 0), ((96, 576), 1), ((576, 96), 0), ((3, 4, 130), 2), ((2, 1), 0)):
        for group_size in (1, 3, 16, 64, 1000):
            x = torch.randn(shape, generator=generator) * 3
            x[..., :1] = 0  # all-zero groups along axis 0
            compiled = quantize(x, bits, group_size, axis, scheme, clip="mse")
            with monkeypatch.context() as patched:
                patched.setattr(quant, "native_library", lambda: None)
                reference = quantize(x, bits, group_size, axis, scheme, clip="mse")
            assert torch.equal(compiled.codes, reference.codes), (shape, axis, group_size)
            assert torch.equal(compiled.scales, reference.scales)
            assert (compiled.zeros is None) == (reference.zeros is None)
            assert compiled.zeros is None or torch.equal(compiled.zeros, reference.zeros)


def test_the_clip_search_counts_every_value_of_a_lane_longer_than_float32_counts_exactly():
    """A lane of 2**25 + 6 values in groups of 3 (the last one padded): the compiled search is told the
    lane's exact length (a float32 sum of the padding mask is not exact past 2**24) and quantizes it."""
    x = torch.randn(2**25 + 6, generator=torch.Generator().manual_seed(3))
    searched = quantize(x, 4, 3, 0, "symmetric", clip="mse")
    plain = quantize(x, 4, 3, 0, "symmetric", clip="absmax")
    assert searched.scales.shape == plain.scales.shape == (1, (2**25 + 6 + 2) // 3)
    # the search keeps ratio 1.0 (absmax) unless another has less error, group by group
    assert float((dequantize(searched) - x).square().sum()) <= float((dequantize(plain) - x).square().sum())


def _keep_bits_up_by_frexp(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The definition of quant._keep_bits_up: each value rounded up to ``bits`` significant bits."""
    fraction, exponent = torch.frexp(scales.float())
    return torch.ldexp(torch.ceil(torch.ldexp(fraction, torch.tensor(bits))), exponent - bits).to(
        torch.float16
    )


def test_scales_keep_their_significant_bits_as_the_frexp_definition_for_every_fp16():
    """_keep_bits_up adds and masks the fp16 bit patterns of normal scales (subnormal ones take the frexp
    form): the same fp16 for every finite non-negative fp16 and every width, an error where the rounded
    scale leaves the fp16 range."""
    every = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16)
    normal = torch.cat([torch.zeros(2, dtype=torch.float16), every[0x0400:]])
    for bits in range(1, quant.SCALE_BITS + 1):
        want = _keep_bits_up_by_frexp(every, bits)
        finite = torch.isfinite(want.float())
        for part in (every, normal):  # with subnormals (the frexp form) and without (the bit form)
            keep = (
                finite[: part.numel()]
                if part is every
                else torch.isfinite(_keep_bits_up_by_frexp(part, bits).float())
            )
            got = quant._keep_bits_up(part[keep], bits)
            assert torch.equal(
                got.view(torch.int16), _keep_bits_up_by_frexp(part[keep], bits).view(torch.int16)
            )
            if not bool(keep.all()):
                with pytest.raises(UsageError, match="too large for fp16"):
                    quant._keep_bits_up(part, bits)


def test_fp16_round_up_is_the_next_fp16_at_or_above_each_value():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(100_000, generator=gen) * torch.exp2(
        torch.randint(-30, 13, (100_000,), generator=gen).float()
    )
    edges = torch.tensor(
        [0.0, -0.0, 2**-24, 2**-25, -(2**-25), 2**-14, 65504.0, -65504.0, -65519.0, -70000.0]
    )
    values = torch.cat([values, edges])
    half = values.to(torch.float16)
    want = torch.where(half.float() < values, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    got = quant._fp16_up(values)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert bool((got.float() >= values).all())
    with pytest.raises(UsageError, match="too large for fp16"):
        quant._fp16_up(torch.tensor([1.0, 65519.0]))
