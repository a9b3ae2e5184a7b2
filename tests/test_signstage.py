"""The encode-side sign stage: the compiled loop gives the torch form's bits, and sign codecs the same bytes."""

from __future__ import annotations

import pytest
import torch

import deltakit
from deltakit.ops import signstage
from deltakit.ops.bitpack import pack_signs
from deltakit.ops.signmm import native_library

needs_native = pytest.mark.skipif(native_library() is None, reason="no C compiler for the kernel")


def _pair(shape, base_dtype, target_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(base_dtype)
    target = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(target_dtype)
    flat_b, flat_t = base.view(-1), target.view(-1)
    flat_t[:3] = flat_b[:3].to(target_dtype)  # equal entries: +0 deltas
    if flat_b.numel() > 4:
        flat_b[3], flat_t[3] = 0.0, -0.0  # (-0) - (+0) = -0, which counts as non-negative
    return base, target


@needs_native
@pytest.mark.parametrize("shape", [(1,), (7,), (13, 5), (3, 17), (64, 48), (576, 1536)])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)],
)
def test_compiled_sign_stage_has_the_torch_forms_bits(shape, dtypes):
    base, target = _pair(shape, *dtypes)
    delta, signs = signstage.sign_stage(base, target)
    reference = target.float() - base.float()
    assert torch.equal(delta, reference) and delta.shape == base.shape
    assert torch.equal(signs, pack_signs(reference))
    assert signs.numel() == (base.numel() + 7) // 8
    for scale in (0.0123, 1 / 3, float(reference.abs().mean()), 0.0):
        expected = reference - scale * torch.where(reference >= 0, 1.0, -1.0)
        assert torch.equal(signstage.sign_residual(delta, scale), expected)


def test_sign_stage_falls_back_to_torch_for_other_dtypes_and_refuses_shape_mismatch():
    base, target = _pair((9, 4), torch.float16, torch.float16)
    delta, signs = signstage.sign_stage(base, target)  # fp16: the torch form
    assert torch.equal(delta, target.float() - base.float())
    assert torch.equal(signs, pack_signs(delta))
    with pytest.raises(ValueError, match="differ in shape"):
        signstage.sign_stage(base, target[:3])


@needs_native
@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("bitdelta", {}),
        ("dqrelo", {}),
        ("dqrelo", {"compensation": "refit"}),
        ("dqrelo", {"factor_bits": 16}),
    ],
)
def test_sign_codecs_store_the_same_bytes_with_and_without_the_compiled_stage(method, config, monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w": torch.randn(48, 80, generator=g).to(torch.bfloat16) for i in range(3)}
    target = {
        k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()
    }

    def stored(delta):
        return {
            key: delta.stored_tensor(key, entry.shard)
            for entry in delta.manifest.tensors.values()
            for key in entry.stored.values()
        }, {name: entry.params for name, entry in delta.manifest.tensors.items()}

    compiled = stored(deltakit.compress(base, target, method=method, config=config))
    monkeypatch.setattr(signstage, "native_for", lambda tensors, dtypes: None)  # the sign stage only
    plain = stored(deltakit.compress(base, target, method=method, config=config))
    assert compiled[1] == plain[1]
    assert compiled[0].keys() == plain[0].keys()
    assert all(torch.equal(compiled[0][k], plain[0][k]) for k in plain[0])
