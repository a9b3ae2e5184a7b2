"""Integration: a real delta from ``deltakit.compress`` through the registry and back into ``apply``."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltakit.registry import Registry


def test_compress_push_resolve_apply(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    deltakit = pytest.importorskip("deltakit")
    base, target = llama_pair
    deltakit.compress(base, target, tmp_path / "delta", method="lossless")
    with Registry.open(tmp_path / "reg") as reg:
        info = reg.add_base("llama-base", base)  # fingerprint computed by deltakit.format.fingerprint
        pushed = reg.push(tmp_path / "delta", "llama-chat:v1", check_base=True)
        assert pushed.base_fingerprint == info.fingerprint
        assert [d.ref for d in reg.ls(base="llama-base")] == ["llama-chat:v1"]
        report = deltakit.apply(
            reg.resolve_base("llama-base"), reg.resolve_delta("llama-chat:v1"), tmp_path / "out"
        )
        assert report.matches_target
        assert reg.verify().ok
