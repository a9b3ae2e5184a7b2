"""Nothing lost, nothing corrupted: SIGKILL in the middle of push, and concurrent writers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import make_delta  # noqa: E402

from deltakit.errors import NotFoundError  # noqa: E402
from deltakit.registry import Registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CHILD = str(Path(__file__).parent / "registry_child.py")  # test-only entry: installs the pause hook


def _spawn(command: str, root: str, *args: str, pause: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    extra = [pause or "-"] if command == "push" else []
    return subprocess.Popen(
        [sys.executable, CHILD, command, root, *extra, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _big_delta(path: Path, seed: int, n_files: int = 12, size: int = 64 << 10) -> Path:
    rng = random.Random(seed)
    return make_delta(path, {f"shard-{i:03d}.safetensors": rng.randbytes(size) for i in range(n_files)})


def _check_whole_or_absent(root: Path, ref: str, candidates: list[Path], out: Path) -> str:
    """verify passes; ``ref`` is absent or equal to one of ``candidates`` byte for byte."""
    with Registry.open(root, create=False) as reg:
        report = reg.verify()
        assert report.ok, [str(p) for p in report.problems]
        try:
            pulled = reg.pull(ref, out)
        except NotFoundError:
            return "absent"
        got = _files(pulled)
        assert any(got == _files(c) for c in candidates), f"{ref} is partial or mixed"
        return "present"


def test_sigkill_during_push_leaves_registry_consistent(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry.open(root) as reg:
        keep = make_delta(tmp_path / "keep")
        reg.push(keep, "keep")
        old = _big_delta(tmp_path / "old", seed=0)
        reg.push(old, "chat")  # the crashed pushes overwrite this tag: old or new, never a mix
    rng = random.Random(1234)
    outcomes = []
    for i in range(6):
        new = _big_delta(tmp_path / f"new{i}", seed=i + 1)
        child = _spawn("push", str(root), str(new), f"fresh{i}", str(new), "chat", pause="blob:0.03")
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.0))  # both pushes take ~0.8 s
        child.send_signal(signal.SIGKILL)
        child.wait()
        _check_whole_or_absent(root, "chat", [old, new], tmp_path / f"out{i}")
        outcomes.append(_check_whole_or_absent(root, f"fresh{i}", [new], tmp_path / f"outf{i}"))
        if _files(tmp_path / f"out{i}") == _files(new):
            outcomes[-1] += "+overwrote"
            old = new  # the overwrite landed: the next crash may leave this one or its own
    with Registry.open(root) as reg:
        assert _files(reg.pull("keep", tmp_path / "keep-out")) == _files(keep)
        reg.gc()
        report = reg.verify()
        assert report.ok and report.unreferenced_blobs == 0 and report.temp_files == 0
    print("fresh delta after each kill:", outcomes)


def test_sigkill_between_ref_and_catalog_is_recovered(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry.open(root).close()
    delta = _big_delta(tmp_path / "d", seed=7, n_files=2)
    child = _spawn("push", str(root), str(delta), "chat:v1", pause="ref:30")
    ref_file = root / "refs" / "deltas" / "chat" / "v1.json"
    deadline = time.time() + 20
    while not ref_file.exists():
        assert time.time() < deadline and child.poll() is None, child.stderr.read() if child.stderr else ""
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list((root / "journal").iterdir())  # the intent record is left behind
    with Registry.open(root) as reg:  # replays it
        assert [d.ref for d in reg.ls()] == ["chat:v1"]
        assert reg.verify().ok
        assert _files(reg.resolve_delta("chat:v1")) == {**_files(delta)}


def test_concurrent_pushers_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry.open(root).close()
    shared = os.urandom(32 << 10)  # every delta shares one file: dedup under concurrency
    jobs = []
    for p in range(4):
        args = []
        for k in range(3):
            d = make_delta(
                tmp_path / f"p{p}d{k}", {"shared.safetensors": shared, "own.safetensors": os.urandom(9000)}
            )
            args += [str(d), f"proc{p}/delta{k}:v1"]
        jobs.append((args, _spawn("push", str(root), *args, pause="blob:0.01")))
    gc = _spawn("gc", str(root), "1.5")  # gc racing the pushes must not eat in-flight blobs
    for _args, proc in jobs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    gc_out, gc_err = gc.communicate(timeout=60)
    assert gc.returncode == 0, gc_err
    with Registry.open(root) as reg:
        refs = [d.ref for d in reg.ls()]
        assert len(refs) == 12
        report = reg.verify()
        assert report.ok, [str(p) for p in report.problems]
        for args, _proc in jobs:
            for delta, ref in zip(args[::2], args[1::2], strict=True):
                assert _files(reg.resolve_delta(ref)) == _files(Path(delta))


@pytest.mark.parametrize("workers", [4])
def test_concurrent_same_tag_last_writer_wins(tmp_path: Path, workers: int) -> None:
    root = tmp_path / "reg"
    Registry.open(root).close()
    deltas = [make_delta(tmp_path / f"d{i}") for i in range(workers)]
    procs = [_spawn("push", str(root), str(d), "chat") for d in deltas]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    with Registry.open(root) as reg:
        assert reg.verify().ok
        got = _files(reg.pull("chat", tmp_path / "out"))
        assert any(got == _files(d) for d in deltas)
