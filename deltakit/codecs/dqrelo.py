"""D-QRELO: one-bit sign of the delta plus a truncated SVD of what the signs leave.

Stages, per weight matrix Δ = W_f − W_b (fp32):
1. sign stage: B = sign(Δ) (zero counts as +), packed 8 per byte, scale α = mean|Δ|;
2. residual stage: R = Δ − α·B, truncated SVD at rank r; factors stored as U√S and √S·Vᵀ;
3. compensation (the paper's §3.3 could not be read; this is our decision): with the low-rank part
   L fixed, re-fit α in closed form, α* = ⟨Δ − L, B⟩ / numel (least squares for a ±1 matrix).
   ``compensation=alternate`` repeats (SVD of Δ − α·B, re-fit α) for ``rounds`` rounds.

Size: signs cost numel/8 bytes, i.e. 1/16 of the fp16 delta; the rank takes the rest of the budget,
r = floor((ρ·2·n·m − n·m/8) / (2·(n+m))), the paper's r = n·m·ρ₁/(n+m) with ρ = ρ₁ + 1/16,
floored so the budget is not exceeded (4096×4096 at ρ = 1/8 gives the paper's r = 128). The fp32
scale (4 bytes a matrix) lives in the manifest and is counted in the delta's reported size.

The residual factors are quantized at ``factor_bits`` (4 by default; codes + fp16 scales, counted
exactly), so at 1/16 plus a little the residual still gets a rank; ``factor_bits=16`` stores float
factors and uses the rank formula above. Below 1/16 the sign bits alone do not fit and the
codec refuses with a BudgetError naming the codecs that go lower (``svd``, ``deltacome``, ``dare``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.codecs._common import (
    LowRankConfig,
    dense_signs,
    has_factors,
    load_factors,
    low_rank_candidates,
    require_2d,
    rescaled_parts,
    sign_part,
    spectrum_of,
    store_factors,
    view_factors,
)
from deltakit.codecs.base import (
    FP16_BYTES,
    Budget,
    Candidate,
    Codec,
    EncodeContext,
    Encoded,
    FactoredView,
    StoredTensor,
    config_field,
)
from deltakit.codecs.registry import register_codec
from deltakit.errors import BudgetError
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.signstage import sign_residual


@dataclass(frozen=True)
class DQReloConfig(LowRankConfig):
    # none: on the fleet at 2 bits per weight, keeping α = mean|Δ| closed 0.991 of KL(ft ‖ base) with
    # 4-bit factors where the closed-form re-fit closed 0.980 (0.975 against 0.965 with fp16 factors):
    # the re-fit lowers the weight error but not the KL (docs/rate_distortion/README.md)
    compensation: str = config_field(
        "none",
        "after the SVD, re-fit the sign scale: none | refit (closed form once) | alternate (SVD and re-fit, "
        "`rounds` times)",
        choices=("none", "refit", "alternate"),
    )
    rounds: int = config_field(2, "rounds of SVD + scale re-fit when compensation=alternate")


@register_codec
class DQRelo(Codec):
    name = "dqrelo"
    version = 1
    config_class = DQReloConfig
    summary = "D-QRELO: 1-bit sign of the delta + truncated SVD of the residual (data-free)"
    default_ratio = 1 / 8
    ratio_range = (1 / 16, 1.0)
    param_bytes = 4
    max_error = 0.52  # measured 0.471 on the conformance probe (seed 0) with 4-bit factors, 0.544 with fp16

    def rank_for(self, shape: tuple[int, int], ctx: EncodeContext, config: DQReloConfig) -> int:
        rows, cols = shape
        if ctx.budget.rank is not None:
            return min(ctx.budget.rank, rows, cols)
        ratio = ctx.budget.ratio if ctx.budget.ratio is not None else self.default_ratio
        budget_bytes = ratio * FP16_BYTES * rows * cols
        sign_bytes = (rows * cols + 7) // 8
        if budget_bytes < sign_bytes * (1 - 1e-6):
            raise BudgetError(
                f"dqrelo needs at least 1/16 of the fp16 delta for its sign bits; ratio {ratio:g} is below "
                "(svd, deltacome and dare reach lower ratios)"
            )
        return config.rank_for_bytes(rows, cols, budget_bytes - sign_bytes)

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: DQReloConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        delta, signs, scale = sign_part(base, target, ctx.device)  # (out, in) fp32, bits of delta >= 0
        rank = self.rank_for(shape, ctx, config)
        tensors: dict[str, torch.Tensor] = {"signs": signs}
        params: dict = {}
        if rank > 0:
            rounds = config.rounds if config.compensation == "alternate" else 1
            sign_dense = None  # the ±1 matrix the bits hold, built only for the compensation's re-fit
            for _ in range(max(1, rounds)):
                residual = sign_residual(delta, scale)  # delta - scale * S
                up, down = config.factors(residual, rank, ctx.tensor_seed())
                stored, params = store_factors(up, down, config, target=residual)
                if config.compensation != "none":
                    if sign_dense is None:
                        sign_dense = torch.where(delta >= 0, 1.0, -1.0)
                    q_up, q_down = load_factors(Encoded(stored, {"shape": list(shape), **params}), ctx.device)
                    scale = float(((delta - q_up @ q_down) * sign_dense).mean())
            tensors.update(stored)
        return Encoded(tensors, {"shape": list(shape), "scale": scale, "rank": rank, **params})

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = tuple(encoded.params["shape"])
        delta = dense_signs(encoded.tensors["signs"], shape, device) * encoded.params["scale"]
        if has_factors(encoded):
            up, down = load_factors(encoded, device)
            delta += low_rank_product(up, down)  # (out, in)
        return delta

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: DQReloConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        rows, cols = require_2d("", self.name, tuple(shape))
        out = {"signs": StoredTensor("uint8", ((rows * cols + 7) // 8,))}
        rank = self.rank_for((rows, cols), EncodeContext(budget=budget), config)
        return {**out, **config.stored(rows, cols, rank)}

    def spectrum(self, delta: torch.Tensor, config: DQReloConfig) -> torch.Tensor:
        """Singular values of what the sign stage leaves, Δ − mean|Δ|·sign(Δ)."""
        sign_dense = torch.where(delta >= 0, 1.0, -1.0)
        return spectrum_of(delta - delta.abs().mean() * sign_dense)

    def candidates(
        self, shape: tuple[int, int], spectrum: torch.Tensor, config: DQReloConfig
    ) -> list[Candidate]:
        sign_bytes = (shape[0] * shape[1] + 7) // 8
        fixed = sign_bytes + self.param_bytes  # sign bits + the fp32 scale
        signs_only = Candidate(
            fixed,
            float((spectrum.to(torch.float64) ** 2).sum()),
            Budget(ratio=sign_bytes / (FP16_BYTES * shape[0] * shape[1])),
            "signs only",
        )
        return [signs_only, *low_rank_candidates(shape, spectrum, config, fixed_bytes=fixed)]

    def factored(self, encoded: Encoded) -> FactoredView:
        shape = tuple(encoded.params["shape"])
        up, down, quantized = view_factors(encoded) if has_factors(encoded) else (None, None, None)
        signs, scale = encoded.tensors["signs"], float(encoded.params["scale"])
        return FactoredView(shape, signs, scale, up, down, quantized)

    def rescaled(self, encoded: Encoded, scale: float | None, components: torch.Tensor | None) -> Encoded:
        return rescaled_parts(encoded, scale, components)
