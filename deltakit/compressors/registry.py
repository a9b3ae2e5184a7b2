"""The model-compressor registry: the ``deltakit.compressors`` entry-point group, as for codecs."""

from __future__ import annotations

from importlib.metadata import entry_points

from deltakit.compressors.base import ModelCompressor
from deltakit.errors import UnknownCodecError
from deltakit.plugins import load_entry_points, register_named

ENTRY_POINT_GROUP = "deltakit.compressors"

_REGISTRY: dict[str, type[ModelCompressor]] = {}
_loaded = False


def register_compressor(cls: type[ModelCompressor]) -> type[ModelCompressor]:
    """Class decorator: make ``cls`` selectable by its ``name`` (``method=NAME`` with no base)."""
    return register_named(_REGISTRY, cls, "compressor")


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_entry_points(entry_points(group=ENTRY_POINT_GROUP), "compressor")


def get_compressor(name: str) -> ModelCompressor:
    """An instance of the compressor registered as ``name``; unknown names list the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownCodecError(
            f"unknown model compressor {name!r}; known compressors: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_compressors() -> list[str]:
    """Names of every registered model compressor, sorted."""
    _load_all()
    return sorted(_REGISTRY)
