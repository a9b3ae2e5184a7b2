"""Checking a delta: file hashes, a known codec, and optionally the base it expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltakit.core.decode import Decoder, load_delta
from deltakit.errors import BaseMismatchError
from deltakit.format.fingerprint import FingerprintBuilder
from deltakit.models.checkpoint import open_checkpoint


def verify(delta_dir: str | Path, base: str | Path | dict | None = None) -> dict[str, Any]:
    """Verify a delta directory; raise a :class:`deltakit.errors.DeltakitError` on any problem.

    Checks the manifest (paths confined to the directory, allowlisted aux names), every file's size and
    sha256, that its codec is known, and every tensor entry's stored tensors against the manifest and the
    codec (names, dtypes and shapes, from the shard headers); with ``base`` also that the base's
    fingerprint is the one the delta was made from. Returns a report dict.
    """
    delta = load_delta(delta_dir, verify=True)
    decoder = Decoder.of(delta)
    for name in delta.tensor_names():
        decoder.check_entry(name)
    report: dict[str, Any] = {
        "delta": str(delta_dir),
        "files_checked": len(delta.manifest.files),
        "codec": delta.manifest.codec.name,
        "base_fingerprint": delta.manifest.base.fingerprint,
        "base_checked": False,
    }
    if base is not None:
        source = open_checkpoint(base)
        builder = FingerprintBuilder()
        for name in source.names():
            builder.add(name, source.get(name))
        actual = builder.fingerprint()
        if actual != delta.manifest.base.fingerprint:
            raise BaseMismatchError(
                f"base fingerprint {actual[:19]}… differs from the delta's base "
                f"{delta.manifest.base.fingerprint[:19]}… ({delta.manifest.base.name!r})"
            )
        report["base_checked"] = True
    return report
