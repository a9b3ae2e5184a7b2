"""Compressing straight into the registry: the delta is staged in a temporary directory, then pushed.

This module sits above both :mod:`deltakit.core` and :mod:`deltakit.registry` (core never imports the
registry); it uses the registry's public API only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltakit.core.compress import compress
from deltakit.core.options import CompressOptions
from deltakit.format.delta import Delta
from deltakit.registry import Registry


def compress_to_registry(
    base: Any,
    target: Any,
    ref: str,
    *,
    registry: Registry | str | Path | None = None,
    output: str | Path | None = None,
    options: CompressOptions | None = None,
    **changes: Any,
) -> tuple[Delta, dict[str, Any]]:
    """Compress ``target`` against ``base`` and push the delta as ``ref`` (``NAME[:TAG]``).

    registry: a :class:`Registry` or its path (default: the user's registry). output: also keep the delta
    in this directory; without it the delta is staged in a temporary directory removed afterwards (the
    returned :class:`Delta` then holds only its manifest: its files are gone).
    Returns the delta and the registry's record of the push (``DeltaInfo.to_dict()``).
    """
    return publish_delta(
        lambda out: compress(base, target, out, options=options, **changes),
        ref,
        registry=registry,
        output=output,
    )


def publish_delta(
    write: Callable[[Path], Delta],
    ref: str,
    *,
    registry: Registry | str | Path | None = None,
    output: str | Path | None = None,
) -> tuple[Delta, dict[str, Any]]:
    """Run ``write(directory)`` (which writes a delta there) and push the result as ``ref``.

    output: the directory to write and keep; without it a temporary one is used and removed (the
    returned :class:`Delta` then holds only its manifest). Returns the delta and ``DeltaInfo.to_dict()``.
    """
    reg = registry if isinstance(registry, Registry) else Registry.open(registry)
    if output is not None:
        delta = write(Path(output))
        return delta, reg.push(output, ref).to_dict()
    with tempfile.TemporaryDirectory(prefix="deltakit-") as staging:
        staged = Path(staging) / "delta"
        delta = write(staged)
        info = reg.push(staged, ref).to_dict()
    return Delta(delta.manifest), info
