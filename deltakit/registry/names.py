"""Names and references: ``name[:tag]`` parsing and validation.

A name is 1..128 characters from ``[A-Za-z0-9._-]`` plus ``/`` as a namespace separator
(``org/model-chat``); no segment may be empty, ``.`` or ``..``, none may start with ``.`` or ``-``, and
none may end in ``.json`` (the suffix of ref documents, so a name never collides with another's ref).
A tag is 1..128 characters from ``[A-Za-z0-9._-]`` starting with a letter or digit.
These rules keep every name a safe relative path on disk and in an object store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltakit.errors import UsageError

DEFAULT_TAG = "latest"
# matched with fullmatch: '$' would also accept a trailing newline
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_NAME = 128


class InvalidNameError(UsageError):
    """A registry name or tag that breaks the naming rules."""


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` unchanged if it is a valid registry name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"{what} must be a non-empty string")
    if len(name) > _MAX_NAME:
        raise InvalidNameError(f"{what} {name[:40]!r}... is longer than {_MAX_NAME} characters")
    for segment in name.split("/"):
        if segment.endswith(".json"):  # a ref document is <part>.json: no directory may take that name
            raise InvalidNameError(f"invalid {what} {name[:80]!r}: no part may end in '.json'")
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidNameError(
                f"invalid {what} {name[:80]!r}: use letters, digits, '.', '_', '-' and '/' between parts; "
                "no empty parts, no part starting with '.' or '-', no '..'"
            )
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` unchanged if valid, else raise :class:`InvalidNameError`."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        shown = repr(tag[:80]) if isinstance(tag, str) else type(tag).__name__
        raise InvalidNameError(
            f"invalid tag {shown}: 1-128 of letters, digits, '.', '_', '-', starting with a letter or digit"
        )
    return tag


@dataclass(frozen=True)
class DeltaRef:
    """A parsed ``name[:tag]`` reference to a delta."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(ref: str | DeltaRef) -> DeltaRef:
    """Parse ``"name"`` or ``"name:tag"`` (tag defaults to ``latest``) and validate both parts."""
    if isinstance(ref, DeltaRef):
        return ref
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError("reference must be a non-empty 'name[:tag]' string")
    name, sep, tag = ref.partition(":")
    if sep and ":" in tag:
        raise InvalidNameError(f"invalid reference {ref!r}: expected 'name[:tag]' with one ':'")
    return DeltaRef(validate_name(name), validate_tag(tag) if sep else DEFAULT_TAG)
