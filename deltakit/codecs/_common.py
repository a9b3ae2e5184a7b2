"""Helpers shared by the built-in codecs: fp32 deltas, low-rank factors, sign parts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.codecs.base import CodecConfig, config_field
from deltakit.errors import BudgetError
from deltakit.ops.bitpack import pack_signs, unpack_signs
from deltakit.ops.svd import svd_factors

FACTOR_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class LowRankConfig(CodecConfig):
    """Config fields of every codec that stores truncated-SVD factors."""

    svd_method: str = config_field("randomized", "truncated SVD algorithm", choices=("randomized", "exact"))
    oversample: int = config_field(10, "extra random directions for the randomized SVD")
    power_iters: int = config_field(2, "power iterations for the randomized SVD")
    factor_dtype: str = config_field("float16", "dtype of the stored low-rank factors", choices=FACTOR_DTYPES)

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


def sign_part(delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Packed signs of ``delta`` and the Frobenius-optimal scale mean|delta| for a ±1 matrix."""
    return pack_signs(delta).cpu(), float(delta.abs().mean())


def dense_signs(packed: torch.Tensor, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    return unpack_signs(packed, shape, device)


def require_2d(name: str, codec: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise BudgetError(f"{codec} encodes 2-D matrices; {name or 'tensor'} has shape {list(shape)}")
    return shape[0], shape[1]


def factor_bytes(factor_dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, factor_dtype)).element_size()
