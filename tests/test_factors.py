"""Quantized factor pairs: exact bytes, refit at least as good as RTN, determinism, bad arguments."""

from __future__ import annotations

import fixtures_models as fm
import pytest
import torch

from deltakit.errors import UsageError
from deltakit.ops.factors import QuantizedFactors, factors_nbytes, quantize_factors
from deltakit.ops.quant import QuantizedTensor
from deltakit.ops.svd import svd_factors


def _pair(seed: int = 0, rows: int = 96, cols: int = 256, rank: int = 16):
    g = torch.Generator().manual_seed(seed)
    delta = fm.structured_delta(rows, cols, g, rank=24, lowrank=0.6, sign=0.0, sparse=0.1, heavy_tail_df=4)
    up, down = svd_factors(delta, rank)
    return delta, up, down


def _err(q: QuantizedFactors, ref: torch.Tensor) -> float:
    return float((q.product() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "refit"])
def test_bytes_are_exact_and_error_shrinks_with_bits(bits, method):
    _, up, down = _pair()
    q = quantize_factors(up, down, bits, 32, method=method)
    assert q.nbytes == factors_nbytes(96, 256, 16, bits, 32)
    stored = {**q.up.to_tensors("u."), **q.down.to_tensors("d.")}
    assert sum(t.numel() * t.element_size() for t in stored.values()) == q.nbytes
    assert q.up.shape == (96, 16) and q.up.axis == 0 and q.down.shape == (16, 256) and q.down.axis == 1
    limit = {2: 0.6, 3: 0.35, 4: 0.2, 8: 0.015}[bits]
    assert _err(q, up @ down) < limit


@pytest.mark.parametrize("clip", ["absmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3])
def test_refit_is_no_worse_than_rtn_and_clearly_better_at_2_bits_absmax(bits, clip):
    for seed in range(3):
        _, up, down = _pair(seed)
        ref = up @ down
        rtn = _err(quantize_factors(up, down, bits, 32, method="rtn", clip=clip), ref)
        refit = _err(quantize_factors(up, down, bits, 32, method="refit", clip=clip), ref)
        assert refit <= rtn
        if bits == 2 and clip == "absmax":
            assert refit < 0.95 * rtn


def test_refit_against_the_delta_uses_the_target():
    delta, up, down = _pair(1)
    to_product = quantize_factors(up, down, 2, 32, clip="absmax")
    to_delta = quantize_factors(up, down, 2, 32, clip="absmax", target=delta)
    assert not torch.equal(to_product.down.codes, to_delta.down.codes)
    assert torch.equal(to_product.up.codes, to_delta.up.codes)  # up is rounded first either way


def test_quantize_factors_is_deterministic_and_round_trips_through_tensors():
    _, up, down = _pair(2)
    a = quantize_factors(up, down, 3, 32)
    b = quantize_factors(up.clone(), down.clone(), 3, 32)
    assert torch.equal(a.product(), b.product())
    up_again = QuantizedTensor.from_tensors(a.up.to_tensors("u."), a.up.params(), "u.")
    down_again = QuantizedTensor.from_tensors(a.down.to_tensors("d."), a.down.params(), "d.")
    assert torch.equal(QuantizedFactors(up_again, down_again).product(), a.product())


def test_quantize_factors_rejects_bad_arguments():
    _, up, down = _pair()
    with pytest.raises(UsageError, match="factors"):
        quantize_factors(up, down.T, 4, 32)
    with pytest.raises(UsageError, match="method"):
        quantize_factors(up, down, 4, 32, method="gptq")
    with pytest.raises(UsageError, match="first"):
        quantize_factors(up, down, 4, 32, first="both")
    with pytest.raises(UsageError, match="target"):
        quantize_factors(up, down, 4, 32, target=torch.zeros(3, 3))
