"""The packed 1-bit sign product: equal to the ±1 matmul within fp32 rounding, fixed bits per row."""

from __future__ import annotations

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
@pytest.mark.parametrize("n", [1, 2, 3, 5, 19])  # few-row form and table form (>= LUT_MIN_ROWS)
@pytest.mark.parametrize("shape", [(70, 576), (33, 40), (24, 584), (130, 1536)])
def test_kernel_matches_the_exact_product(shape, n):
    packed, x = _case(*shape, n)
    ours = sign_matmul(x, packed, shape)
    assert signmm.native_applies(x, shape) and ours.dtype == torch.float32 and ours.shape == (n, shape[0])
    exact = _exact(x, packed, shape)
    bound = 1e-6 * x.abs().sum(-1, keepdim=True).double() + 1e-6  # fp32 summation error bound, loose
    assert ((ours.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(ours, reference_sign_matmul(x, packed, shape), rtol=1e-5, atol=1e-4)


def _lane_transcription(x: torch.Tensor, packed: torch.Tensor, shape) -> torch.Tensor:
    """The few-row form's documented arithmetic in torch, fp32 operation for operation: 32 lanes, lane c
    summing columns 32 j + c of the full blocks in order of j, the tail's 8-column group k into lanes
    8 k .. 8 k + 7, the fixed pairwise tree, then 2 P - T."""
    out_features, in_features = shape
    bits = unpack_signs(packed, shape) > 0  # (out, in)
    full = in_features // 32 * 32

    def lanes_of(mask: torch.Tensor) -> torch.Tensor:  # mask (out, in) -> lane sums (n, out, 32)
        lanes = torch.zeros(x.shape[0], out_features, 32)
        for j in range(0, full, 32):
            xs = x[:, None, j : j + 32].expand(-1, out_features, -1)
            lanes = torch.where(mask[None, :, j : j + 32], lanes + xs, lanes)
        for k, j in enumerate(range(full, in_features, 8)):
            for c in range(8):
                lane = lanes[:, :, 8 * k + c]
                lanes[:, :, 8 * k + c] = torch.where(mask[None, :, j + c], lane + x[:, None, j + c], lane)
        return lanes

    def tree(lanes: torch.Tensor) -> torch.Tensor:
        a = lanes[..., :16] + lanes[..., 16:]
        for w in (8, 4, 2, 1):
            a = a[..., :w] + a[..., w : 2 * w]
        return a[..., 0]

    set_sum = tree(lanes_of(bits))  # (n, out)
    total = tree(lanes_of(torch.ones_like(bits)))[:, :1]  # (n, 1): the same sum for every output
    return 2.0 * set_sum - total


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3])  # the few-row form: 4 or 2 matrix rows per pass
@pytest.mark.parametrize("shape", [(70, 576), (33, 40), (9, 584), (5, 1536), (1, 64)])
def test_few_row_form_has_the_documented_bits(shape, n):
    packed, x = _case(*shape, n, seed=3)
    assert n < signmm.LUT_MIN_ROWS
    ours = sign_matmul(x, packed, shape)
    assert torch.equal(ours, _lane_transcription(x, packed, shape))


@needs_kernel
def test_bf16_activations_are_upcast_exactly():
    packed, x = _case(64, 576, 3)
    xb = x.to(torch.bfloat16)
    assert torch.equal(sign_matmul(xb, packed, (64, 576)), sign_matmul(xb.float(), packed, (64, 576)))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 11, 40])
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
    x = torch.randn(9, 576)
    rows = [[0, 4], [1, 2, 3, 5, 6, 7], [8]]  # non-consecutive; one part takes the table form
    scales = [0.5, -0.25, 2.0]
    y = torch.randn(9, 96)
    expected = y.clone()
    for p, r, a in zip(packs, rows, scales, strict=True):
        expected[r] += a * sign_matmul(x[r], p, shape)
    SignGroup(packs, shape, rows, scales).add_into(x, y)
    assert torch.equal(y, expected)
    with pytest.raises(ValueError, match="rows reach"):
        SignGroup(packs, shape, [[0], [1], [20]], scales).add_into(x, y)


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
