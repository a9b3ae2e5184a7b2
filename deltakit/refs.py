"""Registry references wherever a directory goes: ``path-or-NAME[:TAG]`` for deltas, ``path-or-NAME`` for bases.

A string naming an existing directory is that directory; anything else is looked up in the registry
(``registry``: a :class:`Registry`, its path, or None for the user's registry). This module sits above
:mod:`deltakit.core` and uses the registry's public API only.
"""

from __future__ import annotations

import os
from pathlib import Path

from deltakit.errors import NotFoundError
from deltakit.registry import InvalidNameError, Registry

RegistryArg = Registry | str | os.PathLike[str] | None


def _open(registry: RegistryArg) -> Registry:
    if isinstance(registry, Registry):
        return registry
    return Registry.open(registry, create=False)


def resolve_delta_dir(spec: str | os.PathLike[str], registry: RegistryArg = None) -> Path:
    """The delta directory ``spec`` names: an existing directory, else a registry ref ``NAME[:TAG]``.

    Raises NotFoundError (one line, naming both readings) when it is neither.
    """
    path = Path(spec)
    if path.is_dir():
        return path
    try:
        return _open(registry).resolve_delta(str(spec))
    except (NotFoundError, InvalidNameError) as exc:
        raise NotFoundError(f"{spec} is neither a delta directory nor a registry ref ({exc})") from None


def resolve_base_dir(spec: str | os.PathLike[str], registry: RegistryArg = None) -> Path:
    """The base checkpoint directory ``spec`` names: an existing directory, else a registry base name."""
    path = Path(spec)
    if path.is_dir():
        return path
    try:
        return _open(registry).resolve_base(str(spec))
    except (NotFoundError, InvalidNameError) as exc:
        raise NotFoundError(f"{spec} is neither a model directory nor a registry base ({exc})") from None
