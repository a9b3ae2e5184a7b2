"""all_finite finds every NaN and Inf; scan_pair answers as the torch reductions do; the checkpoint
writer hashes only when asked."""

from __future__ import annotations

import hashlib

import pytest
import torch

from deltakit.format.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from deltakit.ops import signmm
from deltakit.ops.finite import all_finite, scan_pair

SCAN_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 517, -1])
def test_one_non_finite_value_anywhere_is_found(dtype, bad, position):
    values = torch.randn(3, 400).to(dtype)
    assert all_finite(values)
    values.view(-1)[position] = bad
    assert not all_finite(values)


def test_empty_and_non_float_tensors_count_as_finite():
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.tensor([1, 2, 3]))
    assert all_finite(torch.tensor([True]))


def test_input_is_not_mutated():
    values = torch.tensor([1.0, float("nan"), -2.0])
    before = values.clone()
    all_finite(values)
    assert torch.equal(values.isnan(), before.isnan()) and values[0] == 1.0 and values[2] == -2.0


def test_writer_hashes_with_digest_and_refuses_sha256_without(tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    spec = [TensorSpec("w", torch.float32, (2, 3))]
    with StreamingSafetensorsWriter(tmp_path / "a.safetensors", spec) as hashed:
        hashed.write("w", tensor)
    assert hashed.sha256 == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    with StreamingSafetensorsWriter(tmp_path / "b.safetensors", spec, digest=False) as plain:
        plain.write("w", tensor)
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(ValueError, match="digest"):
        _ = plain.sha256


def _torch_answers(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, bool, bool]:
    same = a.shape == b.shape and a.dtype == b.dtype
    return bool(torch.isfinite(a).all()), bool(torch.isfinite(b).all()), same and torch.equal(a, b)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", SCAN_DTYPES)
def test_scan_pair_answers_as_the_torch_reductions(monkeypatch, native, dtype):
    """Equal pairs, one element changed anywhere, ±0 swapped (equal as numbers), and a NaN or Inf in
    either tensor at the start, middle or tail (odd sizes, so no element falls outside a vector)."""
    if not native:
        monkeypatch.setattr(signmm, "_tried", True)
        monkeypatch.setattr(signmm, "_library", None)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 53, generator=gen).to(dtype)
    a.view(-1)[5] = 0.0
    cases = [(a, a.clone())]
    for position in (0, 1000, a.numel() - 1):
        other = a.clone()
        other.view(-1)[position] = other.view(-1)[position] * 2 + 1
        cases.append((a, other))
    signed_zero = a.clone()
    signed_zero.view(-1)[5] = -0.0
    cases.append((a, signed_zero))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in (0, 999, a.numel() - 1):
            broken = a.clone()
            broken.view(-1)[position] = bad
            cases += [(broken, a), (a, broken)]
    for x, y in cases:
        assert scan_pair(x, y) == _torch_answers(x, y)
    assert scan_pair(a, signed_zero)[2] and not scan_pair(a, cases[1][1])[2]


def test_scan_pair_of_other_shapes_dtypes_and_layouts_uses_the_reductions():
    a = torch.randn(8, 6)
    assert scan_pair(a, a.T.contiguous().T) == (True, True, True)  # not contiguous: torch's answer
    assert scan_pair(a, a[:, :5]) == (True, True, False)  # other shape
    assert scan_pair(a, a.double()) == (True, True, False)  # other dtype
    assert scan_pair(a.double(), a.double()) == (True, True, True)
    assert scan_pair(torch.empty(0, 3), torch.empty(0, 3)) == (True, True, True)
    before = a.clone()
    scan_pair(a, a + 1)
    assert torch.equal(a, before)
