"""gc against a stream of pushers: it is not starved, its wait is bounded, and it eats nothing in flight."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import dir_files, make_delta  # noqa: E402

from deltakit.errors import RegistryError  # noqa: E402
from deltakit.registry import Registry  # noqa: E402


def _pusher(root: Path, deltas: list[Path], prefix: str, stop: threading.Event, done: list[str]) -> None:
    """Push the deltas round and round (each push holds the shared lock ~0.2 s) until ``stop``."""
    with Registry.open(root, pause_hook=lambda point: time.sleep(0.05) if point == "blob" else None) as reg:
        i = 0
        while not stop.is_set():
            ref = f"{prefix}:v{i}"
            reg.push(deltas[i % len(deltas)], ref)
            done.append(ref)
            i += 1


def test_gc_is_not_starved_by_overlapping_pushers(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry.open(root).close()
    files = {f"f{k}.safetensors": b"" for k in range(4)}
    deltas = [make_delta(tmp_path / f"d{j}", {n: os.urandom(2048) for n in files}) for j in range(3)]
    stop, done = threading.Event(), []
    threads = [
        threading.Thread(target=_pusher, args=(root, deltas, f"p{t}", stop, done), daemon=True)
        for t in range(3)
    ]
    for i, thread in enumerate(threads):
        thread.start()
        time.sleep(0.07 * (i + 1))  # staggered: some push always holds the shared lock
    try:
        with Registry.open(root) as reg:
            reports = [reg.gc(timeout=30.0) for _ in range(3)]  # each waits only for the pushes inside
        assert all(r.removed_blobs == 0 for r in reports)  # every stored blob belongs to a pushed ref
        in_flight = len(done)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(done) > in_flight or len(done) >= 3  # pushers went on after gc
    with Registry.open(root) as reg:
        assert reg.verify().ok
        for ref in done:
            got = dir_files(reg.resolve_delta(ref))
            assert any(got == dir_files(d) for d in deltas)


def test_gc_wait_is_bounded_and_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry.open(root) as writer, Registry.open(root) as gc_side:
        writer.push(make_delta(tmp_path / "d"), "chat")
        writer.rm("chat")  # its blobs are now garbage
        before = set(writer.store.iter_digests())
        with writer.lock.shared():  # a writer that does not finish in time
            with pytest.raises(RegistryError, match="busy") as exc:
                gc_side.gc(timeout=0.3)
            assert "\n" not in str(exc.value)
        assert set(writer.store.iter_digests()) == before
        assert gc_side.gc(timeout=5.0).removed_blobs == len(before)


def test_writers_wait_while_gc_holds_the_gate(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry.open(root) as reg, Registry.open(root) as other:
        entered = []

        def writer() -> None:
            with other.lock.shared():
                entered.append(time.monotonic())

        with reg.lock.exclusive(5.0, "test"):
            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(0.3)
            assert entered == []  # queued behind the exclusive holder
            released = time.monotonic()
        thread.join(timeout=10)
        assert entered and entered[0] >= released
