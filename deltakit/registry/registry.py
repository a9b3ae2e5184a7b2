"""The embedded registry: one directory holding bases and deltas as content-addressed blobs.

Layout under the registry root::

    registry.json                 layout marker and version
    blobs/sha256/ab/<hex>         every delta file, every manifest, every base file and base file list
    refs/deltas/<name>/<tag>.json {"manifest": "sha256:..."}            (the source of truth, with blobs)
    refs/bases/<name>.json        {"fingerprint": ..., "tree": "sha256:..."}
    refs/evals/<hex>.json         eval results of one delta content (keyed by manifest digest)
    catalog.sqlite                index for ls/show (WAL); ``rebuild_catalog`` recreates it from refs
    journal/                      intent records of writes in flight (replayed into the catalog on open)
    cache/deltas|bases/<hex>/     materialised directories handed to apply (hard links to blobs)
    tmp/                          partial writes (removed by gc)

Write order: blobs (temp + fsync + rename) -> manifest blob -> ref document (atomic rename) -> catalog.
A process killed at any point leaves either the old ref or the new one, never a ref to missing blobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError, IntegrityError, NotFoundError, RegistryError
from deltakit.format.atomic import pid_alive
from deltakit.registry.blobstore import LocalBlobStore, check_digest
from deltakit.registry.catalog import Catalog
from deltakit.registry.fsutil import fsync_dir, sha256_file, write_bytes_atomic
from deltakit.registry.locking import registry_lock
from deltakit.registry.manifest import (
    MANIFEST_NAME,
    check_relpath,
    file_entries,
    list_files,
    parse_manifest,
    summarize,
)
from deltakit.registry.names import DeltaRef, parse_ref, validate_name
from deltakit.registry.paths import resolve_registry_path
from deltakit.registry.records import BaseInfo, DeltaInfo, GcReport, Problem, VerifyReport

LAYOUT = {"format": "deltakit.registry", "format_version": 1}
LAYOUT_FILE = "registry.json"
BASE_TREE_FORMAT = "deltakit.base-tree"
# test-only hook: "blob:0.05,ref:1" sleeps 0.05 s after each blob a push writes and 1 s between the ref
# write and the catalog update, so crash tests can kill a writer inside each window
_TEST_PAUSE_ENV = "_DELTAKIT_TEST_PAUSE"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def delta_ref_key(name: str, tag: str) -> str:
    """Document key of a delta ref."""
    return f"refs/deltas/{name}/{tag}.json"


def base_ref_key(name: str) -> str:
    """Document key of a base ref."""
    return f"refs/bases/{name}.json"


def eval_key(manifest_hex: str) -> str:
    """Document key of the eval results of one manifest."""
    return f"refs/evals/{manifest_hex}.json"


def _test_pause(point: str) -> None:
    spec = os.environ.get(_TEST_PAUSE_ENV)
    if spec:
        for item in spec.split(","):
            name, _, seconds = item.partition(":")
            if name == point:
                time.sleep(float(seconds))


class Registry:
    """A registry of base models and compressed deltas on a local directory.

    Open one with :meth:`Registry.open`; the object is usable as a context manager (closes the catalog).
    Every method is safe to call from several processes at once on the same directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.store = LocalBlobStore(self.root)
        self._catalog: Catalog | None = None
        self._ref_lock_depth = 0

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None, *, create: bool = True) -> Registry:
        """Open the registry at ``path`` (default: ``$DELTAKIT_HOME/registry`` or the user data dir).

        create: initialise an empty registry there if none exists (else raise NotFoundError).
        """
        reg = cls(resolve_registry_path(path))
        if not (reg.root / LAYOUT_FILE).is_file():
            if not create:
                raise NotFoundError(f"no registry at {reg.root}; run `deltakit registry init` first")
            reg.init()
        else:
            reg._check_layout()
        reg._recover()
        return reg

    def init(self) -> Registry:
        """Create the registry layout (idempotent) and return self."""
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root} exists and is not a directory")
        for sub in ("blobs/sha256", "refs/deltas", "refs/bases", "refs/evals", "journal", "cache", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        marker = self.root / LAYOUT_FILE
        if marker.is_file():
            self._check_layout()
        else:
            with contextlib.suppress(FileNotFoundError):
                if any(
                    p.name not in ("blobs", "refs", "journal", "cache", "tmp") for p in self.root.iterdir()
                ):
                    raise RegistryError(f"{self.root} is not empty and is not a deltakit registry")
            write_bytes_atomic(marker, _dumps(LAYOUT))
        _ = self.catalog
        return self

    def _check_layout(self) -> None:
        try:
            layout = json.loads((self.root / LAYOUT_FILE).read_bytes())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{self.root}: unreadable {LAYOUT_FILE} ({exc})") from None
        if layout.get("format") != LAYOUT["format"]:
            raise RegistryError(f"{self.root} is not a deltakit registry")
        if int(layout.get("format_version", 0)) > LAYOUT["format_version"]:
            raise RegistryError(
                f"{self.root} has registry format {layout.get('format_version')}, newer than this deltakit "
                f"reads ({LAYOUT['format_version']}); upgrade deltakit"
            )

    @property
    def catalog(self) -> Catalog:
        """The SQLite catalog (opened on first use)."""
        if self._catalog is None:
            self._catalog = Catalog(self.root / "catalog.sqlite")
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

    def _lock(self, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        return registry_lock(self.root / "lock", exclusive)

    @contextlib.contextmanager
    def _ref_lock(self) -> Iterator[None]:
        """Serialise ref-document writes with their catalog rows (re-entrant within this object)."""
        if self._ref_lock_depth:
            self._ref_lock_depth += 1
            try:
                yield
            finally:
                self._ref_lock_depth -= 1
            return
        with registry_lock(self.root / "refs.lock", exclusive=True):
            self._ref_lock_depth = 1
            try:
                yield
            finally:
                self._ref_lock_depth = 0

    # -- journal: keeps the catalog in step with refs across crashes ---------------------------
    @contextlib.contextmanager
    def _intent(self, record: dict[str, Any]) -> Iterator[None]:
        """Hold the ref lock and leave an intent record while a ref and its catalog row change."""
        with self._ref_lock():
            path = self.root / "journal" / f"{os.getpid()}-{uuid.uuid4().hex}.json"
            write_bytes_atomic(path, _dumps(record))
            yield
            path.unlink()

    def _recover(self) -> None:
        """Replay intent records left by killed processes: re-derive their catalog rows from refs."""
        journal = self.root / "journal"
        if not journal.is_dir():
            return
        for path in sorted(journal.glob("*.json")):
            try:
                pid = int(path.name.split("-", 1)[0])
            except ValueError:
                pid = -1
            if pid > 0 and pid != os.getpid() and pid_alive(pid):
                continue  # a live writer: it will update the catalog itself
            try:
                record = json.loads(path.read_bytes())
            except (OSError, json.JSONDecodeError):
                record = {}
            with self._lock(), self._ref_lock():
                if record.get("kind") == "delta":
                    self._sync_delta_row(record["name"], record["tag"])
                elif record.get("kind") == "base":
                    self._sync_base_row(record["name"])
                elif record.get("kind") == "eval":
                    self._sync_eval_row(record["manifest"])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- reading refs --------------------------------------------------------------------------
    def _read_json_doc(self, key: str) -> dict[str, Any] | None:
        data = self.store.read_doc(key)
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except json.JSONDecodeError:
            raise FormatError(f"{self.root / key}: corrupted ref document") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{self.root / key}: corrupted ref document")
        return doc

    def _delta_doc(self, ref: DeltaRef) -> dict[str, Any]:
        doc = self._read_json_doc(delta_ref_key(ref.name, ref.tag))
        if doc is None:
            tags = sorted(r["tag"] for r in self.catalog.list_deltas() if r["name"] == ref.name)
            hint = f"; tags of {ref.name!r}: {', '.join(tags)}" if tags else ""
            raise NotFoundError(f"no delta {ref} in registry {self.root}{hint}")
        return doc

    def _load_manifest(self, digest: str) -> tuple[bytes, dict[str, Any]]:
        data = self.store.get_bytes(digest)  # verifies the hash
        return data, parse_manifest(data, f"manifest blob {check_digest(digest)[:12]}")

    def _base_doc(self, name: str) -> dict[str, Any]:
        doc = self._read_json_doc(base_ref_key(validate_name(name, "base name")))
        if doc is None:
            known = ", ".join(b["name"] for b in self.catalog.list_bases()) or "none"
            raise NotFoundError(f"no base {name!r} in registry {self.root} (registered: {known})")
        return doc

    def _load_tree(self, digest: str) -> dict[str, Any]:
        tree = json.loads(self.store.get_bytes(digest))
        if tree.get("format") != BASE_TREE_FORMAT or not isinstance(tree.get("files"), dict):
            raise FormatError(f"base file list {check_digest(digest)[:12]} is not a {BASE_TREE_FORMAT}")
        for rel in tree["files"]:
            check_relpath(rel)
        return tree

    # -- catalog rows derived from refs --------------------------------------------------------
    def _delta_row(self, name: str, tag: str, doc: dict[str, Any]) -> dict[str, Any]:
        _, manifest = self._load_manifest(doc["manifest"])
        return {"name": name, "tag": tag, "manifest": doc["manifest"], "created_at": doc.get("created_at", ""),
                **summarize(manifest)}  # fmt: skip

    def _sync_delta_row(self, name: str, tag: str) -> None:
        doc = self._read_json_doc(delta_ref_key(name, tag))
        if doc is None:
            self.catalog.delete_delta(name, tag)
        else:
            self.catalog.upsert_delta(self._delta_row(name, tag, doc))

    def _base_row(self, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        tree = self._load_tree(doc["tree"])
        return {
            "name": name, "fingerprint": doc["fingerprint"], "tree": doc["tree"],
            "total_bytes": sum(int(e["size"]) for e in tree["files"].values()), "n_files": len(tree["files"]),
            "created_at": doc.get("created_at", ""),
        }  # fmt: skip

    def _sync_base_row(self, name: str) -> None:
        doc = self._read_json_doc(base_ref_key(name))
        if doc is None:
            self.catalog.delete_base(name)
        else:
            self.catalog.upsert_base(self._base_row(name, doc))

    def _sync_eval_row(self, manifest: str) -> None:
        doc = self._read_json_doc(eval_key(check_digest(manifest)))
        if doc is None:
            self.catalog.delete_eval(manifest)
        else:
            self.catalog.set_eval(manifest, doc.get("results", {}), doc.get("updated_at", ""))

    def _write_delta_ref(self, ref: DeltaRef, manifest_digest: str, created_at: str | None = None) -> None:
        """Point ``ref`` at a manifest blob (whose files must all be stored already), then index it."""
        doc = {"kind": "delta", "name": ref.name, "tag": ref.tag, "manifest": manifest_digest,
               "created_at": created_at or _now()}  # fmt: skip
        with self._intent({"kind": "delta", "name": ref.name, "tag": ref.tag}):
            self.store.write_doc(delta_ref_key(ref.name, ref.tag), _dumps(doc))
            _test_pause("ref")
            self._sync_delta_row(ref.name, ref.tag)

    def _write_base_ref(
        self, name: str, fingerprint: str, tree_digest: str, created_at: str | None = None
    ) -> None:
        doc = {"kind": "base", "name": name, "fingerprint": fingerprint, "tree": tree_digest,
               "created_at": created_at or _now()}  # fmt: skip
        with self._intent({"kind": "base", "name": name}):
            self.store.write_doc(base_ref_key(name), _dumps(doc))
            self._sync_base_row(name)

    def _write_eval_doc(self, manifest: str, results: dict[str, Any], updated_at: str | None = None) -> None:
        doc = {"kind": "eval", "manifest": manifest, "results": results, "updated_at": updated_at or _now()}
        with self._intent({"kind": "eval", "manifest": manifest}):
            self.store.write_doc(eval_key(check_digest(manifest)), _dumps(doc))
            self._sync_eval_row(manifest)

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
        files = list_files(model_dir)
        if not files:
            raise FormatError(f"{model_dir} holds no files")
        with self._lock():
            old = self._read_json_doc(base_ref_key(name))
            if old is not None and old.get("fingerprint") != fingerprint:
                if not replace:
                    raise RegistryError(
                        f"base {name!r} is already registered with fingerprint {old.get('fingerprint')}; "
                        "pass replace=True (--replace) to re-point it"
                    )
                users = self.catalog.deltas_of_base(old["fingerprint"])
                if users and not force:
                    raise RegistryError(
                        f"base {name!r} is used by {len(users)} delta(s) ({_refs(users)}); pass force=True to replace"
                    )
            entries = {}
            for rel in files:
                digest, size = sha256_file(model_dir / rel)
                self.store.put_file(model_dir / rel, digest)
                entries[rel] = {"sha256": digest, "size": size}
            tree = {
                "format": BASE_TREE_FORMAT,
                "format_version": 1,
                "fingerprint": fingerprint,
                "files": entries,
            }
            tree_digest = "sha256:" + self.store.put_bytes(_dumps(tree))
            if old is not None and old.get("tree") == tree_digest:
                self._sync_base_row(name)
            else:
                self._write_base_ref(name, fingerprint, tree_digest)
        return self.get_base(name)

    def get_base(self, name: str) -> BaseInfo:
        """Catalog record of base ``name`` (NotFoundError if unknown)."""
        validate_name(name, "base name")
        row = self.catalog.get_base(name)
        if row is None:
            self._base_doc(name)  # raises NotFoundError with the known names
            self._sync_base_row(name)
            row = self.catalog.get_base(name)
        assert row is not None
        return BaseInfo(**row)

    def bases(self) -> list[BaseInfo]:
        """Every registered base, sorted by name."""
        return [BaseInfo(**r) for r in self.catalog.list_bases()]

    def resolve_base(self, name: str, *, verify: bool = False) -> Path:
        """A local checkpoint directory with base ``name``'s files (a cache of hard links to blobs).

        Every file is hashed when the cache is first built; later calls check sizes only, unless
        ``verify`` re-hashes everything. Raises IntegrityError on a corrupted file.
        """
        doc = self._base_doc(name)
        tree = self._load_tree(doc["tree"])
        entries = {rel: (e["sha256"], int(e["size"])) for rel, e in tree["files"].items()}
        return self._materialise("bases", doc["tree"], entries, verify_existing=verify)

    # -- deltas --------------------------------------------------------------------------------
    def push(
        self, delta_dir: str | os.PathLike[str], ref: str = "latest", *, check_base: bool = False
    ) -> DeltaInfo:
        """Store the delta directory ``delta_dir`` under ``name[:tag]`` (tag defaults to ``latest``).

        Every file listed in manifest.json is hashed and must match its recorded sha256 and size;
        files on disk that the manifest does not list are refused. Re-pushing identical content is
        cheap (blobs already present are skipped). ``check_base``: refuse a delta whose base
        fingerprint is not registered here.
        """
        parsed = parse_ref(ref)
        delta_dir = Path(delta_dir)
        mpath = delta_dir / MANIFEST_NAME
        if not mpath.is_file():
            raise FormatError(f"{delta_dir} is not a delta directory: no {MANIFEST_NAME}")
        manifest_bytes = mpath.read_bytes()
        manifest = parse_manifest(manifest_bytes, str(mpath))
        entries = file_entries(manifest)
        on_disk = set(list_files(delta_dir)) - {MANIFEST_NAME}
        listed = {e.path for e in entries}
        if on_disk != listed:
            missing, extra = sorted(listed - on_disk), sorted(on_disk - listed)
            raise FormatError(
                f"{delta_dir}: files differ from the manifest (missing: {missing or 'none'}; "
                f"not in manifest: {extra or 'none'})"
            )
        if check_base:
            fp = summarize(manifest)["base_fingerprint"]
            if fp is None or self.catalog.base_by_fingerprint(fp) is None:
                raise RegistryError(
                    f"the base of this delta ({fp}) is not registered; add it with add_base first"
                )
        with self._lock():
            for entry in entries:
                src = delta_dir / entry.path
                if src.stat().st_size != entry.size:
                    raise IntegrityError(
                        f"{src}: size {src.stat().st_size} differs from the manifest's {entry.size} (truncated?)"
                    )
                try:
                    self.store.put_file(src, entry.sha256)
                except IntegrityError:
                    raise IntegrityError(
                        f"{src} does not match the sha256 its manifest records (corrupted)"
                    ) from None
                _test_pause("blob")
            manifest_digest = "sha256:" + self.store.put_bytes(manifest_bytes)
            self._write_delta_ref(parsed, manifest_digest)
        return self.show_info(parsed)

    def show_info(self, ref: str | DeltaRef) -> DeltaInfo:
        """Catalog record of one delta (NotFoundError if unknown)."""
        parsed = parse_ref(ref)
        row = self.catalog.get_delta(parsed.name, parsed.tag)
        if row is None:
            self._delta_doc(parsed)  # raises NotFoundError
            self._sync_delta_row(parsed.name, parsed.tag)
            row = self.catalog.get_delta(parsed.name, parsed.tag)
        assert row is not None
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
        _, manifest = self._load_manifest(info.manifest)
        base = self.catalog.base_by_fingerprint(info.base_fingerprint) if info.base_fingerprint else None
        same_content = [
            r["name"] + ":" + r["tag"] for r in self.catalog.list_deltas() if r["manifest"] == info.manifest
        ]
        return {
            **info.to_dict(),
            "codec_config": (manifest.get("codec") or {}).get("config"),
            "budget": (manifest.get("codec") or {}).get("budget"),
            "files": manifest["files"],
            "registered_base": base["name"] if base else None,
            "also_tagged_as": [r for r in same_content if r != info.ref],
            "format_version": manifest.get("format_version"),
            "deltakit_version": manifest.get("deltakit_version"),
        }

    def manifest(self, ref: str | DeltaRef) -> dict[str, Any]:
        """The parsed manifest of a delta (hash-verified)."""
        return self._load_manifest(self._delta_doc(parse_ref(ref))["manifest"])[1]

    def pull(self, ref: str | DeltaRef, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the delta ``ref`` as a directory at ``out_dir``, verifying every file's hash.

        The directory appears whole or not at all; a corrupted or missing blob raises IntegrityError /
        NotFoundError and leaves nothing behind.
        """
        from deltakit.format.atomic import atomic_directory

        parsed = parse_ref(ref)
        with self._lock():
            doc = self._delta_doc(parsed)
            manifest_bytes, manifest = self._load_manifest(doc["manifest"])
            with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
                for entry in file_entries(manifest):
                    dst = tmp / entry.path
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self.store.get_file(entry.sha256, dst)
                (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)
        return Path(out_dir)

    def resolve_delta(self, ref: str | DeltaRef) -> Path:
        """A verified local directory holding delta ``ref`` (a cache under the registry; do not modify).

        Every file is hashed on each call; a corrupted blob raises IntegrityError.
        """
        parsed = parse_ref(ref)
        with self._lock():
            doc = self._delta_doc(parsed)
            manifest_bytes, manifest = self._load_manifest(doc["manifest"])
            entries = {e.path: (e.sha256, e.size) for e in file_entries(manifest)}
            entries[MANIFEST_NAME] = (check_digest(doc["manifest"]), len(manifest_bytes))
            return self._materialise("deltas", doc["manifest"], entries, verify_existing=True)

    def _materialise(
        self, kind: str, key_digest: str, entries: dict[str, tuple[str, int]], *, verify_existing: bool
    ) -> Path:
        """Build (or check) ``cache/<kind>/<hex>/`` with one hard link per blob (copy if links fail)."""
        final = self.root / "cache" / kind / check_digest(key_digest)
        if final.is_dir():
            try:
                self._check_dir(final, entries, hash_files=verify_existing)
                return final
            except IntegrityError:
                # the cache or the blob under it is damaged: rebuild from blobs (which re-verifies them)
                shutil.rmtree(final, ignore_errors=True)
        tmp = self.root / "tmp" / f"cache-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            for rel, (digest, size) in entries.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                blob = self.store.path(digest)
                if not blob.is_file():
                    raise NotFoundError(f"blob {digest[:12]}... ({rel}) is missing from {self.root}")
                got, got_size = sha256_file(blob)
                if got != digest or got_size != size:
                    raise IntegrityError(
                        f"blob {digest[:12]}... ({rel}) in {self.root} is corrupted; run `deltakit registry verify`"
                    )
                try:
                    os.link(blob, dst)
                except OSError:
                    shutil.copyfile(blob, dst)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
                fsync_dir(final.parent)
            except OSError:
                if not final.is_dir():  # another process built the same cache meanwhile: use theirs
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def _check_dir(root: Path, entries: dict[str, tuple[str, int]], *, hash_files: bool) -> None:
        for rel, (digest, size) in entries.items():
            path = root / rel
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise IntegrityError(f"{path} is missing") from None
            if actual != size:
                raise IntegrityError(f"{path} has size {actual}, expected {size}")
            if hash_files and sha256_file(path)[0] != digest:
                raise IntegrityError(f"{path} does not match its sha256")

    # -- removal -------------------------------------------------------------------------------
    def rm(self, ref: str | DeltaRef, *, force: bool = False) -> DeltaInfo:
        """Remove the tag ``name[:tag]`` (its blobs stay until ``gc``, and are kept while shared).

        force: accepted for symmetry with :meth:`rm_base`; removing a delta never needs it.
        """
        parsed = parse_ref(ref)
        with self._lock():
            info = self.show_info(parsed)
            with self._intent({"kind": "delta", "name": parsed.name, "tag": parsed.tag}):
                self.store.delete_doc(delta_ref_key(parsed.name, parsed.tag))
                self._sync_delta_row(parsed.name, parsed.tag)
        return info

    def rm_base(self, name: str, *, force: bool = False) -> BaseInfo:
        """Unregister base ``name``; refused while deltas made from it remain, unless ``force``."""
        with self._lock():
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
                    "remove them first or pass force=True (--force)"
                )
            with self._intent({"kind": "base", "name": name}):
                self.store.delete_doc(base_ref_key(name))
                self._sync_base_row(name)
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
            json.dumps(results)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"eval results must be JSON-serialisable: {exc}") from None
        with self._lock(), self._ref_lock():
            manifest = self._delta_doc(parse_ref(ref))["manifest"]
            old = self._read_json_doc(eval_key(check_digest(manifest)))
            merged = dict(results) if replace or old is None else {**old.get("results", {}), **results}
            self._write_eval_doc(manifest, merged)
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
    def _delta_refs(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        out = []
        for key in self.store.list_docs("refs/deltas"):
            name, _, tag = key[len("refs/deltas/") : -len(".json")].rpartition("/")
            try:
                doc = self._read_json_doc(key)
            except FormatError:
                doc = None
            out.append((name, tag, doc))
        return out

    def _base_refs(self) -> list[tuple[str, dict[str, Any] | None]]:
        out = []
        for key in self.store.list_docs("refs/bases"):
            try:
                doc = self._read_json_doc(key)
            except FormatError:
                doc = None
            out.append((key[len("refs/bases/") : -len(".json")], doc))
        return out

    def live_digests(self) -> set[str]:
        """Every blob some ref needs (manifests, delta files, base file lists, base files).

        Raises RegistryError if a manifest or file list cannot be read (then nothing is safe to delete).
        """
        live: set[str] = set()
        for name, tag, doc in self._delta_refs():
            if doc is None:
                raise RegistryError(f"delta ref {name}:{tag} is unreadable; run verify and fix it before gc")
            try:
                _, manifest = self._load_manifest(doc["manifest"])
            except (IntegrityError, NotFoundError, FormatError) as exc:
                raise RegistryError(f"delta {name}:{tag}: {exc}; refusing to gc") from None
            live.add(check_digest(doc["manifest"]))
            live.update(e.sha256 for e in file_entries(manifest))
        for name, doc in self._base_refs():
            if doc is None:
                raise RegistryError(f"base ref {name} is unreadable; run verify and fix it before gc")
            try:
                tree = self._load_tree(doc["tree"])
            except (IntegrityError, NotFoundError, FormatError) as exc:
                raise RegistryError(f"base {name}: {exc}; refusing to gc") from None
            live.add(check_digest(doc["tree"]))
            live.update(e["sha256"] for e in tree["files"].values())
        return live

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Delete blobs no ref needs, stale caches, temp files and orphan eval records.

        Holds the registry lock exclusively, so it never races a push. Blobs shared by several deltas
        stay as long as any of them is tagged.
        """
        report = GcReport(dry_run=dry_run)
        with self._lock(exclusive=True):
            live = self.live_digests()
            for digest in list(self.store.iter_digests()):
                if digest not in live:
                    report.removed_blobs += 1
                    report.freed_bytes += self.store.size(digest) or 0
                    if not dry_run:
                        self.store.delete(digest)
            for kind in ("deltas", "bases"):
                cache = self.root / "cache" / kind
                for entry in cache.iterdir() if cache.is_dir() else []:
                    if entry.name not in live:
                        report.removed_cache_dirs += 1
                        if not dry_run:
                            shutil.rmtree(entry, ignore_errors=True)
            for key in self.store.list_docs("refs/evals"):
                digest = key[len("refs/evals/") : -len(".json")]
                if digest not in live:
                    report.removed_eval_docs += 1
                    if not dry_run:
                        self.store.delete_doc(key)
                        self.catalog.delete_eval("sha256:" + digest)
            if dry_run:
                report.removed_temp_files = sum(1 for _ in (self.root / "tmp").iterdir())
            else:
                report.removed_temp_files = self.store.clean_tmp()
        return report

    def rebuild_catalog(self) -> None:
        """Recreate the SQLite catalog from ref documents and manifest blobs (the source of truth)."""
        with self._lock(exclusive=True):
            deltas, bases, evals = [], [], []
            for name, tag, doc in self._delta_refs():
                if doc is not None:
                    with contextlib.suppress(IntegrityError, NotFoundError, FormatError):
                        deltas.append(self._delta_row(name, tag, doc))
            for name, doc in self._base_refs():
                if doc is not None:
                    with contextlib.suppress(IntegrityError, NotFoundError, FormatError):
                        bases.append(self._base_row(name, doc))
            for key in self.store.list_docs("refs/evals"):
                with contextlib.suppress(FormatError):
                    doc = self._read_json_doc(key)
                    if doc is not None:
                        evals.append((doc["manifest"], doc.get("results", {}), doc.get("updated_at", "")))
            self.catalog.replace_all(deltas, bases, evals)

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every blob's hash (``deep``; else sizes only) and every reference; return the problems.

        Problems: corrupt or missing blobs, unreadable refs or manifests, and catalog rows that
        disagree with the refs (fixed by :meth:`rebuild_catalog`). Unreferenced blobs (left by an
        interrupted push or by rm) are counted, not reported: gc removes them.
        """
        report = VerifyReport()
        problems = report.problems
        corrupt: set[str] = set()
        present: set[str] = set(self.store.iter_digests())
        if deep:
            for digest in sorted(present):
                report.blobs_checked += 1
                report.bytes_checked += self.store.size(digest) or 0
                issue = self.store.verify_blob(digest)
                if issue:
                    corrupt.add(digest)
                    problems.append(Problem("corrupt-blob", digest, issue))
        needed: dict[str, tuple[str, int | None]] = {}  # digest -> (who needs it, expected size)

        def need(digest: str, who: str, size: int | None) -> None:
            needed.setdefault(check_digest(digest), (who, size))

        delta_rows: dict[tuple[str, str], str] = {}
        for name, tag, doc in self._delta_refs():
            report.refs_checked += 1
            subject = f"delta {name}:{tag}"
            if doc is None or not isinstance(doc.get("manifest"), str):
                problems.append(Problem("bad-ref", subject, "ref document is unreadable"))
                continue
            delta_rows[(name, tag)] = doc["manifest"]
            need(doc["manifest"], subject + " manifest", None)
            try:
                _, manifest = self._load_manifest(doc["manifest"])
            except (IntegrityError, NotFoundError, FormatError) as exc:
                if check_digest(doc["manifest"]) not in corrupt:
                    problems.append(Problem("bad-manifest", subject, str(exc)))
                continue
            for entry in file_entries(manifest):
                need(entry.sha256, f"{subject} {entry.path}", entry.size)
        base_rows: dict[str, str] = {}
        for name, doc in self._base_refs():
            report.refs_checked += 1
            subject = f"base {name}"
            if doc is None or not isinstance(doc.get("tree"), str):
                problems.append(Problem("bad-ref", subject, "ref document is unreadable"))
                continue
            base_rows[name] = doc["tree"]
            need(doc["tree"], subject + " file list", None)
            try:
                tree = self._load_tree(doc["tree"])
            except (IntegrityError, NotFoundError, FormatError, json.JSONDecodeError) as exc:
                if check_digest(doc["tree"]) not in corrupt:
                    problems.append(Problem("bad-manifest", subject, str(exc)))
                continue
            for rel, entry in tree["files"].items():
                need(entry["sha256"], f"{subject} {rel}", int(entry["size"]))
        for digest, (who, size) in sorted(needed.items()):
            if digest not in present:
                problems.append(Problem("missing-blob", digest, f"needed by {who}"))
            elif size is not None and digest not in corrupt and self.store.size(digest) != size:
                problems.append(
                    Problem("corrupt-blob", digest, f"size differs from {size} recorded by {who}")
                )
        report.unreferenced_blobs = len(present - set(needed))
        tmp = self.root / "tmp"
        report.temp_files = sum(1 for _ in tmp.iterdir()) if tmp.is_dir() else 0
        # catalog agrees with refs?
        cat_deltas = {(r["name"], r["tag"]): r["manifest"] for r in self.catalog.list_deltas()}
        for key in sorted(set(cat_deltas) | set(delta_rows)):
            if cat_deltas.get(key) != delta_rows.get(key):
                problems.append(
                    Problem("catalog", f"delta {key[0]}:{key[1]}", "catalog row differs from the ref")
                )
        cat_bases = {r["name"]: r["tree"] for r in self.catalog.list_bases()}
        for name in sorted(set(cat_bases) | set(base_rows)):
            if cat_bases.get(name) != base_rows.get(name):
                problems.append(Problem("catalog", f"base {name}", "catalog row differs from the ref"))
        return report


def _refs(rows: list[dict[str, Any]], limit: int = 5) -> str:
    names = [f"{r['name']}:{r['tag']}" for r in rows]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
