"""Digests queued on the background thread give the same fingerprint as digests taken in line."""

from __future__ import annotations

import pytest
import torch

from deltakit.format import fingerprint as fp


def _tensors(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(17 + i, 5, generator=gen).to(torch.bfloat16) for i in range(n)}


def test_add_later_matches_add_in_any_order():
    tensors = _tensors(2 * fp.MAX_PENDING + 3)  # more than the queue holds: the oldest are collected
    inline, later = fp.FingerprintBuilder(), fp.FingerprintBuilder()
    for name, tensor in tensors.items():
        inline.add(name, tensor)
    for name in reversed(list(tensors)):
        later.add_later(name, tensors[name])
    assert len(later) == len(tensors)
    assert later.fingerprint() == inline.fingerprint() == fp.fingerprint_tensors(tensors)


def test_a_changed_tensor_changes_the_background_fingerprint():
    tensors = _tensors(3)
    first, second = fp.FingerprintBuilder(), fp.FingerprintBuilder()
    for name, tensor in tensors.items():
        first.add_later(name, tensor)
        second.add_later(name, tensor if name != "t1" else tensor + 1)
    assert first.fingerprint() != second.fingerprint()


def test_a_failing_background_digest_raises_in_the_caller(monkeypatch):
    def broken(name, tensor):
        raise ValueError(f"cannot hash {name}")

    monkeypatch.setattr(fp, "tensor_digest", broken)
    builder = fp.FingerprintBuilder()
    builder.add_later("w", torch.zeros(3))
    with pytest.raises(ValueError, match="cannot hash w"):
        builder.fingerprint()
