"""The low-rank product's bits do not depend on the rows asked for, the thread count or the kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.ops import lowrank
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.signmm import native_library
from deltakit.ops.threads import torch_threads


def _factors(rows: int, rank: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors with some signed zeros (their products' zero signs must be kept too)."""
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen)
    up[::3, :1] = -0.0
    down[:1, ::4] = 0.0
    return up, down


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (``torch.equal`` would take -0 for +0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    rank=st.integers(0, 40),
    cols=st.integers(1, 90),
    step=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
def test_row_blocks_equal_the_rows_of_the_whole_product(rows, rank, cols, step, seed):
    up, down = _factors(rows, rank, cols, seed)
    whole = low_rank_product(up, down)
    blocks = [low_rank_product(up, down, rows=(r, min(rows, r + step))) for r in range(0, rows, step)]
    assert _same_bits(torch.cat(blocks), whole)
    torch.testing.assert_close(whole, up @ down, rtol=1e-4, atol=1e-4)  # the product, up to rounding


@pytest.mark.parametrize("shape", [(9, 8, 200), (37, 3, 13), (6, 64, 576), (300, 16, 96)])
def test_bits_do_not_depend_on_the_thread_count(shape):
    up, down = _factors(*shape)
    results = []
    for threads in (1, 2, 4):
        with torch_threads(threads):
            results.append(low_rank_product(up, down))
    assert all(_same_bits(r, results[0]) for r in results)


@pytest.mark.skipif(native_library() is None, reason="needs the compiled kernel")
@pytest.mark.parametrize(
    "shape", [(9, 8, 200), (37, 3, 13), (64, 70, 33), (5, 1, 64), (4, 2, 16), (7, 5, 17)]
)
def test_compiled_and_torch_forms_give_the_same_bits(shape):
    up, down = _factors(*shape)
    compiled = low_rank_product(up, down)
    torch_form = lowrank._torch_rows(up, down, torch.empty(shape[0], shape[2]))
    assert _same_bits(compiled, torch_form)


def test_rank_zero_gives_zeros_and_inputs_are_not_mutated():
    up, down = _factors(5, 0, 7)
    assert torch.equal(low_rank_product(up, down), torch.zeros(5, 7))
    up, down = _factors(5, 3, 7)
    up16, down16 = up.half(), down.half()
    copies = up16.clone(), down16.clone()
    out = low_rank_product(up16, down16)
    assert out.dtype == torch.float32
    assert torch.equal(up16, copies[0]) and torch.equal(down16, copies[1])


def test_writes_into_the_given_buffer():
    up, down = _factors(16, 4, 9)
    out = torch.full((8, 9), 5.0)
    got = low_rank_product(up, down, rows=(8, 16), out=out)
    assert got is out and torch.equal(out, low_rank_product(up, down)[8:16])


@pytest.mark.parametrize(
    ("up_shape", "down_shape", "rows", "match"),
    [
        ((4, 3), (2, 5), None, "do not form a product"),
        ((4, 3), (3, 5), (2, 6), "outside"),
        ((4,), (3, 5), None, "do not form a product"),
    ],
)
def test_bad_arguments_name_the_problem(up_shape, down_shape, rows, match):
    with pytest.raises(ValueError, match=match):
        low_rank_product(torch.zeros(up_shape), torch.zeros(down_shape), rows=rows)


def test_a_wrong_out_buffer_is_refused():
    up, down = _factors(4, 2, 3)
    with pytest.raises(ValueError, match="contiguous float32"):
        low_rank_product(up, down, out=torch.empty(4, 3, dtype=torch.float16))
