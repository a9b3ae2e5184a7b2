"""Bit and sign packing: property tests over lengths and patterns, plus fixed examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.ops.bitpack import pack_bits, pack_signs, unpack_bits, unpack_signs

bit_lists = st.lists(st.booleans(), min_size=0, max_size=300)


@settings(max_examples=200, deadline=None)
@given(bit_lists)
def test_pack_unpack_bits_round_trips_for_any_length(bits):
    tensor = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(tensor)
    assert packed.dtype == torch.uint8
    assert packed.shape == ((len(bits) + 7) // 8,)
    assert torch.equal(unpack_bits(packed, len(bits)), tensor)


@settings(max_examples=100, deadline=None)
@given(bit_lists.filter(lambda b: len(b) % 8 != 0))
def test_padding_bits_in_last_byte_are_zero(bits):
    packed = pack_bits(torch.tensor(bits, dtype=torch.bool))
    used = len(bits) % 8
    assert int(packed[-1]) >> used == 0


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=144, max_size=144),
)
def test_sign_packing_round_trips_signs_of_any_2d_shape(rows, cols, values):
    delta = torch.tensor(values[: rows * cols], dtype=torch.float32).reshape(rows, cols)
    signs = unpack_signs(pack_signs(delta), (rows, cols))
    assert signs.dtype == torch.float32 and signs.shape == (rows, cols)
    expected = torch.where(delta >= 0, 1.0, -1.0)  # zero counts as +
    assert torch.equal(signs, expected)
    assert torch.equal(signs * delta.abs(), delta.abs() * expected)


def test_bit_order_is_lsb_first_within_each_byte():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [1, 2]


def test_pack_bits_flattens_in_row_major_order_even_for_non_contiguous_input():
    bits = torch.rand(16, 24, generator=torch.Generator().manual_seed(0)) > 0.5
    transposed = bits.T  # non-contiguous view
    assert torch.equal(pack_bits(transposed), pack_bits(transposed.contiguous()))
    assert torch.equal(unpack_bits(pack_bits(transposed), transposed.numel()), transposed.reshape(-1))


def test_pack_does_not_mutate_input():
    delta = torch.randn(5, 7)
    copy = delta.clone()
    pack_signs(delta)
    assert torch.equal(delta, copy)


def test_unpack_refuses_too_few_bytes():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


def test_signs_of_bf16_input_match_fp32():
    delta = torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(pack_signs(delta), pack_signs(delta.float()))
