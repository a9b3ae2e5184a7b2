"""What the codec and compressor registries share: registering a class by name, loading entry points.

Built-in and third-party plug-ins are found the same way, through an entry-point group (the built-ins
are listed in deltakit's own ``pyproject.toml``); importing an entry point's module runs its register
decorator.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any


def register_named(table: dict[str, type], cls: type, what: str) -> type:
    """Add ``cls`` to ``table`` under its ``name`` class attribute; a name taken by another class raises."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    existing = table.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"{what} name {name!r} is already registered by {existing.__module__}")
    table[name] = cls
    return cls


def load_entry_points(points: Iterable[Any], what: str) -> None:
    """Load every entry point; one that fails to import only warns (a broken plug-in must not break the
    others)."""
    for ep in points:
        try:
            ep.load()
        except Exception as exc:
            warnings.warn(f"could not load deltakit {what} entry point {ep.name!r}: {exc}", stacklevel=3)
