"""Applying a delta to its base: one implementation for every codec.

Each output tensor is rebuilt from the matching base tensor (``base + decode(delta)`` in fp32, cast
to the target dtype, unless the codec restores exact bits) and streamed to the output shards, so peak
memory is about one tensor pair per worker. On the CPU, tensors are rebuilt on as many threads as torch
has (one torch thread each; the bits do not depend on it) while this thread writes them in order. The base's fingerprint is computed on the way; a mismatch aborts
the run (the atomic output is discarded) unless ``force`` is set. The output's fingerprint is computed
when it can tell something: when the delta can restore the fine-tune exactly, or when asked.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltakit.core.decode import Decoder, codec_for, load_delta
from deltakit.core.device import resolve_device
from deltakit.core.rebuild import prepare_reconstruct
from deltakit.errors import (
    BaseMismatchError,
    FormatError,
    IntegrityError,
    TensorMismatchError,
    UsageError,
)
from deltakit.format import fingerprint
from deltakit.format.atomic import atomic_directory
from deltakit.format.delta import BackgroundCheck, Delta
from deltakit.format.digest_cache import SourceDigests
from deltakit.format.fingerprint import FingerprintBuilder
from deltakit.format.manifest import ENCODED, UNCHANGED, Manifest
from deltakit.format.paths import check_aux_name, confined
from deltakit.format.safetensors_io import TensorSpec, dtype_from_name, file_sha256
from deltakit.models.checkpoint import CheckpointReader, CheckpointWriter, TensorSource, open_checkpoint
from deltakit.ops.workers import cpu_workers, ordered_map

Progress = Callable[[int, int, str], None]


@dataclass
class ApplyReport:
    """What :func:`apply` did. ``state_dict`` is set when no output directory was given."""

    output: Path | None
    base_fingerprint: str
    #: None when the output was not hashed (see ``fingerprint_output`` of :func:`apply`)
    output_fingerprint: str | None
    #: whether the output is bit for bit the fine-tune the delta was made from; None: not checked
    matches_target: bool | None
    tensors: int
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def expected_base_names(delta: Delta) -> set[str]:
    names = {n for n, e in delta.manifest.tensors.items() if e.needs_base}
    return names | set(delta.manifest.removed)


def check_base_keys(delta: Delta, base: TensorSource) -> None:
    """Missing or extra base tensors are errors naming the first few of each."""
    expected = expected_base_names(delta)
    present = set(base.names())
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensor(s) the delta expects (e.g. {', '.join(missing[:3])})"
            )
        if extra:
            parts.append(f"has {len(extra)} tensor(s) the delta does not know (e.g. {', '.join(extra[:3])})")
        raise TensorMismatchError(f"base model {'; '.join(parts)}: is this the base the delta was made from?")


def apply(
    base: str | Path | dict[str, torch.Tensor] | TensorSource,
    delta: str | Path | Delta,
    output: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_bytes: int = 5 * 1024**3,
    sync: bool = True,
    fingerprint_output: bool | None = None,
    progress: Progress | None = None,
) -> ApplyReport:
    """Rebuild the fine-tune from ``base`` and ``delta``.

    base: checkpoint directory, state dict or tensor source (not mutated).
    delta: delta directory (hashes checked when ``verify``) or a :class:`Delta`.
    output: directory for a Hugging Face checkpoint (written atomically, config and tokenizer files
    included); ``None`` returns the tensors in ``ApplyReport.state_dict`` (tensors the delta leaves
    unchanged may share storage with an in-memory base: clone before editing them in place).
    dtype: cast floating tensors of the output (default: the fine-tune's dtypes).
    force: apply even when the base fingerprint differs from the one recorded in the delta.
    sync: return only once ``output`` is on disk (fsync); ``False`` leaves the disk writes to the kernel,
    which is faster but an OS crash or power loss soon after can leave the output incomplete, and with
    ``overwrite`` lose the output it replaced (other processes still see a whole output or none).
    fingerprint_output: hash the output and compare its fingerprint with the fine-tune's
    (``matches_target``). None (default): only when the delta can restore the fine-tune exactly (an
    exact codec such as ``lossless``, or no encoded tensor); a lossy codec's output then reports
    ``output_fingerprint=None`` and ``matches_target=None``, and apply does not spend the sha256 pass
    over every output byte (about a seventh of its time on SmolLM2, docs/speed.md). The base's
    fingerprint is always checked.

    A delta directory's file sizes are checked first. On the CPU its sha256s are checked on a background
    thread while the tensors are rebuilt: the output is committed (or returned) only once they match,
    and a mismatch is the error raised, whatever else the damaged bytes caused first. On CUDA they are
    checked before anything is decoded (a damaged index could trip a device-side assert, which leaves
    the process's CUDA context unusable).
    """
    out_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating dtype, got {dtype}")
    dev = resolve_device(device)
    check: BackgroundCheck | None = None
    if not isinstance(delta, Delta):
        beside = verify and dev.type == "cpu"
        delta = load_delta(delta, verify=verify and not beside)
        if beside:
            check = BackgroundCheck(delta.path, delta.manifest)
    try:
        if fingerprint_output is None:
            fingerprint_output = can_restore_exactly(delta)
        options = _Options(out_dtype, dev, force, overwrite, max_shard_bytes, sync, fingerprint_output)
        return _apply_verified(delta, base, output, options, progress, check)
    except Exception as exc:
        # a damaged file is the cause to report, whatever error its bytes caused first; a usage error is
        # the caller's and does not wait for the check
        failed = check.failure() if check is not None and not isinstance(exc, UsageError) else None
        if isinstance(failed, IntegrityError) and failed is not exc:
            raise failed from exc
        raise
    finally:
        if check is not None:
            check.cancel()  # no-op once done; stops the hashing after an interrupt


def can_restore_exactly(delta: Delta) -> bool:
    """Whether ``delta`` can rebuild its fine-tune bit for bit: its codec is exact (``max_error`` 0,
    e.g. ``lossless``) or it encodes no tensor (every tensor unchanged or stored as it is)."""
    if all(entry.kind != ENCODED for entry in delta.manifest.tensors.values()):
        return True
    return codec_for(delta.manifest).max_error == 0.0


@dataclass(frozen=True)
class _Options:
    """:func:`apply`'s settings, checked."""

    out_dtype: torch.dtype | None
    device: torch.device
    force: bool
    overwrite: bool
    max_shard_bytes: int
    sync: bool
    fingerprint_output: bool


def _apply_verified(
    delta: Delta,
    base: str | Path | dict[str, torch.Tensor] | TensorSource,
    output: str | Path | None,
    options: _Options,
    progress: Progress | None,
    check: BackgroundCheck | None,
) -> ApplyReport:
    """:func:`apply` once the delta is open; ``check``: its sha256 check, taken before anything is
    committed or returned."""
    base_src = open_checkpoint(base)
    check_base_keys(delta, base_src)

    specs = []
    for name, entry in delta.manifest.tensors.items():
        tdtype = dtype_from_name(entry.dtype)
        if options.out_dtype is not None and tdtype.is_floating_point:
            tdtype = options.out_dtype
        specs.append(TensorSpec(name, tdtype, tuple(entry.shape)))

    if output is None:
        state: dict[str, torch.Tensor] = {}
        report = _apply_into(delta, base_src, specs, options, progress, state.__setitem__)
        if check is not None:
            check.result()
        report.state_dict = state
        return report
    inputs = (getattr(base_src, "path", None), delta.path)
    with atomic_directory(output, overwrite=options.overwrite, inputs=inputs, sync=options.sync) as tmp:
        writer = CheckpointWriter(tmp, specs, options.max_shard_bytes, writeback=options.sync)
        report = _apply_into(delta, base_src, specs, options, progress, writer.write)
        writer.close()
        _copy_aux(delta, base_src, tmp)
        if check is not None:
            check.result()  # inside the block: a mismatch discards the output
    report.output = Path(output)
    return report


def _apply_into(
    delta: Delta,
    base_src: TensorSource,
    specs: list[TensorSpec],
    options: _Options,
    progress: Progress | None,
    sink: Callable[[str, torch.Tensor], None],
) -> ApplyReport:
    dev, hash_output = options.device, options.fingerprint_output
    base_fp = FingerprintBuilder(SourceDigests.of(base_src))  # a base read before is not hashed again
    out_fp = FingerprintBuilder()
    manifest = delta.manifest
    decoder = Decoder.of(delta)
    total = len(specs) + len(manifest.removed)
    base_names = set(base_src.names())
    one_at_a_time = threading.Lock()

    def read(spec: TensorSpec) -> tuple[TensorSpec, torch.Tensor | None]:
        return spec, base_src.get(spec.name) if spec.name in base_names else None

    def as_base(spec: TensorSpec) -> bool:
        """Whether the output tensor is the base's bytes (its digest is then the base's)."""
        return manifest.tensors[spec.name].kind == UNCHANGED and spec.dtype == base_src.spec(spec.name).dtype

    def rebuild(item: tuple[TensorSpec, torch.Tensor | None]) -> tuple[torch.Tensor, str | None, str | None]:
        """The output tensor, its digest (None: the base's, or the output is not hashed) and the base
        tensor's (None: no base tensor; remembered ones are taken as they are). Both are hashed here, on
        the worker, right after the rebuild has read the one and written the other: from the core's cache
        sha256 runs about 1.6x as fast as from memory on the development machine."""
        # the small steps before the arithmetic run one worker at a time (see prepare_reconstruct)
        spec, base_tensor = item
        with one_at_a_time:
            finish = prepare_reconstruct(decoder, spec.name, base_tensor, dev, check_finite=True)
        rebuilt = finish().to(spec.dtype).cpu()
        base_digest = None
        if base_tensor is not None:
            base_digest = base_fp.remembered(spec.name) or fingerprint.tensor_digest(spec.name, base_tensor)
        hashed = hash_output and not as_base(spec)
        return rebuilt, fingerprint.tensor_digest(spec.name, rebuilt) if hashed else None, base_digest

    def held_bytes(item: tuple[TensorSpec, torch.Tensor | None]) -> int:
        """What a queued tensor holds until it is written: the base tensor read and the rebuilt one."""
        return item[0].nbytes + (item[1].nbytes if item[1] is not None else 0)

    workers = cpu_workers(dev)
    items = (read(spec) for spec in specs)
    base_named = []  # tensors written with the base's bytes: their digest is the base's
    for index, (spec, (rebuilt, digest, base_digest)) in enumerate(
        zip(specs, ordered_map(rebuild, items, workers, cost=held_bytes), strict=True)
    ):
        if progress is not None:
            progress(index, total, spec.name)
        if base_digest is not None:
            base_fp.add_digest(spec.name, base_digest)
        if digest is not None:
            out_fp.add_digest(spec.name, digest)
        elif hash_output:
            base_named.append(spec.name)
        sink(spec.name, rebuilt)
    for offset, name in enumerate(manifest.removed):
        if progress is not None:
            progress(len(specs) + offset, total, name)
        base_fp.add_later(name, base_src.get(name))
    if progress is not None:
        progress(total, total, "")
    base_fingerprint = base_fp.fingerprint()
    _check_base_fingerprint(base_fingerprint, manifest, options.force)
    if not hash_output:
        return ApplyReport(None, base_fingerprint, None, None, len(specs))
    for name in base_named:
        out_fp.add_digest(name, base_fp.digest(name))
    output_fingerprint = out_fp.fingerprint()
    return ApplyReport(
        None,
        base_fingerprint,
        output_fingerprint,
        output_fingerprint == manifest.target.fingerprint,
        len(specs),
    )


def _check_base_fingerprint(base_fingerprint: str, manifest: Manifest, force: bool) -> None:
    """BaseMismatchError when the base is not the one the delta was made from (a warning with force)."""
    if base_fingerprint == manifest.base.fingerprint:
        return
    message = (
        f"base fingerprint {base_fingerprint[:19]}… differs from the one the delta was made from "
        f"({manifest.base.fingerprint[:19]}…, {manifest.base.name!r})"
    )
    if not force:
        raise BaseMismatchError(message + "; pass force=True to apply anyway")
    warnings.warn(message + "; applying anyway (force=True)", stacklevel=4)


def _copy_aux(delta: Delta, base_src: TensorSource, out_dir: Path) -> None:
    """Copy the fine-tune's config/tokenizer files: from the delta (checked) or the base.

    Names are allowlisted plain names (the manifest refuses others); a copy from the delta is read only
    from a plain file inside the delta directory and must match its recorded sha256. The base is the
    caller's own directory: its files may be links (a Hugging Face cache snapshot).
    """
    base_dir = base_src.path if isinstance(base_src, CheckpointReader) else None
    for name, entry in delta.manifest.aux_files.items():
        target = out_dir / check_aux_name(name)
        if entry.source == "delta" and entry.path is not None:
            if delta.path is None:
                raise FormatError(f"aux file {name}: an in-memory delta holds no files")
            source = confined(delta.path, entry.path)
            if not source.is_file():
                raise FormatError(f"{delta.path}: aux file {entry.path} is missing")
            shutil.copyfile(source, target)
            if file_sha256(target) != entry.sha256:
                raise IntegrityError(f"{delta.path}: aux file {entry.path} does not match its sha256")
            continue
        source = base_dir / name if base_dir is not None else None
        if source is None or not source.is_file():
            warnings.warn(f"base has no {name}; the output lacks it", stacklevel=3)
            continue
        shutil.copyfile(source, target)
        if file_sha256(target) != entry.sha256:
            warnings.warn(f"{name} in the base differs from the fine-tune's; copied the base's", stacklevel=3)
