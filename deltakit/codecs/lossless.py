"""Lossless: the exact fine-tuned bits, XOR-ed with the base and entropy-coded per byte plane.

For a small fine-tuning delta most high bytes (sign, exponent, top of the mantissa) of base and
target agree, so ``target_bits XOR base_bits`` is mostly zero there. Splitting the XOR into byte
planes (all high bytes together, then all low bytes; the ZipNN idea) lets zstd exploit that.
:meth:`reconstruct` restores the target bit for bit; :meth:`decode` gives ``target − base`` in fp32.
When base and target dtypes differ, the target's own bytes are coded (no XOR).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from deltakit.codecs.base import (
    Budget,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    StoredTensor,
    config_field,
)
from deltakit.codecs.registry import register_codec
from deltakit.errors import BudgetError, FormatError
from deltakit.format.safetensors_io import dtype_from_name, dtype_name


@dataclass(frozen=True)
class LosslessConfig(CodecConfig):
    level: int = config_field(6, "zstd compression level (1 fast ... 19 small)")
    byte_planes: bool = config_field(True, "code each byte of the values as its own stream (ZipNN style)")


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """(numel, itemsize) uint8 view of a tensor's bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().reshape(flat.numel(), -1)


@register_codec
class Lossless(Codec):
    name = "lossless"
    version = 1
    config_class = LosslessConfig
    summary = "exact delta: base-XOR bits, byte-plane zstd; apply restores the fine-tune bit for bit"
    max_error = 0.0

    def check_budget(self, budget: Budget) -> None:
        if budget.ratio is not None or budget.rank is not None:
            raise BudgetError(
                "lossless keeps every bit; its size is whatever zstd achieves (leave ratio and rank unset)"
            )

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: LosslessConfig, ctx: EncodeContext
    ) -> Encoded:
        xor = base.dtype == target.dtype and base.shape == target.shape
        data = _raw_bytes(target)
        if xor:
            data = np.bitwise_xor(data, _raw_bytes(base))
        compressor = zstandard.ZstdCompressor(level=config.level)
        planes = [data[:, i] for i in range(data.shape[1])] if config.byte_planes else [data.reshape(-1)]
        tensors = {
            f"plane{i}": torch.frombuffer(
                bytearray(compressor.compress(np.ascontiguousarray(p).tobytes())), dtype=torch.uint8
            )
            for i, p in enumerate(planes)
        }
        params = {
            "shape": list(target.shape),
            "dtype": dtype_name(target.dtype),
            "xor": xor,
            "planes": len(planes),
        }
        return Encoded(tensors, params)

    def _target(self, encoded: Encoded, base: torch.Tensor | None) -> torch.Tensor:
        params = encoded.params
        dtype = dtype_from_name(params["dtype"])
        shape = tuple(params["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = int(np.prod(shape)) if shape else 1
        decompressor = zstandard.ZstdDecompressor()
        streams = [
            np.frombuffer(
                decompressor.decompress(encoded.tensors[f"plane{i}"].numpy().tobytes()), dtype=np.uint8
            )
            for i in range(params["planes"])
        ]
        data = np.stack(streams, axis=1) if len(streams) > 1 else streams[0].reshape(numel, itemsize)
        if data.size != numel * itemsize:
            raise FormatError("lossless: decoded size does not match the recorded shape")
        if params["xor"]:
            if base is None:
                raise FormatError("lossless delta needs the base tensor to decode")
            data = np.bitwise_xor(data, _raw_bytes(base))
        out = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).view(dtype)
        return out.reshape(shape)

    def reconstruct(
        self, encoded: Encoded, base: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return self._target(encoded, base).to(device=device, dtype=dtype)

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        target = self._target(encoded, base).to(device=device, dtype=torch.float32)
        if base is None:
            return target
        return target - base.to(device=device, dtype=torch.float32)

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: LosslessConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        planes = torch.empty((), dtype=dtype).element_size() if config.byte_planes else 1
        return {f"plane{i}": StoredTensor("uint8", None) for i in range(planes)}  # zstd: data-dependent
