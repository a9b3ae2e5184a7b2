"""Paths named by a manifest: they must stay inside the delta directory, and aux files are a known few.

``check_relpath`` checks the text of a relative path; :func:`confined` resolves it against its
directory and refuses anything that lands outside it or passes through a symbolic link.
"""

from __future__ import annotations

import re
from pathlib import Path

from deltakit.errors import FormatError

#: a path component: no control characters, no backslash, no ':' (drive letters, NTFS streams)
_SAFE_PART = re.compile(r"[^\x00-\x1f\x7f\\:]+")
MANIFEST_NAME = "manifest.json"
MAX_PATH_CHARS = 1024
MAX_PART_CHARS = 255

#: config/tokenizer files a delta may carry or take from the base (plain names, nothing else)
AUX_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
    }
)


def check_relpath(path: object, *, allow_manifest: bool = False) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise FormatError.

    Safe: a non-empty string of at most MAX_PATH_CHARS characters, '/'-separated plain components
    (no empty, '.', '..' or hidden component starting with '.', none longer than MAX_PART_CHARS), no
    leading '/', no backslash, ':', NUL or other control character, and not the manifest itself
    (unless ``allow_manifest``: a base checkpoint may hold a file of that name).
    """
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise FormatError(f"manifest lists an unsafe file path {str(path)[:80]!r}")
    parts = path.split("/")
    if (
        path.startswith("/")
        or any(p.startswith(".") or len(p) > MAX_PART_CHARS or not _SAFE_PART.fullmatch(p) for p in parts)
        or (path == MANIFEST_NAME and not allow_manifest)
    ):
        raise FormatError(f"manifest lists an unsafe or reserved file path {path[:80]!r}")
    return path


def check_aux_name(name: str) -> str:
    """Return ``name`` if it is one of :data:`AUX_FILE_NAMES` (a plain file name, no directory)."""
    check_relpath(name)
    if name not in AUX_FILE_NAMES:
        raise FormatError(
            f"manifest lists aux file {name!r}, which is not an allowed config/tokenizer file name"
        )
    return name


def confined(root: Path | str, rel: str) -> Path:
    """``root / rel`` resolved, refused unless it stays inside ``root`` with no symlink on the way.

    rel: a relative path from a manifest (checked with :func:`check_relpath` first). A symlink is
    refused even when it points inside ``root``: a delta is plain files, and a link could be repointed
    between the check and the read.
    """
    root = Path(root)
    check_relpath(rel)
    real_root = root.resolve()
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise FormatError(f"{root}: {rel} is a symbolic link; a delta holds plain files only")
    resolved = path.resolve()
    if not resolved.is_relative_to(real_root):
        raise FormatError(f"{root}: {rel} leads outside the delta directory")
    return resolved


def overlaps(a: Path | str, b: Path | str) -> bool:
    """Whether the resolved paths ``a`` and ``b`` are the same, or one lies inside the other."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)
