"""The codec registry: one decorator registers a codec; every codec is found through entry points.

Packages, deltakit included, expose codecs through the ``deltakit.codecs`` entry-point group; each entry
point names a module whose import registers its codecs with :func:`register_codec`. Entry points are
loaded on first lookup, so ``import deltakit`` stays cheap.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from deltakit.codecs.base import Codec
from deltakit.errors import UnknownCodecError
from deltakit.plugins import load_entry_points, register_named

ENTRY_POINT_GROUP = "deltakit.codecs"

_REGISTRY: dict[str, type[Codec]] = {}
_loaded = False


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` selectable by its ``name`` (``method=NAME``)."""
    return register_named(_REGISTRY, cls, "codec")


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_entry_points(entry_points(group=ENTRY_POINT_GROUP), "codec")


def get_codec(name: str) -> Codec:
    """An instance of the codec registered as ``name``; unknown names list the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownCodecError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_codecs() -> list[str]:
    """Names of every registered codec, sorted."""
    _load_all()
    return sorted(_REGISTRY)
