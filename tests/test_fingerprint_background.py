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


@pytest.mark.parametrize("remembered", ["1", "0"])
def test_apply_fingerprints_are_those_of_its_inputs_and_output(monkeypatch, tmp_path, remembered):
    """Apply hashes on its workers, next to each rebuild: the base fingerprint is the checkpoint's and the
    output fingerprint is that of the tensors it returns, with digests remembered or not."""
    from test_runtime_support import cached_fleet

    import deltakit
    from deltakit.format.digest_cache import ENV_SWITCH
    from deltakit.format.fingerprint import checkpoint_fingerprint, fingerprint_tensors

    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv(ENV_SWITCH, remembered)
    fleet = cached_fleet("llama")
    for name in ("svd-2", "lossless-3"):
        for _ in range(2):  # the second run finds the base's digests remembered (when switched on)
            report = deltakit.apply(fleet["base"], fleet["delta"][name], fingerprint_output=True)
            assert report.base_fingerprint == checkpoint_fingerprint(fleet["base"])
            assert report.output_fingerprint == fingerprint_tensors(report.state_dict)
    assert report.matches_target  # lossless: the output is the fine-tune
