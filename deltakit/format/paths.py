"""Relative paths named by a manifest: they must stay inside the delta directory."""

from __future__ import annotations

import re

from deltakit.errors import FormatError

_SAFE_PART = re.compile(r"^[^\x00-\x1f\x7f\\:]+$")


def check_relpath(path: str, reserved: tuple[str, ...] = ("manifest.json",)) -> str:
    """Return ``path`` if it is a safe relative POSIX path (no ``..``, not absolute, no control chars).

    reserved: names a listed file may not take (the manifest itself).
    """
    parts = path.split("/") if isinstance(path, str) else [""]
    if (
        not path
        or path.startswith("/")
        or any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts)
        or path in reserved
    ):
        raise FormatError(f"manifest lists an unsafe or reserved file path {path!r}")
    return path
