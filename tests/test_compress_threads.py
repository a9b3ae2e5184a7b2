"""A delta's stored bytes do not depend on the CPU thread count (its content address stays stable)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import hashlib, sys, torch
import deltakit
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
base = {f"layers.{i}.w": torch.randn(192, 320, generator=g) for i in range(3)}
target = {k: v + 0.02 * torch.randn(v.shape, generator=g) + 0.05 * torch.randn(192, 8, generator=g)
          @ torch.randn(8, 320, generator=g) for k, v in base.items()}
options = dict(method=sys.argv[2], **({"bits_per_weight": 1.5} if sys.argv[2] == "deltacome" else {"ratio": 0.125}))
delta = deltakit.compress(base, target, **options)
digest = hashlib.sha256()
for name in sorted(delta.manifest.tensors):
    entry = delta.manifest.tensors[name]
    digest.update(repr(sorted(entry.params.items())).encode())
    for key in sorted(entry.stored.values()):
        digest.update(delta.stored_tensor(key, entry.shard).numpy().tobytes())
print(digest.hexdigest(), torch.get_num_threads())
"""


def _run(threads: int, method: str) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(threads), method], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    digest, count = out.stdout.split()
    return digest, int(count)


@pytest.mark.parametrize("method", ["dqrelo", "svd", "deltacome"])
def test_compressed_bytes_do_not_depend_on_the_thread_count(method):
    one, two = _run(1, method), _run(2, method)
    assert one[1] == 1 and two[1] == 2  # the caller's thread count is what the script set
    assert one[0] == two[0]


@pytest.mark.parametrize("method", ["dqrelo", "deltacome", "lossless"])
def test_applied_bits_do_not_depend_on_the_thread_count(method, tmp_path):
    """apply rebuilds tensors on one worker per torch thread: the written checkpoint is the same for any
    count, and a failed check still surfaces as the error it was."""
    import torch

    import deltakit
    from deltakit.ops.threads import torch_threads

    g = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.w": torch.randn(96, 160, generator=g).to(torch.bfloat16) for i in range(5)}
    target = {
        k: (v.float() + 0.03 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()
    }
    options = {"bits_per_weight": 1.5} if method == "deltacome" else {}
    delta = deltakit.compress(base, target, tmp_path / "delta", method=method, **options)
    rebuilt = {}
    for threads in (1, 2, 3):
        with torch_threads(threads):
            rebuilt[threads] = deltakit.apply(base, delta).state_dict
    for name in base:
        assert torch.equal(rebuilt[1][name], rebuilt[2][name]) and torch.equal(
            rebuilt[1][name], rebuilt[3][name]
        )
    if method == "lossless":
        assert all(torch.equal(rebuilt[2][k], target[k]) for k in target)
