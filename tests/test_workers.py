"""ordered_map: results in input order, errors in input order, workers at one torch thread each."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from deltakit.ops.threads import torch_threads
from deltakit.ops.workers import ordered_map, tensor_bytes


def _cpu_over_wall() -> float:
    """CPU seconds per wall second of this process while the calling thread runs a few BLAS products:
    about 1 when the thread's BLAS runs on one core, about 2 on two."""
    a = torch.randn(768, 768, generator=torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(40):
        a @ a
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_results_come_in_input_order(workers):
    def slow_for_early(i: int) -> int:
        time.sleep(0.02 if i % 3 == 0 else 0.0)  # early items finish last
        return i * i

    assert list(ordered_map(slow_for_early, range(12), workers)) == [i * i for i in range(12)]


def test_items_are_drawn_in_the_callers_thread_and_in_order():
    drawn = []

    def items():
        for i in range(6):
            drawn.append((i, threading.current_thread() is threading.main_thread()))
            yield i

    assert list(ordered_map(lambda i: i + 1, items(), 2, ahead=2)) == [1, 2, 3, 4, 5, 6]
    assert drawn == [(i, True) for i in range(6)]


def test_in_flight_items_never_exceed_ahead():
    live, peak, lock = [0], [0], threading.Lock()

    def items():
        for i in range(10):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            yield i

    for _ in ordered_map(lambda i: i, items(), 2, ahead=3):
        with lock:
            live[0] -= 1
    assert peak[0] <= 3


def _peak_in_flight(workers: int, **options) -> int:
    """Most items drawn and not yet consumed during an ordered_map over 24 items of 1 MiB each."""
    live, peak, lock = [0], [0], threading.Lock()
    payload = torch.zeros(1 << 20, dtype=torch.uint8)

    def items():
        for i in range(24):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            yield i, payload

    def slow_first(item):
        time.sleep(0.01 if item[0] % 4 == 0 else 0.0)
        return item[0]

    results = []
    for result in ordered_map(slow_first, items(), workers, **options):
        with lock:
            live[0] -= 1
        results.append(result)
    assert results == list(range(24))
    return peak[0]


def test_cheap_items_queue_ahead_costly_ones_stop_at_workers_plus_one():
    assert _peak_in_flight(2) == 6  # default ahead 2 * workers + 2, no cost given
    assert _peak_in_flight(2, cost=tensor_bytes) == 6  # 1 MiB items, far below AHEAD_BYTES
    # the bytes bound: the queued items hold at most ahead_bytes, plus the item just drawn
    assert _peak_in_flight(2, cost=tensor_bytes, ahead_bytes=(1 << 20) * 4) == 5
    assert _peak_in_flight(2, cost=tensor_bytes, ahead_bytes=(1 << 20) * 2) == 3
    assert _peak_in_flight(3, cost=tensor_bytes, ahead_bytes=0) == 4  # never below workers + 1
    assert tensor_bytes(("name", torch.zeros(3, dtype=torch.float32), None, torch.zeros(2, 2))) == 28


def test_the_first_failing_item_in_input_order_is_raised():
    def fail_on(i: int) -> int:
        if i == 2:
            time.sleep(0.05)  # finishes after item 5 has failed
            raise ValueError("item 2")
        if i == 5:
            raise KeyError("item 5")
        return i

    got = []
    with pytest.raises(ValueError, match="item 2"):
        for value in ordered_map(fail_on, range(8), 3, ahead=8):
            got.append(value)
    assert got == [0, 1]


def test_stopping_early_joins_the_workers_and_restores_the_thread_count():
    before = torch.get_num_threads()
    started = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    results = ordered_map(work, range(100), 2, ahead=4)
    assert next(results) == 0
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("deltakit-work")]
    assert len(started) < 100  # items not yet started were cancelled
    assert torch.get_num_threads() == before


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to tell one BLAS thread from two")
def test_workers_run_blas_on_one_thread_each():
    with torch_threads(2):
        ratios = list(ordered_map(lambda _: _cpu_over_wall(), range(1), 2))
    assert ratios[0] < 1.5


def test_streaming_writer_starts_writeback_as_it_goes_and_writes_the_same_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from deltakit.format import safetensors_io
    from deltakit.format.safetensors_io import StreamingSafetensorsWriter, TensorSpec

    ranges = []
    real = safetensors_io.start_writeback
    monkeypatch.setattr(safetensors_io, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(
        safetensors_io, "start_writeback", lambda fd, o, n: (ranges.append((o, n)), real(fd, o, n))
    )
    tensors = {f"t{i}": torch.arange(300 * (i + 1), dtype=torch.float32) for i in range(4)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert len(ranges) >= 3  # every 1000 bytes or more, one range after the other, no gaps
    assert ranges[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
