"""Moving deltas and bases between the embedded registry and a remote store (S3-compatible).

Only blobs the other side lacks are sent (one listing of the other side's blobs, then set difference);
content addressing makes every write idempotent, so an interrupted sync is simply run again. Blobs go
first, ref documents last, so the other side never sees a ref whose blobs are not all there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from deltakit.errors import FormatError, NotFoundError
from deltakit.registry.blobstore import BlobStore, LocalBlobStore, check_digest
from deltakit.registry.journal import RefJournal
from deltakit.registry.layout import base_ref_key, delta_ref_key, eval_key
from deltakit.registry.locking import RegistryLock
from deltakit.registry.manifest import file_entries, parse_manifest
from deltakit.registry.names import DeltaRef, InvalidNameError, parse_ref, validate_name, validate_tag
from deltakit.registry.records import SyncReport
from deltakit.registry.refs import (
    BaseDoc,
    DeltaDoc,
    parse_base_doc,
    parse_delta_doc,
    parse_eval_doc,
    parse_tree,
)


class LocalSide(Protocol):
    """What sync needs of the local registry (a :class:`~deltakit.registry.Registry` provides it)."""

    store: LocalBlobStore
    lock: RegistryLock
    journal: RefJournal


def open_remote(url: str, **options: Any) -> BlobStore:
    """A :class:`BlobStore` for ``url`` (``s3://bucket/prefix``); options go to the store's constructor."""
    from deltakit.registry.s3store import S3BlobStore

    return S3BlobStore(url, **options)


def _key_identity(key: str) -> tuple[str, str]:
    """``(name, tag)`` of a delta ref key or ``(name, "")`` of a base ref key, validated (FormatError)."""
    try:
        if key.startswith("refs/deltas/") and key.endswith(".json"):
            name, _, tag = key[len("refs/deltas/") : -len(".json")].rpartition("/")
            return validate_name(name), validate_tag(tag)
        if key.startswith("refs/bases/") and key.endswith(".json"):
            return validate_name(key[len("refs/bases/") : -len(".json")], "base name"), ""
    except InvalidNameError as exc:
        raise FormatError(f"ref document key {key[:80]!r} does not name a valid ref ({exc})") from None
    raise FormatError(f"not a ref document key: {key[:80]!r}")


def read_ref(store: BlobStore, key: str) -> tuple[bytes, DeltaDoc | BaseDoc]:
    """Bytes and validated content of the ref document ``key`` on ``store`` (NotFoundError if absent)."""
    data = store.read_doc(key)
    if data is None:
        raise NotFoundError(f"{store.url}: no {key}")
    name, tag = _key_identity(key)
    where = f"{store.url}/{key}"
    doc = parse_delta_doc(data, name, tag, where) if tag else parse_base_doc(data, name, where)
    return data, doc


def _closure(store: BlobStore, key: str) -> list[str]:
    """Digests a ref document needs on ``store``, leaves first (files, then the manifest or file list)."""
    _, doc = read_ref(store, key)
    if isinstance(doc, DeltaDoc):
        top = check_digest(doc.manifest)
        manifest = parse_manifest(store.get_bytes(top), f"{store.url} manifest {top[:12]}")
        return [e.sha256 for e in file_entries(manifest)] + [top]
    top = check_digest(doc.tree)
    files = parse_tree(store.get_bytes(top), f"{store.url} base file list {top[:12]}")
    return [e.sha256 for e in files.values()] + [top]


def _select(store: BlobStore, refs: Iterable[str] | None, bases: Iterable[str] | None) -> list[str]:
    """Ref document keys to move: everything when both selections are None."""
    if refs is None and bases is None:
        return store.list_docs("refs/deltas") + store.list_docs("refs/bases")
    keys = []
    for ref in refs or []:
        if ":" in ref:
            parsed = parse_ref(ref)
            keys.append(delta_ref_key(parsed.name, parsed.tag))
        else:  # a bare name: every tag of it
            found = [
                k
                for k in store.list_docs(f"refs/deltas/{validate_name(ref)}")
                if k.count("/") == ref.count("/") + 3
            ]
            if not found:
                raise NotFoundError(f"{store.url}: no delta named {ref!r}")
            keys.extend(found)
    keys.extend(base_ref_key(validate_name(b, "base name")) for b in bases or [])
    return keys


def _copy_blobs(src: BlobStore, dst: BlobStore, digests: list[str], report: SyncReport, workers: int) -> None:
    have = set(dst.iter_digests())
    todo = []
    for digest in dict.fromkeys(digests):  # de-duplicated, order kept (leaves before tops)
        if digest in have:
            report.blobs_present += 1
        else:
            todo.append(digest)
    if not todo:
        return

    def send(digest: str) -> int:
        if isinstance(src, LocalBlobStore):
            dst.put_file(src.path(digest), digest)
            return src.size(digest) or 0
        assert isinstance(dst, LocalBlobStore)
        tmp = dst.new_tmp()
        try:
            size = src.get_file(digest, tmp)
            dst.adopt(tmp, digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size in pool.map(send, todo):
            report.blobs_sent += 1
            report.bytes_sent += size


def push_remote(
    reg: LocalSide, url: str, *, refs: Iterable[str] | None = None, bases: Iterable[str] | None = None,
    workers: int = 4, remote: BlobStore | None = None, **options: Any,
) -> SyncReport:  # fmt: skip
    """Copy deltas (``refs``: ``name:tag`` or a bare name for every tag) and bases to ``url``.

    With neither ``refs`` nor ``bases`` everything is pushed. Eval results travel with their deltas.
    Remote refs of the same names are replaced (the local side wins).
    """
    start = time.perf_counter()
    remote = remote or open_remote(url, **options)
    report = SyncReport("push", remote.url)
    local = reg.store
    keys = _select(local, refs, bases)
    digests = [d for key in keys for d in _closure(local, key)]
    _copy_blobs(local, remote, digests, report, workers)
    for key in keys:
        data, doc = read_ref(local, key)
        _copy_doc(local, remote, key, data, report)
        if isinstance(doc, DeltaDoc):
            ekey = eval_key(check_digest(doc.manifest))
            edata = local.read_doc(ekey)
            if edata is not None:
                _copy_doc(local, remote, ekey, edata, report)
    report.seconds = time.perf_counter() - start
    return report


def _copy_doc(src: BlobStore, dst: BlobStore, key: str, data: bytes, report: SyncReport) -> bool:
    old = dst.read_doc(key)
    if old == data:
        return False
    dst.write_doc(key, data)
    if not key.startswith("refs/evals/"):  # evals travel with their delta and are not listed
        (report.refs_replaced if old is not None else report.refs_written).append(key)
    return True


def pull_remote(
    reg: LocalSide, url: str, *, refs: Iterable[str] | None = None, bases: Iterable[str] | None = None,
    workers: int = 4, remote: BlobStore | None = None, **options: Any,
) -> SyncReport:  # fmt: skip
    """Copy deltas and bases from ``url`` into the local registry (everything when nothing is selected).

    Every downloaded blob is hash-checked before it enters the store; local refs of the same names
    are replaced (the remote side wins) and the catalog is updated.
    """
    start = time.perf_counter()
    remote = remote or open_remote(url, **options)
    report = SyncReport("pull", remote.url)
    keys = _select(remote, refs, bases)
    with reg.lock.shared():
        digests = [d for key in keys for d in _closure(remote, key)]
        _copy_blobs(remote, reg.store, digests, report, workers)
        for key in keys:
            data, doc = read_ref(remote, key)
            old = reg.store.read_doc(key)
            if old == data:
                continue
            _install_ref(reg.journal, remote, doc)
            (report.refs_replaced if old is not None else report.refs_written).append(key)
    report.seconds = time.perf_counter() - start
    return report


def _install_ref(journal: RefJournal, remote: BlobStore, doc: DeltaDoc | BaseDoc) -> None:
    """Write one pulled ref (and, for a delta, its eval record) through the local journal."""
    if isinstance(doc, BaseDoc):
        journal.write_base_ref(doc.name, doc.fingerprint, doc.tree, doc.created_at or None)
        return
    journal.write_delta_ref(DeltaRef(doc.name, doc.tag), doc.manifest, doc.created_at or None)
    ekey = eval_key(check_digest(doc.manifest))
    edata = remote.read_doc(ekey)
    if edata is not None:
        edoc = parse_eval_doc(edata, doc.manifest, f"{remote.url}/{ekey}")
        journal.write_eval(doc.manifest, edoc.results, edoc.updated_at or None)
