"""quantize's MSE clip search scores every clip ratio of a block of lanes at once: the codes, scales and
offsets are those of trying one ratio at a time (the form below), bit for bit, ties and padding
included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.ops import quant
from deltakit.ops.intpack import pack_codes


def _ratio_by_ratio(x: torch.Tensor, bits: int, group_size: int, axis: int, scheme: str, clip: str):
    """The search one ratio at a time: round, score, keep a ratio only when its error is strictly less."""
    axis = axis % x.ndim
    moved = x.to(torch.float32).movedim(axis, -1).contiguous()
    grouped, length = quant._grouped(moved, group_size)
    valid = None
    if grouped.shape[1] * group_size != length:
        valid = (torch.arange(grouped.shape[1] * group_size) < length).float()
        valid = valid.reshape(1, grouped.shape[1], group_size)
    extent = quant._group_extent(grouped, scheme)
    best = None
    for ratio in quant.CLIP_RATIOS if clip == "mse" else (1.0,):
        codes, scales, zeros, origin = quant._round_groups(grouped, bits, scheme, ratio, extent)
        err = codes * scales.float()[..., None]
        err.add_(origin[..., None]).sub_(grouped).square_()
        if valid is not None:
            err.mul_(valid)
        err = err.sum(dim=-1)
        if best is None:
            best = [codes, scales, zeros, err]
            continue
        better = err < best[3]
        best[0] = torch.where(better[..., None], codes, best[0])
        best[1] = torch.where(better, scales, best[1])
        best[2] = None if zeros is None else torch.where(better, zeros, best[2])
        best[3] = torch.where(better, err, best[3])
    codes = best[0].reshape(best[0].shape[0], -1)[:, :length].to(torch.uint8)
    return pack_codes(codes, bits), best[1], best[2]


def _assert_same(x, bits, group_size, axis, scheme, clip):
    got = quant.quantize(x, bits, group_size, axis, scheme, clip)
    codes, scales, zeros = _ratio_by_ratio(x, bits, group_size, axis, scheme, clip)
    assert torch.equal(got.codes, codes)
    assert torch.equal(got.scales.view(torch.int16), scales.view(torch.int16))
    if zeros is None:
        assert got.zeros is None
    else:
        assert torch.equal(got.zeros.view(torch.int16), zeros.view(torch.int16))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    axis=st.integers(-3, 2),
    bits=st.sampled_from(quant.SUPPORTED_BITS),
    group_size=st.integers(1, 50),
    scheme=st.sampled_from(quant.SCHEMES),
    clip=st.sampled_from(quant.CLIPS),
    kind=st.sampled_from(("normal", "small integers", "zeros and outliers", "wide", "tiny")),
    seed=st.integers(0, 10_000),
)
def test_the_search_gives_the_ratio_by_ratio_result(shape, axis, bits, group_size, scheme, clip, kind, seed):
    """Random groups, groups of small integers, zero groups with lone outliers, magnitudes near fp16's
    largest scales, and tiny ones whose scales are fp16 subnormals (where several ratios tie)."""
    axis = axis % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if kind == "small integers":
        x = torch.randint(-3, 4, shape, generator=gen).float()
    elif kind == "zeros and outliers":
        x = torch.where(torch.rand(*shape, generator=gen) < 0.9, torch.zeros(shape), x * 50)
    elif kind == "wide":
        x = x * 2000.0
    elif kind == "tiny":
        x = x * 1e-6
    _assert_same(x, bits, group_size, axis, scheme, clip)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_lanes_split_into_blocks_give_the_same_result(monkeypatch, scheme):
    """A tensor scored in several blocks of lanes (a small block size forced), with padded groups."""
    monkeypatch.setattr(quant, "_BLOCK_VALUES", 3000)
    x = torch.randn(90, 70, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 5, 70)
    for axis in (0, 1):
        _assert_same(x, 4, 32, axis, scheme, "mse")
        _assert_same(x.bfloat16(), 3, 64, axis, scheme, "mse")
