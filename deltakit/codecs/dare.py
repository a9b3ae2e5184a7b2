"""DARE and magnitude sparsification of the delta.

``mode=random`` (DARE, Yu et al. 2024): keep a random fraction k of Δ's entries and rescale them by
1/k so the delta's expectation is unchanged. The kept positions come from a seeded permutation, so
only the seed is stored, not the positions: k = ρ (fp16 values, 2 bytes each).

``mode=magnitude``: keep the k entries of largest |Δ| without rescaling. Positions are stored as a
packed bitmask (numel/8 bytes, k = ρ − 1/16) or as int32 flat indices (k = ρ/3), whichever keeps
more entries at the given budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltakit.codecs._common import fp32_delta, require_2d
from deltakit.codecs.base import FP16_BYTES, Codec, CodecConfig, EncodeContext, Encoded, config_field
from deltakit.codecs.registry import register_codec
from deltakit.errors import BudgetError
from deltakit.ops.bitpack import pack_bits, unpack_bits


@dataclass(frozen=True)
class DAREConfig(CodecConfig):
    mode: str = config_field(
        "random",
        "random: DARE drop-and-rescale; magnitude: keep the largest |delta| entries",
        choices=("random", "magnitude"),
    )


def _random_positions(numel: int, keep: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:keep].sort().values


@register_codec
class DARE(Codec):
    name = "dare"
    version = 1
    config_class = DAREConfig
    summary = "DARE random drop with rescale (or magnitude top-k) of the delta entries"
    default_ratio = 1 / 8

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: DAREConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        if ctx.budget.rank is not None:
            raise BudgetError("dare has no rank; give a ratio")
        ratio = ctx.budget.ratio if ctx.budget.ratio is not None else self.default_ratio
        delta = fp32_delta(base, target, ctx.device).reshape(-1).cpu()
        numel = delta.numel()
        if config.mode == "random":
            keep = math.floor(ratio * numel)
            if keep < 1:
                raise BudgetError(
                    f"dare: ratio {ratio:g} keeps no entry of {ctx.name or 'a'} {list(shape)} tensor"
                )
            seed = ctx.tensor_seed()
            positions = _random_positions(numel, keep, seed)
            values = (delta[positions] * (numel / keep)).to(torch.float16)
            return Encoded(
                {"values": values}, {"shape": list(shape), "mode": "random", "keep": keep, "seed": seed}
            )
        budget = ratio * FP16_BYTES * numel
        keep_mask = math.floor((budget - (numel + 7) // 8) / FP16_BYTES)
        keep_index = math.floor(budget / (FP16_BYTES + 4))
        keep = max(keep_mask, keep_index)
        if keep < 1:
            raise BudgetError(
                f"dare: ratio {ratio:g} keeps no entry of {ctx.name or 'a'} {list(shape)} tensor"
            )
        positions = delta.abs().topk(min(keep, numel)).indices.sort().values
        values = delta[positions].to(torch.float16)
        if keep_mask >= keep_index:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[positions] = True
            stored = {"values": values, "mask": pack_bits(mask)}
        else:
            stored = {"values": values, "indices": positions.to(torch.int32)}
        return Encoded(stored, {"shape": list(shape), "mode": "magnitude", "keep": int(positions.numel())})

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        params = encoded.params
        shape = tuple(params["shape"])
        numel = math.prod(shape)
        if params["mode"] == "random":
            positions = _random_positions(numel, params["keep"], params["seed"])
        elif "mask" in encoded.tensors:
            positions = unpack_bits(encoded.tensors["mask"], numel).nonzero().reshape(-1)
        else:
            positions = encoded.tensors["indices"].to(torch.int64)
        delta = torch.zeros(numel, dtype=torch.float32, device=device)
        delta[positions.to(device)] = encoded.tensors["values"].to(device=device, dtype=torch.float32)
        return delta.reshape(shape)
