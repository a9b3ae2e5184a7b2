"""Remembered tensor digests of checkpoint files, so one base serving many deltas is hashed once.

apply and compress fingerprint every tensor they read (:mod:`deltakit.format.fingerprint`): the base's
fingerprint is how a delta recognises the base it was made from. A fleet applies and compresses many
deltas against the same base, and hashing it each time costs a full pass over its bytes (the largest
share of an apply's CPU time on a 2-core machine, seconds per run for a 7B model).

A safetensors file's digests are kept in ``<cache>/digests/<sha256 of its resolved path>.json`` together
with the file's identity: device, inode, size, and modification and status-change times in nanoseconds.
They are used only while the identity is unchanged. Rewriting a file changes its modification time, and
the status-change time cannot be set back by user programs, so a stale digest needs tampering with the
file system itself; the fingerprint guards against using the wrong base by mistake, not against the
machine's own administrator. An unreadable, malformed or mismatched record is ignored (and replaced on
the next save); records are written atomically, a failed write costs only the saving, and at most
MAX_RECORDS are kept (the least recently written go first).
``DELTAKIT_DIGEST_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from deltakit.cachedir import cache_dir

ENV_SWITCH = "DELTAKIT_DIGEST_CACHE"
#: records kept at most; beyond, the least recently written are removed (files deleted long ago, temporary
#: checkpoints) when a new one is saved
MAX_RECORDS = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def file_identity(path: Path) -> list[int] | None:
    """``[device, inode, size, mtime_ns, ctime_ns]`` of a regular file, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record_path(resolved: Path) -> Path:
    return cache_dir() / "digests" / (hashlib.sha256(str(resolved).encode()).hexdigest()[:32] + ".json")


def _read_record(resolved: Path, identity: list[int]) -> dict[str, str]:
    """The remembered ``{tensor name: digest}`` of the file, or {} when none matches its identity."""
    try:
        data = json.loads(_record_path(resolved).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("path") != str(resolved) or data.get("identity") != identity:
        return {}
    digests = data.get("digests")
    if not isinstance(digests, dict):
        return {}
    return {
        k: v for k, v in digests.items() if isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v)
    }


class SourceDigests:
    """Known digests of one tensor source's files: :meth:`get` before hashing, :meth:`save` after
    (:class:`deltakit.format.fingerprint.FingerprintBuilder` does both).

    files: tensor name -> the safetensors file holding it (an empty map disables the cache, as for
    in-memory sources and ``.bin`` checkpoints).
    """

    def __init__(self, files: dict[str, Path]):
        self._file_of: dict[str, Path] = {}
        self._identity: dict[Path, list[int]] = {}
        self._known: dict[str, str] = {}
        if not enabled():
            return
        resolved_of: dict[Path, Path] = {}  # each file resolved once, not once per tensor
        by_file: dict[Path, list[str]] = {}
        for name, file in files.items():
            if file.suffix == ".safetensors":
                if file not in resolved_of:
                    resolved_of[file] = Path(os.path.realpath(file))
                by_file.setdefault(resolved_of[file], []).append(name)
        for resolved, names in by_file.items():
            identity = file_identity(resolved)
            if identity is None:
                continue
            self._identity[resolved] = identity
            remembered = _read_record(resolved, identity)
            for name in names:
                self._file_of[name] = resolved
                if name in remembered:
                    self._known[name] = remembered[name]

    @classmethod
    def of(cls, source) -> SourceDigests:
        """For a :class:`~deltakit.models.checkpoint.CheckpointReader` (anything with ``file_of``), else
        an empty one."""
        file_of = getattr(source, "file_of", None)
        return cls(file_of() if callable(file_of) else {})

    def get(self, name: str) -> str | None:
        """The remembered digest of tensor ``name``, or None (then hash it)."""
        return self._known.get(name)

    def save(self, digests: dict[str, str]) -> None:
        """Remember ``digests`` (tensor name -> hex digest) of this source's tensors, file by file, when a
        file's identity is still the one read at the start (best effort: errors are ignored)."""
        new: dict[Path, dict[str, str]] = {}
        for name, digest in digests.items():
            resolved = self._file_of.get(name)
            if resolved is not None and self._known.get(name) != digest:
                new.setdefault(resolved, {})[name] = digest
        for resolved, entries in new.items():
            identity = self._identity[resolved]
            if file_identity(resolved) != identity:
                continue  # the file changed while it was read: its digests describe neither version
            known = {
                n: self._known[n] for n, f in self._file_of.items() if f == resolved and n in self._known
            }
            record = {"path": str(resolved), "identity": identity, "digests": {**known, **entries}}
            _write_atomic(_record_path(resolved), json.dumps(record, sort_keys=True))
            self._known.update(entries)
        if new:
            _prune(cache_dir() / "digests", MAX_RECORDS)


def _prune(folder: Path, keep: int) -> None:
    """Remove the least recently written records beyond ``keep`` (best effort)."""
    try:
        records = [(p.stat().st_mtime_ns, p) for p in folder.glob("*.json")]
    except OSError:
        return
    if len(records) <= keep:
        return
    for _, path in sorted(records)[: len(records) - keep]:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
