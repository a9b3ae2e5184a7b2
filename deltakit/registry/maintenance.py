"""Registry maintenance: which blobs are live, garbage collection, and verification.

gc and pushers: gc holds the registry lock exclusively, so it never deletes a blob an in-flight push has
written but not yet referenced. It is not starved by a stream of pushers: it queues at the lock's gate
(see ``locking``), after which new writers wait while those already inside finish; the wait is bounded
(``timeout``), after which gc gives up with RegistryError and deletes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from deltakit.errors import RegistryError
from deltakit.format.atomic import pid_alive
from deltakit.registry.blobstore import LocalBlobStore, check_digest
from deltakit.registry.catalog import Catalog
from deltakit.registry.fsutil import temp_owner
from deltakit.registry.journal import RefJournal
from deltakit.registry.manifest import file_entries
from deltakit.registry.records import GcReport, Problem, VerifyReport
from deltakit.registry.refs import REF_ERRORS, RefReader


def live_digests(reader: RefReader) -> set[str]:
    """Every blob some ref needs (manifests, delta files, base file lists, base files).

    Raises RegistryError if a ref, manifest or file list cannot be read (then nothing is safe to delete).
    """
    live: set[str] = set()
    for name, tag, ddoc, problem in reader.delta_refs():
        if ddoc is None:
            raise RegistryError(f"delta ref {name}:{tag} is unreadable ({problem}); fix it before gc")
        try:
            _, manifest = reader.manifest(ddoc.manifest)
        except REF_ERRORS as exc:
            raise RegistryError(f"delta {name}:{tag}: {exc}; refusing to gc") from None
        live.add(check_digest(ddoc.manifest))
        live.update(e.sha256 for e in file_entries(manifest))
    for name, bdoc, problem in reader.base_refs():
        if bdoc is None:
            raise RegistryError(f"base ref {name} is unreadable ({problem}); fix it before gc")
        try:
            files = reader.tree(bdoc.tree)
        except REF_ERRORS as exc:
            raise RegistryError(f"base {name}: {exc}; refusing to gc") from None
        live.add(check_digest(bdoc.tree))
        live.update(e.sha256 for e in files.values())
    return live


def stale_ref_temps(root: Path) -> list[Path]:
    """Temp files of interrupted ref writes under ``refs/`` and ``journal/`` whose writer is gone."""
    out = []
    for top in ("refs", "journal"):
        for dirpath, _dirs, files in os.walk(root / top):
            for name in files:
                pid = temp_owner(name)
                if pid is not None and (pid == os.getpid() or not pid_alive(pid)):
                    out.append(Path(dirpath, name))
    return out


def collect(root: Path, journal: RefJournal, catalog: Catalog, *, dry_run: bool) -> GcReport:
    """Delete unreferenced blobs, stale caches, temp files and orphan eval records (caller holds the lock)."""
    report = GcReport(dry_run=dry_run)
    store: LocalBlobStore = journal.store
    live = live_digests(journal.reader)
    for digest in list(store.iter_digests()):
        if digest not in live:
            report.removed_blobs += 1
            report.freed_bytes += store.size(digest) or 0
            if not dry_run:
                store.delete(digest)
    for kind in ("deltas", "bases"):
        cache = root / "cache" / kind
        for entry in cache.iterdir() if cache.is_dir() else []:
            if entry.name not in live:
                report.removed_cache_dirs += 1
                if dry_run:
                    continue
                if entry.is_symlink() or not entry.is_dir():  # never followed out of the registry
                    entry.unlink()
                else:
                    shutil.rmtree(entry, ignore_errors=True)
    for digest, _doc in journal.reader.eval_docs():
        if digest not in live:
            report.removed_eval_docs += 1
            if not dry_run:
                journal.delete_eval(digest)
    stale = stale_ref_temps(root)
    if dry_run:
        report.removed_temp_files = sum(1 for _ in (root / "tmp").iterdir()) + len(stale)
    else:
        report.removed_temp_files = store.clean_tmp()
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed_temp_files += 1
    return report


@dataclass
class _Needs:
    """Blobs the refs need: digest -> (who needs it, expected size or None)."""

    needed: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def add(self, digest: str, who: str, size: int | None) -> None:
        self.needed.setdefault(check_digest(digest), (who, size))


def _check_blobs(store: LocalBlobStore, report: VerifyReport, present: set[str]) -> set[str]:
    corrupt = set()
    for digest in sorted(present):
        report.blobs_checked += 1
        report.bytes_checked += store.size(digest) or 0
        issue = store.verify_blob(digest)
        if issue:
            corrupt.add(digest)
            report.problems.append(Problem("corrupt-blob", digest, issue))
    return corrupt


def _check_delta_refs(reader: RefReader, report: VerifyReport, needs: _Needs, corrupt: set[str]) -> dict:
    rows: dict[tuple[str, str], str] = {}
    for name, tag, doc, problem in reader.delta_refs():
        report.refs_checked += 1
        subject = f"delta {name}:{tag}"
        if doc is None:
            report.problems.append(Problem("bad-ref", subject, f"ref document is unreadable: {problem}"))
            continue
        rows[(name, tag)] = doc.manifest
        needs.add(doc.manifest, subject + " manifest", None)
        try:
            _, manifest = reader.manifest(doc.manifest)
        except REF_ERRORS as exc:
            if check_digest(doc.manifest) not in corrupt:
                report.problems.append(Problem("bad-manifest", subject, str(exc)))
            continue
        for entry in file_entries(manifest):
            needs.add(entry.sha256, f"{subject} {entry.path}", entry.size)
    return rows


def _check_base_refs(reader: RefReader, report: VerifyReport, needs: _Needs, corrupt: set[str]) -> dict:
    rows: dict[str, str] = {}
    for name, doc, problem in reader.base_refs():
        report.refs_checked += 1
        subject = f"base {name}"
        if doc is None:
            report.problems.append(Problem("bad-ref", subject, f"ref document is unreadable: {problem}"))
            continue
        rows[name] = doc.tree
        needs.add(doc.tree, subject + " file list", None)
        try:
            files = reader.tree(doc.tree)
        except REF_ERRORS as exc:
            if check_digest(doc.tree) not in corrupt:
                report.problems.append(Problem("bad-manifest", subject, str(exc)))
            continue
        for rel, entry in files.items():
            needs.add(entry.sha256, f"{subject} {rel}", entry.size)
    return rows


def _check_catalog(catalog: Catalog, report: VerifyReport, deltas: dict, bases: dict) -> None:
    cat_deltas = {(r["name"], r["tag"]): r["manifest"] for r in catalog.list_deltas()}
    for key in sorted(set(cat_deltas) | set(deltas)):
        if cat_deltas.get(key) != deltas.get(key):
            report.problems.append(
                Problem("catalog", f"delta {key[0]}:{key[1]}", "catalog row differs from the ref")
            )
    cat_bases = {r["name"]: r["tree"] for r in catalog.list_bases()}
    for name in sorted(set(cat_bases) | set(bases)):
        if cat_bases.get(name) != bases.get(name):
            report.problems.append(Problem("catalog", f"base {name}", "catalog row differs from the ref"))


def verify(root: Path, reader: RefReader, catalog: Catalog, *, deep: bool) -> VerifyReport:
    """Check every blob's hash (``deep``; else sizes only), every ref, and the catalog against the refs."""
    report = VerifyReport()
    store: LocalBlobStore = reader.store
    present = set(store.iter_digests())
    corrupt = _check_blobs(store, report, present) if deep else set()
    needs = _Needs()
    deltas = _check_delta_refs(reader, report, needs, corrupt)
    bases = _check_base_refs(reader, report, needs, corrupt)
    for digest, (who, size) in sorted(needs.needed.items()):
        if digest not in present:
            report.problems.append(Problem("missing-blob", digest, f"needed by {who}"))
        elif size is not None and digest not in corrupt and store.size(digest) != size:
            report.problems.append(
                Problem("corrupt-blob", digest, f"size differs from {size} recorded by {who}")
            )
    report.unreferenced_blobs = len(present - set(needs.needed))
    tmp = root / "tmp"
    report.temp_files = (sum(1 for _ in tmp.iterdir()) if tmp.is_dir() else 0) + len(stale_ref_temps(root))
    _check_catalog(catalog, report, deltas, bases)
    return report
