"""Embedded registry: push/pull/resolve, names, integrity, rm/gc sharing, bases, evals, catalog rebuild."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import BASE_FP, flip_byte, make_base, make_delta  # noqa: E402

from deltakit.errors import DeltakitError, FormatError, IntegrityError, NotFoundError, RegistryError  # noqa: E402
from deltakit.registry import InvalidNameError, Registry, parse_ref  # noqa: E402


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    with Registry.open(tmp_path / "reg") as registry:
        yield registry


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", ["chat", "org/chat-7b", "a.b_c-d", "x:v1.2", "m:latest", "A9"])
def test_valid_refs(good: str) -> None:
    ref = parse_ref(good)
    assert ref.tag == (good.split(":")[1] if ":" in good else "latest")


@pytest.mark.parametrize(
    "bad",
    ["", ":", "a:", ":tag", "../x", "a/../b", "/abs", "a//b", ".hidden", "a/.b", "-x", "a b", "a\x00b",
     "a\nb", "tab\t", "a:b:c", "a:-t", "é", "a\\b", "x" * 200, "a:" + "t" * 200, "a/", "./a", "a:.."],
)  # fmt: skip
def test_invalid_refs(bad: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_ref(bad)


def test_invalid_names_refused_by_api(reg: Registry, tmp_path: Path) -> None:
    delta = make_delta(tmp_path / "d")
    for bad in ("../evil", "a/../../b", "", "x\x01"):
        with pytest.raises(InvalidNameError):
            reg.push(delta, bad)
        with pytest.raises(InvalidNameError):
            reg.add_base(bad, make_base(tmp_path / "b"), fingerprint=BASE_FP)
    assert not (tmp_path / "evil").exists()
    assert reg.ls() == []


# -- push / pull / resolve --------------------------------------------------------------------------------
def test_push_pull_roundtrip(reg: Registry, tmp_path: Path) -> None:
    delta = make_delta(tmp_path / "d")
    info = reg.push(delta, "chat")
    assert info.ref == "chat:latest" and info.codec == "dqrelo" and info.n_files == 2
    assert info.base_fingerprint == BASE_FP and info.target_name == "tiny-chat"
    out = reg.pull("chat", tmp_path / "out")
    assert _files(out) == _files(delta)
    with pytest.raises(DeltakitError):  # refuses to overwrite
        reg.pull("chat", tmp_path / "out")
    resolved = reg.resolve_delta("chat:latest")
    assert resolved.is_relative_to(reg.root) and _files(resolved) == _files(delta)
    assert reg.resolve_delta("chat") == resolved  # cached and re-verified


def test_push_is_idempotent_and_dedups(reg: Registry, tmp_path: Path) -> None:
    shared = os.urandom(10_000)
    a = make_delta(tmp_path / "a", {"s.safetensors": shared, "a.safetensors": b"A" * 100})
    b = make_delta(
        tmp_path / "b", {"s.safetensors": shared, "b.safetensors": b"B" * 100}, target_name="other"
    )
    reg.push(a, "a:v1")
    n1 = len(list(reg.store.iter_digests()))
    reg.push(a, "a:v1")
    reg.push(a, "a:v2")  # same content, second tag: no new blob
    assert len(list(reg.store.iter_digests())) == n1
    reg.push(b, "b")
    assert len(list(reg.store.iter_digests())) == n1 + 2  # b's own file + its manifest
    assert [d.ref for d in reg.ls()] == ["a:v1", "a:v2", "b:latest"]
    assert reg.show("a:v1")["also_tagged_as"] == ["a:v2"]


def test_push_refuses_bad_delta_dirs(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        reg.push(tmp_path, "x")  # no manifest
    delta = make_delta(tmp_path / "d")
    (delta / "stray.bin").write_bytes(b"?")
    with pytest.raises(FormatError, match="stray.bin"):
        reg.push(delta, "x")
    (delta / "stray.bin").unlink()
    flip_byte(delta / "delta-00001.safetensors")
    with pytest.raises(IntegrityError):
        reg.push(delta, "x")
    evil = make_delta(tmp_path / "e")
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="unsafe"):
        reg.push(evil, "x")
    assert reg.ls() == [] and reg.verify().ok


def test_unknown_refs(reg: Registry, tmp_path: Path) -> None:
    reg.push(make_delta(tmp_path / "d"), "chat:v1")
    with pytest.raises(NotFoundError, match="v1"):
        reg.show("chat:v2")
    with pytest.raises(NotFoundError):
        reg.resolve_delta("nope")
    with pytest.raises(NotFoundError):
        reg.resolve_base("nobase")


# -- corruption -----------------------------------------------------------------------------------------
def test_flipped_byte_caught_everywhere(reg: Registry, tmp_path: Path) -> None:
    delta = make_delta(tmp_path / "d")
    info = reg.push(delta, "chat")
    reg.resolve_delta("chat")  # build the cache first: corruption must still be caught
    digest = json.loads((delta / "manifest.json").read_text())["files"]["delta-00001.safetensors"]["sha256"]
    flip_byte(reg.store.path(digest))
    report = reg.verify()
    assert not report.ok and [p.kind for p in report.problems] == ["corrupt-blob"]
    assert report.problems[0].subject == digest
    with pytest.raises(IntegrityError):
        reg.pull("chat", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IntegrityError):
        reg.resolve_delta("chat")
    # a corrupted manifest blob is refused too
    flip_byte(reg.store.path(info.manifest), offset=3)
    with pytest.raises(IntegrityError):
        reg.show("chat")


def test_missing_blob_reported(reg: Registry, tmp_path: Path) -> None:
    delta = make_delta(tmp_path / "d")
    reg.push(delta, "chat")
    digest = json.loads((delta / "manifest.json").read_text())["files"]["extra/tok.json"]["sha256"]
    os.unlink(reg.store.path(digest))
    report = reg.verify()
    assert [p.kind for p in report.problems] == ["missing-blob"]
    with pytest.raises(NotFoundError):
        reg.pull("chat", tmp_path / "out")
    assert reg.gc().removed_blobs == 0  # a missing leaf does not hide what is live
    os.unlink(reg.store.path(reg.show_info("chat").manifest))
    with pytest.raises(RegistryError, match="refusing to gc"):
        reg.gc()  # without the manifest nothing tells which blobs are live: delete nothing


# -- rm / gc ---------------------------------------------------------------------------------------------
def test_rm_keeps_shared_blobs_and_gc_removes_only_unreferenced(reg: Registry, tmp_path: Path) -> None:
    shared = os.urandom(5000)
    a = make_delta(tmp_path / "a", {"shared.safetensors": shared, "own.safetensors": b"a" * 64})
    b = make_delta(
        tmp_path / "b", {"shared.safetensors": shared, "own.safetensors": b"b" * 64}, target_name="b"
    )
    reg.push(a, "a")
    reg.push(b, "b")
    before = set(reg.store.iter_digests())
    reg.rm("a")
    assert set(reg.store.iter_digests()) == before  # rm never deletes blobs
    report = reg.gc()
    assert report.removed_blobs == 2  # a's own file and a's manifest
    assert _files(reg.pull("b", tmp_path / "out")) == _files(b)
    assert reg.verify().ok
    assert reg.gc().removed_blobs == 0
    with pytest.raises(NotFoundError):
        reg.rm("a")


def test_gc_dry_run_and_temp_files(reg: Registry, tmp_path: Path) -> None:
    reg.push(make_delta(tmp_path / "a"), "a")
    orphan = reg.store.put_bytes(b"orphan")
    (reg.root / "tmp" / "123-partial").write_bytes(b"half")
    assert reg.verify().unreferenced_blobs == 1 and reg.verify().ok
    dry = reg.gc(dry_run=True)
    assert dry.removed_blobs == 1 and reg.store.has(orphan)
    report = reg.gc()
    assert report.removed_blobs == 1 and report.removed_temp_files == 1 and not reg.store.has(orphan)
    assert reg.verify().ok and reg.verify().unreferenced_blobs == 0


# -- bases -----------------------------------------------------------------------------------------------
def test_bases_and_lineage(reg: Registry, tmp_path: Path) -> None:
    base_dir = make_base(tmp_path / "base")
    info = reg.add_base("tiny-base", base_dir, fingerprint=BASE_FP)
    assert info.n_files == 3 and info.fingerprint == BASE_FP
    assert reg.add_base("tiny-base", base_dir, fingerprint=BASE_FP).tree == info.tree  # idempotent
    other_fp = "sha256:" + "c" * 64
    reg.push(make_delta(tmp_path / "d1"), "chat")
    reg.push(make_delta(tmp_path / "d2", base_fp=other_fp, base_name="other"), "code")
    assert [d.ref for d in reg.ls(base="tiny-base")] == ["chat:latest"]
    assert [d.ref for d in reg.ls(base="other")] == ["code:latest"]  # unregistered base: by manifest name
    assert reg.show("chat")["registered_base"] == "tiny-base"
    resolved = reg.resolve_base("tiny-base")
    assert _files(resolved) == _files(base_dir)
    with pytest.raises(RegistryError, match="chat:latest"):
        reg.rm_base("tiny-base")
    with pytest.raises(RegistryError, match="replace"):
        reg.add_base("tiny-base", make_base(tmp_path / "b2", b"other"), fingerprint=other_fp)
    reg.rm_base("tiny-base", force=True)
    assert reg.bases() == [] and reg.verify().ok
    reg.gc()
    assert reg.verify().ok and _files(reg.pull("chat", tmp_path / "out")) == _files(tmp_path / "d1")


def test_base_removed_when_unused(reg: Registry, tmp_path: Path) -> None:
    reg.add_base("b", make_base(tmp_path / "base"), fingerprint=BASE_FP)
    reg.push(make_delta(tmp_path / "d"), "chat")
    reg.rm("chat")
    reg.rm_base("b")
    assert reg.gc().removed_blobs >= 4 and list(reg.store.iter_digests()) == []


def test_corrupted_base_refused(reg: Registry, tmp_path: Path) -> None:
    base_dir = make_base(tmp_path / "base")
    reg.add_base("b", base_dir, fingerprint=BASE_FP)
    digest = reg.store.put_bytes((base_dir / "model.safetensors").read_bytes())  # same digest: already there
    flip_byte(reg.store.path(digest))
    with pytest.raises(IntegrityError):
        reg.resolve_base("b")
    assert not reg.verify().ok


# -- evals, catalog --------------------------------------------------------------------------------------
def test_set_eval_merges_and_survives_rebuild(reg: Registry, tmp_path: Path) -> None:
    delta = make_delta(tmp_path / "d")
    reg.push(delta, "chat:v1")
    reg.push(delta, "chat:v2")
    reg.set_eval("chat:v1", {"ppl": 7.5})
    assert reg.set_eval("chat:v1", {"kl": 0.1}) == {"ppl": 7.5, "kl": 0.1}
    assert reg.get_eval("chat:v2") == {"ppl": 7.5, "kl": 0.1}  # same content, same evals
    with pytest.raises(FormatError):
        reg.set_eval("chat:v1", {"bad": object()})
    os.unlink(reg.root / "catalog.sqlite")
    for extra in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        (reg.root / extra).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="rebuilt it from the refs"), Registry.open(reg.root) as fresh:
        # a missing catalog is rebuilt from the refs on open, never an empty ls
        assert [d.ref for d in fresh.ls()] == ["chat:v1", "chat:v2"]
        assert fresh.get_eval("chat:v1") == {"ppl": 7.5, "kl": 0.1}
        fresh.rebuild_catalog()
        assert [d.ref for d in fresh.ls()] == ["chat:v1", "chat:v2"]
        assert fresh.get_eval("chat:v1") == {"ppl": 7.5, "kl": 0.1}


def test_catalog_drift_reported_and_rebuilt(reg: Registry, tmp_path: Path) -> None:
    reg.push(make_delta(tmp_path / "d"), "chat")
    con = sqlite3.connect(reg.root / "catalog.sqlite")
    con.execute("DELETE FROM deltas")
    con.commit()
    con.close()
    assert [p.kind for p in reg.verify().problems] == ["catalog"]
    reg.rebuild_catalog()
    assert reg.verify().ok and [d.ref for d in reg.ls()] == ["chat:latest"]
    assert (reg.root / "catalog.sqlite").exists()
    assert con is not None


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        Registry.open(tmp_path / "none", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(RegistryError):
        Registry.open(tmp_path / "junk")


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    with Registry.open() as registry:
        assert registry.root == tmp_path / "home" / "registry"
        assert (registry.root / "registry.json").is_file()


def test_journal_replayed_after_crash_between_ref_and_catalog(reg: Registry, tmp_path: Path) -> None:
    """A ref written without its catalog row (writer died) is indexed on the next open."""
    reg.push(make_delta(tmp_path / "d"), "chat")
    doc = reg.store.read_doc("refs/deltas/chat/latest.json")
    reg.store.write_doc("refs/deltas/chat/v9.json", doc.replace(b'"latest"', b'"v9"'))
    (reg.root / "journal" / "999999999-dead.json").write_text(
        json.dumps({"kind": "delta", "name": "chat", "tag": "v9"})
    )
    with Registry.open(reg.root) as fresh:
        assert [d.ref for d in fresh.ls()] == ["chat:latest", "chat:v9"]
        assert fresh.verify().ok and not list((fresh.root / "journal").iterdir())
