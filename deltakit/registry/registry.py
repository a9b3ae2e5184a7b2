"""The embedded registry: one directory holding bases and deltas as content-addressed blobs.

:class:`Registry` is a facade over modules with one job each (layout in ``layout``, locks in
``locking``, ref reads in ``refs``, ref writes and crash recovery in ``journal``, the SQLite index in
``catalog``/``indexing``, ingestion of delta and checkpoint directories in ``ingest``, materialised
directories in ``cache``, gc and verify in ``maintenance``,
remote stores in ``sync``). See ``docs/registry.md`` for the layout on disk.

Write order: blobs (temp + fsync + rename) -> manifest blob -> ref document (atomic rename) -> catalog.
A process killed at any point leaves either the old ref or the new one, never a ref to missing blobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError, NotFoundError, RegistryError
from deltakit.registry import cache, indexing, ingest, maintenance
from deltakit.registry.blobstore import LocalBlobStore, check_digest
from deltakit.registry.catalog import Catalog
from deltakit.registry.journal import PauseHook, RefJournal
from deltakit.registry.layout import (
    LAYOUT_FILE,
    check_layout,
    init_layout,
)
from deltakit.registry.locking import RegistryLock
from deltakit.registry.manifest import MANIFEST_NAME, file_entries, list_files, summarize
from deltakit.registry.names import DeltaRef, parse_ref, validate_name
from deltakit.registry.paths import resolve_registry_path
from deltakit.registry.records import BaseInfo, DeltaInfo, GcReport, VerifyReport
from deltakit.registry.refs import BaseDoc, DeltaDoc, RefReader

#: how long gc and rebuild_catalog wait for writers to drain before giving up (seconds)
DEFAULT_EXCLUSIVE_TIMEOUT = 300.0


class Registry:
    """A registry of base models and compressed deltas on a local directory.

    Open one with :meth:`Registry.open`; the object is usable as a context manager (closes the catalog).
    Every method is safe to call from several processes at once on the same directory; one object is
    not meant to be shared between threads.

    pause_hook: test-only callable ``hook(point)`` run inside push (see ``journal``); settable later.
    """

    def __init__(self, root: Path, *, pause_hook: PauseHook | None = None) -> None:
        self.root = Path(root)
        self.store = LocalBlobStore(self.root)
        self.reader = RefReader(self.store)
        self.lock = RegistryLock(self.root)
        self.journal = RefJournal(self.root, self.reader, lambda: self.catalog, pause_hook)
        self._catalog: Catalog | None = None

    @property
    def pause_hook(self) -> PauseHook | None:
        """The test pause hook (None in production)."""
        return self.journal.pause_hook

    @pause_hook.setter
    def pause_hook(self, hook: PauseHook | None) -> None:
        self.journal.pause_hook = hook

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        pause_hook: PauseHook | None = None,
    ) -> Registry:
        """Open the registry at ``path`` (default: ``$DELTAKIT_HOME/registry`` or the user data dir).

        create: initialise an empty registry there if none exists (else raise NotFoundError).
        A missing or damaged catalog is rebuilt from the refs (with a warning); intent records left
        by killed writers are replayed.
        """
        reg = cls(resolve_registry_path(path), pause_hook=pause_hook)
        if not (reg.root / LAYOUT_FILE).is_file():
            if not create:
                raise NotFoundError(f"no registry at {reg.root}; create one with Registry.open(create=True)")
            reg.init()
        else:
            check_layout(reg.root)
            _ = reg.catalog
        reg.journal.recover(reg.lock)
        return reg

    def init(self) -> Registry:
        """Create the registry layout (idempotent) and return self."""
        init_layout(self.root)
        _ = self.catalog
        return self

    @property
    def catalog(self) -> Catalog:
        """The SQLite catalog (opened on first use; rebuilt from the refs when missing or damaged)."""
        if self._catalog is None:
            self._catalog = indexing.open_catalog(self.root, self.reader, self.lock)
        return self._catalog

    def close(self) -> None:
        """Close the catalog connection."""
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading refs --------------------------------------------------------------------------
    def _delta_doc(self, ref: DeltaRef) -> DeltaDoc:
        doc = self.reader.delta(ref)
        if doc is None:
            tags = sorted(r["tag"] for r in self.catalog.list_deltas() if r["name"] == ref.name)
            hint = f"; tags of {ref.name!r}: {', '.join(tags)}" if tags else ""
            raise NotFoundError(f"no delta {ref} in registry {self.root}{hint}")
        return doc

    def _base_doc(self, name: str) -> BaseDoc:
        doc = self.reader.base(name)
        if doc is None:
            known = ", ".join(b["name"] for b in self.catalog.list_bases()) or "none"
            raise NotFoundError(f"no base {name!r} in registry {self.root} (registered: {known})")
        return doc

    # -- bases ---------------------------------------------------------------------------------
    def add_base(
        self, name: str, model_dir: str | os.PathLike[str], *, fingerprint: str | None = None,
        replace: bool = False, force: bool = False,
    ) -> BaseInfo:  # fmt: skip
        """Store a Hugging Face checkpoint directory as base ``name`` (every file, content-addressed).

        fingerprint: the checkpoint's ``sha256:...`` identity; computed with
            ``deltakit.format.fingerprint.checkpoint_fingerprint`` when not given.
        replace: allow re-pointing an existing name at different weights; deltas made from the old
            weights then refuse unless ``force``. Re-adding identical weights is a no-op.
        """
        validate_name(name, "base name")
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise NotFoundError(f"base model directory {model_dir} does not exist")
        if fingerprint is None:
            from deltakit.format.fingerprint import checkpoint_fingerprint

            fingerprint = checkpoint_fingerprint(model_dir)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise FormatError("fingerprint must be a non-empty string")
        files = list_files(model_dir)
        if not files:
            raise FormatError(f"{model_dir} holds no files")
        with self.lock.shared():
            old = self.reader.base(name)
            if old is not None and old.fingerprint != fingerprint:
                self._check_base_replace(name, old, replace=replace, force=force)
            tree_digest = ingest.store_checkpoint(self.store, model_dir, files, fingerprint)
            if old is not None and old.tree == tree_digest:
                indexing.sync_base_row(self.reader, self.catalog, name)
            else:
                self.journal.write_base_ref(name, fingerprint, tree_digest)
        return self.get_base(name)

    def _check_base_replace(self, name: str, old: BaseDoc, *, replace: bool, force: bool) -> None:
        if not replace:
            raise RegistryError(
                f"base {name!r} is already registered with fingerprint {old.fingerprint}; "
                "pass replace=True to re-point it"
            )
        users = self.catalog.deltas_of_base(old.fingerprint)
        if users and not force:
            raise RegistryError(
                f"base {name!r} is used by {len(users)} delta(s) ({_refs(users)}); pass force=True to replace"
            )

    def get_base(self, name: str) -> BaseInfo:
        """Catalog record of base ``name`` (NotFoundError if unknown)."""
        validate_name(name, "base name")
        row = self.catalog.get_base(name)
        if row is None:
            self._base_doc(name)  # raises NotFoundError with the known names
            indexing.sync_base_row(self.reader, self.catalog, name)
            row = self.catalog.get_base(name)
        if row is None:
            raise NotFoundError(f"no base {name!r} in registry {self.root}")
        return BaseInfo(**row)

    def bases(self) -> list[BaseInfo]:
        """Every registered base, sorted by name."""
        return [BaseInfo(**r) for r in self.catalog.list_bases()]

    def resolve_base(self, name: str, *, verify: bool = False) -> Path:
        """A local checkpoint directory with base ``name``'s files (a cache of hard links to blobs).

        Every file is hashed when the cache is first built; later calls check sizes only, unless
        ``verify`` re-hashes everything. Raises IntegrityError on a corrupted file.
        """
        with self.lock.shared():
            doc = self._base_doc(name)
            files = self.reader.tree(doc.tree)
            entries = {rel: (e.sha256, e.size) for rel, e in files.items()}
            return cache.materialise(self.store, "bases", doc.tree, entries, verify_existing=verify)

    # -- deltas --------------------------------------------------------------------------------
    def push(
        self, delta_dir: str | os.PathLike[str], ref: str = "latest", *, check_base: bool = False
    ) -> DeltaInfo:
        """Store the delta directory ``delta_dir`` under ``name[:tag]`` (tag defaults to ``latest``).

        Every file listed in manifest.json is hashed and must match its recorded sha256 and size;
        files on disk that the manifest does not list, and manifest paths that are not plain relative
        paths, are refused. Re-pushing identical content is cheap (blobs already present are skipped).
        ``check_base``: refuse a delta whose base fingerprint is not registered here.
        """
        parsed = parse_ref(ref)
        delta_dir = Path(delta_dir)
        manifest_bytes, manifest = ingest.read_delta_dir(delta_dir)
        if check_base:
            fp = summarize(manifest)["base_fingerprint"]
            if fp is None or self.catalog.base_by_fingerprint(fp) is None:
                raise RegistryError(
                    f"the base of this delta ({fp}) is not registered; add it with add_base first"
                )
        with self.lock.shared():
            for entry in file_entries(manifest):
                ingest.put_delta_file(self.store, delta_dir, entry.path, entry.sha256, entry.size)
                self.journal.pause("blob")
            manifest_digest = "sha256:" + self.store.put_bytes(manifest_bytes)
            self.journal.write_delta_ref(parsed, manifest_digest)
        return self.show_info(parsed)

    def show_info(self, ref: str | DeltaRef) -> DeltaInfo:
        """Catalog record of one delta (NotFoundError if unknown)."""
        parsed = parse_ref(ref)
        row = self.catalog.get_delta(parsed.name, parsed.tag)
        if row is None:
            self._delta_doc(parsed)  # raises NotFoundError
            indexing.sync_delta_row(self.reader, self.catalog, parsed)
            row = self.catalog.get_delta(parsed.name, parsed.tag)
        if row is None:
            raise NotFoundError(f"no delta {parsed} in registry {self.root}")
        return DeltaInfo(**row, eval=self.catalog.get_eval(row["manifest"]))

    def ls(self, base: str | None = None) -> list[DeltaInfo]:
        """Every tagged delta, sorted by name and tag; ``base``: only deltas made from that base."""
        if base is None:
            rows = self.catalog.list_deltas()
        else:
            validate_name(base, "base name")
            known = self.catalog.get_base(base)
            rows = self.catalog.list_deltas(known["fingerprint"] if known else None, base)
        evals = self.catalog.all_evals()
        return [DeltaInfo(**r, eval=evals.get(r["manifest"])) for r in rows]

    def show(self, ref: str | DeltaRef) -> dict[str, Any]:
        """Everything about one delta: catalog record, codec config, files, lineage and evals."""
        info = self.show_info(ref)
        _, manifest = self.reader.manifest(info.manifest)
        codec = manifest.get("codec") if isinstance(manifest.get("codec"), dict) else {}
        base = self.catalog.base_by_fingerprint(info.base_fingerprint) if info.base_fingerprint else None
        same_content = [
            r["name"] + ":" + r["tag"] for r in self.catalog.list_deltas() if r["manifest"] == info.manifest
        ]
        return {
            **info.to_dict(),
            "codec_config": codec.get("config"),
            "budget": codec.get("budget"),
            "files": manifest["files"],
            "registered_base": base["name"] if base else None,
            "also_tagged_as": [r for r in same_content if r != info.ref],
            "format_version": manifest.get("format_version"),
            "deltakit_version": manifest.get("deltakit_version"),
        }

    def manifest(self, ref: str | DeltaRef) -> dict[str, Any]:
        """The parsed manifest of a delta (hash-verified)."""
        return self.reader.manifest(self._delta_doc(parse_ref(ref)).manifest)[1]

    def pull(self, ref: str | DeltaRef, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the delta ``ref`` as a directory at ``out_dir``, verifying every file's hash.

        The directory appears whole or not at all; a corrupted or missing blob raises IntegrityError /
        NotFoundError and leaves nothing behind. Leftovers of an earlier replace of ``out_dir`` that
        was interrupted (hidden ``.NAME.old-<pid>-*`` directories of dead processes) are removed.
        """
        from deltakit.format.atomic import atomic_directory

        parsed = parse_ref(ref)
        out = Path(out_dir)
        with self.lock.shared():
            doc = self._delta_doc(parsed)
            manifest_bytes, manifest = self.reader.manifest(doc.manifest)
            ingest.remove_replace_leftovers(out)
            with atomic_directory(out, overwrite=overwrite) as tmp:
                for entry in file_entries(manifest):
                    dst = tmp / entry.path
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self.store.get_file(entry.sha256, dst)
                (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)
        return out

    def resolve_delta(self, ref: str | DeltaRef) -> Path:
        """A verified local directory holding delta ``ref`` (a cache under the registry; do not modify).

        Every file is hashed on each call; a corrupted blob raises IntegrityError.
        """
        parsed = parse_ref(ref)
        with self.lock.shared():
            doc = self._delta_doc(parsed)
            manifest_bytes, manifest = self.reader.manifest(doc.manifest)
            entries = {e.path: (e.sha256, e.size) for e in file_entries(manifest)}
            entries[MANIFEST_NAME] = (check_digest(doc.manifest), len(manifest_bytes))
            return cache.materialise(self.store, "deltas", doc.manifest, entries, verify_existing=True)

    # -- removal -------------------------------------------------------------------------------
    def rm(self, ref: str | DeltaRef, *, force: bool = False) -> DeltaInfo:
        """Remove the tag ``name[:tag]`` (its blobs stay until ``gc``, and are kept while shared).

        force: accepted for symmetry with :meth:`rm_base`; removing a delta never needs it.
        """
        parsed = parse_ref(ref)
        with self.lock.shared():
            info = self.show_info(parsed)
            self.journal.delete_delta_ref(parsed)
        return info

    def rm_base(self, name: str, *, force: bool = False) -> BaseInfo:
        """Unregister base ``name``; refused while deltas made from it remain, unless ``force``."""
        with self.lock.shared():
            info = self.get_base(name)
            users = self.catalog.deltas_of_base(info.fingerprint)
            others = [
                b
                for b in self.catalog.list_bases()
                if b["fingerprint"] == info.fingerprint and b["name"] != name
            ]
            if users and not others and not force:
                raise RegistryError(
                    f"base {name!r} is still used by {len(users)} delta(s): {_refs(users)}; "
                    "remove them first or pass force=True"
                )
            self.journal.delete_base_ref(name)
        return info

    # -- evals ---------------------------------------------------------------------------------
    def set_eval(
        self, ref: str | DeltaRef, results: dict[str, Any], *, replace: bool = False
    ) -> dict[str, Any]:
        """Record eval results for the content of delta ``ref``; merged into earlier results unless ``replace``.

        results: JSON-serialisable mapping, e.g. ``{"ppl": 7.1, "kl_to_target": 0.02}``. Returns the stored dict.
        """
        if not isinstance(results, dict):
            raise FormatError("eval results must be a dict")
        try:
            json.dumps(results, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"eval results must be JSON-serialisable: {exc}") from None
        with self.lock.shared(), self.journal.ref_lock():
            manifest = self._delta_doc(parse_ref(ref)).manifest
            old = self.reader.eval(manifest)
            merged = dict(results) if replace or old is None else {**old.results, **results}
            self.journal.write_eval(manifest, merged)
        return merged

    def get_eval(self, ref: str | DeltaRef) -> dict[str, Any] | None:
        """Eval results recorded for delta ``ref``, or None."""
        return self.show_info(ref).eval

    # -- remote --------------------------------------------------------------------------------
    def push_remote(self, url: str, **kwargs: Any) -> Any:
        """Send deltas/bases to a remote store; see :func:`deltakit.registry.sync.push_remote`."""
        from deltakit.registry.sync import push_remote

        return push_remote(self, url, **kwargs)

    def pull_remote(self, url: str, **kwargs: Any) -> Any:
        """Fetch deltas/bases from a remote store; see :func:`deltakit.registry.sync.pull_remote`."""
        from deltakit.registry.sync import pull_remote

        return pull_remote(self, url, **kwargs)

    # -- maintenance ---------------------------------------------------------------------------
    def live_digests(self) -> set[str]:
        """Every blob some ref needs; RegistryError if a ref, manifest or file list cannot be read."""
        return maintenance.live_digests(self.reader)

    def gc(self, *, dry_run: bool = False, timeout: float = DEFAULT_EXCLUSIVE_TIMEOUT) -> GcReport:
        """Delete blobs no ref needs, stale caches, temp files and orphan eval records.

        Holds the registry lock exclusively, so it never races a push; writers arriving meanwhile
        wait, so a stream of pushers cannot starve it. timeout: seconds to wait for running writers
        to finish (RegistryError after that, nothing deleted). Shared blobs stay while any ref needs them.
        """
        with self.lock.exclusive(timeout, "gc"):
            return maintenance.collect(self.root, self.journal, self.catalog, dry_run=dry_run)

    def rebuild_catalog(self, *, timeout: float = DEFAULT_EXCLUSIVE_TIMEOUT) -> None:
        """Recreate the SQLite catalog from ref documents and manifest blobs (the source of truth)."""
        with self.lock.exclusive(timeout, "rebuild_catalog"):
            indexing.rebuild(self.reader, self.catalog)

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every blob's hash (``deep``; else sizes only) and every reference; return the problems.

        Problems: corrupt or missing blobs, unreadable refs or manifests, and catalog rows that
        disagree with the refs (fixed by :meth:`rebuild_catalog`). Unreferenced blobs (left by an
        interrupted push or by rm) are counted, not reported: gc removes them.
        """
        return maintenance.verify(self.root, self.reader, self.catalog, deep=deep)


def _refs(rows: list[dict[str, Any]], limit: int = 5) -> str:
    names = [f"{r['name']}:{r['tag']}" for r in rows]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
