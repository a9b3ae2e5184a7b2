"""Hostile input against the registry: names, manifests, ref documents, catalog and layout files.

Each case builds its attack under ``tmp_path``, runs one ``deltakit registry ...`` command in-process
(``deltakit_cli.main.main``, the real entry point with its error mapping) and asserts:
the exit code, a one-line message on stderr without a traceback, and that nothing outside the registry
root changed (a listing of ``tmp_path`` without ``reg/`` before and after, contents hashed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import make_delta  # noqa: E402

from deltakit.errors import FormatError, NotFoundError, RegistryError, UsageError  # noqa: E402
from deltakit.registry import Registry  # noqa: E402
from deltakit_cli.main import main  # noqa: E402

USAGE, FORMAT, REGISTRY, NOT_FOUND = (
    UsageError.exit_code,
    FormatError.exit_code,
    RegistryError.exit_code,
    NotFoundError.exit_code,
)


@dataclass(frozen=True)
class Case:
    """An attack: ``setup(tmp, reg_root)`` prepares it and returns the CLI arguments after ``registry``."""

    id: str
    setup: Callable[[Path, Path], list[str]]
    code: int
    message: str  # a fragment the one-line message must contain (stderr)
    outputs: tuple[str, ...] = ()  # paths under tmp_path the command may legitimately create


def _listing(tmp: Path, skip: tuple[str, ...]) -> dict[str, str]:
    """Every path below ``tmp`` except the registry root and allowed outputs: kind and content hash."""
    out = {}
    for path in sorted(tmp.rglob("*")):
        rel = path.relative_to(tmp).as_posix()
        if rel == "reg" or rel.startswith("reg/") or any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["registry", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _pushed(reg_root: Path, tmp: Path, ref: str = "chat") -> Registry:
    reg = Registry.open(reg_root)
    reg.push(make_delta(tmp / "good"), ref)
    return reg


def _delta_with_files(tmp: Path, files: dict, raw: bytes | None = None) -> Path:
    """A delta directory whose manifest lists ``files`` as given (or is ``raw`` bytes)."""
    path = make_delta(tmp / "evil")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = files
    (path / "manifest.json").write_bytes(raw if raw is not None else json.dumps(manifest).encode())
    return path


def _entry(data: bytes = b"x") -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _push_manifest(files: dict | None = None, raw: bytes | None = None) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, root: Path) -> list[str]:
        return ["push", str(_delta_with_files(tmp, files or {}, raw)), "evil", "--registry", str(root)]

    return setup


def _push_name(ref: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, root: Path) -> list[str]:
        return ["push", str(make_delta(tmp / "d")), ref, "--registry", str(root)]

    return setup


def _ref_doc(content: bytes | None = None, symlink: bool = False) -> Callable[[Path, Path], list[str]]:
    """Replace the ref of chat:latest by ``content`` (or by a symlink to a file outside), then pull it."""

    def setup(tmp: Path, root: Path) -> list[str]:
        _pushed(root, tmp).close()
        ref = root / "refs" / "deltas" / "chat" / "latest.json"
        if symlink:
            outside = tmp / "outside.json"
            outside.write_bytes(ref.read_bytes())
            ref.unlink()
            ref.symlink_to(outside)
        else:
            ref.write_bytes(content or b"")
        return ["pull", "chat", "-o", str(tmp / "out"), "--registry", str(root)]

    return setup


def _blob_dir_symlink(tmp: Path, root: Path) -> list[str]:
    reg = _pushed(root, tmp)
    digest = next(e["sha256"] for e in reg.manifest("chat")["files"].values())
    reg.close()
    shard = root / "blobs" / "sha256" / digest[:2]
    outside = tmp / "outside-blobs"
    os.rename(shard, outside)
    shard.symlink_to(outside, target_is_directory=True)
    return ["pull", "chat", "-o", str(tmp / "out"), "--registry", str(root)]


def _delta_symlink(tmp: Path, root: Path) -> list[str]:
    secret = tmp / "secret.txt"
    secret.write_bytes(b"x")
    delta = _delta_with_files(tmp, {"leak.bin": _entry(b"x")})
    (delta / "leak.bin").symlink_to(secret)
    return ["push", str(delta), "evil", "--registry", str(root)]


def _layout_garbage(tmp: Path, root: Path) -> list[str]:
    _pushed(root, tmp).close()
    (root / "registry.json").write_bytes(b"\x00\xffnot json")
    return ["ls", "--registry", str(root)]


def _gc_unreadable_ref(tmp: Path, root: Path) -> list[str]:
    _pushed(root, tmp).close()
    (root / "refs" / "deltas" / "chat" / "latest.json").write_text('{"manifest": 7}')
    return ["gc", "--registry", str(root)]


def _base_tree_bad_size(tmp: Path, root: Path) -> list[str]:
    reg = Registry.open(root)
    tree = {"format": "deltakit.base-tree", "files": {"model.safetensors": {"sha256": "a" * 64, "size": "9"}}}
    digest = reg.store.put_bytes(json.dumps(tree).encode())
    reg.store.write_doc(
        "refs/bases/b.json",
        json.dumps({"name": "b", "fingerprint": "fp", "tree": f"sha256:{digest}"}).encode(),
    )
    reg.rebuild_catalog()  # indexes nothing: the only ref is unreadable
    reg.close()
    return ["gc", "--registry", str(root)]


def _file(path: Path) -> Path:
    path.write_text("not a registry")
    return path


def _ref_key_collision(tmp: Path, root: Path) -> list[str]:
    _pushed(root, tmp, "org:v1").close()
    return ["push", str(make_delta(tmp / "d2")), "org/v1.json:x", "--registry", str(root)]


DOTDOT = {"../outside.bin": _entry()}
CASES = [
    # names and tags: full-string matches (exit 2)
    Case("name-dotdot", _push_name("../evil"), USAGE, "invalid name"),
    Case("name-absolute", _push_name("/etc/passwd"), USAGE, "invalid name"),
    Case("name-trailing-newline", _push_name("chat\n"), USAGE, "invalid name"),
    Case("tag-trailing-newline", _push_name("chat:v1\n"), USAGE, "invalid tag"),
    Case("name-nul", _push_name("ch\x00at"), USAGE, "invalid name"),
    Case("name-leading-dot", _push_name(".hidden"), USAGE, "invalid name"),
    Case("name-overlong", _push_name("a" * 129), USAGE, "longer than 128"),
    Case("name-json-part-collides-with-ref", _ref_key_collision, USAGE, "'.json'"),
    Case("ref-two-colons", _push_name("a:b:c"), USAGE, "one ':'"),
    Case("tag-leading-dash", _push_name("chat:-v"), USAGE, "invalid tag"),
    # manifests pushed into the registry (exit 3)
    Case("manifest-path-dotdot", _push_manifest(DOTDOT), FORMAT, "unsafe"),
    Case("manifest-path-absolute", _push_manifest({"/tmp/x.bin": _entry()}), FORMAT, "unsafe"),
    Case("manifest-path-backslash", _push_manifest({"a\\..\\b.bin": _entry()}), FORMAT, "unsafe"),
    Case("manifest-path-nul", _push_manifest({"a\x00.bin": _entry()}), FORMAT, "unsafe"),
    Case("manifest-path-newline", _push_manifest({"a.bin\n": _entry()}), FORMAT, "unsafe"),
    Case("manifest-path-hidden", _push_manifest({".git/config": _entry()}), FORMAT, "unsafe"),
    Case("manifest-path-drive", _push_manifest({"C:x.bin": _entry()}), FORMAT, "unsafe"),
    Case("manifest-size-bool", _push_manifest({"a.bin": {"sha256": "a" * 64, "size": True}}), FORMAT, "size"),
    Case(
        "manifest-size-huge", _push_manifest({"a.bin": {"sha256": "a" * 64, "size": 2**70}}), FORMAT, "size"
    ),
    Case(
        "manifest-sha-uppercase", _push_manifest({"a.bin": {"sha256": "A" * 64, "size": 1}}), FORMAT, "sha256"
    ),
    Case("manifest-not-object", _push_manifest(raw=b"[]"), FORMAT, "JSON object"),
    Case(
        "manifest-duplicate-key", _push_manifest(raw=b'{"format": "x", "format": "y"}'), FORMAT, "duplicate"
    ),
    Case(
        "manifest-deep-json",
        _push_manifest(raw=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        FORMAT,
        "nested too deeply",
    ),  # fmt: skip
    Case("manifest-not-utf8", _push_manifest(raw=b"\xff\xfe{}"), FORMAT, "not valid JSON"),
    Case("delta-file-symlink", _delta_symlink, FORMAT, "symbolic links"),
    # registry files (exit 3 for a malformed document, 8 for the registry refusing to act)
    Case("ref-garbage", _ref_doc(b"\xff{"), FORMAT, "not valid JSON", ("out",)),
    Case("ref-manifest-wrong-type", _ref_doc(b'{"manifest": 5}'), FORMAT, "'manifest'", ("out",)),
    Case(
        "ref-manifest-bad-digest", _ref_doc(b'{"manifest": "sha256:../../x"}'), FORMAT, "'manifest'", ("out",)
    ),
    Case(
        "ref-name-mismatch",
        _ref_doc(b'{"manifest": "sha256:' + b"a" * 64 + b'", "tag": "v9"}'),
        FORMAT,
        "the key says",
        ("out",),
    ),  # fmt: skip
    Case("ref-symlink-outside", _ref_doc(symlink=True), FORMAT, "outside", ("out",)),
    Case("blob-dir-symlink-outside", _blob_dir_symlink, FORMAT, "outside", ("out",)),
    Case("layout-marker-garbage", _layout_garbage, REGISTRY, "unreadable registry.json"),
    Case("gc-with-unreadable-ref", _gc_unreadable_ref, REGISTRY, "fix it before gc"),
    Case("base-tree-size-not-int", _base_tree_bad_size, REGISTRY, "refusing to gc"),
    Case(
        "registry-missing",
        lambda tmp, root: ["ls", "--registry", str(tmp / "nope")],
        NOT_FOUND,
        "registry init",
    ),
    Case(
        "registry-is-a-file",
        lambda tmp, root: ["push", str(make_delta(tmp / "d")), "x", "--registry", str(_file(tmp / "afile"))],
        REGISTRY,
        "not a directory",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_registry_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "reg"
    argv = case.setup(tmp_path, root)
    capsys.readouterr()
    before = _listing(tmp_path, case.outputs)
    code, out, err = _cli(argv, capsys)
    assert code == case.code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.message in lines[0], lines[0]
    assert _listing(tmp_path, case.outputs) == before
    for output in case.outputs:
        assert not (tmp_path / output).exists()


# -- damaged catalog: rebuilt from the refs with a one-line warning, never an empty ls -----------------
def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _wrong_schema(path: Path) -> None:
    path.unlink()
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE deltas (x TEXT)")
    con.commit()
    con.close()


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "damage",
    [_garbage, _truncated, _wrong_schema, _missing],
    ids=["garbage", "truncated", "wrong-schema", "missing"],
)
def test_damaged_catalog_is_rebuilt(
    damage: Callable[[Path], None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "reg"
    with _pushed(root, tmp_path, "chat:v1") as reg:
        reg.push(make_delta(tmp_path / "two"), "code:v2")
        reg.rebuild_catalog()  # checkpoints the WAL into the main file
    for side in ("-wal", "-shm"):
        (root / f"catalog.sqlite{side}").unlink(missing_ok=True)
    damage(root / "catalog.sqlite")
    before = _listing(tmp_path, ())
    capsys.readouterr()
    code, out, err = _cli(["ls", "--json", "--registry", str(root)], capsys)
    assert code == 0, err
    assert [d["ref"] for d in json.loads(out)] == ["chat:v1", "code:v2"]
    lines = err.strip().splitlines()  # the CLI shows the warning as one line
    assert len(lines) == 1 and lines[0].startswith("warning:") and "rebuilt it from the refs" in lines[0], err
    assert _listing(tmp_path, ()) == before
    with Registry.open(root) as reg:
        assert reg.verify().ok


def test_catalog_damaged_after_open_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with _pushed(root, tmp_path) as reg:
        reg.catalog.conn.execute("DROP TABLE deltas")
        with pytest.raises(RegistryError, match="damaged") as exc:
            reg.ls()
        assert "\n" not in str(exc.value)


# -- leftovers of interrupted writes -----------------------------------------------------------------
def test_interrupted_replace_leftovers_are_cleaned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "reg"
    _pushed(root, tmp_path).close()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    trash = tmp_path / f".out.old-{dead}-0badc0de"  # a replace of out/ killed between its two renames
    trash.mkdir()
    (trash / "manifest.json").write_text("{}")
    ref_temp = root / "refs" / "deltas" / "chat" / f".latest.json.tmp-{dead}-0badc0de"
    ref_temp.write_text("{")
    code, _, err = _cli(["pull", "chat", "-o", str(tmp_path / "out"), "--registry", str(root)], capsys)
    assert code == 0, err
    assert not trash.exists() and (tmp_path / "out" / "manifest.json").is_file()
    with Registry.open(root) as reg:
        assert reg.verify().temp_files == 1
        assert reg.gc().removed_temp_files == 1
        assert not ref_temp.exists() and reg.verify().ok


def test_manifest_fields_of_wrong_type_are_catalogued_as_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    delta = make_delta(tmp_path / "d", target_name="[bold red]x[/]")
    manifest = json.loads((delta / "manifest.json").read_text())
    manifest["codec"]["name"] = {"nested": True}
    manifest["stats"]["ratio"] = "high"
    (delta / "manifest.json").write_text(json.dumps(manifest))
    root = str(tmp_path / "reg")
    assert _cli(["push", str(delta), "odd", "--registry", root], capsys)[0] == 0
    code, out, err = _cli(["ls", "--registry", root], capsys)
    assert code == 0, err
    assert "[bold red]x[/]" in out  # printed literally, not as markup
    with Registry.open(root) as reg:
        info = reg.show_info("odd")
        assert info.codec is None and info.target_name == "[bold red]x[/]"


def test_garbage_journal_record_is_dropped_on_open(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _pushed(root, tmp_path).close()
    (root / "journal" / f"{2**22 + 1}-garbage.json").write_bytes(b"\xff\x00{")
    (root / "journal" / f"{2**22 + 2}-evil.json").write_text(
        json.dumps({"kind": "delta", "name": "../x", "tag": "v"})
    )
    with Registry.open(root) as reg:
        assert [d.ref for d in reg.ls()] == ["chat:latest"]
        assert list((root / "journal").iterdir()) == [] and reg.verify().ok


def test_base_holding_a_manifest_json_file_resolves(tmp_path: Path) -> None:
    from registry_helpers import make_base

    base = make_base(tmp_path / "base")
    (base / "manifest.json").write_text("{}")  # a checkpoint may carry a file of that name
    with Registry.open(tmp_path / "reg") as reg:
        reg.add_base("b", base, fingerprint="sha256:" + "c" * 64)
        assert (reg.resolve_base("b") / "manifest.json").read_text() == "{}"


@pytest.mark.parametrize("where", ["tmp", "cache/deltas"], ids=["tmp-symlink", "cache-symlink"])
def test_gc_does_not_follow_symlinks_out_of_the_registry(where: str, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _pushed(root, tmp_path).close()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (root / where).mkdir(parents=True, exist_ok=True)
    link = root / where / ("f" * 64)
    link.symlink_to(outside, target_is_directory=True)
    with Registry.open(root) as reg:
        reg.gc()
        assert not link.is_symlink() and (outside / "keep.txt").read_text() == "mine"


def test_resolve_refuses_a_cache_dir_linked_outside(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with _pushed(root, tmp_path) as reg:
        good = reg.resolve_delta("chat")
        outside = tmp_path / "elsewhere"
        os.rename(good, outside)
        good.symlink_to(outside, target_is_directory=True)
        with pytest.raises(FormatError, match="outside"):
            reg.resolve_delta("chat")


def test_pull_remote_refuses_a_hostile_remote_key(tmp_path: Path) -> None:
    from deltakit.registry import LocalBlobStore

    remote = LocalBlobStore(tmp_path / "remote")
    remote.write_doc("refs/deltas/-evil/v1.json", b'{"manifest": "sha256:' + b"a" * 64 + b'"}')
    with Registry.open(root := tmp_path / "reg") as reg:
        with pytest.raises(FormatError, match="does not name a valid ref"):
            reg.pull_remote("local", remote=remote)
        assert reg.ls() == [] and not list((root / "refs" / "deltas").iterdir())
