"""Whole-model compressors (lillama, deltallm): the interface and the registry."""

from deltakit.compressors.base import ModelCompressor, ModelJob
from deltakit.compressors.registry import get_compressor, list_compressors, register_compressor

__all__ = ["ModelCompressor", "ModelJob", "get_compressor", "list_compressors", "register_compressor"]
