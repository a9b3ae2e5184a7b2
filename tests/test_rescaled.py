"""``Codec.rescaled``: the factored view's sign scale and low-rank components rescaled in the stored
tensors (keys, dtypes and shapes unchanged), the contract scale refinement relies on."""

from __future__ import annotations

import pytest
import torch

from deltakit.codecs.base import Budget, EncodeContext
from deltakit.codecs.registry import get_codec
from deltakit.errors import FormatError

CASES = [
    ("svd", {"factor_bits": 16}),
    ("svd", {"factor_bits": 4}),
    ("dqrelo", {"factor_bits": 4}),
    ("dqrelo", {"factor_bits": 16}),
    ("deltacome", {}),
    ("bitdelta", {}),
]


def _encode(name: str, overrides: dict):
    codec = get_codec(name)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=generator)
    target = base + 0.05 * torch.randn(48, 40, generator=generator)
    config = codec.config_class(**overrides)
    ctx = EncodeContext(budget=Budget(ratio=0.25), name="w")
    return codec, codec.encode(base, target, config, ctx)


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_rescaled_matches_the_rescaled_view(name, overrides):
    codec, encoded = _encode(name, overrides)
    view = codec.factored(encoded)
    rank = 0 if view.up is None else view.up.shape[1]
    components = None if rank == 0 else torch.linspace(0.5, 1.5, rank)
    scale = 1.7 * view.scale if view.signs is not None else None
    out = codec.rescaled(encoded, scale, components)
    assert {k: (v.dtype, v.shape) for k, v in out.tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in encoded.tensors.items()
    }
    assert set(out.params) == set(encoded.params)
    expected = torch.zeros(view.shape)
    if view.signs is not None:
        from deltakit.ops.bitpack import unpack_signs

        expected += scale * unpack_signs(view.signs, view.shape, "cpu").float()
    if rank:
        expected += (view.up.float() * components) @ view.down.float()
    got = codec.decode(out)
    # fp16 storage of the rescaled factor (or its group scales) rounds to 2^-11 relative
    assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    assert not torch.equal(got, codec.decode(encoded))
    same = codec.rescaled(encoded, view.scale if view.signs is not None else None, None)
    assert torch.equal(codec.decode(same), codec.decode(encoded))  # scale kept, no component touched


def test_wrong_component_count_and_missing_factors_are_format_errors():
    codec, encoded = _encode("svd", {"factor_bits": 4})
    rank = codec.factored(encoded).up.shape[1]
    with pytest.raises(FormatError, match=rf"{rank + 1} component scales for {rank} quantized vectors"):
        codec.rescaled(encoded, None, torch.ones(rank + 1))
    codec, encoded = _encode("bitdelta", {})
    with pytest.raises(FormatError, match="no low-rank components"):
        codec.rescaled(encoded, 1.0, torch.ones(3))


def test_negative_multipliers_clamp_to_zero_and_input_is_not_mutated():
    codec, encoded = _encode("deltacome", {})
    before = {k: v.clone() for k, v in encoded.tensors.items()}
    rank = codec.factored(encoded).up.shape[1]
    out = codec.rescaled(encoded, None, -torch.ones(rank))
    assert torch.count_nonzero(codec.decode(out)) == 0
    assert all(torch.equal(before[k], v) for k, v in encoded.tensors.items())
