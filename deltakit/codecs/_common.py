"""Helpers shared by the built-in codecs: fp32 deltas, low-rank factors, sign parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from deltakit.codecs.base import Budget, Candidate, CodecConfig, Encoded, StoredTensor, config_field
from deltakit.errors import BudgetError, ConfigError, FormatError
from deltakit.ops.bitpack import unpack_signs
from deltakit.ops.factors import factors_nbytes, quantize_factors
from deltakit.ops.mixed import measure_error_factors
from deltakit.ops.quant import SCALE_BITS, QuantizedTensor, dequantize, exact_product_bits
from deltakit.ops.signstage import sign_stage
from deltakit.ops.svd import svd_factors

FACTOR_DTYPES = ("float16", "bfloat16", "float32")
FACTOR_BITS = (16, 8, 4, 3, 2)
QUANT_NAMES = ("up_codes", "up_scales", "down_codes", "down_scales")


@dataclass(frozen=True)
class LowRankConfig(CodecConfig):
    """Config fields of every codec that stores truncated-SVD factors.

    ``factor_bits`` defaults to 4: at the same bytes 4-bit factors (groups of 64, ``refit`` rounding) beat
    fp16 ones on the fleet, e.g. svd at 1 bit per weight closed 0.990 of KL(ft ‖ base) on shakespeare
    against 0.948 (docs/codecs.md, "Defaults"). Deltas written before ``factor_bits`` existed hold fp16
    factors (:attr:`STORED_DEFAULTS`).
    """

    STORED_DEFAULTS: ClassVar[dict[str, Any]] = {"factor_bits": 16, "factor_exact_products": False}

    svd_method: str = config_field("randomized", "truncated SVD algorithm", choices=("randomized", "exact"))
    oversample: int = config_field(10, "extra random directions for the randomized SVD")
    power_iters: int = config_field(2, "power iterations for the randomized SVD")
    factor_dtype: str = config_field("float16", "dtype of the stored low-rank factors", choices=FACTOR_DTYPES)
    factor_bits: int = config_field(
        4,
        "bits per stored factor value: 16 = float factors in factor_dtype; 8/4/3/2 = quantized",
        FACTOR_BITS,
    )
    factor_group: int = config_field(64, "values per fp16 scale when factor_bits < 16")
    factor_rounding: str = config_field(
        "refit", "quantized factors: rtn, or refit (round up, least-squares re-fit down)", ("rtn", "refit")
    )
    factor_exact_products: bool = config_field(
        True,
        "2-4 bit factors: scales keep 12 - factor_bits significant bits, so products of factor values are "
        "exact in fp32 and rebuilds use fused multiply-adds",
        (True, False),
    )

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.factor_group, int) or self.factor_group < 1:
            raise ConfigError(f"factor_group must be a positive integer, got {self.factor_group!r}")

    @property
    def quantized(self) -> bool:
        return self.factor_bits < 16

    def pair_nbytes(self, rows: int, cols: int, rank: int) -> int:
        """Exact stored bytes of a rank-``rank`` factor pair under this config."""
        if rank == 0:
            return 0
        if self.quantized:
            return factors_nbytes(rows, cols, rank, self.factor_bits, self.factor_group)
        return factor_bytes(self.factor_dtype) * (rows + cols) * rank

    def rank_for_bytes(self, rows: int, cols: int, nbytes: float) -> int:
        """Largest rank (<= min(rows, cols)) whose factor pair fits in ``nbytes`` (0 when none does)."""
        limit = min(rows, cols)
        low, high = 0, limit
        while low < high:  # pair_nbytes grows with the rank
            mid = (low + high + 1) // 2
            if self.pair_nbytes(rows, cols, mid) <= nbytes:
                low = mid
            else:
                high = mid - 1
        return low

    def rel_sq_error(self) -> float:
        """Modelled relative squared error one quantized singular pair adds (0 for float factors)."""
        if not self.quantized:
            return 0.0
        eps = measure_error_factors((self.factor_bits,), self.factor_group)[self.factor_bits]
        return min(1.0, 2 * eps + eps**2)

    def stored(self, rows: int, cols: int, rank: int, prefix: str = "") -> dict[str, StoredTensor]:
        """The tensors :func:`store_factors` writes for a rank-``rank`` pair (declared shapes exact)."""
        if rank == 0:
            return {}
        if not self.quantized:
            return {
                prefix + "up": StoredTensor(self.factor_dtype, (rows, rank)),
                prefix + "down": StoredTensor(self.factor_dtype, (rank, cols)),
            }
        g, bits = self.factor_group, self.factor_bits
        return {
            prefix + "up_codes": StoredTensor("uint8", ((rows * rank * bits + 7) // 8,)),
            prefix + "up_scales": StoredTensor("float16", (rank, -(-rows // g))),
            prefix + "down_codes": StoredTensor("uint8", ((rank * cols * bits + 7) // 8,)),
            prefix + "down_scales": StoredTensor("float16", (rank, -(-cols // g))),
        }

    def factors(self, matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``low_rank_factors`` of ``matrix`` with this config's SVD settings."""
        return low_rank_factors(
            matrix,
            rank,
            self.factor_dtype,
            svd_method=self.svd_method,
            oversample=self.oversample,
            power_iters=self.power_iters,
            seed=seed,
        )


def fp32_delta(base: torch.Tensor, target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``target - base`` in fp32 on ``device`` (inputs not mutated)."""
    if base.shape != target.shape:
        raise ValueError(f"base {tuple(base.shape)} and target {tuple(target.shape)} differ in shape")
    return target.to(device=device, dtype=torch.float32) - base.to(device=device, dtype=torch.float32)


def low_rank_factors(
    matrix: torch.Tensor,
    rank: int,
    factor_dtype: str,
    *,
    svd_method: str,
    oversample: int,
    power_iters: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``up`` (rows, r) and ``down`` (r, cols) with ``matrix ≈ up @ down``, √S on each side.

    Returned on the CPU in ``factor_dtype``.
    """
    up, down = svd_factors(
        matrix, rank, method=svd_method, oversample=oversample, power_iters=power_iters, seed=seed
    )  # (rows, r), (r, cols)
    dtype = getattr(torch, factor_dtype)
    return up.to(dtype).cpu(), down.to(dtype).cpu()


def low_rank_product(up: torch.Tensor, down: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """fp32 ``up @ down`` on ``device``: (rows, r) @ (r, cols) -> (rows, cols)."""
    return up.to(device=device, dtype=torch.float32) @ down.to(device=device, dtype=torch.float32)


def sign_part(
    base: torch.Tensor, target: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(delta, signs, scale)``: the fp32 ``target - base`` on ``device``, its packed signs (CPU) and the
    Frobenius-optimal scale mean|delta| for a ±1 matrix (:func:`deltakit.ops.signstage.sign_stage`;
    inputs not mutated)."""
    delta, signs = sign_stage(base, target, device)
    return delta, signs, float(delta.abs().mean())


def dense_signs(packed: torch.Tensor, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    return unpack_signs(packed, shape, device)


def require_2d(name: str, codec: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise BudgetError(f"{codec} encodes 2-D matrices; {name or 'tensor'} has shape {list(shape)}")
    return shape[0], shape[1]


def factor_bytes(factor_dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, factor_dtype)).element_size()


def store_factors(
    up: torch.Tensor, down: torch.Tensor, config: LowRankConfig, target: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and params storing ``up`` (rows, r) and ``down`` (r, cols) as ``config`` says.

    Float factors: ``{"up", "down"}`` in ``factor_dtype`` and no params. Quantized: the codes and scales of
    :func:`deltakit.ops.factors.quantize_factors` (symmetric groups along each singular vector, MSE clip),
    with ``params["factors"] = {"up": ..., "down": ...}`` (bits, group size, axis, scheme, packing).
    target: the (rows, cols) matrix the ``refit`` rounding fits (default the product). Inputs not mutated.
    """
    if not config.quantized:
        dtype = getattr(torch, config.factor_dtype)
        return {"up": up.to(dtype).cpu(), "down": down.to(dtype).cpu()}, {}
    q = quantize_factors(
        up,
        down,
        config.factor_bits,
        config.factor_group,
        method=config.factor_rounding,
        target=target,
        clip="mse",
        scale_bits=exact_product_bits(config.factor_bits) if config.factor_exact_products else SCALE_BITS,
    )
    tensors = {k: v.cpu() for k, v in {**q.up.to_tensors("up_"), **q.down.to_tensors("down_")}.items()}
    return tensors, {"factors": {"up": q.up.params(), "down": q.down.params()}}


def has_factors(encoded: Encoded) -> bool:
    return "up" in encoded.tensors or "up_codes" in encoded.tensors


def load_factors(encoded: Encoded, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(up (rows, r), down (r, cols))`` of a stored pair, float or quantized (validated)."""
    t = encoded.tensors
    if "up" in t:
        return t["up"].to(device=device, dtype=torch.float32), t["down"].to(
            device=device, dtype=torch.float32
        )
    q_up, q_down = quantized_factors(encoded)
    return dequantize(q_up, device), dequantize(q_down, device)


def quantized_factors(encoded: Encoded) -> tuple[QuantizedTensor, QuantizedTensor]:
    """The stored quantized ``(up (rows, r), down (r, cols))`` of an encoded pair, every field validated
    (FormatError otherwise)."""
    t = encoded.tensors
    meta = encoded.params.get("factors")
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("up"), dict)
        or not isinstance(meta.get("down"), dict)
    ):
        raise FormatError("quantized factors need params.factors with 'up' and 'down' descriptions")
    q_up = QuantizedTensor.from_tensors(t, meta["up"], "up_")
    q_down = QuantizedTensor.from_tensors(t, meta["down"], "down_")
    shape = encoded.params.get("shape")
    if (
        len(q_up.shape) != 2
        or len(q_down.shape) != 2
        or q_up.axis != 0
        or q_down.axis != 1
        or q_up.shape[1] != q_down.shape[0]
        or (isinstance(shape, list) and [q_up.shape[0], q_down.shape[1]] != shape)
    ):
        raise FormatError(f"quantized factors {list(q_up.shape)} x {list(q_down.shape)} do not match {shape}")
    return q_up, q_down


def low_rank_candidates(
    shape: tuple[int, int],
    spectrum: torch.Tensor,
    config: LowRankConfig,
    *,
    fixed_bytes: int = 0,
    min_rank: int = 1,
    max_options: int = 256,
) -> list[Candidate]:
    """Rank options for a factor pair approximating a matrix with singular values ``spectrum`` (desc.).

    Each option stores ``fixed_bytes`` (sign bits, float params) plus the pair; its modelled squared error
    is the dropped tail ``Σ_{i>=r} σ_i²`` plus ``rel_sq_error() · Σ_{i<r} σ_i²`` for quantized factors.
    Ranks run from ``min_rank`` to min(rows, cols) in at most ``max_options`` even steps.
    """
    rows, cols = shape
    sigma2 = spectrum.detach().to(torch.float64).cpu().reshape(-1) ** 2
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sigma2, 0)])  # (k + 1,)
    total, q = float(prefix[-1]), config.rel_sq_error()
    limit = min(rows, cols)
    step = max(1, -(-(limit - min_rank + 1) // max_options))
    ranks = sorted({*range(min_rank, limit + 1, step), limit}) if limit >= min_rank else []
    out = []
    for r in ranks:
        kept = float(prefix[min(r, sigma2.numel())])
        error = max(0.0, total - kept) + q * kept
        nbytes = fixed_bytes + config.pair_nbytes(rows, cols, r)
        out.append(Candidate(nbytes, error, Budget(rank=r), f"rank {r} @ {config.factor_bits} bits"))
    return out


def spectrum_of(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, fp32 on the CPU) of a 2-D fp32 matrix."""
    return torch.linalg.svdvals(matrix.to(torch.float32)).cpu()


def view_factors(
    encoded: Encoded,
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[QuantizedTensor, QuantizedTensor] | None]:
    """Factors for a :class:`FactoredView`: ``(up, down, quantized)``, the stored float tensors themselves
    and None, or (None, None) and the stored quantized pair (the view dequantizes on access; kernels read
    the codes)."""
    if "up" in encoded.tensors:
        return encoded.tensors["up"], encoded.tensors["down"], None
    return None, None, quantized_factors(encoded)


def rescaled_parts(encoded: Encoded, scale: float | None, components: torch.Tensor | None) -> Encoded:
    """:meth:`Codec.rescaled` for the built-in layouts: ``params["scale"]`` set to ``scale`` and low-rank
    component k multiplied by ``components[k]``: column k of a float ``up`` (rows, r), or row k of a
    quantized ``up_scales`` (r, groups), the fp16 scales of singular vector k's groups (deltacome's
    blocks are concatenated in component order, so its rows line up the same way). Same keys, dtypes and
    shapes as ``encoded`` (not mutated)."""
    params, tensors = dict(encoded.params), dict(encoded.tensors)
    if scale is not None:
        params["scale"] = float(scale)
    if components is not None:
        c = components.detach().to(device="cpu", dtype=torch.float32).clamp(min=0.0)  # (r,)
        if "up" in tensors:
            up = tensors["up"]  # (rows, r)
            if up.shape[1] != c.numel():
                raise FormatError(f"{c.numel()} component scales for a rank-{up.shape[1]} factor pair")
            tensors["up"] = (up.to(torch.float32) * c[None, :]).to(up.dtype)
        elif "up_scales" in tensors:
            scales = tensors["up_scales"]  # (r, groups) fp16
            if scales.shape[0] != c.numel():
                raise FormatError(f"{c.numel()} component scales for {scales.shape[0]} quantized vectors")
            scaled = (scales.to(torch.float32) * c[:, None]).clamp(max=torch.finfo(torch.float16).max)
            tensors["up_scales"] = scaled.to(scales.dtype)
        else:
            raise FormatError("component scales given for an encoding without low-rank factors")
    return Encoded(tensors, params)
