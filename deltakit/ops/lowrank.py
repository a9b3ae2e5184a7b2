"""The low-rank product ``up @ down`` of a factored delta, with bits that do not depend on how it is tiled.

A delta's low-rank part is rebuilt in several places: the codec's reference ``decode``, the fused rebuild's
row tiles (:mod:`deltakit.ops.fused`), and the mixed-delta batch's embedding rows. A BLAS matmul does not
promise that rows of a product equal the same rows computed as part of another row block or with another
thread count (MKL picks its kernel by shape: on some CPUs rows of a (9, 8) @ (8, 200) product differ in
the last bit from the rows of an (8, 8) @ (8, 200) one). On the CPU the product here is therefore taken
in a fixed order, element by element::

    out[i, j] = (...((up[i,0]·down[0,j] + up[i,1]·down[1,j]) + up[i,2]·down[2,j]) + ...)

every product and every sum rounded to fp32 on its own (no fused multiply-add that could round
differently; where every product is exact, as for 16-bit factors or quantized factors with few-bit
scales within range, the fused rebuild uses fused multiply-adds, which then round the same). The compiled form
(``deltakit_low_rank_rows`` in ``signmm_native.c``, threads split rows) and the torch form (one broadcast
multiply and one add per rank component) perform the same operations, so both give the same bits for any
rows, tile or thread count. On CUDA the product is one matmul over the whole matrix: the fused rebuild
takes the whole matrix as its tile there, so both paths make the same call.
"""

from __future__ import annotations

import torch

from deltakit.ops.signmm import native_library


def low_rank_product(
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 rows ``r0:r1`` of ``up @ down`` (all rows when ``rows`` is None).

    up: (n, r) and down (r, cols), any float dtype, on one device; not mutated (converted to contiguous
    fp32 when they are not). out: a contiguous fp32 (r1 - r0, cols) tensor on that device to write into,
    or None to allocate one. Returns the (r1 - r0, cols) fp32 product.
    """
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"up {list(up.shape)} and down {list(down.shape)} do not form a product")
    r0, r1 = rows if rows is not None else (0, up.shape[0])
    if not 0 <= r0 <= r1 <= up.shape[0]:
        raise ValueError(f"rows {r0}:{r1} are outside up's {up.shape[0]} rows")
    cols = down.shape[1]
    up32 = up.to(torch.float32).contiguous()  # (n, r)
    down32 = down.to(device=up.device, dtype=torch.float32).contiguous()  # (r, cols)
    if out is None:
        out = torch.empty((r1 - r0, cols), dtype=torch.float32, device=up.device)
    elif tuple(out.shape) != (r1 - r0, cols) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {[r1 - r0, cols]}")
    if up.device.type != "cpu":
        return torch.matmul(up32[r0:r1], down32, out=out)  # (r1 - r0, cols)
    lib = native_library()
    if lib is not None:
        code = lib.deltakit_low_rank_rows(
            up32.data_ptr(),
            down32.data_ptr(),
            up32.shape[1],
            cols,
            r0,
            r1,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if code != 0:
            raise ValueError(f"low-rank kernel refused its arguments (code {code})")
        return out
    return _torch_rows(up32[r0:r1], down32, out)


def _torch_rows(up32: torch.Tensor, down32: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The compiled kernel's operations in torch: out = up32[:, 0]·down32[0] + up32[:, 1]·down32[1] + ...,
    one rounded multiply and one rounded add per rank component, in order. out is written in place."""
    rank = up32.shape[1]
    if rank == 0:
        return out.zero_()
    torch.mul(up32[:, :1], down32[:1], out=out)  # (n, 1) * (1, cols)
    term = torch.empty_like(out)
    for k in range(1, rank):
        torch.mul(up32[:, k : k + 1], down32[k : k + 1], out=term)
        out.add_(term)
    return out
