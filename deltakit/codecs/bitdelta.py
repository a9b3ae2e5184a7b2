"""BitDelta: sign(Δ) packed 8 per byte and one scale per matrix.

The scale is α = mean|Δ|, the Frobenius-optimal scale for a ±1 matrix. Size is fixed at 1/16 of
the fp16 delta (plus 4 bytes for the scale). The paper's second stage, distilling the scales
against the fine-tune's logits, needs data and runs after encoding when asked
(``refine_scales=True``, :mod:`deltakit.core.refine`); the codec itself stays data-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.codecs._common import dense_signs, require_2d, rescaled_parts, sign_part
from deltakit.codecs.base import (
    Budget,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    FactoredView,
    StoredTensor,
)
from deltakit.codecs.registry import register_codec
from deltakit.errors import BudgetError, FormatError


@dataclass(frozen=True)
class BitDeltaConfig(CodecConfig):
    pass


@register_codec
class BitDelta(Codec):
    name = "bitdelta"
    version = 1
    config_class = BitDeltaConfig
    summary = "BitDelta: 1-bit sign of the delta with one scale per matrix (1/16 of fp16)"
    default_ratio = 1 / 16
    ratio_range = (1 / 16, 1 / 16)
    param_bytes = 4
    max_error = 0.70  # measured 0.643 on the conformance probe (seed 0)

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: BitDeltaConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        if ctx.budget.rank is not None:
            raise BudgetError("bitdelta has no rank; its size is fixed at 1/16 of the fp16 delta")
        _, signs, scale = sign_part(base, target, ctx.device)
        return Encoded({"signs": signs}, {"shape": list(shape), "scale": scale})

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = tuple(encoded.params["shape"])
        return dense_signs(encoded.tensors["signs"], shape, device) * encoded.params["scale"]

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: BitDeltaConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        rows, cols = require_2d("", self.name, tuple(shape))
        return {"signs": StoredTensor("uint8", ((rows * cols + 7) // 8,))}

    def factored(self, encoded: Encoded) -> FactoredView:
        shape = tuple(encoded.params["shape"])
        return FactoredView(shape, encoded.tensors["signs"], float(encoded.params["scale"]))

    def rescaled(self, encoded: Encoded, scale: float | None, components: torch.Tensor | None) -> Encoded:
        if components is not None:
            raise FormatError("bitdelta has no low-rank components to rescale")
        return rescaled_parts(encoded, scale, None)
