"""The packed 1-bit sign product: equal to the ±1 matmul within fp32 rounding, fixed bits per row."""

from __future__ import annotations

import platform

import pytest
import torch

import deltakit.ops.signmm as signmm
from deltakit.ops.bitpack import pack_signs, unpack_signs
from deltakit.ops.signmm import SignGroup, reference_sign_matmul, sign_matmul

needs_kernel = pytest.mark.skipif(signmm.native_library() is None, reason="no C compiler for the sign kernel")


def _case(rows: int, cols: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    packed = pack_signs(torch.randn(rows, cols, generator=g))
    return packed, torch.randn(n, cols, generator=g)


def _exact(x: torch.Tensor, packed: torch.Tensor, shape) -> torch.Tensor:
    return x.double() @ unpack_signs(packed, shape).double().T


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 5, 19, 24, 33])  # tile form and table form (>= LUT_MIN_ROWS)
@pytest.mark.parametrize("shape", [(70, 576), (33, 40), (24, 584), (130, 1536)])
def test_kernel_matches_the_exact_product(shape, n):
    packed, x = _case(*shape, n)
    ours = sign_matmul(x, packed, shape)
    assert signmm.native_applies(x, shape) and ours.dtype == torch.float32 and ours.shape == (n, shape[0])
    exact = _exact(x, packed, shape)
    bound = 1e-6 * x.abs().sum(-1, keepdim=True).double() + 1e-6  # fp32 summation error bound, loose
    assert ((ours.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(ours, reference_sign_matmul(x, packed, shape), rtol=1e-5, atol=1e-4)


def _tile_transcription(x: torch.Tensor, packed: torch.Tensor, shape) -> torch.Tensor:
    """The few-row form's documented arithmetic in torch, fp32 operation for operation: per 4-column group
    q a table T_q[v] = ((s0 x0 + s1 x1) + s2 x2) + s3 x3 (s_k = +1 where bit k of v is set), the matrix
    row's nibble for q selecting its entry, partial a_{q % 4} summing in order of q from +0, and
    (a0 + a1) + (a2 + a3)."""
    out_features, in_features = shape
    bits = unpack_signs(packed, shape) > 0  # (out, in)
    weights = 1 << torch.arange(4)
    partials = [torch.zeros(x.shape[0], out_features) for _ in range(4)]
    for q in range(in_features // 4):
        xs = x[:, 4 * q : 4 * q + 4]  # (n, 4)
        v = torch.arange(16)
        signs = torch.where((v[:, None] >> torch.arange(4)) & 1 == 1, 1.0, -1.0)  # (16, 4)
        terms = signs[None] * xs[:, None, :]  # (n, 16, 4), exact
        table = ((terms[..., 0] + terms[..., 1]) + terms[..., 2]) + terms[..., 3]  # (n, 16)
        nibble = (bits[:, 4 * q : 4 * q + 4].long() * weights).sum(-1)  # (out,)
        partials[q % 4] = partials[q % 4] + table[:, nibble]
    return (partials[0] + partials[1]) + (partials[2] + partials[3])


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 13])  # the tile form, 4 rows per pass
@pytest.mark.parametrize("shape", [(70, 576), (33, 40), (9, 584), (5, 1536), (1, 64), (16, 8), (48, 24)])
def test_few_row_form_has_the_documented_bits(shape, n):
    packed, x = _case(*shape, n, seed=3)
    assert n < signmm.LUT_MIN_ROWS
    ours = sign_matmul(x, packed, shape)
    assert torch.equal(ours, _tile_transcription(x, packed, shape))


def test_sign_tiles_lay_out_sixteen_matrix_rows_per_tile():
    shape = (20, 24)  # 2 tiles, the second padded with 12 zero rows; 3 bytes per matrix row
    packed = torch.arange(60, dtype=torch.uint8) + 1
    tiles = signmm.sign_tiles(packed, shape).view(2, 3, 16)  # (tile, group, row in tile)
    rows = packed.view(20, 3)
    assert torch.equal(tiles[0].T, rows[:16])
    assert torch.equal(tiles[1].T[:4], rows[16:]) and not tiles[1].T[4:].any()
    with pytest.raises(ValueError, match="in_features % 8"):
        signmm.sign_tiles(packed, (20, 12))
    with pytest.raises(ValueError, match="cannot hold"):
        signmm.sign_tiles(packed[:59], shape)


@needs_kernel
def test_bf16_activations_are_upcast_exactly():
    packed, x = _case(64, 576, 3)
    xb = x.to(torch.bfloat16)
    assert torch.equal(sign_matmul(xb, packed, (64, 576)), sign_matmul(xb.float(), packed, (64, 576)))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 11, 40])  # tile form, 4 rows per pass, table form
def test_bits_do_not_depend_on_threads_or_on_the_other_rows(n):
    packed, x = _case(300, 584, n, seed=1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):  # 3: output slices of the table form that do not divide evenly
            torch.set_num_threads(threads)
            results.append(sign_matmul(x, packed, (300, 584)))
    finally:
        torch.set_num_threads(before)
    one = results[0]
    assert all(torch.equal(one, r) for r in results[1:])
    other = x.clone()
    other[1:] = torch.randn(n - 1, 584)  # same first row, other companions of the same count
    assert torch.equal(sign_matmul(other, packed, (300, 584))[0], one[0])


@needs_kernel
def test_sign_group_adds_each_part_into_its_own_rows():
    shape = (96, 576)
    packs = [_case(*shape, 1, seed=s)[0] for s in range(3)]
    x = torch.randn(31, 576)
    rows = [[0, 4], [1, 2, 3, *range(5, 30)], [30]]  # non-consecutive; one part takes the table form
    assert len(rows[1]) >= signmm.LUT_MIN_ROWS
    scales = [0.5, -0.25, 2.0]
    y = torch.randn(31, 96)
    expected = y.clone()
    for p, r, a in zip(packs, rows, scales, strict=True):
        expected[r] += a * sign_matmul(x[r], p, shape)
    SignGroup(packs, shape, rows, scales).add_into(x, y)
    assert torch.equal(y, expected)
    with pytest.raises(ValueError, match="rows reach 40, activations have 31"):
        SignGroup(packs, shape, [[0], [1], [40]], scales).add_into(x, y)


def test_fallback_without_the_kernel_gives_the_matmul(monkeypatch):
    packed, x = _case(40, 24, 3)
    monkeypatch.setattr(signmm, "_tried", True)
    monkeypatch.setattr(signmm, "_library", None)
    assert not signmm.native_applies(x, (40, 24))
    assert torch.equal(sign_matmul(x, packed, (40, 24)), x @ unpack_signs(packed, (40, 24)).T)
    odd, xo = _case(5, 13, 2)  # 13 columns: rows not byte aligned, always the torch form
    assert torch.equal(sign_matmul(xo, odd, (5, 13)), xo @ unpack_signs(odd, (5, 13)).T)


def test_malformed_inputs_are_refused():
    packed, x = _case(8, 16, 2)
    with pytest.raises(ValueError, match="features"):
        sign_matmul(x[:, :8], packed, (8, 16))
    with pytest.raises(ValueError, match="packed bytes"):
        sign_matmul(x, packed[:3], (8, 16))


def test_sign_group_refuses_parts_too_short_for_the_shape_and_negative_rows():
    shape = (16, 24)
    full = torch.zeros(16 * 24 // 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        signmm.SignGroup([full, full[:-1]], shape, [[0], [1]], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        signmm.SignGroup([full], shape, [[-1]], [1.0])


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-fma")])
def test_portable_build_gives_the_same_bits(monkeypatch, tmp_path, flags):
    """The library built without AVX-512 (the portable loops), with 256-bit fused multiply-adds or none,
    against the native build: same bits, for the sign products and for the fused rebuild with 16-bit
    factors (widened by F16C or by the compiler; their exact products taken by fused multiply-adds or by
    separate multiplies and adds), and for a mixed batch's low-rank group with 4-bit factor codes (their
    levels looked up by the portable loop instead of a permute) beside fp16 factors."""
    from deltakit.ops.fused import fused_rebuild
    from deltakit.ops.lowrank_group import GroupFactors, LowRankGroup
    from deltakit.ops.quant import quantize

    def low_rank_group_share() -> torch.Tensor:
        g = torch.Generator().manual_seed(11)
        q_first = quantize(torch.randn(6, 200, generator=g), 4, 48, 1, "asymmetric", "mse")
        q_second = quantize(torch.randn(6, 90, generator=g), 4, 64, 1, "symmetric", "mse")
        parts = [
            GroupFactors.prepare_quantized(q_first, q_second),
            GroupFactors.prepare(
                torch.randn(3, 200, generator=g).half(), torch.randn(3, 90, generator=g).half()
            ),
        ]
        x, y = torch.randn(9, 200, generator=g), torch.zeros(9, 90)
        LowRankGroup(parts, [[0, 3], [1, 2, 4, 5, 6, 7, 8]]).add_into(x, y)  # 7 rows: a prefill's blocks
        return y

    shape, cases = (70, 584), [_case(70, 584, n, seed=5 + n) for n in (1, 3, 6, 30)]
    native = [sign_matmul(x, packed, shape) for packed, x in cases]
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=gen).bfloat16()
    parts = {
        "signs": cases[0][0],
        "scale": 0.01,
        "up": torch.randn(70, 5, generator=gen).half(),
        "down": torch.randn(5, 584, generator=gen).half(),
    }
    native.append(fused_rebuild(base, torch.bfloat16, **parts))
    native.append(low_rank_group_share())
    monkeypatch.setattr(signmm, "_FLAGS", (*signmm._FLAGS, *flags))
    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(signmm, "_tried", False)
    monkeypatch.setattr(signmm, "_library", None)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("-mno-avx512f and -mno-fma are x86 flags")
    assert signmm.native_library() is not None, "the portable form does not build"
    portable = [sign_matmul(x, packed, shape) for packed, x in cases]
    portable.append(fused_rebuild(base, torch.bfloat16, **parts))
    portable.append(low_rank_group_share())
    assert native[-1].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(native, portable, strict=True))


@needs_kernel
def test_sign_group_takes_kept_tiles_and_refuses_wrong_sizes():
    shape = (40, 24)
    packs = [_case(*shape, 1, seed=s)[0] for s in range(2)]
    tiles = [signmm.sign_tiles(p, shape) for p in packs]
    x, rows, scales = torch.randn(3, 24), [[0, 2], [1]], [1.0, -0.5]
    made, kept = torch.zeros(3, 40), torch.zeros(3, 40)
    SignGroup(packs, shape, rows, scales).add_into(x, made)
    SignGroup(packs, shape, rows, scales, tiles).add_into(x, kept)
    assert torch.equal(made, kept)
    with pytest.raises(ValueError, match="tiled bytes"):
        SignGroup(packs, shape, rows, scales, [tiles[0], tiles[1][:-16]])
    with pytest.raises(ValueError, match="as many"):
        SignGroup(packs, shape, rows, scales, tiles[:1])
