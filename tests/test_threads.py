"""Thread-count logic: affinity, cgroup quotas (fake files), busy CPUs, the --threads option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltakit.errors import UsageError
from deltakit.ops import threads as th


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000", None),
        ("150000 100000", 1.5),
        ("200000 100000\n", 2.0),
        ("garbage", None),
        ("0 100", None),
    ],
)
def test_cgroup_v2_cpu_max_is_parsed(text, cpus):
    assert th.parse_cpu_max(text) == cpus


def test_cgroup_v1_quota_is_parsed():
    assert th.parse_cfs("-1\n", "100000\n") is None
    assert th.parse_cfs("50000\n", "100000\n") == 0.5
    assert th.parse_cfs("x", "100000") is None


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    _write(tmp_path, "cpu.max", "150000 100000\n")
    assert th.available_cpus(tmp_path, affinity={0, 1, 2, 3}) == 2
    _write(tmp_path, "cpu.max", "max 100000\n")
    assert th.available_cpus(tmp_path, affinity={0, 1, 2, 3}) == 4
    _write(tmp_path, "cpu.max", "800000 100000\n")
    assert th.available_cpus(tmp_path, affinity={0, 5}) == 2
    _write(tmp_path, "cpu.max", "10000 100000\n")
    assert th.available_cpus(tmp_path, affinity={0, 1}) == 1


def test_available_cpus_reads_cgroup_v1_files(tmp_path):
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "300000\n")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert th.available_cpus(tmp_path, affinity=set(range(8))) == 3
    assert th.available_cpus(tmp_path / "nowhere", affinity=set(range(8))) == 8


def _stat(*cpus: tuple[int, int]) -> str:
    """/proc/stat text: per CPU (busy jiffies, idle jiffies)."""
    lines = ["cpu 0 0 0 0 0 0 0 0 0 0"]
    for i, (busy, idle) in enumerate(cpus):
        lines.append(f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0")
    return "\n".join(lines) + "\nintr 1 2 3\n"


def test_busy_cpus_counts_the_non_idle_share_of_the_allowed_cpus():
    samples = iter([_stat((0, 0), (0, 0), (0, 0)), _stat((100, 0), (10, 90), (100, 0))])
    busy = th.busy_cpus({0, 1}, stat=lambda: next(samples), interval=0)
    assert busy == pytest.approx(1.1)  # cpu 2 is busy but not ours


def test_threads_leave_out_cpus_other_work_keeps_busy():
    assert th.choose_threads(2, 0.0) == 2
    assert th.choose_threads(2, 0.4) == 2
    assert th.choose_threads(2, 1.0) == 1  # one core held by another process: one thread
    assert th.choose_threads(2, 2.0) == 1
    assert th.choose_threads(8, 2.6) == 5


def test_environment_and_explicit_counts_win(monkeypatch):
    monkeypatch.setenv("DELTAKIT_THREADS", "3")
    assert th.default_threads() == 3
    monkeypatch.setenv("DELTAKIT_THREADS", "zero")
    with pytest.raises(UsageError, match="threads="):
        th.default_threads()
    with pytest.raises(UsageError):
        th.parse_threads(0)


def test_set_threads_sets_torch_and_the_wait_policy_defaults_only_fill_gaps():
    before = torch.get_num_threads()
    try:
        assert th.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    th.passive_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}


def test_cli_threads_option(monkeypatch):
    from click.testing import CliRunner

    from deltakit_cli.main import cli

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["--threads", "1", "methods"])
        assert result.exit_code == 0 and torch.get_num_threads() == 1
        bad = CliRunner().invoke(cli, ["--threads", "-2", "methods"])
        assert bad.exit_code != 0 and isinstance(bad.exception, UsageError)
    finally:
        torch.set_num_threads(before)
