"""Plain result records returned by the registry API (all JSON-serialisable through ``to_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeltaInfo:
    """One tagged delta: where its manifest is and what the catalog knows about it."""

    name: str
    tag: str
    manifest: str  # "sha256:<hex>" of the manifest blob
    codec: str | None
    codec_version: int | None
    ratio: float | None
    base_name: str | None
    base_fingerprint: str | None
    target_name: str | None
    target_fingerprint: str | None
    stored_bytes: int | None
    fp16_delta_bytes: int | None
    total_bytes: int | None
    n_files: int | None
    created_at: str
    eval: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        """``name:tag``."""
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (adds ``ref``)."""
        return {"ref": self.ref, **asdict(self)}


@dataclass(frozen=True)
class BaseInfo:
    """One registered base model."""

    name: str
    fingerprint: str
    tree: str  # "sha256:<hex>" of the base's file-list blob
    total_bytes: int
    n_files: int
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found wrong: what kind, which object, and details."""

    kind: str  # corrupt-blob | missing-blob | bad-ref | bad-manifest | catalog
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@dataclass
class VerifyReport:
    """Result of ``Registry.verify``: ``ok`` is True when ``problems`` is empty."""

    problems: list[Problem] = field(default_factory=list)
    blobs_checked: int = 0
    bytes_checked: int = 0
    refs_checked: int = 0
    unreferenced_blobs: int = 0
    temp_files: int = 0

    @property
    def ok(self) -> bool:
        """No problems found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class GcReport:
    """Result of ``Registry.gc``."""

    removed_blobs: int = 0
    freed_bytes: int = 0
    removed_cache_dirs: int = 0
    removed_temp_files: int = 0
    removed_eval_docs: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class SyncReport:
    """Result of a remote push or pull: blobs moved or already present, refs written."""

    direction: str  # "push" | "pull"
    remote: str
    blobs_sent: int = 0
    blobs_present: int = 0
    bytes_sent: int = 0
    refs_written: list[str] = field(default_factory=list)
    refs_replaced: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)
