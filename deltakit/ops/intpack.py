"""Packing unsigned integer codes of 1 to 8 bits into a dense little-endian bit stream of uint8 bytes.

Code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least significant bit first; stream bit ``k`` is
bit ``k % 8`` (LSB = 0) of byte ``k // 8``. A code may straddle two bytes (3-bit codes really cost 3 bits),
and the unused high bits of the last byte are zero. The layout does not depend on the device.
"""

from __future__ import annotations

import torch

from deltakit.errors import FormatError, UsageError
from deltakit.ops.bitpack import pack_bits, unpack_bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` writes for ``numel`` codes of ``bits`` bits: ``ceil(numel*bits/8)``."""
    _check_bits(bits)
    if numel < 0:
        raise UsageError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any integer dtype, any shape, row-major order; else UsageError).

    Returns a 1-D uint8 tensor of :func:`packed_nbytes` bytes on the input's device; not mutated.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise UsageError(f"pack_codes needs an integer tensor, got {codes.dtype}")
    unsigned = codes.dtype == torch.uint8  # never negative, and packed without widening
    flat = codes.reshape(-1) if unsigned else codes.reshape(-1).to(torch.int32)
    if flat.numel() and ((not unsigned and int(flat.min()) < 0) or int(flat.max()) >= 1 << bits):
        raise UsageError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    if 8 % bits == 0:
        return _pack_whole_bytes(flat.to(torch.uint8), bits)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (numel * bits,) LSB first per code
    return pack_bits(stream.to(torch.bool))


def _pack_whole_bytes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of checked 1-D uint8 codes when whole codes fill a byte (1, 2, 4 or 8 bits), in
    uint8 arithmetic: code k of a byte at bits ``k * bits``, the bytes of the bit stream (about ten times
    faster on the codecs' factor codes than shifting and summing them as int32); not mutated."""
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    tail = (-flat.numel()) % per_byte
    if tail:
        flat = torch.cat([flat, flat.new_zeros(tail)])
    grouped = flat.view(-1, per_byte)  # (bytes, codes per byte)
    packed = grouped[:, 0].clone()
    for k in range(1, per_byte):
        packed |= grouped[:, k] << (k * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a 1-D uint8 tensor of ``numel`` codes on the packed tensor's device.

    ``packed`` must be 1-D uint8 holding exactly :func:`packed_nbytes` bytes, else FormatError.
    """
    expected = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != expected:
        raise FormatError(
            f"packed codes must be 1-D uint8 of {expected} bytes for {numel} {bits}-bit codes, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:  # whole codes per byte
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    stream = unpack_bits(packed, numel * bits).reshape(numel, bits).to(torch.int32)  # (numel, bits)
    weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise UsageError(f"bits must be an integer from 1 to 8, got {bits!r}")
