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
from deltakit.codecs.base import (
    FP16_BYTES,
    Budget,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    StoredTensor,
    config_field,
)
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

    def _plan(
        self, shape: tuple[int, ...], config: DAREConfig, budget: Budget, name: str = ""
    ) -> tuple[int, str]:
        """How many entries to keep and how positions are stored (``seed``, ``mask`` or ``indices``)."""
        if budget.rank is not None:
            raise BudgetError("dare has no rank; give a ratio")
        ratio = budget.ratio if budget.ratio is not None else self.default_ratio
        numel = math.prod(shape)
        if config.mode == "random":
            keep, storage = math.floor(ratio * numel), "seed"
        else:
            nbytes = ratio * FP16_BYTES * numel
            keep_mask = math.floor((nbytes - (numel + 7) // 8) / FP16_BYTES)
            keep_index = math.floor(nbytes / (FP16_BYTES + 4))
            keep, storage = (
                min(max(keep_mask, keep_index), numel),
                "mask" if keep_mask >= keep_index else "indices",
            )
        if keep < 1:
            raise BudgetError(f"dare: ratio {ratio:g} keeps no entry of {name or 'a'} {list(shape)} tensor")
        return keep, storage

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: DAREConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        keep, storage = self._plan(tuple(shape), config, budget)
        out = {"values": StoredTensor("float16", (keep,))}
        if storage == "mask":
            out["mask"] = StoredTensor("uint8", ((math.prod(shape) + 7) // 8,))
        elif storage == "indices":
            out["indices"] = StoredTensor("int32", (keep,))
        return out

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: DAREConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        keep, storage = self._plan(shape, config, ctx.budget, ctx.name)
        delta = fp32_delta(base, target, ctx.device).reshape(-1).cpu()
        numel = delta.numel()
        if storage == "seed":
            seed = ctx.tensor_seed()
            positions = _random_positions(numel, keep, seed)
            values = (delta[positions] * (numel / keep)).to(torch.float16)
            return Encoded(
                {"values": values}, {"shape": list(shape), "mode": "random", "keep": keep, "seed": seed}
            )
        positions = delta.abs().topk(keep).indices.sort().values
        values = delta[positions].to(torch.float16)
        if storage == "mask":
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[positions] = True
            stored = {"values": values, "mask": pack_bits(mask)}
        else:
            stored = {"values": values, "indices": positions.to(torch.int32)}
        return Encoded(stored, {"shape": list(shape), "mode": "magnitude", "keep": int(positions.numel())})

    def expected_error(self, encoded: Encoded) -> float | None:
        """Drop-and-rescale keeps fraction k with variance giving relative error sqrt((1 - k) / k)."""
        if encoded.params["mode"] != "random":
            return None
        keep = encoded.params["keep"] / math.prod(encoded.params["shape"])
        return math.sqrt((1 - keep) / keep)

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
