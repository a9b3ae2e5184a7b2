"""Remote registry on a real S3 server (SeaweedFS): push/pull move only missing blobs, verified."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_s3 import S3Server, s3_server  # noqa: E402,F401
from registry_helpers import BASE_FP, make_base, make_delta  # noqa: E402

from deltakit.errors import IntegrityError, NotFoundError  # noqa: E402
from deltakit.registry import Registry  # noqa: E402
from deltakit.registry.s3store import S3BlobStore  # noqa: E402

pytest.importorskip("s3fs", reason="remote registry tests need s3fs: pip install s3fs")


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def remote(s3_server: S3Server) -> tuple[str, dict]:  # noqa: F811 - the imported fixture
    """A fresh bucket prefix and the options to reach it."""
    url = f"s3://deltakit-test/{uuid.uuid4().hex[:8]}"
    return url, {"endpoint_url": s3_server.endpoint_url, "storage_options": s3_server.storage_options}


def test_push_pull_remote_roundtrip(tmp_path: Path, remote: tuple[str, dict]) -> None:
    url, opts = remote
    shared = os.urandom(20_000)
    a = make_delta(tmp_path / "a", {"shared.safetensors": shared, "a.safetensors": os.urandom(3000)})
    b = make_delta(tmp_path / "b", {"shared.safetensors": shared, "b.safetensors": os.urandom(3000)})
    with Registry.open(tmp_path / "one") as one:
        one.add_base("tiny-base", make_base(tmp_path / "base"), fingerprint=BASE_FP)
        one.push(a, "chat:v1")
        one.set_eval("chat:v1", {"ppl": 6.25})
        first = one.push_remote(url, **opts)
        assert first.blobs_sent == len(set(one.store.iter_digests())) and first.blobs_present == 0
        assert len(first.refs_written) == 2
        again = one.push_remote(url, **opts)  # idempotent: nothing to send
        assert again.blobs_sent == 0 and again.refs_written == [] and again.refs_replaced == []
        one.push(b, "code")
        third = one.push_remote(url, refs=["code"], **opts)
        assert third.blobs_sent == 2  # b's own file and manifest; the shared file is there already
        assert third.refs_written == ["refs/deltas/code/latest.json"]
    with Registry.open(tmp_path / "two") as two:
        report = two.pull_remote(url, **opts)
        assert sorted(report.refs_written) == [
            "refs/bases/tiny-base.json", "refs/deltas/chat/v1.json", "refs/deltas/code/latest.json",
        ]  # fmt: skip
        assert [d.ref for d in two.ls()] == ["chat:v1", "code:latest"]
        assert two.get_eval("chat:v1") == {"ppl": 6.25}
        assert _files(two.resolve_delta("chat:v1")) == _files(a)
        assert _files(two.pull("code", tmp_path / "out")) == _files(b)
        assert _files(two.resolve_base("tiny-base")) == _files(tmp_path / "base")
        assert two.verify().ok
        assert two.pull_remote(url, **opts).blobs_sent == 0


def test_pull_remote_refuses_corrupted_blob(tmp_path: Path, remote: tuple[str, dict]) -> None:
    url, opts = remote
    delta = make_delta(tmp_path / "d")
    with Registry.open(tmp_path / "one") as one:
        one.push(delta, "chat")
        one.push_remote(url, **opts)
    store = S3BlobStore(url, **opts)
    digest = json.loads((delta / "manifest.json").read_text())["files"]["delta-00001.safetensors"]["sha256"]
    store.fs.pipe_file(f"{store.prefix}/blobs/sha256/{digest[:2]}/{digest}", b"tampered")
    with Registry.open(tmp_path / "two") as two:
        with pytest.raises(IntegrityError):
            two.pull_remote(url, **opts)
        assert two.ls() == [] and two.verify().ok  # nothing half-imported
        assert not two.store.has(digest)


def test_pull_remote_selection_and_missing(tmp_path: Path, remote: tuple[str, dict]) -> None:
    url, opts = remote
    with Registry.open(tmp_path / "one") as one:
        one.push(make_delta(tmp_path / "a"), "a:v1")
        one.push(make_delta(tmp_path / "b"), "b:v1")
        one.push_remote(url, **opts)
    with Registry.open(tmp_path / "two") as two:
        two.pull_remote(url, refs=["b:v1"], **opts)
        assert [d.ref for d in two.ls()] == ["b:v1"]
        with pytest.raises(NotFoundError):
            two.pull_remote(url, refs=["nope"], **opts)
