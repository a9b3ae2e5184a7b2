"""Sync between the embedded registry and a second store, run against a local directory store.

The remote side here is a :class:`LocalBlobStore` (same layout as an S3 prefix), so the sync logic is
tested without an S3 server; tests/test_registry_s3.py runs it against a real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import BASE_FP, dir_files, make_base, make_delta  # noqa: E402

from deltakit.errors import FormatError  # noqa: E402
from deltakit.registry import LocalBlobStore, Registry  # noqa: E402


def test_push_then_pull_through_a_local_store(tmp_path: Path) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    delta = make_delta(tmp_path / "d")
    with Registry.open(tmp_path / "one") as one:
        one.add_base("tiny-base", make_base(tmp_path / "base"), fingerprint=BASE_FP)
        one.push(delta, "chat:v1")
        one.set_eval("chat:v1", {"ppl": 7.0})
        first = one.push_remote("local", remote=remote)
        assert sorted(first.refs_written) == ["refs/bases/tiny-base.json", "refs/deltas/chat/v1.json"]
        # 2 delta files + manifest, 3 base files + file list; the two "{}" files share one blob
        assert first.blobs_sent == 6
        assert one.push_remote("local", remote=remote).blobs_sent == 0
    with Registry.open(tmp_path / "two") as two:
        report = two.pull_remote("local", remote=remote)
        assert report.blobs_sent == 6 and len(report.refs_written) == 2
        assert [d.ref for d in two.ls()] == ["chat:v1"] and two.get_eval("chat:v1") == {"ppl": 7.0}
        assert dir_files(two.pull("chat:v1", tmp_path / "out")) == dir_files(delta)
        assert two.verify().ok


def test_pull_refuses_a_ref_naming_another_key(tmp_path: Path) -> None:
    remote = LocalBlobStore(tmp_path / "remote")
    with Registry.open(tmp_path / "one") as one:
        one.push(make_delta(tmp_path / "d"), "chat:v1")
        one.push_remote("local", remote=remote)
    doc = remote.read_doc("refs/deltas/chat/v1.json")
    assert doc is not None
    remote.write_doc("refs/deltas/chat/v2.json", doc)  # says name chat, tag v1 inside
    with Registry.open(tmp_path / "two") as two:
        with pytest.raises(FormatError, match="tag"):
            two.pull_remote("local", remote=remote, refs=["chat:v2"])
        assert two.ls() == []
