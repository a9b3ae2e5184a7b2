"""The combined sign + low-rank call of a mixed batch: the bits of the two groups' calls on an fp32 share
added with torch's ``add_``, for every activation dtype, both sign forms, any thread count; bad arguments
refused."""

from __future__ import annotations

import pytest
import torch

from deltakit.ops import lowrank_group
from deltakit.ops.lowrank_group import GroupFactors, LowRankGroup
from deltakit.ops.mixed_shares import SharesCall, add_shares_into
from deltakit.ops.quant import quantize
from deltakit.ops.signmm import LUT_MIN_ROWS, SignGroup

pytestmark = pytest.mark.skipif(not lowrank_group.available(), reason="needs the compiled kernel")


def _groups(in_features: int, out_features: int, rows: list[list[int]], seed: int):
    """A low-rank group (ranks 5, 0, 17, ...; the rank-17 parts' factors 4-bit codes, the others fp16)
    and a sign group over the same row lists."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [(5, 0, 17, 3)[i % 4] for i in range(len(rows))]
    factors = []
    for r in ranks:
        first, second = (
            torch.randn(r, in_features, generator=gen),
            torch.randn(r, out_features, generator=gen),
        )
        if r == 17:
            factors.append(
                GroupFactors.prepare_quantized(quantize(first, 4, 32, 1), quantize(second, 4, 32, 1))
            )
        else:
            factors.append(GroupFactors.prepare(first.half(), second.half()))
    packed = [
        torch.randint(0, 256, (out_features * in_features // 8,), dtype=torch.uint8, generator=gen)
        for _ in rows
    ]
    scales = [0.01 * (i + 1) for i in range(len(rows))]
    return LowRankGroup(factors, rows), SignGroup(packed, (out_features, in_features), rows, scales)


def _separate(x, y0, low_rank, signs):
    """The executor's separate path: fp32 x, zero fp32 share, each group into it, then ``add_``."""
    xf = x.to(torch.float32)
    share = torch.zeros(y0.shape, dtype=torch.float32)
    if low_rank is not None:
        low_rank.add_into(xf, share)
    if signs is not None:
        signs.add_into(xf, share)
    expected = y0.clone()
    expected.add_(share)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_part", [2, LUT_MIN_ROWS])  # the sign kernel's tile and table forms
@pytest.mark.parametrize("which", ["both", "signs", "low_rank"])
def test_one_call_has_the_bits_of_the_separate_calls_and_add(dtype, per_part, which):
    in_features, out_features = 96, 80  # tails in both stages (not multiples of 64 or 32)
    rows = [list(range(p * per_part, (p + 1) * per_part)) for p in range(3)]
    n = 3 * per_part + 2  # two rows of no part
    low_rank, signs = _groups(in_features, out_features, rows, seed=per_part)
    low_rank = low_rank if which != "signs" else None
    signs = signs if which != "low_rank" else None
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, in_features, generator=gen).to(dtype)
    y0 = (torch.randn(n, out_features, generator=gen) * 3).to(dtype)
    y0[-1] = -0.0  # a row of no part: -0.0 + 0 is +0.0, as add_ makes it
    y0[rows[1][0], :7] = -0.0  # a row of the rank-0 low-rank part
    expected = _separate(x, y0, low_rank, signs)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for threads in (1, 3):
        y = y0.clone()
        add_shares_into(x, y, low_rank, signs, threads)
        assert torch.equal(y.view(bits), expected.view(bits)), threads
    assert not torch.equal(y[:-2], y0[:-2])
    assert torch.equal(y[-1].view(bits), torch.zeros(out_features, dtype=dtype).view(bits))


def test_bad_arguments_are_refused():
    rows = [[0, 1], [2]]
    low_rank, signs = _groups(32, 16, rows, seed=1)
    x, y = torch.randn(3, 32), torch.zeros(3, 16)
    with pytest.raises(ValueError, match="a low-rank group, a sign group or both"):
        add_shares_into(x, y, None, None)
    with pytest.raises(ValueError, match="one dtype"):
        add_shares_into(x, y.bfloat16(), low_rank, signs)
    with pytest.raises(ValueError, match="one dtype"):
        add_shares_into(x.t(), torch.zeros(32, 16), low_rank, signs)  # not contiguous
    with pytest.raises(ValueError, match=r"low-rank group of \(32 -> 16\) got \(32, 17\)"):
        add_shares_into(x, torch.zeros(3, 17), low_rank, None)
    with pytest.raises(ValueError, match=r"sign group of \(16, 32\)"):
        add_shares_into(x, torch.zeros(3, 17), None, signs)
    with pytest.raises(ValueError, match="rows reach 2, activations have 2"):
        add_shares_into(x[:2], y[:2], low_rank, signs)


@pytest.mark.parametrize("which", ["both", "signs"])
def test_trusted_call_gives_the_checked_call_bits_and_still_checks_sizes_and_rows(which):
    """SharesCall.add_into_trusted (the executor's per-call path) writes what add_shares_into writes, for
    (batch, tokens, in) activations too, and refuses feature sizes or row counts that do not fit."""
    from deltakit.ops.mixed_shares import SharesCall

    rows = [[0, 1, 4], [2, 3]]
    low_rank, signs = _groups(32, 16, rows, seed=5)
    call = SharesCall(low_rank if which == "both" else None, signs)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 32, generator=gen).bfloat16()  # (batch, tokens, in): rows 0..5 flattened
    y = torch.randn(3, 2, 16, generator=gen).bfloat16()
    want = y.reshape(6, 16).clone()
    add_shares_into(x.reshape(6, 32), want, call.low_rank, signs)
    got = y.clone()
    call.add_into_trusted(x, got)
    assert torch.equal(got.reshape(6, 16).view(torch.int16), want.view(torch.int16))
    bf = torch.bfloat16
    for bad_x, bad_y in [((6, 31), (6, 16)), ((6, 32), (6, 15)), ((4, 32), (4, 16)), ((6, 32), (5, 16))]:
        with pytest.raises(ValueError, match="mixed shares of"):
            call.add_into_trusted(torch.zeros(bad_x, dtype=bf), torch.zeros(bad_y, dtype=bf))


def test_groups_of_different_layer_shapes_are_refused_when_the_call_is_made():
    """The trusted call reads the sign matrices at the low-rank group's (out, in): a sign group of another
    shape must not get that far."""
    rows = [[0, 1], [2]]
    low_rank, _ = _groups(32, 16, rows, seed=1)
    _, narrow = _groups(8, 16, rows, seed=1)  # signs of a (16, 8) layer
    with pytest.raises(
        ValueError, match=r"sign group of \(16, 8\) \(out, in\) and low-rank group of \(16, 32\)"
    ):
        SharesCall(low_rank, narrow)
