"""The single-pass rebuild gives the bits of the reference path (``Codec.reconstruct``) exactly."""

from __future__ import annotations

import math

import pytest
import torch

from deltakit.codecs.base import Budget, EncodeContext
from deltakit.codecs.registry import get_codec, list_codecs
from deltakit.core.rebuild import factored_view, fusable, rebuild
from deltakit.errors import NonFiniteError
from deltakit.ops import fused
from deltakit.ops.fused import fused_rebuild
from deltakit.ops.fused_batch import FusedWrite, batch_job, fused_rebuild_many
from deltakit.ops.threads import torch_threads

SHAPES = [(64, 192), (192, 64), (37, 13), (301, 13), (9, 200), (100, 7)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _encode(codec_name: str, shape: tuple[int, int], dtype: torch.dtype, seed: int = 0):
    codec = get_codec(codec_name)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    target = (base.float() + 0.02 * torch.randn(shape, generator=gen)).to(dtype)
    budget = Budget(ratio=None if codec_name == "bitdelta" else 0.5)
    encoded = codec.encode(base, target, codec.config_class(), EncodeContext(budget=budget, name="w"))
    return codec, base, encoded


@pytest.mark.parametrize("codec_name", ["dqrelo", "bitdelta", "svd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_equals_reference_bit_for_bit(codec_name, dtype, shape):
    codec, base, encoded = _encode(codec_name, shape, dtype)
    reference = codec.reconstruct(encoded, base, dtype)
    view = codec.factored(encoded)
    for tile in (8, 16, 24, None):
        for threads in (1, 2):
            with torch_threads(threads):
                got = fused_rebuild(
                    base, dtype, signs=view.signs, scale=view.scale, up=view.up, down=view.down, tile=tile
                )
            assert got.dtype == dtype
            assert torch.equal(got, reference), (codec_name, shape, dtype, tile, threads)


def test_fused_writes_into_a_wider_parameter_after_rounding_to_the_finetune_dtype():
    """A bf16 fine-tune served in fp32: the value is rounded to bf16 first, as apply + copy_ does."""
    codec, base, encoded = _encode("dqrelo", (40, 24), torch.bfloat16)
    reference = codec.reconstruct(encoded, base, torch.bfloat16).to(torch.float32)
    out = torch.full((40, 24), 7.0)
    got = rebuild(codec, "encoded", torch.bfloat16, encoded.tensors, encoded.params, base, out=out)
    assert got is out and torch.equal(out, reference)


def test_every_fusable_codec_with_a_factored_view_matches_its_reconstruct():
    """Codecs registered by anyone: where the runtime takes the fused path, the bits are the codec's own."""
    checked = 0
    for name in list_codecs():
        codec = get_codec(name)
        if codec.needs_data or not fusable(codec):
            continue
        try:
            codec, base, encoded = _encode(name, (48, 40), torch.bfloat16)
        except Exception:  # codecs that cannot encode this probe have nothing to compare
            continue
        if factored_view(codec, encoded) is None:
            continue
        got = rebuild(codec, "encoded", torch.bfloat16, encoded.tensors, encoded.params, base)
        assert torch.equal(got, codec.reconstruct(encoded, base, torch.bfloat16)), name
        checked += 1
    assert checked >= 3  # dqrelo, bitdelta, svd at least


def test_codecs_with_their_own_reconstruct_are_not_fused():
    assert not fusable(get_codec("lossless"))
    assert fusable(get_codec("dqrelo"))


def test_non_finite_values_are_refused_when_checked():
    codec, base, encoded = _encode("svd", (32, 16), torch.float16)
    view = codec.factored(encoded)
    up = view.up.clone()
    up[20, 0] = float("inf")
    out = torch.empty(32, 16, dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="w9 decodes to NaN or Inf"):
        fused_rebuild(base, torch.float16, up=up, down=view.down, out=out, check_finite=True, name="w9")
    fused_rebuild(base, torch.float16, up=view.up, down=view.down, out=out, check_finite=True)


def test_tiles_must_keep_sign_bytes_aligned():
    codec, base, encoded = _encode("bitdelta", (40, 13), torch.float32)
    view = codec.factored(encoded)
    with pytest.raises(ValueError, match="multiple of 8"):
        fused_rebuild(base, torch.float32, signs=view.signs, scale=view.scale, tile=12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec_name", ["dqrelo", "bitdelta", "svd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_on_cuda_equals_the_cuda_reference(codec_name, dtype):
    codec, base, encoded = _encode(codec_name, (301, 200), dtype)
    base = base.cuda()
    reference = codec.reconstruct(encoded, base, dtype, "cuda")
    got = rebuild(codec, "encoded", dtype, encoded.tensors, encoded.params, base)
    assert got.is_cuda and torch.equal(got, reference)
    out = torch.empty_like(reference)
    rebuild(codec, "encoded", dtype, encoded.tensors, encoded.params, base, out=out)
    assert torch.equal(out, reference)


def test_reused_scratch_buffers_never_leak_between_calls():
    """Tiles reuse per-thread buffers: a call after a larger one, or one with other parts, is still exact."""
    cases = [("svd", (301, 13)), ("bitdelta", (64, 192)), ("dqrelo", (9, 200)), ("svd", (192, 64))]
    encoded = [(_encode(name, shape, torch.bfloat16, seed=i), name) for i, (name, shape) in enumerate(cases)]
    for _ in range(2):
        for (codec, base, enc), name in encoded:
            view = codec.factored(enc)
            got = fused_rebuild(
                base, torch.bfloat16, signs=view.signs, scale=view.scale, up=view.up, down=view.down
            )
            assert torch.equal(got, codec.reconstruct(enc, base, torch.bfloat16)), name


def test_a_float64_base_is_upcast_to_fp32_before_the_sum():
    codec, base, encoded = _encode("dqrelo", (64, 48), torch.float32)
    view = codec.factored(encoded)
    wide = base.double()
    got = fused_rebuild(wide, torch.float32, signs=view.signs, scale=view.scale, up=view.up, down=view.down)
    assert torch.equal(got, codec.reconstruct(encoded, base, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("parts", "factor_dtypes"),
    [
        ("signs", None),
        ("low_rank", (torch.float32, torch.float32)),
        ("both", (torch.float32, torch.float32)),
        ("both", (torch.float16, torch.float16)),  # read as stored, widened inside the kernel
        ("low_rank", (torch.bfloat16, torch.bfloat16)),
        ("both", (torch.float16, torch.float32)),  # mixed: widened before the kernel
    ],
)
def test_compiled_tiles_equal_the_torch_tiles_bit_for_bit(
    monkeypatch, dtype, out_dtype, parts, factor_dtypes
):
    """The C tile kernel (when a compiler exists) against the torch tiles, NaN, Inf and tails included,
    with fp32 and 16-bit factors (the torch tiles widen those to fp32 first)."""
    if fused.native_library() is None:
        pytest.skip("no C compiler: only the torch tiles exist")
    gen = torch.Generator().manual_seed(1)
    rows, cols, rank = 61, 40, 3  # 2440 values: not a multiple of 16, tails on every tile
    base = torch.randn(rows, cols, generator=gen).to(dtype)
    base[3, 5], base[40, 7], base[50, 1] = float("nan"), float("inf"), -float("inf")
    signs = torch.randint(0, 256, (rows * cols // 8,), dtype=torch.uint8, generator=gen)
    up = down = None
    if parts != "signs":
        up = torch.randn(rows, rank, generator=gen).to(factor_dtypes[0])
        down = torch.randn(rank, cols, generator=gen).to(factor_dtypes[1])
    kw = {"signs": signs if parts != "low_rank" else None, "scale": 0.0173, "up": up, "down": down}
    for tile in (8, 24, None):
        native = fused.fused_rebuild(
            base, dtype, out=torch.empty(rows, cols, dtype=out_dtype), tile=tile, **kw
        )
        with monkeypatch.context() as patch:
            patch.setattr(fused, "native_library", lambda: None)
            plain = fused.fused_rebuild(
                base, dtype, out=torch.empty(rows, cols, dtype=out_dtype), tile=tile, **kw
            )
        bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
        assert torch.equal(native.view(bits), plain.view(bits)), (parts, tile)  # NaN bits included
        with pytest.raises(NonFiniteError):
            fused.fused_rebuild(base, dtype, check_finite=True, tile=tile, **kw)


@pytest.mark.parametrize("magnitude", [2.0**-70, 2.0**-63, 2.0**66, 2.0**63.5, 1.0])
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
def test_compiled_low_rank_products_equal_the_torch_tiles_at_any_magnitude(
    monkeypatch, magnitude, factor_dtype
):
    """16-bit factors take fused multiply-adds only while every product is exact in fp32. bf16 factors
    near 2^-70 give products below the normal range (the separate multiply rounds them) and near 2^66
    products that overflow (inf - inf = NaN where a fused multiply-add keeps a finite sum), and near 2^-63
    and 2^63.5 products straddle the limits of the normal range; all must keep the separate operations'
    bits, as must fp16 factors (always in range, subnormal ones included) and
    ordinary values."""
    if fused.native_library() is None:
        pytest.skip("no C compiler: only the torch tiles exist")
    gen = torch.Generator().manual_seed(7)
    rows, cols, rank = 37, 96, 5  # 8-row and 4-row vector blocks and single rows
    base = torch.zeros(rows, cols) if magnitude < 1 else torch.randn(rows, cols, generator=gen)
    # fp16's own extremes (subnormal fp16 values, products near 2^28) stay exact in fp32
    scale = (
        magnitude
        if factor_dtype == torch.bfloat16
        else {2.0**-70: 2.0**-20, 2.0**66: 2.0**13}.get(magnitude, 1.0)
    )
    up = (torch.randn(rows, rank, generator=gen) * scale).to(factor_dtype)
    down = (torch.randn(rank, cols, generator=gen) * scale).to(factor_dtype)
    native = fused.fused_rebuild(base, torch.float32, up=up, down=down)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "native_library", lambda: None)
        plain = fused.fused_rebuild(base, torch.float32, up=up, down=down)
    assert torch.equal(native.view(torch.int32), plain.view(torch.int32))  # NaN bits included
    if magnitude in (2.0**-70, 2.0**-63) and factor_dtype == torch.bfloat16:
        assert (plain != 0).any() and (plain.abs() < 2.0**-126).any()  # subnormal sums were formed
    if magnitude == 2.0**66 and factor_dtype == torch.bfloat16:
        assert plain.isnan().any()  # overflowing products met


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
def test_non_finite_factors_give_the_torch_tiles_bits(monkeypatch, factor_dtype):
    """Factors holding NaN or Inf are not taken as exact products (blocks with them keep the separate
    multiply and add): the compiled rebuild writes the torch tiles' bits, NaN bits included, and a
    checked rebuild refuses them."""
    if fused.native_library() is None:
        pytest.skip("no C compiler: only the torch tiles exist")
    gen = torch.Generator().manual_seed(8)
    rows, cols, rank = 24, 64, 4
    base = torch.randn(rows, cols, generator=gen)
    up = torch.randn(rows, rank, generator=gen).to(factor_dtype)
    down = torch.randn(rank, cols, generator=gen).to(factor_dtype)
    up[3, 1], up[17, 0], down[2, 40] = float("nan"), float("inf"), -float("inf")
    native = fused.fused_rebuild(base, torch.float32, up=up, down=down)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "native_library", lambda: None)
        plain = fused.fused_rebuild(base, torch.float32, up=up, down=down)
    assert plain.isnan().any() and torch.equal(native.view(torch.int32), plain.view(torch.int32))
    with pytest.raises(NonFiniteError):
        fused.fused_rebuild(base, torch.float32, up=up, down=down, check_finite=True)


@pytest.mark.parametrize(
    ("up_shape", "down_shape"),
    [((1, 4), (4, 24)), ((40, 4), (4, 23)), ((40, 4), (3, 24)), ((40, 4, 1), (4, 24))],
)
def test_factors_that_do_not_fit_the_base_are_refused_before_the_kernel(up_shape, down_shape):
    """A hostile delta's factors must never be indexed by the base's shape (out-of-bounds reads)."""
    base = torch.zeros(40, 24)
    with pytest.raises(ValueError, match="do not rebuild a 40x24 matrix"):
        fused_rebuild(base, torch.float32, up=torch.zeros(up_shape), down=torch.zeros(down_shape), name="w")
    with pytest.raises(ValueError, match="come together"):
        fused_rebuild(base, torch.float32, up=torch.zeros(40, 4), name="w")


def test_a_view_whose_factors_do_not_fit_is_one_format_error():
    """A view is refused when it is made; the rebuild checks again (a view bypassing that check)."""
    from deltakit.codecs.base import FactoredView
    from deltakit.errors import FormatError

    codec, base, encoded = _encode("svd", (40, 24), torch.float32)
    with pytest.raises(ValueError, match=r"do not make a \[40, 24\] matrix"):
        FactoredView((40, 24), up=torch.zeros(8, 4), down=torch.zeros(4, 24))
    view = FactoredView((8, 24), up=torch.zeros(8, 4), down=torch.zeros(4, 24))
    object.__setattr__(view, "shape", (40, 24))
    with pytest.raises(FormatError, match="do not rebuild a 40x24 matrix"):
        rebuild(codec, "encoded", torch.float32, encoded.tensors, encoded.params, base, view=view, name="w")


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rank_zero_factors_of_any_width_add_a_zero_product(monkeypatch, factor_dtype):
    """Rank-0 factors (an empty low-rank part) at every factor width add a zero product, as the reference
    sum does: base + signs, and a -0.0 of the base becomes +0.0, on the compiled path (one matrix or in a
    batch) and the torch tiles alike. An empty tensor's address is 0, which the kernel would take for no
    low-rank part at all (the base copied, -0.0 kept)."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(24, 48, generator=gen).bfloat16()
    base[0, :5] = -0.0
    signs = torch.randint(0, 256, (24 * 48 // 8,), dtype=torch.uint8, generator=gen)
    empty = {"up": torch.zeros(24, 0, dtype=factor_dtype), "down": torch.zeros(0, 48, dtype=factor_dtype)}
    plus_zero = (base.float() + 0.0).bfloat16().view(torch.int16)  # (24, 48): -0.0 -> +0.0
    assert not torch.equal(plus_zero, base.view(torch.int16))
    assert torch.equal(fused_rebuild(base, torch.bfloat16, **empty).view(torch.int16), plus_zero)
    write = FusedWrite(
        base, torch.bfloat16, torch.empty_like(base), None, 0.0, empty["up"], empty["down"], "w"
    )
    fused_rebuild_many([write], check_finite=True)
    assert torch.equal(write.out.view(torch.int16), plus_zero)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "native_library", lambda: None)
        assert torch.equal(fused_rebuild(base, torch.bfloat16, **empty).view(torch.int16), plus_zero)
    with_signs = fused_rebuild(base, torch.bfloat16, signs=signs, scale=0.5, **empty)
    assert torch.equal(with_signs, fused_rebuild(base, torch.bfloat16, signs=signs, scale=0.5))


@pytest.mark.parametrize("shape", [(8, 0), (0, 8)])
def test_empty_matrices_rebuild_to_empty_tensors(shape):
    """A matrix with no rows or no columns rebuilds to an empty tensor, checked or not, alone or in a
    batch: no spurious non-finite error, no failed concatenation."""
    rows, cols = shape
    parts = {
        "signs": torch.zeros(0, dtype=torch.uint8),
        "scale": 0.5,
        "up": torch.zeros(rows, 2, dtype=torch.float16),
        "down": torch.zeros(2, cols, dtype=torch.float16),
    }
    base = torch.zeros(shape, dtype=torch.bfloat16)
    for check in (False, True):
        assert fused_rebuild(base, torch.bfloat16, check_finite=check, **parts).shape == shape
    write = FusedWrite(base, torch.bfloat16, torch.empty(shape, dtype=torch.bfloat16), *parts.values(), "w")
    fused_rebuild_many([write], check_finite=True)
    assert write.out.shape == shape


def test_threads_that_end_give_their_kernel_scratch_back():
    """Each thread that runs the compiled rebuild keeps scratch buffers between calls; a thread that ends
    (an apply's worker pool, a server's request thread) gives them back."""
    import threading
    import time

    lib = fused.native_library()
    if lib is None:
        pytest.skip("no C compiler: no compiled kernel, no scratch")
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=gen).bfloat16()
    up, down = torch.randn(64, 4, generator=gen).half(), torch.randn(4, 96, generator=gen).half()
    fused_rebuild(base, torch.bfloat16, up=up, down=down)  # this thread's (and its pool's) scratch
    before = lib.deltakit_scratch_sets()

    def rebuild() -> None:
        fused_rebuild(base, torch.bfloat16, up=up, down=down)

    workers = [threading.Thread(target=rebuild) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert lib.deltakit_scratch_sets() > 0
    deadline = time.monotonic() + 10  # OpenMP's helper threads of an ended thread end a moment later
    while lib.deltakit_scratch_sets() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lib.deltakit_scratch_sets() == before


def _many_writes(seed: int = 0) -> list[FusedWrite]:
    """Matrices of several shapes (tails, single blocks, partial blocks), dtypes and parts, with one the
    compiled batch does not take (an fp16 base: the torch tiles)."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [
        (torch.bfloat16, torch.float16, torch.bfloat16),
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
    ]
    writes = []
    for i, (rows, cols) in enumerate([(61, 40), (8, 16), (200, 96), (17, 24), (576, 192), (3, 8), (300, 64)]):
        for base_dtype, factor_dtype, out_dtype in kinds:
            base = torch.randn(rows, cols, generator=gen).to(base_dtype)
            rank = i % 4 + 1
            has_low, has_signs = i % 3 != 1, i % 3 != 2
            writes.append(
                FusedWrite(
                    base,
                    base_dtype,
                    torch.full((rows, cols), 7.0, dtype=out_dtype),
                    torch.randint(0, 256, (rows * cols // 8 + 1,), dtype=torch.uint8, generator=gen)
                    if has_signs
                    else None,
                    0.013 * (i + 1),
                    torch.randn(rows, rank, generator=gen).to(factor_dtype) if has_low else None,
                    torch.randn(rank, cols, generator=gen).to(factor_dtype) if has_low else None,
                    f"w{i}",
                )
            )
    base = torch.randn(16, 32, generator=gen).half()
    writes.append(
        FusedWrite(
            base,
            torch.float16,
            torch.empty(16, 32, dtype=torch.float16),
            up=torch.randn(16, 2),
            down=torch.randn(2, 32),
            name="fp16",
        )
    )
    return writes


def _one_by_one(write: FusedWrite) -> torch.Tensor:
    return write.rebuild_alone(out=torch.empty_like(write.out))  # fused_rebuild, one matrix per call


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_writes_in_one_call_equal_one_by_one_bit_for_bit(threads):
    """The batch (one compiled call, blocks dealt out between threads by cost) writes each matrix's bits."""
    writes = _many_writes()
    if fused.native_library() is not None:  # all but the fp16 one go through the compiled batch
        assert sum(batch_job(w, w.signs) is not None for w in writes) == len(writes) - 1
    expected = [_one_by_one(w) for w in writes]
    with torch_threads(threads):
        fused_rebuild_many(writes, check_finite=True)
    for write, reference in zip(writes, expected, strict=True):
        assert torch.equal(write.out, reference), write.name


def test_many_writes_check_every_part_before_writing_anything():
    writes = _many_writes()
    bad = writes[6]
    writes[6] = FusedWrite(bad.base, bad.dtype, bad.out, bad.signs, bad.scale, bad.up[:-1], bad.down, "w-bad")
    with pytest.raises(ValueError, match="w-bad: factors up"):
        fused_rebuild_many(writes)
    assert all(bool((w.out == 7.0).all()) for w in writes[:-1])  # nothing was written


def test_many_writes_name_a_non_finite_one():
    writes = _many_writes()
    writes[4].base[2, 3] = float("inf")
    fused_rebuild_many(writes)  # unchecked: written as they decode
    with pytest.raises(NonFiniteError, match=f"{writes[4].name} decodes to NaN or Inf"):
        fused_rebuild_many(writes, check_finite=True)


@pytest.mark.parametrize("method", ["dqrelo", "lossless"])
def test_prepared_rebuilds_finish_in_any_order_with_the_decoders_bits(tmp_path, llama_pair, method):
    """prepare_reconstruct's first step (reads, checks, factor decoding) for every tensor, then the
    arithmetic in reverse order: each result is Decoder.reconstruct's, whichever path it took (fused for
    dqrelo, the codec's own for lossless, the base's tensor for unchanged ones)."""
    import deltakit
    from deltakit.core.decode import Decoder, load_delta
    from deltakit.core.rebuild import prepare_reconstruct
    from deltakit.models.checkpoint import open_checkpoint

    deltakit.compress(llama_pair[0], llama_pair[1], tmp_path / "d", method=method)
    delta = load_delta(tmp_path / "d")
    decoder, base = Decoder.of(delta), open_checkpoint(llama_pair[0])
    names = list(delta.manifest.tensors)
    pending = [prepare_reconstruct(decoder, n, base.get(n), check_finite=True) for n in names]
    finished = {n: finish() for n, finish in reversed(list(zip(names, pending, strict=True)))}
    for name in names:
        assert torch.equal(finished[name], decoder.reconstruct(name, base.get(name))), name


def _quantized_writes(seed: int = 0) -> list[FusedWrite]:
    """Writes whose factors are group-quantized (read as codes by the compiled batch): every width, both
    schemes, group sizes that do and do not divide the lanes, odd row counts (lanes of ``up`` starting
    inside a byte), exact-product and ordinary scales."""
    from deltakit.ops.factors import quantize_factors
    from deltakit.ops.quant import exact_product_bits, quantize

    gen = torch.Generator().manual_seed(seed)
    writes = []
    cases = [(61, 40, 4, 64, "symmetric", True), (8, 16, 2, 3, "symmetric", True), (200, 96, 3, 32, "symmetric", True),
             (17, 24, 8, 5, "symmetric", False), (576, 192, 4, 64, "symmetric", False), (33, 50, 4, 7, "asymmetric", False),
             (300, 64, 2, 64, "asymmetric", False)]  # fmt: skip
    for i, (rows, cols, bits, group, scheme, exact) in enumerate(cases):
        rank = i % 5 + 1
        up, down = torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen)
        if scheme == "symmetric":
            scale_bits = exact_product_bits(bits) if exact else 11
            q = quantize_factors(up, down, bits, group, scale_bits=scale_bits)
            pair = (q.up, q.down)
        else:
            pair = (quantize(up, bits, group, 0, scheme), quantize(down, bits, group, 1, scheme))
        for base_dtype, out_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]:
            base = torch.randn(rows, cols, generator=gen).to(base_dtype)
            signs = torch.randint(0, 256, ((rows * cols + 7) // 8,), dtype=torch.uint8, generator=gen)
            out = torch.full((rows, cols), 7.0, dtype=out_dtype)
            writes.append(
                FusedWrite(
                    base, base_dtype, out, signs if i % 2 else None, 0.01, name=f"q{i}", quantized=pair
                )
            )
    return writes


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_quantized_factors_read_as_codes_give_the_dequantized_factors_bits(threads):
    """The compiled batch decodes the codes itself (no fp32 copies): the bits of the same write with the
    factors dequantized first, through the torch tiles."""
    writes = _quantized_writes()
    if fused.native_library() is not None:
        assert all(batch_job(w, w.signs) is not None for w in writes)  # every one read as codes
    expected = []
    for write in writes:
        up, down = write.factors()
        plain = FusedWrite(
            write.base, write.dtype, torch.empty_like(write.out), write.signs, write.scale, up, down
        )
        with torch_threads(1):
            expected.append(fused.fused_rebuild(plain.base, plain.dtype, signs=plain.signs, scale=plain.scale,
                                                up=up, down=down, out=plain.out, tile=8))  # fmt: skip
    with torch_threads(threads):
        fused_rebuild_many(writes, check_finite=True)
    for write, reference in zip(writes, expected, strict=True):
        assert torch.equal(write.out, reference), write.name


def test_quantized_factors_that_do_not_fit_are_refused_before_writing():
    writes = _quantized_writes()
    q_up, q_down = writes[4].quantized
    writes[4] = FusedWrite(
        writes[4].base, writes[4].dtype, writes[4].out, name="q-bad", quantized=(q_down, q_up)
    )
    with pytest.raises(ValueError, match="q-bad: factors up"):
        fused_rebuild_many(writes)
    assert all(bool((w.out == 7.0).all()) for w in writes)


def test_views_of_quantized_factors_hold_codes_only():
    """A codec's view of 4-bit factors keeps the stored codes; up and down dequantize on access."""
    codec, base, encoded = _encode("svd", (64, 48), torch.float32)
    view = codec.factored(encoded)
    assert view.quantized is not None and view.float_factors == (None, None) and view.has_low_rank
    up, down = view.up, view.down
    assert (
        up.dtype == torch.float32
        and tuple(up.shape) == (64, view.rank)
        and tuple(down.shape) == (view.rank, 48)
    )
    assert up is not view.up  # a new tensor each time: nothing fp32 is held


def test_finite_rows_match_the_conversions_at_the_range_edges():
    """_finite_rows decides rows within both dtypes' largest finite value without converting them: the
    same verdicts as rounding each (min, max) to the fine-tune dtype and then to the written one."""
    from deltakit.ops.fused_batch import _finite_rows

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    edges = [
        0.0,
        1.0,
        65280.0,
        65281.0,
        65504.0,
        65519.0,
        65520.0,
        3.3895e38,
        3.4e38,
        float("inf"),
        float("nan"),
    ]
    for dtype in (f16, bf16, f32):  # each largest value and the fp32 values around it
        top = torch.tensor(torch.finfo(dtype).max, dtype=f32)
        for toward in (0.0, math.inf):
            edges.append(torch.nextafter(top, torch.tensor(toward)).item())
    rows, dtypes = [], []
    for pair in [(a, b) for a in (f16, bf16, f32) for b in (f16, bf16, f32)]:
        for high in edges:
            for low in (-1.0, -high):
                rows.append([low, high])
                dtypes.append(pair)
    extremes = torch.tensor(rows, dtype=torch.float32)
    want = [bool(torch.isfinite(extremes[i].to(pair[0]).to(pair[1])).all()) for i, pair in enumerate(dtypes)]
    assert _finite_rows(extremes, dtypes) == want
    assert True in want and False in want
