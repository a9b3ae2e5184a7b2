"""What the codec and compressor registries share: a table of classes by name, filled on first lookup.

Every plug-in registers itself with a class decorator when its module is imported. Two places are
imported on the first lookup: every public module of deltakit's own package for that kind (so a built-in
codec is one new file in ``deltakit/codecs/``, nothing else to edit), and every entry point of the
kind's group (third-party packages). A plug-in that fails to import only warns: a broken plug-in must not
break the others.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from deltakit.errors import UnknownCodecError

T = TypeVar("T")


class PluginTable(Generic[T]):
    """Classes of one kind (codecs, compressors) by their ``name`` class attribute.

    group: the entry-point group third parties use; package: deltakit's own package of built-ins whose
    modules (all but those named in ``infrastructure`` or starting with ``_``) are imported on first use.
    """

    def __init__(
        self, what: str, group: str, package: str, infrastructure: Iterable[str], *, label: str, plural: str
    ):
        self.what = what
        self.label, self.plural = label, plural  # how unknown-name errors call one and several of them
        self.group = group
        #: the entry-point lookup (``importlib.metadata.entry_points``); tests substitute their own
        self.entry_points = entry_points
        self.package = package
        self.infrastructure = frozenset(infrastructure)
        self._table: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        """Add ``cls`` under its ``name``; a name taken by another class raises."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
        existing = self._table.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"{self.what} name {name!r} is already registered by {existing.__module__}")
        self._table[name] = cls
        return cls

    def get(self, name: str) -> T:
        """An instance of the class registered as ``name``; unknown names list the known ones."""
        self.load()
        try:
            return self._table[name]()
        except KeyError:
            raise UnknownCodecError(
                f"unknown {self.label} {name!r}; known {self.plural}: {', '.join(sorted(self._table)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load()
        return sorted(self._table)

    def load(self) -> None:
        """Import the built-in modules, then the entry points (once)."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_") or info.name in self.infrastructure:
                continue
            _import_plugin(f"{self.package}.{info.name}", self.what)
        for ep in self.entry_points(group=self.group):
            if ep.value.split(":")[0].startswith(self.package + "."):
                continue  # a built-in module named by an older install's metadata: already imported
            _load_entry_point(ep, self.what)


def _import_plugin(module: str, what: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        warnings.warn(f"could not load deltakit {what} module {module!r}: {exc}", stacklevel=4)


def _load_entry_point(ep: Any, what: str) -> None:
    try:
        ep.load()
    except Exception as exc:
        warnings.warn(f"could not load deltakit {what} entry point {ep.name!r}: {exc}", stacklevel=4)
