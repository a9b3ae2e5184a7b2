"""Packing boolean / sign tensors 8 values per byte (LSB first within each byte)."""

from __future__ import annotations

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor of any shape into uint8, 8 per byte, in flattened (row-major) order.

    Returns a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes on the input's device; the input is
    not mutated. Padding bits in the last byte are zero.
    """
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)  # (bytes, 8)
    weights = _WEIGHTS.to(groups.device)
    return (groups * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a 1-D bool tensor of ``numel`` values on ``device``."""
    packed = packed.to(device) if device is not None else packed
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} bits")
    weights = _WEIGHTS.to(packed.device)
    bits = (packed.reshape(-1, 1) & weights) != 0  # (bytes, 8)
    return bits.reshape(-1)[:numel]


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Pack ``delta >= 0`` (1 = non-negative, 0 = negative) 8 per byte; see :func:`pack_bits`."""
    return pack_bits(delta >= 0)


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) fp32 table: row b holds the ±1 values of byte b's bits, LSB first."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256, dtype=torch.int64).reshape(-1, 1) >> torch.arange(8)) & 1  # (256, 8)
        table = (bits.to(torch.float32) * 2 - 1).to(device)
        _SIGN_TABLES[device] = table
    return table


def unpack_signs(
    packed: torch.Tensor, shape: tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """±1 fp32 tensor of ``shape`` from packed sign bits (one table lookup per byte)."""
    numel = 1
    for dim in shape:
        numel *= dim
    packed = packed.to(device) if device is not None else packed
    if packed.numel() * 8 < numel:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} bits")
    signs = _sign_table(packed.device)[packed.reshape(-1).long()]  # (bytes, 8)
    return signs.reshape(-1)[:numel].reshape(shape)
