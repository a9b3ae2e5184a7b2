"""Mixed-precision low-rank delta (Delta-CoMe's idea, data-free): more bits for larger singular values.

Per weight matrix Δ (out, in), fp32:
1. exact SVD Δ = U·diag(σ)·Vᵀ; singular pair i is the balanced pair u_i√σ_i (rows) and √σ_i·v_i (cols);
2. :func:`deltakit.ops.mixed.split_mixed_precision` chooses, at the matrix's byte budget
   ``floor(ρ · 2 · rows · cols)``, how many leading pairs are stored at each width of ``bit_widths``
   (non-increasing bits down the spectrum) and how many are dropped, minimising the modelled error;
3. each width's block of pairs is quantized with :func:`deltakit.ops.factors.quantize_factors`
   (symmetric groups of ``factor_group`` along each singular vector, fp16 scales, MSE clipping).

Stored tensors (names fixed, sizes data-dependent): ``up_codes`` / ``down_codes`` (uint8, the blocks'
packed codes one after the other) and ``up_scales`` (rank, ceil(rows/g)) / ``down_scales``
(rank, ceil(cols/g)) (fp16, blocks stacked). ``params.blocks`` lists each block's bits, rank and the
QuantizedTensor params of its two factors, widest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from deltakit.codecs._common import fp32_delta, require_2d, rescaled_parts, spectrum_of
from deltakit.codecs.base import (
    FP16_BYTES,
    Budget,
    Candidate,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    FactoredView,
    StoredTensor,
    config_field,
)
from deltakit.codecs.registry import register_codec
from deltakit.errors import BudgetError, ConfigError, FormatError
from deltakit.ops.factors import quantize_factors
from deltakit.ops.intpack import packed_nbytes
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.mixed import lagrangian_splits, split_mixed_precision
from deltakit.ops.quant import SUPPORTED_BITS, QuantizedTensor, dequantize
from deltakit.ops.threads import torch_threads

NAMES = ("up_codes", "up_scales", "down_codes", "down_scales")


@dataclass(frozen=True)
class DeltaCoMeConfig(CodecConfig):
    bit_widths: str = config_field("8,4,3,2", "comma-separated bit widths the split may use (from 8,4,3,2)")
    factor_group: int = config_field(64, "values per fp16 scale along each singular vector")
    factor_rounding: str = config_field(
        "refit", "rtn, or refit (round up, least-squares re-fit down) per block", ("rtn", "refit")
    )
    candidate_levels: int = config_field(24, "byte levels per matrix offered to the cross-tensor allocator")

    def widths(self) -> tuple[int, ...]:
        try:
            widths = tuple(sorted({int(b) for b in self.bit_widths.split(",")}, reverse=True))
        except ValueError:
            raise ConfigError(f"bit_widths={self.bit_widths!r} must be comma-separated integers") from None
        if not widths or any(b not in SUPPORTED_BITS for b in widths):
            raise ConfigError(f"bit_widths={self.bit_widths!r}: each width must be one of {SUPPORTED_BITS}")
        return widths

    def validate(self) -> None:
        super().validate()
        self.widths()
        if not isinstance(self.factor_group, int) or self.factor_group < 1:
            raise ConfigError(f"factor_group must be a positive integer, got {self.factor_group!r}")
        if not isinstance(self.candidate_levels, int) or self.candidate_levels < 2:
            raise ConfigError(f"candidate_levels must be an integer >= 2, got {self.candidate_levels!r}")


@register_codec
class DeltaCoMe(Codec):
    name = "deltacome"
    version = 1
    config_class = DeltaCoMeConfig
    summary = "mixed-precision SVD: leading singular vectors at 8/4 bits, later ones at 3/2 (data-free)"
    default_ratio = 1 / 16
    max_error = 0.48  # measured 0.436 on the conformance probe at 1/8 (seed 0)

    def budget_bytes(self, shape: tuple[int, int], budget: Budget) -> int:
        rows, cols = shape
        if budget.rank is not None:
            raise BudgetError("deltacome is sized by a ratio (its rank follows from the split), not a rank")
        ratio = budget.ratio if budget.ratio is not None else self.default_ratio
        return math.floor(ratio * FP16_BYTES * rows * cols * (1 + 1e-12))

    def split(self, sigma: torch.Tensor, shape: tuple[int, int], nbytes: int, config: DeltaCoMeConfig):
        return split_mixed_precision(
            sigma, shape[0], shape[1], nbytes, bit_widths=config.widths(), group_size=config.factor_group
        )

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: DeltaCoMeConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        nbytes = self.budget_bytes(shape, ctx.budget)
        delta = fp32_delta(base, target, ctx.device)  # (out, in)
        u, s, vh = _svd(delta)  # (out, k), (k,), (k, in)
        split = self.split(s, shape, nbytes, config)
        if sum(split.counts.values()) == 0:
            raise BudgetError(
                f"deltacome: {nbytes} bytes hold no singular vector of {ctx.name or 'a'} "
                f"{shape[0]}x{shape[1]} matrix; give a larger ratio"
            )
        root = s.sqrt()
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in NAMES}
        blocks: list[dict[str, Any]] = []
        start = 0
        for bits in config.widths():
            n = split.counts.get(bits, 0)
            if n == 0:
                continue
            up = u[:, start : start + n] * root[start : start + n]  # (out, n)
            down = root[start : start + n, None] * vh[start : start + n]  # (n, in)
            q = quantize_factors(
                up, down, bits, config.factor_group, method=config.factor_rounding, clip="mse"
            )
            for name, t in {**q.up.to_tensors("up_"), **q.down.to_tensors("down_")}.items():
                parts[name].append(t.cpu())
            blocks.append({"bits": bits, "rank": n, "up": q.up.params(), "down": q.down.params()})
            start += n
        tensors = {k: torch.cat(v, 0) for k, v in parts.items()}
        return Encoded(tensors, {"shape": list(shape), "rank": start, "blocks": blocks})

    def factors(
        self, encoded: Encoded, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``up`` (rows, rank) and ``down`` (rank, cols), all blocks dequantized and concatenated."""
        t, params = encoded.tensors, encoded.params
        blocks, shape = params.get("blocks"), params.get("shape")
        if not isinstance(blocks, list) or not blocks or not isinstance(shape, list) or len(shape) != 2:
            raise FormatError("deltacome params need a non-empty 'blocks' list and a 2-D 'shape'")
        missing = [n for n in NAMES if n not in t]
        if missing:
            raise FormatError(f"deltacome tensor lacks stored {', '.join(missing)}")
        ups, downs, offsets = [], [], dict.fromkeys(NAMES, 0)
        for block in blocks:
            if not isinstance(block, dict) or not isinstance(block.get("up"), dict):
                raise FormatError("deltacome block must be an object with 'up' and 'down' params")
            pieces = {}
            for side in ("up", "down"):
                q = _block_tensor(t, block.get(side), side, offsets)
                pieces[side] = q
            if (
                pieces["up"].axis != 0
                or pieces["down"].axis != 1
                or list(pieces["up"].shape) != [shape[0], pieces["down"].shape[0]]
                or pieces["down"].shape[1] != shape[1]
                or block.get("bits") != pieces["up"].bits
                or block.get("bits") != pieces["down"].bits
                or block.get("rank") != pieces["up"].shape[1]
            ):
                raise FormatError(
                    f"deltacome block {block.get('bits')!r} bits: shapes or widths do not match {shape}"
                )
            ups.append(dequantize(pieces["up"], device))
            downs.append(dequantize(pieces["down"], device))
        extra = [n for n in NAMES if offsets[n] != t[n].shape[0]]
        if extra:
            raise FormatError(f"deltacome stored {', '.join(extra)} longer than its blocks")
        return torch.cat(ups, 1), torch.cat(downs, 0)

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        up, down = self.factors(encoded, device)
        return low_rank_product(up, down)  # (out, in)

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: DeltaCoMeConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        require_2d("", self.name, tuple(shape))
        return {
            "up_codes": StoredTensor("uint8", None),
            "up_scales": StoredTensor("float16", None),
            "down_codes": StoredTensor("uint8", None),
            "down_scales": StoredTensor("float16", None),
        }

    def spectrum(self, delta: torch.Tensor, config: DeltaCoMeConfig) -> torch.Tensor:
        return spectrum_of(delta)

    def candidates(
        self, shape: tuple[int, int], spectrum: torch.Tensor, config: DeltaCoMeConfig
    ) -> list[Candidate]:
        """Up to ``candidate_levels`` splits from the lower hull of (bytes, model error)
        (:func:`deltakit.ops.mixed.lagrangian_splits`), at geometrically spaced byte levels.

        Each hull split's bytes, plus the 2 bytes per width the split keeps for partial code bytes, are
        the candidate's budget; its bytes and error are those of the split :meth:`encode` makes at that
        budget (this hull split or a better one), so the allocator is priced exactly.
        """
        rows, cols = shape
        fp16 = FP16_BYTES * rows * cols
        slack = 2 * len(config.widths())
        hull = lagrangian_splits(
            spectrum,
            rows,
            cols,
            levels=config.candidate_levels,
            max_bytes=fp16 - slack,
            bit_widths=config.widths(),
            group_size=config.factor_group,
        )
        out, seen = [], set()
        for hull_split in hull:
            budget = hull_split.nbytes + slack  # what encode's split sees: this split fits, a better one may
            split = self.split(spectrum, shape, budget, config)
            if split.nbytes in seen:
                continue
            seen.add(split.nbytes)
            label = "/".join(str(split.counts.get(b, 0)) for b in config.widths())
            out.append(
                Candidate(
                    split.nbytes,
                    split.model_error,
                    Budget(ratio=budget / fp16),
                    f"split {label} ({config.bit_widths})",
                )
            )
        return out

    def factored(self, encoded: Encoded) -> FactoredView:
        up, down = self.factors(encoded)
        return FactoredView(tuple(encoded.params["shape"]), up=up, down=down)

    def rescaled(self, encoded: Encoded, scale: float | None, components: torch.Tensor | None) -> Encoded:
        return rescaled_parts(encoded, None, components)


def _pair_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    return math.ceil((rows + cols) * bits / 8) + 2 * (math.ceil(rows / group) + math.ceil(cols / group))


def _block_tensor(
    t: dict[str, torch.Tensor], params: Any, side: str, offsets: dict[str, int]
) -> QuantizedTensor:
    """The block's slice of the concatenated codes/scales, rebuilt and validated."""
    if not isinstance(params, dict):
        raise FormatError(f"deltacome block needs '{side}' params")
    shape = params.get("shape")
    bits, group = params.get("bits"), params.get("group_size")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise FormatError(f"deltacome block {side} shape must be two positive integers, got {shape!r}")
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS or not isinstance(group, int) or group < 1:
        raise FormatError(f"deltacome block {side}: bad bits {bits!r} or group_size {group!r}")
    lanes = shape[1] if side == "up" else shape[0]
    length = shape[0] if side == "up" else shape[1]
    n_codes, n_lanes = packed_nbytes(lanes * length, bits), lanes
    c0, s0 = offsets[f"{side}_codes"], offsets[f"{side}_scales"]
    sliced = {
        f"{side}_codes": t[f"{side}_codes"][c0 : c0 + n_codes],
        f"{side}_scales": t[f"{side}_scales"][s0 : s0 + n_lanes],
    }
    offsets[f"{side}_codes"] += n_codes
    offsets[f"{side}_scales"] += n_lanes
    return QuantizedTensor.from_tensors(sliced, params, f"{side}_")


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD; single-threaded on the CPU so the bytes do not depend on the thread count."""
    if delta.device.type != "cpu":
        return torch.linalg.svd(delta, full_matrices=False)
    with torch_threads(1):
        return torch.linalg.svd(delta, full_matrices=False)
