"""svd_factors and quantize_factors give the same bytes whatever the CPU thread count, and leaves the caller's count alone."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from deltakit.ops.svd import svd_factors
from deltakit.ops.threads import torch_threads

_SCRIPT = """
import hashlib, sys, torch
from deltakit.ops.factors import quantize_factors
from deltakit.ops.svd import svd_factors
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
m = torch.randn(300, 32, generator=g) @ torch.randn(32, 700, generator=g) + 0.3 * torch.randn(300, 700, generator=g)
digest = hashlib.sha256()
for method, rank in (("randomized", 24), ("exact", 8)):
    up, down = svd_factors(m, rank, method=method, seed=1)
    digest.update(up.numpy().tobytes() + down.numpy().tobytes())
q = quantize_factors(up, down, 3, 32, target=m)
digest.update(q.up.codes.numpy().tobytes() + q.down.codes.numpy().tobytes() + q.down.scales.numpy().tobytes())
print(digest.hexdigest(), torch.get_num_threads())
"""


def _run(threads: int) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(threads)], env=env, capture_output=True, text=True, check=True
    )
    digest, count = out.stdout.split()
    return digest, int(count)


def test_svd_factors_bytes_do_not_depend_on_the_thread_count():
    one, count_one = _run(1)
    two, count_two = _run(2)
    assert one == two
    assert (count_one, count_two) == (1, 2)  # the caller's setting survives the call


def test_torch_threads_restores_the_previous_count_even_on_error():
    before = torch.get_num_threads()
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
    svd_factors(torch.randn(40, 30), 4)
    assert torch.get_num_threads() == before
