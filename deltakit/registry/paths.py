"""Where the embedded registry lives: an explicit path, else ``$DELTAKIT_HOME/registry``, else the
platform's user data directory (``platformdirs.user_data_dir("deltakit")/registry``)."""

from __future__ import annotations

import os
from pathlib import Path


def default_registry_path() -> Path:
    """The registry directory used when none is given."""
    home = os.environ.get("DELTAKIT_HOME")
    if home:
        return Path(home).expanduser() / "registry"
    import platformdirs

    return Path(platformdirs.user_data_dir("deltakit")) / "registry"


def resolve_registry_path(path: str | os.PathLike[str] | None) -> Path:
    """``path`` if given (``~`` expanded), else :func:`default_registry_path`."""
    return Path(path).expanduser() if path is not None else default_registry_path()
