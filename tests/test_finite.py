"""all_finite finds every NaN and Inf; the checkpoint writer hashes only when asked."""

from __future__ import annotations

import hashlib

import pytest
import torch

from deltakit.format.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from deltakit.ops.finite import all_finite


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
