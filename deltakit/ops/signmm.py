"""Packed 1-bit sign matrix times activations: ``x Sᵀ`` from the packed bits, no ±1 matrix built.

S (out, in) is stored as bits (1 = +1, 0 = -1, least significant bit first, row-major, see
:mod:`deltakit.ops.bitpack`). :func:`sign_matmul` gives ``x Sᵀ`` in fp32 for activations x (n, in):

- on the CPU, through a small C kernel (``signmm_native.c``) compiled once with the system C compiler
  into the deltakit cache (``$DELTAKIT_CACHE/kernels`` or the user cache dir) and called with ctypes.
  Few rows (decoding) take the tile form: the bits laid out 16 matrix rows to a tile
  (:func:`sign_tiles`, same size as the packed bits), a 16-entry table of ±x sums per 4 columns and row,
  and one vector permute + add per 16 matrix rows and 4 columns (AVX-512; portable code does the same
  additions). Its sums are in a fixed order, so its bits do not depend on the thread count, the
  instruction set or the rows batched with a row. From :data:`LUT_MIN_ROWS` rows on (prefill) a
  table-lookup form takes 16 rows per vector: per 8-column group a 256-entry table of the rows' ±x
  sums, one vector add per 8 columns. Its bits are also fixed for a row, whatever the threads or other
  rows, but round differently from the tile form;
- elsewhere (CUDA tensors, ``in`` not a multiple of 8, no C compiler, ``DELTAKIT_NATIVE=0``):
  ``x @ unpack(S)ᵀ`` in fp32 (:func:`reference_sign_matmul`), the same sums in the matmul's order.

The same library holds the one-pass rebuild of :mod:`deltakit.ops.fused` (``deltakit_fused_rows``) and the
fixed-order low-rank product of :mod:`deltakit.ops.lowrank` (``deltakit_low_rank_rows``); a second source,
``lowrank_native.c``, compiled into it, holds the mixed batch's low-rank shares at the factors' stored width
(:mod:`deltakit.ops.lowrank_group`), a third, ``signstage_native.c``, the encode-side sign stage
(:mod:`deltakit.ops.signstage`), a fourth, ``pairscan_native.c``, the finiteness and equality scan
of a fine-tune tensor and its base (:func:`deltakit.ops.finite.scan_pair`), and a fifth,
``dequant_native.c``, the dequantization of packed codes (:func:`deltakit.ops.quant.dequantize`).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from deltakit.cachedir import cache_dir
from deltakit.ops.bitpack import unpack_signs

#: compiled together into one library
_SOURCES = tuple(
    Path(__file__).with_name(n)
    for n in (
        "signmm_native.c",
        "lowrank_native.c",
        "signstage_native.c",
        "pairscan_native.c",
        "dequant_native.c",
    )
)
#: an undeclared function is an error, never an implicit ``int`` one (a missing header must not build)
_FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-fno-fast-math",
    "-ffp-contract=off",
    "-Werror=implicit-function-declaration",
)
#: from this many activation rows on, the table-lookup kernel (16 rows per vector) is used: on SmolLM2's
#: shapes it is slower than the tile form up to 16 rows, level at 24 and faster from 32 (docs/sign_kernel.md)
LUT_MIN_ROWS = 24
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: argument types of the kernel's entry points (every one returns an int status, 0 = done)
_SIGNATURES = {
    "deltakit_sign_matmul_tiles": (_P, _I64, _I64, _P, _I64, _P, _I32),
    "deltakit_sign_matmul_lut": (_P, _I64, _I64, _P, _I64, _P, _I32),
    "deltakit_sign_matmul_multi": (_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I32),
    # the one-pass rows of ops/fused.py: base, kind, up, down, factor kind, rank, cols, r0, r1, bits, alpha,
    # round, out, kind, extremes, threads
    "deltakit_fused_rows": (
        _P,
        _I32,
        _P,
        _P,
        _I32,
        _I64,
        _I64,
        _I64,
        _I64,
        _P,
        ctypes.c_float,
        _I32,
        _P,
        _I32,
        _P,
        _I32,
    ),
    # many matrices of ops/fused.py in one call: jobs (fused_job array), count, extremes (count, 2), threads
    "deltakit_fused_batch": (_P, _I64, _P, _I32),
    # threads holding the fused kernel's scratch now (each gives it back when it ends)
    "deltakit_scratch_sets": (),
    # ops/lowrank.py: up, down, rank, cols, first row, end row, out
    "deltakit_low_rank_rows": (_P, _P, _I64, _I64, _I64, _I64, _P, _I32),
    # lowrank_native.c (ops/lowrank_group.py): x, in, out, parts, first, second, ranks, kinds, offsets,
    # rows, y, act_kind, threads
    "deltakit_low_rank_multi": (_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I32, _I32),
    # lowrank_native.c (ops/mixed_shares.py): x, act_kind, n, in, out; the low-rank group's parts, first,
    # second, ranks, kinds, offsets, rows; the sign group's parts, packed, tiles, offsets, rows, scales,
    # lut_min; y, threads
    "deltakit_mixed_shares": (
        _P,
        _I32,
        _I64,
        _I64,
        _I64,
        _I64,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _I64,
        _P,
        _P,
        _P,
        _P,
        _P,
        _I64,
        _P,
        _I32,
    ),
    # signstage_native.c (ops/signstage.py): base, kind, target, kind, n, delta, packed / delta, n, scale, out
    "deltakit_sign_stage": (_P, _I32, _P, _I32, _I64, _P, _P),
    "deltakit_sign_residual": (_P, _I64, ctypes.c_float, _P),
    # pairscan_native.c (ops/finite.py): a, b, kind, n, flags
    "deltakit_scan_pair": (_P, _P, _I32, _I64, _P),
    # dequant_native.c (ops/quant.py): packed, nbytes, bits, lanes, length, group, groups, step, origin,
    # out, lane stride, value stride
    "deltakit_dequantize": (_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _I64),
    # dequant_native.c (ops/quant.py): grouped, lanes, groups, size, length, ratios, step, origin, top,
    # best, codes
    "deltakit_clip_search": (_P, _I64, _I64, _I64, _I64, _I64, _P, _P, ctypes.c_float, _P, _P),
}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _build(target: Path, compiler: str) -> None:
    """Compile the kernel into ``target`` (written under a temporary name, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def native_for(tensors: tuple[torch.Tensor, ...], dtypes) -> ctypes.CDLL | None:
    """The compiled library when every tensor is a contiguous CPU tensor of one of ``dtypes``, else None
    (then the caller's torch form runs)."""
    if not all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in dtypes for t in tensors):
        return None
    return native_library()


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when unavailable (then the torch form is used)."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if (
            os.environ.get("DELTAKIT_NATIVE", "1") == "0"
            or compiler is None
            or not all(p.exists() for p in _SOURCES)
        ):
            return None
        key = hashlib.sha256(
            b"".join(p.read_bytes() for p in _SOURCES)
            + repr((_FLAGS, compiler, platform.machine(), _cpu_flags())).encode()
        ).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"signmm-{key}.so"
        try:
            if not target.exists():
                _build(target, compiler)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError):
            return None
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = ctypes.c_int, list(argtypes)
        _library = lib
        return lib


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds differ per CPU model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def native_applies(x: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether :func:`sign_matmul` takes the C kernel for activations ``x`` and a matrix of ``shape``."""
    return x.device.type == "cpu" and shape[1] % 8 == 0 and native_library() is not None


def reference_sign_matmul(x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``x.float() @ Sᵀ`` with S unpacked to fp32: x (..., in) -> fp32 (..., out) on x's device."""
    signs = unpack_signs(packed, shape, x.device)  # (out, in) fp32
    return x.to(torch.float32) @ signs.T


#: matrix rows per tile of :func:`sign_tiles`
TILE_ROWS = 16


def sign_tiles(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The packed bits of S (out, in), ``in % 8 == 0``, in the tile layout of the few-rows kernel: uint8
    (tiles * in / 8 * 16,), byte ``(b * in / 8 + g) * 16 + j`` = byte g of matrix row ``16 b + j`` (zero past
    the last row). packed is not mutated."""
    out_features, in_features = shape
    groups = in_features // 8
    if in_features % 8 != 0:
        raise ValueError(f"the tile layout needs in_features % 8 == 0, got shape {shape}")
    if packed.dtype != torch.uint8 or packed.numel() < out_features * groups:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a {shape} sign matrix")
    count = -(-out_features // TILE_ROWS)
    padded = torch.zeros(count * TILE_ROWS, groups, dtype=torch.uint8, device=packed.device)
    padded[:out_features] = packed.reshape(-1)[: out_features * groups].view(out_features, groups)
    return padded.view(count, TILE_ROWS, groups).transpose(1, 2).contiguous().view(-1)  # (count, groups, 16)


def sign_matmul(x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``x Sᵀ`` for x (..., in) of any float dtype and packed bits of S (out, in) -> fp32 (..., out).

    x and packed are not mutated. The product is exact up to fp32 summation (x is upcast first).
    """
    out_features, in_features = shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"activations have {x.shape[-1]} features, the sign matrix {shape} wants {in_features}"
        )
    if packed.dtype != torch.uint8 or packed.numel() * 8 < out_features * in_features:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a {shape} sign matrix")
    if not native_applies(x, shape):
        return reference_sign_matmul(x, packed, shape)
    lib = native_library()
    assert lib is not None
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_features).to(torch.float32).contiguous()  # (n, in)
    rows = flat.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if rows >= LUT_MIN_ROWS:
        kernel, bits = lib.deltakit_sign_matmul_lut, packed.contiguous()
    else:
        kernel, bits = lib.deltakit_sign_matmul_tiles, sign_tiles(packed, shape)
    code = kernel(
        flat.data_ptr(),
        rows,
        in_features,
        bits.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"sign kernel failed for shape {shape} (code {code})")
    return y.reshape(*lead, out_features)


class SignGroup:
    """Several packed sign matrices of one shape, each applied to its own rows, in one kernel call.

    packed: per part the packed bits of S_p (out, in); rows: per part the row indices (into the
    flattened activations) it applies to, disjoint; scales: per part α_p; tiles: per part the same bits
    in :func:`sign_tiles` layout when the caller keeps them (else made here for the parts of fewer than
    :data:`LUT_MIN_ROWS` rows, which take the tile form). The tensors are kept (their addresses are
    handed to the kernel). Only for CPU tensors with ``in % 8 == 0`` and the C kernel present
    (:func:`native_applies`).
    """

    def __init__(
        self,
        packed: list[torch.Tensor],
        shape: tuple[int, int],
        rows: list[list[int]],
        scales: list[float],
        tiles: list[torch.Tensor] | None = None,
    ):
        if (
            len(packed) != len(rows)
            or len(rows) != len(scales)
            or (tiles is not None and len(tiles) != len(rows))
        ):
            raise ValueError("a sign group needs as many row lists, scales and tiles as packed matrices")
        needed = (shape[0] * shape[1] + 7) // 8
        for part in packed:  # the kernel reads `needed` bytes of every part: refuse anything shorter
            if part.dtype != torch.uint8 or part.device.type != "cpu" or part.numel() < needed:
                raise ValueError(f"{part.numel()} packed bytes cannot hold a {shape} sign matrix")
        tiled = -(-shape[0] // TILE_ROWS) * TILE_ROWS * (shape[1] // 8)
        for part in tiles or ():
            if part.dtype != torch.uint8 or part.device.type != "cpu" or part.numel() != tiled:
                raise ValueError(f"{part.numel()} tiled bytes do not lay out a {shape} sign matrix")
        if any(i < 0 for r in rows for i in r):
            raise ValueError("sign group rows must be non-negative")
        self.shape = shape
        self.packed = [p.contiguous() for p in packed]
        if tiles is None:
            tiles = [
                sign_tiles(p, shape) if len(r) < LUT_MIN_ROWS else torch.empty(0, dtype=torch.uint8)
                for p, r in zip(self.packed, rows, strict=True)
            ]
        self.tiles = [t.contiguous() for t in tiles]
        self.pointers = torch.tensor([p.data_ptr() for p in self.packed], dtype=torch.int64)
        self.tile_pointers = torch.tensor([t.data_ptr() for t in self.tiles], dtype=torch.int64)
        self.offsets = torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.int64)
        self.rows = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
        self.max_row = max((i for r in rows for i in r), default=-1)
        self.scales = torch.tensor(scales, dtype=torch.float32)
        #: the kernel's arguments that do not change between calls, from the part count to the scales
        #: (``deltakit_mixed_shares`` takes the same run)
        self.parts_args = (
            len(self.packed),
            self.pointers.data_ptr(),
            self.tile_pointers.data_ptr(),
            self.offsets.data_ptr(),
            self.rows.data_ptr(),
            self.scales.data_ptr(),
        )

    def add_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[rows_p] += α_p · x[rows_p] S_pᵀ`` for every part; x (N, in) and y (N, out) contiguous fp32
        CPU tensors (y mutated). Each part's product has the bits of :func:`sign_matmul` on its rows."""
        out_features, in_features = self.shape
        if (
            x.dtype != torch.float32
            or y.dtype != torch.float32
            or not (x.is_contiguous() and y.is_contiguous())
        ):
            raise ValueError("sign group wants contiguous fp32 activations and output")
        if x.shape[-1] != in_features or y.shape[-1] != out_features or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"sign group of {self.shape} got activations {tuple(x.shape)}, output {tuple(y.shape)}"
            )
        if self.max_row >= x.shape[0]:
            raise ValueError(f"sign group rows reach {self.max_row}, activations have {x.shape[0]}")
        lib = native_library()
        if lib is None:
            raise ValueError("the sign kernel is not available")
        code = lib.deltakit_sign_matmul_multi(
            x.data_ptr(),
            in_features,
            out_features,
            *self.parts_args,
            y.data_ptr(),
            LUT_MIN_ROWS,
            torch.get_num_threads(),
        )
        if code != 0:
            raise ValueError(f"sign kernel failed for shape {self.shape} (code {code})")
