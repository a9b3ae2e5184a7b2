"""The codec registry: one decorator registers a codec.

Every public module of ``deltakit/codecs/`` is imported on the first lookup (a built-in codec is one new
file there), then every entry point of the ``deltakit.codecs`` group (third-party packages); importing a
module runs its :func:`register_codec` decorators. Nothing loads before the first lookup, so
``import deltakit`` stays cheap.
"""

from __future__ import annotations

from deltakit.codecs.base import Codec
from deltakit.plugins import PluginTable

ENTRY_POINT_GROUP = "deltakit.codecs"

CODECS: PluginTable[Codec] = PluginTable(
    "codec", ENTRY_POINT_GROUP, "deltakit.codecs", ("base", "registry"), label="method", plural="methods"
)


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` selectable by its ``name`` (``method=NAME``)."""
    return CODECS.register(cls)


def get_codec(name: str) -> Codec:
    """An instance of the codec registered as ``name``; unknown names list the known ones."""
    return CODECS.get(name)


def list_codecs() -> list[str]:
    """Names of every registered codec, sorted."""
    return CODECS.names()
