"""The model-compressor registry: built-in modules of ``deltakit/compressors/`` and the
``deltakit.compressors`` entry-point group, found as codecs are (:mod:`deltakit.plugins`)."""

from __future__ import annotations

from deltakit.compressors.base import ModelCompressor
from deltakit.plugins import PluginTable

ENTRY_POINT_GROUP = "deltakit.compressors"

COMPRESSORS: PluginTable[ModelCompressor] = PluginTable(
    "compressor",
    ENTRY_POINT_GROUP,
    "deltakit.compressors",
    ("base", "registry"),
    label="model compressor",
    plural="compressors",
)


def register_compressor(cls: type[ModelCompressor]) -> type[ModelCompressor]:
    """Class decorator: make ``cls`` selectable by its ``name`` (``method=NAME`` with no base)."""
    return COMPRESSORS.register(cls)


def get_compressor(name: str) -> ModelCompressor:
    """An instance of the compressor registered as ``name``; unknown names list the known ones."""
    return COMPRESSORS.get(name)


def list_compressors() -> list[str]:
    """Names of every registered model compressor, sorted."""
    return COMPRESSORS.names()
