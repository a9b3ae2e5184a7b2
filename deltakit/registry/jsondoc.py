"""Strict JSON parsing for registry documents (refs, manifests, base file lists, eval records).

Every document is hostile input: it must be UTF-8 JSON, an object at the top, with no duplicate keys,
no deeper nesting than Python's parser handles, and no larger than ``MAX_DOC_BYTES``. Anything else
raises a one-line :class:`FormatError` naming ``where``.
"""

from __future__ import annotations

import json
from typing import Any

from deltakit.errors import FormatError

MAX_DOC_BYTES = 64 << 20  # a manifest of a very large model is a few MiB


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def parse_object(data: bytes, where: str) -> dict[str, Any]:
    """Parse ``data`` as one JSON object; raise FormatError (one line, naming ``where``) otherwise."""
    if len(data) > MAX_DOC_BYTES:
        raise FormatError(f"{where}: document of {len(data)} bytes is larger than {MAX_DOC_BYTES}")
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicates)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. integers with too many digits
        raise FormatError(f"{where}: unreadable JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def require(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``doc[key]`` if present and of type ``kind`` (bool is never accepted as int); else FormatError."""
    value = doc.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise FormatError(f"{where}: field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def optional_str(doc: dict[str, Any], key: str, where: str) -> str:
    """``doc[key]`` as a string ('' when absent); FormatError when present and not a string."""
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise FormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value
