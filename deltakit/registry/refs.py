"""Reading ref documents and the blobs they name, every field validated.

A ref document is small JSON under ``refs/`` naming a blob by digest. Three kinds (see ``layout``):
delta refs ``{"manifest": "sha256:<hex>", "name", "tag", "created_at"}``, base refs
``{"fingerprint", "tree": "sha256:<hex>", "name", "created_at"}`` and eval records
``{"manifest", "results": {...}, "updated_at"}``. ``name``/``tag``, when present, must match the
document's key. Anything malformed raises a one-line FormatError (exit 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deltakit.errors import FormatError, IntegrityError, NotFoundError
from deltakit.registry.blobstore import LocalBlobStore, check_digest
from deltakit.registry.jsondoc import optional_str, parse_object, require
from deltakit.registry.layout import BASE_TREE_FORMAT, base_ref_key, delta_ref_key, eval_key
from deltakit.registry.manifest import FileEntry, check_file_entry, parse_manifest
from deltakit.registry.names import DeltaRef, InvalidNameError, validate_name, validate_tag

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: errors that make one ref unreadable without making the registry unreadable
REF_ERRORS = (IntegrityError, NotFoundError, FormatError, InvalidNameError)


@dataclass(frozen=True)
class DeltaDoc:
    """A delta ref: ``name:tag`` points at the manifest blob ``manifest`` (``sha256:<hex>``)."""

    name: str
    tag: str
    manifest: str
    created_at: str


@dataclass(frozen=True)
class BaseDoc:
    """A base ref: base ``name`` with checkpoint ``fingerprint`` and file-list blob ``tree``."""

    name: str
    fingerprint: str
    tree: str
    created_at: str


@dataclass(frozen=True)
class EvalDoc:
    """Eval results recorded for one manifest digest."""

    manifest: str
    results: dict[str, Any]
    updated_at: str


def check_ref_digest(value: object, field: str, where: str) -> str:
    """``value`` if it is ``sha256:<64 lowercase hex>``, else FormatError naming ``field``."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise FormatError(
            f"{where}: field {field!r} must be 'sha256:<64 hex digits>', got {str(value)[:80]!r}"
        )
    return value


def _check_identity(doc: dict[str, Any], field: str, expected: str, where: str) -> None:
    if field in doc and doc[field] != expected:
        raise FormatError(f"{where}: field {field!r} is {str(doc[field])[:80]!r}, the key says {expected!r}")


def parse_delta_doc(data: bytes, name: str, tag: str, where: str) -> DeltaDoc:
    """Validate the bytes of the delta ref stored for ``name:tag``."""
    doc = parse_object(data, where)
    _check_identity(doc, "name", name, where)
    _check_identity(doc, "tag", tag, where)
    manifest = check_ref_digest(doc.get("manifest"), "manifest", where)
    return DeltaDoc(name, tag, manifest, optional_str(doc, "created_at", where))


def parse_base_doc(data: bytes, name: str, where: str) -> BaseDoc:
    """Validate the bytes of the base ref stored for ``name``."""
    doc = parse_object(data, where)
    _check_identity(doc, "name", name, where)
    fingerprint = require(doc, "fingerprint", str, where)
    tree = check_ref_digest(doc.get("tree"), "tree", where)
    return BaseDoc(name, fingerprint, tree, optional_str(doc, "created_at", where))


def parse_eval_doc(data: bytes, manifest: str, where: str) -> EvalDoc:
    """Validate the bytes of the eval record of ``manifest`` (``sha256:<hex>``)."""
    doc = parse_object(data, where)
    _check_identity(doc, "manifest", manifest, where)
    results = doc.get("results", {})
    if not isinstance(results, dict):
        raise FormatError(f"{where}: field 'results' must be an object")
    return EvalDoc(manifest, results, optional_str(doc, "updated_at", where))


def parse_tree(data: bytes, where: str) -> dict[str, FileEntry]:
    """Validate a base file list: ``{"format": BASE_TREE_FORMAT, "files": {relpath: {sha256, size}}}``."""
    tree = parse_object(data, where)
    files = tree.get("files")
    if tree.get("format") != BASE_TREE_FORMAT or not isinstance(files, dict):
        raise FormatError(f"{where} is not a {BASE_TREE_FORMAT}")
    return {rel: check_file_entry(rel, entry, where, allow_manifest=True) for rel, entry in files.items()}


class RefReader:
    """Read-only access to the ref documents and manifest/file-list blobs of one store."""

    def __init__(self, store: LocalBlobStore) -> None:
        self.store = store

    def _where(self, key: str) -> str:
        return f"{self.store.url}/{key}"

    def delta(self, ref: DeltaRef) -> DeltaDoc | None:
        """The delta ref ``ref`` or None when absent (FormatError when malformed)."""
        key = delta_ref_key(ref.name, ref.tag)
        data = self.store.read_doc(key)
        return None if data is None else parse_delta_doc(data, ref.name, ref.tag, self._where(key))

    def base(self, name: str) -> BaseDoc | None:
        """The base ref ``name`` or None when absent."""
        key = base_ref_key(validate_name(name, "base name"))
        data = self.store.read_doc(key)
        return None if data is None else parse_base_doc(data, name, self._where(key))

    def eval(self, manifest: str) -> EvalDoc | None:
        """The eval record of a manifest digest or None when absent."""
        key = eval_key(check_digest(manifest))
        data = self.store.read_doc(key)
        return None if data is None else parse_eval_doc(data, manifest, self._where(key))

    def manifest(self, digest: str) -> tuple[bytes, dict[str, Any]]:
        """Bytes and parsed content of a manifest blob (hash-verified)."""
        data = self.store.get_bytes(digest)
        return data, parse_manifest(data, f"manifest blob {check_digest(digest)[:12]}")

    def tree(self, digest: str) -> dict[str, FileEntry]:
        """The validated file list of a base (hash-verified)."""
        return parse_tree(self.store.get_bytes(digest), f"base file list {check_digest(digest)[:12]}")

    def delta_refs(self) -> list[tuple[str, str, DeltaDoc | None, str]]:
        """Every delta ref key as ``(name, tag, doc or None, problem)``; unreadable ones give None."""
        out = []
        for key in self.store.list_docs("refs/deltas"):
            name, _, tag = key[len("refs/deltas/") : -len(".json")].rpartition("/")
            try:
                doc = self.delta(DeltaRef(validate_name(name), validate_tag(tag)))
                out.append((name, tag, doc, ""))
            except REF_ERRORS as exc:
                out.append((name, tag, None, str(exc)))
        return out

    def base_refs(self) -> list[tuple[str, BaseDoc | None, str]]:
        """Every base ref key as ``(name, doc or None, problem)``."""
        out = []
        for key in self.store.list_docs("refs/bases"):
            name = key[len("refs/bases/") : -len(".json")]
            try:
                out.append((name, self.base(name), ""))
            except REF_ERRORS as exc:
                out.append((name, None, str(exc)))
        return out

    def eval_docs(self) -> list[tuple[str, EvalDoc | None]]:
        """Every eval record as ``(manifest hex, doc or None)``."""
        out = []
        for key in self.store.list_docs("refs/evals"):
            digest = key[len("refs/evals/") : -len(".json")]
            try:
                out.append((digest, self.eval("sha256:" + digest)))
            except REF_ERRORS:
                out.append((digest, None))
        return out
