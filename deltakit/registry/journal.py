"""Writing refs: each ref document change and its catalog row, kept in step across crashes.

Every change of a ref document happens under the ref lock (``refs.lock``) with an intent record in
``journal/`` naming the ref; the record is removed once the catalog row matches. A process killed in
between leaves the record behind, and :meth:`RefJournal.recover` (run by ``Registry.open``) re-derives
the row from the ref. This is the registry's one public write path for refs: ``sync`` uses it too.

A pause hook (``pause_hook(point)``, points ``"blob"`` after each pushed blob and ``"ref"`` between the
ref write and the catalog update) lets crash tests kill a writer inside each window; it is injected
by the caller, never read from the environment.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError
from deltakit.format.atomic import pid_alive
from deltakit.registry import indexing
from deltakit.registry.blobstore import check_digest
from deltakit.registry.catalog import Catalog
from deltakit.registry.fsutil import write_bytes_atomic
from deltakit.registry.jsondoc import parse_object
from deltakit.registry.layout import base_ref_key, confine, delta_ref_key, dumps, eval_key, now
from deltakit.registry.locking import RegistryLock, registry_lock
from deltakit.registry.names import DeltaRef, parse_ref, validate_name
from deltakit.registry.refs import REF_ERRORS, RefReader

PauseHook = Callable[[str], None]


class RefJournal:
    """Ref writes of one registry directory: ref document, intent record and catalog row together.

    root: the registry directory. reader: its :class:`RefReader`. catalog: a callable returning the
    open catalog. pause_hook: optional test hook called at the points named in the module docstring.
    """

    def __init__(
        self,
        root: Path,
        reader: RefReader,
        catalog: Callable[[], Catalog],
        pause_hook: PauseHook | None = None,
    ) -> None:
        self.root = Path(root)
        self.reader = reader
        self.store = reader.store
        self._catalog = catalog
        self.pause_hook = pause_hook
        self._depth = 0

    def pause(self, point: str) -> None:
        """Call the pause hook (if any) at ``point``."""
        if self.pause_hook is not None:
            self.pause_hook(point)

    @contextlib.contextmanager
    def ref_lock(self) -> Iterator[None]:
        """Serialise ref-document writes with their catalog rows (re-entrant within this object)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with registry_lock(self.root / "refs.lock", exclusive=True):
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0

    @contextlib.contextmanager
    def intent(self, record: dict[str, Any]) -> Iterator[None]:
        """Hold the ref lock and leave an intent record while a ref and its catalog row change."""
        with self.ref_lock():
            path = confine(self.root, "journal") / f"{os.getpid()}-{uuid.uuid4().hex}.json"
            write_bytes_atomic(path, dumps(record))
            yield
            path.unlink()

    # -- the write interface ---------------------------------------------------------------------
    def write_delta_ref(self, ref: DeltaRef, manifest_digest: str, created_at: str | None = None) -> None:
        """Point ``ref`` at a manifest blob (whose files must all be stored already), then index it."""
        check_digest(manifest_digest)
        doc = {"kind": "delta", "name": ref.name, "tag": ref.tag, "manifest": manifest_digest,
               "created_at": created_at or now()}  # fmt: skip
        with self.intent({"kind": "delta", "name": ref.name, "tag": ref.tag}):
            self.store.write_doc(delta_ref_key(ref.name, ref.tag), dumps(doc))
            self.pause("ref")
            indexing.sync_delta_row(self.reader, self._catalog(), ref)

    def write_base_ref(
        self, name: str, fingerprint: str, tree_digest: str, created_at: str | None = None
    ) -> None:
        """Point base ``name`` at a file-list blob (whose files must all be stored already), then index it."""
        validate_name(name, "base name")
        check_digest(tree_digest)
        doc = {"kind": "base", "name": name, "fingerprint": fingerprint, "tree": tree_digest,
               "created_at": created_at or now()}  # fmt: skip
        with self.intent({"kind": "base", "name": name}):
            self.store.write_doc(base_ref_key(name), dumps(doc))
            indexing.sync_base_row(self.reader, self._catalog(), name)

    def write_eval(self, manifest: str, results: dict[str, Any], updated_at: str | None = None) -> None:
        """Store the eval results of one manifest digest, then index them."""
        doc = {"kind": "eval", "manifest": manifest, "results": results, "updated_at": updated_at or now()}
        with self.intent({"kind": "eval", "manifest": manifest}):
            self.store.write_doc(eval_key(check_digest(manifest)), dumps(doc))
            indexing.sync_eval_row(self.reader, self._catalog(), manifest)

    def delete_delta_ref(self, ref: DeltaRef) -> None:
        """Remove the ref document of ``ref`` and its catalog row."""
        with self.intent({"kind": "delta", "name": ref.name, "tag": ref.tag}):
            self.store.delete_doc(delta_ref_key(ref.name, ref.tag))
            indexing.sync_delta_row(self.reader, self._catalog(), ref)

    def delete_base_ref(self, name: str) -> None:
        """Remove the ref document of base ``name`` and its catalog row."""
        with self.intent({"kind": "base", "name": name}):
            self.store.delete_doc(base_ref_key(name))
            indexing.sync_base_row(self.reader, self._catalog(), name)

    def delete_eval(self, manifest_hex: str) -> None:
        """Remove the eval record of a manifest (hex digest) and its catalog row."""
        with self.intent({"kind": "eval", "manifest": "sha256:" + manifest_hex}):
            self.store.delete_doc(eval_key(check_digest(manifest_hex)))
            self._catalog().delete_eval("sha256:" + manifest_hex)

    # -- recovery --------------------------------------------------------------------------------
    def _replay(self, record: dict[str, Any]) -> None:
        catalog = self._catalog()
        kind = record.get("kind")
        if kind == "delta":
            indexing.sync_delta_row(
                self.reader, catalog, parse_ref(f"{record.get('name')}:{record.get('tag')}")
            )
        elif kind == "base":
            indexing.sync_base_row(self.reader, catalog, validate_name(str(record.get("name")), "base name"))
        elif kind == "eval":
            indexing.sync_eval_row(self.reader, catalog, str(record.get("manifest")))

    def recover(self, lock: RegistryLock) -> list[str]:
        """Replay intent records left by dead processes; return one line per record that could not be.

        A record whose ref is unreadable is dropped (the ref's problem is then reported by verify).
        """
        journal = self.root / "journal"
        problems: list[str] = []
        if not journal.is_dir():
            return problems
        for path in sorted(journal.glob("*.json")):
            pid_text = path.name.split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else -1
            if pid > 0 and pid != os.getpid() and pid_alive(pid):
                continue  # a live writer: it will update the catalog itself
            try:
                record = parse_object(path.read_bytes(), str(path))
            except (OSError, FormatError):
                record = {}
            with lock.shared(), self.ref_lock():
                try:
                    self._replay(record)
                except (*REF_ERRORS, ValueError) as exc:
                    problems.append(f"journal record {path.name}: {exc}")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return problems
