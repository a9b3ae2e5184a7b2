"""Scales with few significant bits make factor products exact in fp32, and the fused rebuild uses fused
multiply-adds only where they are: its bits stay those of the separate multiply and add."""

from __future__ import annotations

import pytest
import torch

from deltakit.codecs.registry import get_codec
from deltakit.errors import UsageError
from deltakit.ops import fused
from deltakit.ops.factors import quantize_factors
from deltakit.ops.quant import SCALE_BITS, dequantize, exact_product_bits, quantize


def significant_bits(x: torch.Tensor) -> int:
    """The most significant bits any value of ``x`` carries (0 for all zeros)."""
    fraction, _ = torch.frexp(x.double().flatten())
    bits = 0
    while not torch.equal(
        torch.ldexp(fraction, torch.tensor(bits)).round(), torch.ldexp(fraction, torch.tensor(bits))
    ):
        bits += 1  # 2^bits · fraction is an integer once ``bits`` covers every significant bit
    return bits


@pytest.mark.parametrize("scale_bits", [1, 5, 8, 10])
@pytest.mark.parametrize("clip", ["absmax", "mse"])
def test_scales_keep_at_most_scale_bits_and_the_error_bound_holds(scale_bits, clip):
    gen = torch.Generator().manual_seed(scale_bits)
    x = torch.randn(48, 70, generator=gen) * torch.logspace(-6, 2, 70)
    q = quantize(x, 4, 16, axis=1, clip=clip, scale_bits=scale_bits)
    assert q.scales.dtype == torch.float16
    assert significant_bits(q.scales) <= scale_bits
    if clip == "absmax":  # rounded up: every value stays inside its group's grid
        step = q.scales.float().repeat_interleave(16, dim=1)[:, :70]
        assert bool(((dequantize(q) - x).abs() <= step / 2 * (1 + 1e-6)).all())


def test_all_scale_bits_is_the_plain_quantizer():
    x = torch.randn(33, 40, generator=torch.Generator().manual_seed(2))
    a, b = quantize(x, 3, 8, clip="mse"), quantize(x, 3, 8, clip="mse", scale_bits=SCALE_BITS)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_fewer_scale_bits_cost_little_accuracy():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    full = float((dequantize(quantize(x, 4, 64, clip="mse")) - x).norm())
    kept = float((dequantize(quantize(x, 4, 64, clip="mse", scale_bits=exact_product_bits(4))) - x).norm())
    assert full <= kept < 1.01 * full


def test_scale_bits_are_checked():
    x = torch.randn(4, 4)
    for bad in (0, 12, True, 2.5, "8"):
        with pytest.raises(UsageError, match="scale_bits"):
            quantize(x, 4, 2, scale_bits=bad)


def test_subnormal_zero_and_huge_scales():
    tiny = torch.tensor([[3e-7, -1e-7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # fp16 subnormal scales and zeros
    q = quantize(tiny, 4, 2, scale_bits=3)
    assert q.scales[1].eq(0).all() and significant_bits(q.scales) <= 3
    assert bool(((dequantize(q) - tiny).abs() <= q.scales.float().repeat_interleave(2, 1) / 2).all())
    # a scale just under the fp16 limit would round past it at 8 bits: refused, not written as inf
    with pytest.raises(UsageError, match="fp16"):
        quantize(torch.tensor([65500.0 * 7.5]), 4, 1, scale_bits=8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_products_of_factor_values_are_exact_at_exact_product_bits(bits):
    gen = torch.Generator().manual_seed(bits)
    up = torch.randn(130, 24, generator=gen) * torch.logspace(0, -4, 24)
    down = torch.randn(24, 90, generator=gen)
    q = quantize_factors(up, down, bits, 64, scale_bits=exact_product_bits(bits))
    u, d = q.dequantize()
    assert significant_bits(u) <= 12 and significant_bits(d) <= 12
    products = u.double()[:, :, None] * d.double()[None, :, :]  # (rows, r, cols) exact in fp64
    assert torch.equal(products.float().double(), products)
    assert exact_product_bits(8) == SCALE_BITS


def _rebuild_both_ways(monkeypatch, base, **parts):
    native = fused.fused_rebuild(base, torch.float32, **parts)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "native_library", lambda: None)
        plain = fused.fused_rebuild(base, torch.float32, **parts)
    return native, plain


def test_fp32_factors_whose_products_need_more_bits_keep_the_separate_operations(monkeypatch):
    """1 + 2^-12 carries 13 bits: its square, 1 + 2^-11 + 2^-24, rounds to 1 + 2^-11 on its own (a tie
    to even), so -1 + u·d is 2^-11 with separate operations and 2^-11 + 2^-24 with a fused multiply-add.
    The kernel must see the 26 bits and give the first; at 12 bits the products are exact and both agree."""
    if fused.native_library() is None:
        pytest.skip("no C compiler: only the torch tiles exist")
    rows, cols = 16, 48
    base = torch.zeros(rows, cols)
    for value, expected in [(1 + 2.0**-12, 2.0**-11), (1 + 2.0**-11, 2.0**-10 + 2.0**-22)]:
        up = torch.tensor([[-1.0, value]]).repeat(rows, 1)  # (rows, 2)
        down = torch.tensor([[1.0], [value]]).repeat(1, cols)  # (2, cols)
        native, plain = _rebuild_both_ways(monkeypatch, base, up=up, down=down)
        assert torch.equal(plain, torch.full((rows, cols), expected))
        assert torch.equal(native, plain), value


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_factors_with_exact_products_rebuild_to_the_reference_bits(monkeypatch, bits, dtype):
    if fused.native_library() is None:
        pytest.skip("no C compiler: only the torch tiles exist")
    gen = torch.Generator().manual_seed(10 + bits)
    rows, cols, rank = 77, 100, 9  # 8-row blocks and a tail
    q = quantize_factors(
        torch.randn(rows, rank, generator=gen),
        torch.randn(rank, cols, generator=gen),
        bits,
        32,
        scale_bits=exact_product_bits(bits),
    )
    up, down = q.dequantize()
    base = torch.randn(rows, cols, generator=gen).to(dtype)
    signs = torch.randint(0, 256, ((rows * cols + 7) // 8,), dtype=torch.uint8, generator=gen)
    native, plain = _rebuild_both_ways(monkeypatch, base, up=up, down=down, signs=signs, scale=0.01)
    assert torch.equal(native.view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("codec_name", ["dqrelo", "svd"])
def test_low_rank_codecs_store_exact_product_scales_by_default_and_old_deltas_read_as_before(codec_name):
    codec = get_codec(codec_name)
    config = codec.config_class()
    assert config.factor_bits == 4 and config.factor_exact_products
    old = codec.config_class.from_stored({"factor_bits": 4})  # a manifest written before the field
    assert not old.factor_exact_products
