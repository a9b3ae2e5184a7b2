"""Keeping the SQLite catalog in step with the refs: rows derived from ref documents, rebuild, recovery.

The refs and blobs are the source of truth; every catalog row is a function of one ref document (and the
manifest or file list it names). :func:`open_catalog` opens ``catalog.sqlite`` and, when the file is
missing while refs exist, or is damaged (garbage bytes, truncated, another schema), moves the damaged
file aside and rebuilds the catalog from the refs with a warning, so ``ls`` never answers empty.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltakit.registry.catalog import Catalog, CatalogDamaged
from deltakit.registry.locking import RegistryLock
from deltakit.registry.manifest import summarize
from deltakit.registry.names import DeltaRef
from deltakit.registry.refs import REF_ERRORS, BaseDoc, DeltaDoc, RefReader

CATALOG_FILE = "catalog.sqlite"
_SIDE_FILES = ("-wal", "-shm", "-journal")


def delta_row(reader: RefReader, doc: DeltaDoc) -> dict[str, Any]:
    """The catalog row of one delta ref (reads and checks its manifest blob)."""
    _, manifest = reader.manifest(doc.manifest)
    return {"name": doc.name, "tag": doc.tag, "manifest": doc.manifest, "created_at": doc.created_at,
            **summarize(manifest)}  # fmt: skip


def base_row(reader: RefReader, doc: BaseDoc) -> dict[str, Any]:
    """The catalog row of one base ref (reads and checks its file list)."""
    files = reader.tree(doc.tree)
    return {
        "name": doc.name, "fingerprint": doc.fingerprint, "tree": doc.tree,
        "total_bytes": sum(e.size for e in files.values()), "n_files": len(files), "created_at": doc.created_at,
    }  # fmt: skip


def sync_delta_row(reader: RefReader, catalog: Catalog, ref: DeltaRef) -> None:
    """Make the catalog row of ``ref`` equal what its ref document says (delete it when absent)."""
    doc = reader.delta(ref)
    catalog.upsert_delta(delta_row(reader, doc)) if doc else catalog.delete_delta(ref.name, ref.tag)


def sync_base_row(reader: RefReader, catalog: Catalog, name: str) -> None:
    """Make the catalog row of base ``name`` equal its ref document."""
    doc = reader.base(name)
    catalog.upsert_base(base_row(reader, doc)) if doc else catalog.delete_base(name)


def sync_eval_row(reader: RefReader, catalog: Catalog, manifest: str) -> None:
    """Make the catalog's eval row of ``manifest`` equal its eval record."""
    doc = reader.eval(manifest)
    catalog.set_eval(manifest, doc.results, doc.updated_at) if doc else catalog.delete_eval(manifest)


def _row_or_none(
    make: Callable[[RefReader, Any], dict[str, Any]], reader: RefReader, doc: Any
) -> dict | None:
    """``make(reader, doc)``, or None when the doc is missing or what it names is unreadable."""
    if doc is None:
        return None
    try:
        return make(reader, doc)
    except REF_ERRORS:
        return None


def rebuild(reader: RefReader, catalog: Catalog) -> int:
    """Replace every catalog row with rows derived from the refs; return how many refs were unreadable.

    Unreadable refs (malformed document, missing or corrupt manifest) get no row; ``verify`` reports them.
    """
    deltas = [_row_or_none(delta_row, reader, doc) for _name, _tag, doc, _problem in reader.delta_refs()]
    bases = [_row_or_none(base_row, reader, doc) for _name, doc, _problem in reader.base_refs()]
    evals = [(e.manifest, e.results, e.updated_at) for _digest, e in reader.eval_docs() if e is not None]
    catalog.replace_all([r for r in deltas if r], [r for r in bases if r], evals)
    return deltas.count(None) + bases.count(None)


def _move_aside(path: Path) -> Path:
    """Rename a damaged catalog (and its WAL side files) out of the way; return the new name."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}-{os.getpid()}")
    for suffix in ("", *_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


def _has_refs(reader: RefReader) -> bool:
    return bool(reader.store.list_docs("refs/deltas") or reader.store.list_docs("refs/bases"))


def _needs_rebuild(catalog: Catalog, reader: RefReader) -> bool:
    """An empty catalog, never rebuilt, while refs exist and no journal record explains it: the file was lost.

    (A catalog rebuilt from refs that are all unreadable stays empty; it is not rebuilt on every open.)
    (A writer killed between its first ref and its catalog row leaves a journal record; the journal
    replay indexes that ref, no rebuild needed.)
    """
    if not catalog.is_empty() or catalog.was_rebuilt() or not _has_refs(reader):
        return False
    journal = reader.store.root / "journal"
    return not (journal.is_dir() and any(journal.glob("*.json")))


def open_catalog(root: Path, reader: RefReader, lock: RegistryLock, timeout: float = 60.0) -> Catalog:
    """Open ``root/catalog.sqlite``; if it is damaged, or empty while refs exist, rebuild it from the refs.

    The common case (a healthy catalog) takes no lock. Recovery takes the registry lock exclusively
    (waiting at most ``timeout`` seconds), re-checks, and warns: a damaged file is moved aside as
    ``catalog.sqlite.damaged-<time>-<pid>`` and a new catalog indexed from the refs.
    """
    path = root / CATALOG_FILE
    try:
        catalog = Catalog(path)
        if not _needs_rebuild(catalog, reader):
            return catalog
        catalog.close()
    except CatalogDamaged:
        pass
    with lock.exclusive(timeout, "catalog recovery"):
        try:
            catalog = Catalog(path)
        except CatalogDamaged as exc:
            aside = _move_aside(path)
            warnings.warn(
                f"catalog {path} was damaged ({exc.reason}); moved it to {aside.name} and rebuilt it from the refs",
                stacklevel=3,
            )
            catalog = Catalog(path)
            rebuild(reader, catalog)
            return catalog
        if _needs_rebuild(catalog, reader):
            warnings.warn(f"catalog {path} was missing or empty; rebuilt it from the refs", stacklevel=3)
            rebuild(reader, catalog)
        return catalog
