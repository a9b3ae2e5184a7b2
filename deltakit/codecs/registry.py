"""The codec registry: one decorator registers a codec; third parties register through entry points.

Built-in codecs are imported on first lookup, so ``import deltakit`` stays cheap. Third-party
packages expose codecs through the ``deltakit.codecs`` entry-point group; each entry point names a
module (or object) whose import registers its codecs with :func:`register_codec`.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

from deltakit.codecs.base import Codec
from deltakit.errors import UnknownCodecError

ENTRY_POINT_GROUP = "deltakit.codecs"
_BUILTIN_MODULES = (
    "deltakit.codecs.dqrelo",
    "deltakit.codecs.bitdelta",
    "deltakit.codecs.svd",
    "deltakit.codecs.dare",
    "deltakit.codecs.lossless",
    "deltakit.codecs.lillama",
    "deltakit.codecs.deltallm",
)

_REGISTRY: dict[str, type[Codec]] = {}
_loaded = False


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` selectable by its ``name`` (``--method NAME``)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"codec name {name!r} is already registered by {existing.__module__}")
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a codec module that exists but fails to import is a bug: say so
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not break the built-in codecs
            warnings.warn(f"could not load deltakit codec entry point {ep.name!r}: {exc}", stacklevel=2)


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
