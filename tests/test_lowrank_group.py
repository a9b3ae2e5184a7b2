"""The mixed batch's compiled low-rank group: the documented arithmetic, bit for bit, whatever the threads,
rows, other parts or factor width; bad arguments refused."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.ops import lowrank_group
from deltakit.ops.lowrank_group import (
    GroupFactors,
    LowRankGroup,
    stored_dtype,
    tile_columns,
)
from deltakit.ops.quant import dequantize, quantize

pytestmark = pytest.mark.skipif(not lowrank_group.available(), reason="needs the compiled kernel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tree16(lanes: torch.Tensor) -> torch.Tensor:
    """(..., 16) -> (...): l[i] + l[i + 8], then halves pairwise, as the kernel's tree."""
    a = lanes[..., :8] + lanes[..., 8:]
    for w in (4, 2, 1):
        a = a[..., :w] + a[..., w : 2 * w]
    return a[..., 0]


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 ``a * b + c`` rounded once (a fused multiply-add), for broadcastable fp32 tensors.

    The product of two fp32 values is exact in float64, and TwoSum gives the float64 sum ``s`` and its
    exact error ``e``. Rounding ``s`` to fp32 gives the fused result except where ``s`` lies exactly
    halfway between two fp32 values (their midpoint is a float64 value): there the sign of ``e`` says on
    which side the exact sum lies.
    """
    p, c64 = a.double() * b.double(), c.double()
    s = p + c64
    virtual = s - p
    e = (p - (s - virtual)) + (c64 - virtual)  # p + c64 == s + e exactly
    r = s.float()
    up = torch.nextafter(r, torch.tensor(float("inf")))
    down = torch.nextafter(r, torch.tensor(float("-inf")))
    r = torch.where((s == (r.double() + up.double()) / 2) & (e > 0), up, r)
    return torch.where((s == (r.double() + down.double()) / 2) & (e < 0), down, r)


def _fma_exact(a: float, b: float, c: float) -> float:
    """a * b + c for fp32 values, summed exactly (fractions) and rounded once to fp32 by torch."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    below = torch.tensor(float(exact), dtype=torch.float64).float()  # float() of a fraction: nearest float64
    candidates = {
        below.item(),
        *(torch.nextafter(below, torch.tensor(d)).item() for d in (-math.inf, math.inf)),
    }
    return min(candidates, key=lambda v: (abs(Fraction(v) - exact), int(np.float32(v).view(np.int32)) & 1))


def test_fma_reference_rounds_once():
    big = 2.0**50 + 2.0**27  # an fp32 with an odd last bit; the next one up is 2^50 + 2^28
    a, b = 2.0**13 * (1 + 2.0**-23), 2.0**13 * (1 - 2.0**-23)  # a * b = 2^26 - 2^-20, just below half a step
    fused = _fma(torch.tensor([a]), torch.tensor([b]), torch.tensor([big])).item()
    assert fused == big  # the float64 sum is the midpoint itself, which rounds to even: 2^50 + 2^28
    assert (torch.tensor([a]) * torch.tensor([b]) + torch.tensor([big])).item() == 2.0**50 + 2.0**28
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(3, 2000, generator=gen) * torch.exp2(
        torch.randint(-30, 30, (3, 2000), generator=gen)
    )
    got = _fma(values[0], values[1], values[2])
    for i in range(0, 2000, 7):
        assert got[i].item() == _fma_exact(*(values[k, i].item() for k in range(3)))


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The kernel's operations in torch for one part: x (n, in) fp32, a (r, in), b (r, out) -> (n, out)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    n, width = x.shape
    full = width - width % 64
    acc = torch.zeros(n, a32.shape[0], 64)  # (n, r, lanes)
    for m in range(0, full, 64):
        acc = _fma(x[:, None, m : m + 64], a32[None, :, m : m + 64], acc)
    for i in range(full, width):
        acc[..., i - full] = _fma(x[:, None, i], a32[None, :, i], acc[..., i - full])
    halves = acc[..., :32] + acc[..., 32:]  # l[i] + l[i + 32]
    h = _tree16(halves[..., :16] + halves[..., 16:])  # (n, r)
    if a32.shape[0] == 0:
        return torch.zeros(n, b32.shape[1])
    s = h[:, :1] * b32[:1]
    for k in range(1, a32.shape[0]):
        s = _fma(h[:, k : k + 1], b32[k : k + 1], s)
    return s


def _parts(seed: int, in_features: int, out_features: int, ranks: list[int], dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    firsts = [torch.randn(r, in_features, generator=gen).to(dtype) for r in ranks]
    seconds = [torch.randn(r, out_features, generator=gen).to(dtype) for r in ranks]
    return firsts, seconds


def _group(firsts, seconds, rows) -> LowRankGroup:
    return LowRankGroup([GroupFactors.prepare(a, b) for a, b in zip(firsts, seconds, strict=True)], rows)


@settings(max_examples=30, deadline=None)
@given(
    in_features=st.integers(1, 150),
    out_features=st.integers(1, 90),
    ranks=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    per_part=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_group_performs_the_documented_operations(in_features, out_features, ranks, per_part, dtype, seed):
    firsts, seconds = _parts(seed, in_features, out_features, ranks, dtype)
    n = per_part * len(ranks)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()  # rows interleaved
    rows = [perm[p * per_part : (p + 1) * per_part] for p in range(len(ranks))]
    x = torch.randn(n, in_features, generator=torch.Generator().manual_seed(seed + 1))
    y0 = torch.randn(n, out_features, generator=torch.Generator().manual_seed(seed + 2))
    y = y0.clone()
    _group(firsts, seconds, rows).add_into(x, y)
    expected = y0.clone()
    for a, b, r in zip(firsts, seconds, rows, strict=True):
        expected[r] = expected[r] + _reference(x[r], a, b)
    assert torch.equal(y.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows",
    [[[0, 5], [1, 2, 3], [4], [6, 7]], [[0, 5, 8, 9, 10, 11], [1, 2, 3], [4], [6, 7, 12, 13, 14, 15, 16]]],
    ids=["decode", "prefill blocks"],
)
def test_bits_do_not_depend_on_threads_or_on_the_other_parts(dtype, rows):
    firsts, seconds = _parts(0, 576, 1536, [40, 7, 0, 63], dtype)
    n = max(max(r) for r in rows) + 1
    x = torch.randn(n, 576, generator=torch.Generator().manual_seed(1))
    outs = []
    for threads in (1, 2, 3, 4):
        y = torch.zeros(n, 1536)
        _group(firsts, seconds, rows).add_into(x, y, threads)
        outs.append(y)
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    alone = torch.zeros(n, 1536)  # the last part on its own, one of its rows only
    _group(firsts[3:], seconds[3:], [[7]]).add_into(x, alone, 2)
    assert torch.equal(alone[7], outs[0][7])
    assert torch.equal(outs[0][4], torch.zeros(1536))  # the rank-0 part adds nothing


@pytest.mark.parametrize("act", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_16_bit_activations_and_output_give_torch_add_of_the_fp32_share(act, dtype):
    """A 16-bit x is read as its exact fp32 widening and a 16-bit y takes the share rounded to nearest
    even, bit for bit ``y.add_(share)`` of the fp32 path, a rank-0 part's rows included (-0.0 becomes
    +0.0); rows of no part keep their bits (-0 included)."""
    firsts, seconds = _parts(5, 150, 97, [9, 0, 33], dtype)  # tails in both stages, a rank-0 part
    rows = [[0, 4], [1], [2, 3, 5]]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 150, generator=gen).to(act)
    y0 = (torch.randn(7, 97, generator=gen) * 4).to(act)
    y0[6] = -0.0  # row 6 belongs to no part
    y0[1, :5] = -0.0  # row 1 belongs to the rank-0 part: its zero share is added all the same (+0.0)
    share = torch.zeros(7, 97)
    _group(firsts, seconds, rows).add_into(x.float(), share)
    expected = y0.clone()
    expected.add_(share)
    for threads in (1, 3):
        y = y0.clone()
        _group(firsts, seconds, rows).add_into(x, y, threads)
        assert torch.equal(y[:6].view(torch.int16), expected[:6].view(torch.int16))
        assert torch.equal(y[6].view(torch.int16), y0[6].view(torch.int16))
    assert not torch.equal(y[:6], y0[:6])


def test_16_bit_output_rounds_ties_to_even_and_overflows_like_torch():
    """Values placed on bf16 rounding ties and at the fp16 limit: the kernel's rounding is torch's."""
    first = torch.zeros(1, 64)
    first[0, 0] = 1.0
    second = torch.ones(1, 64)  # share = x[:, 0] for every output column
    ties = torch.tensor([2**-8, 3 * 2**-8, -(2**-8), 2**-9])  # halfway between neighbouring bf16 of 1.0
    for act, y_value, x_values in (
        (torch.bfloat16, 1.0, ties),
        (torch.float16, 65504.0, torch.tensor([16.0, 32.0, -16.0, 1e6])),
    ):
        x = torch.zeros(4, 64)
        x[:, 0] = x_values
        y0 = torch.full((4, 64), y_value).to(act)
        share = torch.zeros(4, 64)
        _group([first], [second], [[0, 1, 2, 3]]).add_into(x, share)
        expected = y0.clone()
        expected.add_(share)
        y = y0.clone()
        _group([first.to(act)], [second.to(act)], [[0, 1, 2, 3]]).add_into(x.to(act), y)
        assert torch.equal(y.view(torch.int16), expected.view(torch.int16)), act


def test_result_is_close_to_the_float64_product():
    firsts, seconds = _parts(3, 200, 300, [16, 33], torch.float16)
    rows = [[0, 2], [1]]
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(3, 300)
    _group(firsts, seconds, rows).add_into(x, y)
    for a, b, r in zip(firsts, seconds, rows, strict=True):
        exact = (x[r].double() @ a.double().T) @ b.double()
        torch.testing.assert_close(y[r].double(), exact, rtol=1e-5, atol=1e-4)


def test_stored_dtype_keeps_16_bit_factors_and_widens_the_rest():
    half = torch.zeros(2, 2, dtype=torch.float16)
    assert stored_dtype(half, half) == torch.float16
    assert stored_dtype(half, half.bfloat16()) == torch.float32
    assert stored_dtype(half.double(), half.double()) == torch.float32


def untile_columns(tiled: torch.Tensor, rank: int, out: int) -> torch.Tensor:
    """The inverse of tile_columns: (rank, out)."""
    full = out - out % 32
    head = tiled[: rank * full].reshape(full // 32, rank, 32).transpose(0, 1).reshape(rank, full)
    return torch.cat([head, tiled[rank * full :].reshape(rank, out - full)], dim=1)


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(0, 9), out_features=st.integers(1, 100))
def test_column_tiles_round_trip(rank, out_features):
    second = torch.arange(rank * out_features, dtype=torch.float32).reshape(rank, out_features)
    tiled = tile_columns(second)
    assert tiled.shape == (rank * out_features,)
    assert torch.equal(untile_columns(tiled, rank, out_features), second)
    if rank and out_features >= 64:  # tile 1 starts at element 32 * rank with column 32
        assert tiled[32 * rank] == second[0, 32]


def test_bad_arguments_are_refused():
    firsts, seconds = _parts(0, 8, 6, [2, 3], torch.float32)
    with pytest.raises(ValueError, match="one part each"):
        _group(firsts, seconds, [[0, 1], [1]])
    with pytest.raises(ValueError, match="non-negative"):
        _group(firsts, seconds, [[-1], [1]])
    with pytest.raises(ValueError, match="share a rank"):
        GroupFactors.prepare(firsts[0], seconds[1])
    with pytest.raises(ValueError, match="want one of"):
        GroupFactors.prepare(firsts[0].double(), seconds[0].double())
    with pytest.raises(ValueError, match="want one of"):
        GroupFactors.prepare(firsts[0], seconds[0].half())
    with pytest.raises(ValueError, match="same in and out"):
        _group([firsts[0], firsts[1][:, :4]], seconds, [[0], [1]])
    with pytest.raises(ValueError, match="one factor pair"):
        LowRankGroup([], [])
    group = _group(firsts, seconds, [[0], [3]])
    with pytest.raises(ValueError, match="rows reach 3"):
        group.add_into(torch.zeros(2, 8), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="got activations"):
        group.add_into(torch.zeros(4, 7), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="one dtype"):
        group.add_into(torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="one dtype"):
        group.add_into(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        group.add_into(torch.zeros(8, 4).T, torch.zeros(4, 6))


def test_every_kernel_source_ships_with_the_package():
    """A non-editable install compiles the library from package data: every source must be listed."""
    from pathlib import Path

    import tomllib

    from deltakit.ops import signmm

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = set(config["tool"]["setuptools"]["package-data"]["deltakit.ops"])
    assert {p.name for p in signmm._SOURCES} <= shipped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trusted_call_gives_add_into_bits_and_still_checks_sizes_and_rows(dtype):
    """add_into_trusted (the executor's per-call path) writes what add_into writes, for (batch, tokens,
    in) activations too, and refuses feature sizes or row counts that do not fit the group."""
    firsts, seconds = _parts(3, 40, 24, [3, 5], dtype)
    group = _group(firsts, seconds, [[0, 1, 4, 5], [2, 3]])
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 40, generator=gen).to(dtype)  # (batch, tokens, in): rows 0..5 flattened
    y = torch.randn(3, 2, 24, generator=gen).to(dtype)
    want = y.reshape(6, 24).clone()
    group.add_into(x.reshape(6, 40), want)
    got = y.clone()
    group.add_into_trusted(x, got)
    assert torch.equal(got.reshape(6, 24), want)
    with pytest.raises(ValueError, match="got activations"):
        group.add_into_trusted(torch.zeros(6, 41, dtype=dtype), torch.zeros(6, 24, dtype=dtype))
    with pytest.raises(ValueError, match="got activations"):
        group.add_into_trusted(torch.zeros(6, 40, dtype=dtype), torch.zeros(6, 23, dtype=dtype))
    with pytest.raises(ValueError, match="rows up to 5"):
        group.add_into_trusted(torch.zeros(5, 40, dtype=dtype), torch.zeros(5, 24, dtype=dtype))
    with pytest.raises(ValueError, match="got activations"):
        group.add_into_trusted(torch.zeros(6, 40, dtype=dtype), torch.zeros(7, 24, dtype=dtype))


def _quantized_pair(
    seed: int, in_features: int, out_features: int, rank: int, bits: int, group: int, scheme: str
):
    """Quantized A (rank, in) and B (rank, out), their lanes the rank components, as a codec stores them:
    ``down`` (r, in) grouped along its rows, ``up`` (out, r) along its columns."""
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=gen)
    up = torch.randn(out_features, rank, generator=gen) * 0.1
    return quantize(down, bits, group, 1, scheme, "mse"), quantize(up, bits, group, 0, scheme, "mse")


@settings(max_examples=30, deadline=None)
@given(
    in_features=st.one_of(st.integers(1, 200), st.sampled_from((16, 64, 96, 192))),
    out_features=st.one_of(st.integers(1, 100), st.sampled_from((16, 32, 48, 80))),
    ranks=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    bits=st.sampled_from((2, 3, 4)),
    group=st.sampled_from((16, 32, 48, 64, 80, 128)),
    scheme=st.sampled_from(("symmetric", "asymmetric")),
    act=st.sampled_from(DTYPES),
    per_part=st.sampled_from((1, 2, 5, 9)),
    seed=st.integers(0, 1000),
)
def test_quantized_factors_give_the_bits_of_their_dequantized_fp32_copy(
    in_features, out_features, ranks, bits, group, scheme, act, per_part, seed
):
    """4-bit codes decoded in the kernel: the same bits as the fp32 kind fed ops.quant.dequantize's
    values, for every bit width up to 4, both grids, groups whose chunk count is a power of two or not,
    tails in both stages, every activation dtype, and parts of a few rows (decoded per row tile) or of
    more than 4 (decoded once into a buffer)."""
    pairs = [
        _quantized_pair(seed + i, in_features, out_features, r, bits, group, scheme)
        for i, r in enumerate(ranks)
    ]
    n = per_part * len(ranks)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [perm[i * per_part : (i + 1) * per_part] for i in range(len(ranks))]
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, in_features, generator=gen).to(act)
    y0 = torch.randn(n, out_features, generator=gen).to(act)
    packed = LowRankGroup([GroupFactors.prepare_quantized(a, b) for a, b in pairs], rows)
    widened = _group([dequantize(a) for a, _ in pairs], [dequantize(b).T for _, b in pairs], rows)
    assert all(p.kind == lowrank_group.QUANTIZED_KIND for p in packed.parts)
    got, want = y0.clone(), y0.clone()
    packed.add_into(x, got)
    widened.add_into(x, want)
    bits_view = torch.int32 if act == torch.float32 else torch.int16
    assert torch.equal(got.view(bits_view), want.view(bits_view))
    assert not torch.equal(got, y0)


def test_parts_of_every_kind_share_one_call_with_the_bits_of_each_alone():
    """fp32, fp16, bf16 and 4-bit parts in one group, any thread count: each row has the bits its part
    gives on its own, and the 4-bit part's codes take about a seventh of its fp32 copy's bytes."""
    firsts, seconds = _parts(2, 576, 1536, [24, 16, 8], torch.float32)
    q_first, q_second = _quantized_pair(3, 576, 1536, 32, 4, 64, "symmetric")
    parts = [
        GroupFactors.prepare(firsts[0], seconds[0]),
        GroupFactors.prepare(firsts[1].half(), seconds[1].half()),
        GroupFactors.prepare(firsts[2].bfloat16(), seconds[2].bfloat16()),
        GroupFactors.prepare_quantized(q_first, q_second),
    ]
    rows = [[0, 7], [1, 2], [3], [4, 5, 6]]
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    together = []
    for threads in (1, 2, 3):
        y = torch.zeros(8, 1536, dtype=torch.bfloat16)
        LowRankGroup(parts, rows).add_into(x, y, threads)
        together.append(y)
    assert all(torch.equal(together[0], y) for y in together[1:])
    for part, part_rows in zip(parts, rows, strict=True):
        alone = torch.zeros(8, 1536, dtype=torch.bfloat16)
        LowRankGroup([part], [part_rows]).add_into(x, alone)
        assert torch.equal(alone[part_rows], together[0][part_rows])
        assert alone[part_rows].abs().sum() > 0
    fp32_bytes = 32 * (576 + 1536) * 4
    assert parts[3].nbytes * 6 < fp32_bytes


def test_quantized_layouts_the_kernel_cannot_read_are_refused():
    q8_first, q8_second = _quantized_pair(0, 64, 32, 4, 8, 32, "symmetric")
    q_first, q_second = _quantized_pair(0, 64, 32, 4, 4, 32, "symmetric")
    odd_first, _ = _quantized_pair(0, 64, 32, 4, 4, 24, "symmetric")
    assert not lowrank_group.quantized_applies(q8_first)
    assert not lowrank_group.quantized_applies(odd_first)
    assert lowrank_group.quantized_applies(q_first)
    with pytest.raises(ValueError, match="at most 4 bits"):
        GroupFactors.prepare_quantized(q8_first, q8_second)
    with pytest.raises(ValueError, match="multiple of 16"):
        GroupFactors.prepare_quantized(odd_first, q_second)
    other_rank, _ = _quantized_pair(0, 64, 32, 5, 4, 32, "symmetric")
    with pytest.raises(ValueError, match="do not share a rank"):
        GroupFactors.prepare_quantized(other_rank, q_second)


@pytest.mark.parametrize(("in_features", "out_features", "rank"), [(8200, 40, 3), (70, 64, 300)])
def test_quantized_factors_too_large_for_the_buffer_are_decoded_per_row_tile(in_features, out_features, rank):
    """A's rows of 8200 values (a prefill's block buffer is sized by the row) and B tiles of rank over 256
    (decoded per row tile, past the tile buffer): still the bits of the dequantized fp32 copy, for parts
    of many rows and of few."""
    first, second = _quantized_pair(5, in_features, out_features, rank, 4, 64, "symmetric")
    rows = [[0, 2, 4, 6, 8, 9], [1, 3]]
    x = torch.randn(10, in_features, generator=torch.Generator().manual_seed(6))
    parts = [GroupFactors.prepare_quantized(first, second), GroupFactors.prepare_quantized(first, second)]
    widened = GroupFactors.prepare(dequantize(first), dequantize(second).T)
    got, want = torch.zeros(10, out_features), torch.zeros(10, out_features)
    LowRankGroup(parts, rows).add_into(x, got)
    LowRankGroup([widened, widened], rows).add_into(x, want)
    assert torch.equal(got, want) and got.abs().sum() > 0


@pytest.mark.parametrize(("bits", "length"), [(4, 16), (4, 48), (4, 576), (4, 40), (3, 48), (2, 20)])
def test_codes_are_laid_out_at_their_documented_nibbles(bits, length):
    """Value m of a chunk of 16 at nibble 8 (m % 2) + m // 2 (byte n // 2, the high nibble for odd n),
    zero codes after the lane's end: for 4-bit lanes of whole chunks (moved from the stored bytes) and
    for the rest (unpacked and paired)."""
    from deltakit.ops.intpack import unpack_codes

    q = quantize(torch.randn(5, length, generator=torch.Generator().manual_seed(length)), bits, 16, 1)
    chunks = -(-length // 16)
    codes = torch.zeros(5, chunks * 16, dtype=torch.int64)
    codes[:, :length] = unpack_codes(q.codes, bits, 5 * length).reshape(5, length).long()
    want = torch.zeros(5, chunks, 8, dtype=torch.int64)
    for m in range(16):
        n = 8 * (m % 2) + m // 2
        want[:, :, n // 2] |= codes.reshape(5, chunks, 16)[:, :, m] << (4 * (n % 2))
    assert torch.equal(lowrank_group._chunk_codes(q).long(), want.reshape(5, -1))


def test_a_quantized_pair_fits_only_with_the_rank_as_its_lanes():
    """A's and B's lanes must be the rank components over the layer's in and out features: a pair
    grouped the other way, or of other sizes, is left to the fp32 copy."""
    first, second = _quantized_pair(0, 64, 32, 4, 4, 32, "symmetric")  # A (4, 64), B (4, 32)
    assert lowrank_group.quantized_pair_fits(first, second, 4, 64, 32)
    assert not lowrank_group.quantized_pair_fits(first, second, 4, 32, 64)
    assert not lowrank_group.quantized_pair_fits(first, second, 5, 64, 32)
    across = quantize(torch.randn(4, 64), 4, 16, 0)  # grouped along the rank: lanes are the columns
    assert not lowrank_group.quantized_pair_fits(across, second, 4, 64, 32)


def test_quantized_factors_whose_tensors_do_not_hold_their_layout_are_not_read_in_place():
    """The kernel reads codes and grids in place, so a QuantizedTensor built by hand (a plug-in codec's)
    whose tensors are short or of another shape is refused, and a mixed batch takes the fp32 copy."""
    from dataclasses import replace

    first, second = _quantized_pair(0, 64, 32, 4, 4, 32, "symmetric")
    asym, _ = _quantized_pair(0, 64, 32, 4, 4, 32, "asymmetric")
    bad = {
        "short codes": replace(second, codes=second.codes[: second.codes.numel() // 2]),
        "broadcast scales": replace(second, scales=second.scales[:1]),
        "integer scales": replace(second, scales=second.scales.to(torch.int16)),
        "asymmetric without zeros": replace(asym, zeros=None),
        "symmetric with zeros": replace(second, zeros=second.scales.clone()),
    }
    assert lowrank_group.quantized_pair_fits(first, second, 4, 64, 32)
    for what, q in bad.items():
        assert not lowrank_group.quantized_applies(q), what
        low = (q, second) if q.shape == first.shape else (first, q)
        assert not lowrank_group.quantized_pair_fits(*low, 4, 64, 32), what
        with pytest.raises(ValueError, match="do not hold that layout"):
            GroupFactors.prepare_quantized(*low)


def test_a_group_longer_than_its_lane_lays_out_one_grid_entry_per_chunk():
    """A group size beyond a lane's length gives the values of one group of the lane's length (one grid
    entry per lane, nothing sized by the group size), in the kernel as in dequantize."""
    from dataclasses import replace

    first, second = _quantized_pair(3, 40, 48, 3, 4, 64, "asymmetric")  # lanes of 40 and 48 values
    huge = replace(first, group_size=1 << 30), replace(second, group_size=(1 << 30) + 16 * 3)
    x = torch.randn(2, 40)
    want = _group([dequantize(first)], [dequantize(second).T], [[0, 1]])
    got = LowRankGroup([GroupFactors.prepare_quantized(*huge)], [[0, 1]])
    y_want, y_got = torch.zeros(2, 48), torch.zeros(2, 48)
    want.add_into(x, y_want)
    got.add_into(x, y_got)
    assert torch.equal(y_got, y_want)
    assert torch.equal(dequantize(huge[0]), dequantize(first))
    assert got.parts[0].nbytes < 4096
