"""Helpers for the registry tests: tiny deltas and bases built on disk (no compress pipeline)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BASE_FP = "sha256:" + "b" * 64


def make_delta(
    path: Path,
    files: dict[str, bytes] | None = None,
    *,
    base_fp: str = BASE_FP,
    base_name: str = "tiny-base",
    target_name: str = "tiny-chat",
    codec: str = "dqrelo",
) -> Path:
    """Write a delta directory: manifest.json + ``files`` with correct sha256/size entries."""
    files = (
        files if files is not None else {"delta-00001.safetensors": os.urandom(4096), "extra/tok.json": b"{}"}
    )
    path.mkdir(parents=True, exist_ok=True)
    entries = {}
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
        entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    stored = sum(len(d) for d in files.values())
    manifest = {
        "format": "deltakit.delta",
        "format_version": 1,
        "deltakit_version": "0.1.0",
        "codec": {
            "name": codec,
            "version": 1,
            "config": {"bits": 2},
            "budget": {"ratio": 0.125, "rank": None},
        },
        "base": {"name": base_name, "fingerprint": base_fp},
        "target": {
            "name": target_name,
            "fingerprint": "sha256:" + hashlib.sha256(target_name.encode()).hexdigest(),
        },
        "tensors": {},
        "groups": {},
        "files": entries,
        "stats": {"stored_bytes": stored, "fp16_delta_bytes": stored * 8, "ratio": 0.125},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def make_base(path: Path, seed: bytes = b"base") -> Path:
    """Write a fake checkpoint directory (config.json, a weights file, a tokenizer file)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny", "seed": seed.decode()}))
    (path / "model.safetensors").write_bytes(hashlib.sha256(seed).digest() * 512)
    (path / "tokenizer.json").write_text("{}")
    return path


def flip_byte(path: Path, offset: int = 10) -> None:
    """Flip one byte of a (possibly read-only) file in place."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def dir_files(path: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below ``path`` (to compare directories exactly)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
