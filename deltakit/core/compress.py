"""Streaming compression of a fine-tune into a delta against its base.

Tensors are read one pair at a time; each changed matrix is encoded by the chosen codec, vectors
(norms, biases) and tensors the base lacks are stored exactly, identical tensors cost nothing. On the
CPU, as many tensors as torch has threads (at most 8) are encoded side by side, each at one
thread, so the delta's bytes do not depend on the thread count. Peak memory is a tensor pair and the
codec's work per worker, plus one output shard.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.base import Budget, Codec, CodecConfig, EncodeContext, Encoded
from deltakit.codecs.registry import get_codec
from deltakit.core import activations
from deltakit.core import allocation as alloc
from deltakit.core.decode import load_delta
from deltakit.core.device import resolve_device
from deltakit.core.options import CompressOptions, build_config
from deltakit.core.refine import Refinement
from deltakit.errors import BudgetError, NonFiniteError, TensorMismatchError, UsageError
from deltakit.format.atomic import atomic_directory
from deltakit.format.delta import Delta, ShardWriter, fp16_delta_bytes, write_manifest
from deltakit.format.digest_cache import SourceDigests
from deltakit.format.fingerprint import FingerprintBuilder
from deltakit.format.manifest import (
    ENCODED,
    PASSTHROUGH,
    UNCHANGED,
    AuxFile,
    CodecInfo,
    FileEntry,
    Manifest,
    ModelIdentity,
    TensorEntry,
)
from deltakit.format.safetensors_io import dtype_name, file_sha256
from deltakit.models.checkpoint import CheckpointReader, TensorSource, open_checkpoint
from deltakit.models.roles import TensorRole, infer_roles
from deltakit.ops.finite import all_finite, scan_pair
from deltakit.ops.threads import one_thread_on_cpu
from deltakit.ops.workers import cpu_workers, ordered_map, tensor_bytes

__all__ = ["CompressOptions", "build_config", "compress"]


def compress(
    base: str | Path | dict[str, torch.Tensor] | TensorSource,
    target: str | Path | dict[str, torch.Tensor] | TensorSource,
    output: str | Path | None = None,
    *,
    options: CompressOptions | None = None,
    **changes: Any,
) -> Delta:
    """Compress ``target`` (a fine-tune) against ``base`` into a delta.

    base, target: checkpoint directories, in-memory state dicts, or tensor sources; never mutated.
    output: delta directory to write atomically; ``None`` keeps the delta in memory.
    options: a :class:`CompressOptions`; keywords (``method=``, ``ratio=``, ``rank=``, ``config=``,
    ``overrides=``, ``device=``, ``seed=`` ...) replace its fields.
    Returns the :class:`Delta` (backed by ``output`` when given). To shrink a model's own weights (no
    base) use :func:`deltakit.compress_model`.
    """
    opts = CompressOptions.build(options, **changes)
    if base is None:
        raise UsageError(
            "compress makes a delta and needs a base; to shrink a model's own weights call "
            f"deltakit.compress_model(model, output, method={opts.method!r}, reduction=...)"
        )
    codec = get_codec(opts.method)
    calibration = opts.calibration(codec.needs_data)
    if opts.reduction is not None:
        raise UsageError(
            "reduction= applies to model compression (compress_model); for deltas give ratio= or rank="
        )
    cfg = build_config(codec, opts.config, opts.overrides)
    planned = opts.size_target()
    budget = Budget(ratio=opts.ratio, rank=opts.rank)
    codec.check_budget(budget)
    if opts.ratio is None and opts.rank is None and codec.default_ratio is not None:
        budget = Budget(ratio=codec.default_ratio)
    dev = resolve_device(opts.device)
    base_src, target_src = open_checkpoint(base), open_checkpoint(target)
    refinement = Refinement.of(opts, codec, cfg, base_src, target_src, dev)
    plan = _plan(codec, cfg, base_src, target_src, opts, dev) if planned else None
    if plan is not None:
        budget = plan.budget
    prepared = codec.prepare(base_src, target_src, cfg, budget, calibration, dev, opts.seed, opts.progress)
    builder = _DeltaBuilder(codec, cfg, budget, dev, opts, prepared, plan, refinement)
    if output is None:
        return builder.run(base_src, target_src, None)
    inputs = (getattr(base_src, "path", None), getattr(target_src, "path", None))
    with atomic_directory(output, overwrite=opts.overwrite, inputs=inputs) as tmp:
        builder.run(base_src, target_src, tmp)
    return load_delta(output, verify=False)


def _plan(
    codec: Codec,
    cfg: CodecConfig,
    base_src: TensorSource,
    target_src: TensorSource,
    opts: CompressOptions,
    dev: torch.device,
) -> alloc.Plan:
    """First pass for a size target: survey the tensors, then plan the bytes (uniform or rd).

    With ``weight_allocation`` (rd only), each matrix's error is weighted by its layer's input energy on
    ``data`` through the base model (:mod:`deltakit.core.activations`); otherwise ``data`` is left to the
    codec and to scale refinement (data-free codecs do not read it)."""
    if codec.default_ratio is None and codec.ratio_range is None:
        raise BudgetError(f"{codec.name} has no size budget; size= and bits_per_weight= do not apply")
    mode = opts.allocation
    if mode is None:
        mode = "rd" if codec.allocatable else "uniform"
    workers = encode_workers(codec, dev)
    with encode_threads(dev):
        found = alloc.survey(
            codec, cfg, base_src, target_src, opts.exclude_roles, dev, spectra=mode == "rd", workers=workers
        )
    if not found.shapes:
        return alloc.Plan(Budget(ratio=opts.ratio) if opts.ratio else Budget(), {}, {}, 0, mode)
    target = alloc.coded_target(found, size=opts.size, bits_per_weight=opts.bits_per_weight, ratio=opts.ratio)
    weighting = None
    calibration = opts.allocation_weighting(mode)
    if calibration is not None:
        weighting = activations.calibration_weighting(
            base_src, target_src, calibration, list(found.shapes), dev
        )
    with encode_threads(dev):
        if mode == "rd":
            return alloc.plan_rd(codec, cfg, found, target, weighting)
        return alloc.plan_uniform(codec, cfg, found, target)


def _non_finite(name: str, which: str) -> NonFiniteError:
    return NonFiniteError(f"{which} tensor {name} contains NaN or Inf")


def _model_name(source: TensorSource, given: str | None) -> str:
    if given:
        return given
    path = getattr(source, "path", None)
    return Path(path).name if path is not None else "in-memory"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _DeltaBuilder:
    """Builds one delta: a tensor entry per fine-tune tensor, stored tensors in shards or in memory."""

    def __init__(
        self,
        codec: Codec,
        cfg: CodecConfig,
        budget: Budget,
        dev: torch.device,
        opts: CompressOptions,
        prepared: Any,
        plan: alloc.Plan | None = None,
        refinement: Refinement | None = None,
    ):
        self.codec, self.cfg, self.budget, self.dev, self.opts, self.prepared = (
            codec,
            cfg,
            budget,
            dev,
            opts,
            prepared,
        )
        self.plan, self.refinement = plan, refinement
        self.memory: dict[str, torch.Tensor] = {}
        self.shards: ShardWriter | None = None
        self.tensors: dict[str, TensorEntry] = {}
        self.stats = dict.fromkeys(
            (
                "encoded_bytes",
                "param_bytes",
                "fp16_delta_bytes",
                "passthrough_bytes",
                "encoded_tensors",
                "unchanged_tensors",
                "passthrough_tensors",
            ),
            0,
        )

    def store(self, key: str, tensor: torch.Tensor) -> str | None:
        """Queue a stored tensor; returns its shard (None in memory)."""
        if self.shards is None:
            self.memory[key] = tensor.detach().cpu().contiguous()
            return None
        return self.shards.add(key, tensor)

    def exact(self, entry: TensorEntry, name: str, t: torch.Tensor, in_base: bool) -> TensorEntry:
        """Record ``t`` as a passthrough tensor stored bit for bit."""
        entry.kind, entry.in_base, entry.value = PASSTHROUGH, in_base, name
        entry.shard = self.store(name, t)
        self.stats["passthrough_bytes"] += _nbytes(t)
        self.stats["passthrough_tensors"] += 1
        return entry

    def compute(self, item: tuple[str, torch.Tensor, torch.Tensor | None, TensorRole]) -> _Work:
        """The kind decision for one tensor and, for a changed matrix, its encoding (on a worker thread).

        item: (name, fine-tuned tensor, base tensor or None, role); the tensors are not mutated."""
        name, t, b, role = item
        if b is None:
            if not all_finite(t):
                raise _non_finite(name, "fine-tuned")
            return _Work(PASSTHROUGH)
        finite_t, finite_b, equal = scan_pair(t, b)  # one pass over the pair
        if not finite_t:
            raise _non_finite(name, "fine-tuned")
        if not finite_b:
            raise _non_finite(name, "base")
        kind, grown = alloc.classify(t, b, role, self.opts.exclude_roles, equal=equal)
        if tuple(b.shape) != tuple(t.shape) and not grown:
            raise TensorMismatchError(
                f"tensor {name}: base shape {list(b.shape)} and fine-tune shape {list(t.shape)} differ "
                "(only embedding/lm_head rows may grow)"
            )
        if kind != ENCODED:
            return _Work(kind, grown)
        shared = t[: b.shape[0]] if grown else t  # (base rows, cols)
        budget = self.plan.per_tensor.get(name, self.budget) if self.plan is not None else self.budget
        ctx = EncodeContext(
            budget=budget, device=self.dev, seed=self.opts.seed, name=name, prepared=self.prepared
        )
        actual = None
        with encode_threads(self.dev):
            encoded = self.codec.encode(b, shared, self.cfg, ctx)
            if self.plan is not None and name in self.plan.info:
                delta = shared.to(torch.float32) - b.to(torch.float32)
                actual = alloc.relative_error(delta, self.codec.decode(encoded, "cpu", base=b))
        return _Work(ENCODED, grown, encoded, actual)

    def record(self, name: str, t: torch.Tensor, b: torch.Tensor | None, role: TensorRole, work: _Work):
        """The manifest entry of one computed tensor; its stored tensors queued in order (caller's thread)."""
        entry = TensorEntry(kind=UNCHANGED, dtype=dtype_name(t.dtype), shape=list(t.shape), role=role.role)
        if role.role == "linear" and role.layout != "out_in":
            entry.layout = role.layout
        if work.kind == UNCHANGED:
            self.stats["unchanged_tensors"] += 1
            return entry
        if work.kind == PASSTHROUGH:
            return self.exact(entry, name, t, in_base=b is not None)
        encoded = work.encoded
        entry.kind, entry.params = ENCODED, encoded.params
        if work.actual_error is not None:
            entry.params = {
                **encoded.params,
                "allocation": {**self.plan.info[name], "actual_error": work.actual_error},
            }
        for local, tensor in encoded.tensors.items():
            entry.stored[local] = key = f"{name}::{local}"
            entry.shard = self.store(key, tensor)
            self.stats["encoded_bytes"] += _nbytes(tensor)
        self.stats["param_bytes"] += 4 * sum(1 for v in encoded.params.values() if isinstance(v, float))
        self.stats["fp16_delta_bytes"] += fp16_delta_bytes(tuple(b.shape))
        if work.grown:
            entry.base_shape = list(b.shape)
            entry.extra_rows = f"{name}::extra_rows"
            entry.shard = self.store(entry.extra_rows, t[b.shape[0] :])
            self.stats["passthrough_bytes"] += _nbytes(t[b.shape[0] :])
        self.stats["encoded_tensors"] += 1
        return entry

    def run(self, base_src: TensorSource, target_src: TensorSource, out_dir: Path | None) -> Delta:
        """Walk the fine-tune's tensors (then the removed base ones) and write the delta to ``out_dir``.

        Tensors are read, fingerprinted and recorded in order in this thread; :meth:`compute` runs on
        :func:`encode_workers` threads, so the delta is the same for any worker count."""
        progress = self.opts.progress
        self.shards = ShardWriter(out_dir, self.opts.max_shard_bytes) if out_dir is not None else None
        base_names, target_names = base_src.names(), target_src.names()
        base_set, target_set = set(base_names), set(target_names)
        roles = infer_roles({n: target_src.spec(n) for n in target_names})
        # checkpoints read before are not hashed again
        base_fp, target_fp = (
            FingerprintBuilder(SourceDigests.of(base_src)),
            FingerprintBuilder(SourceDigests.of(target_src)),
        )
        removed = [n for n in base_names if n not in target_set]
        total = len(target_names) + len(removed)

        def read(name: str) -> tuple[str, torch.Tensor, torch.Tensor | None, TensorRole]:
            t = target_src.get(name)
            target_fp.add_later(name, t)
            b = base_src.get(name) if name in base_set else None
            if b is not None:
                base_fp.add_later(name, b)
            return name, t, b, roles[name]

        def compute(item):
            return item, self.compute(item)

        workers = encode_workers(self.codec, self.dev)
        items = (read(name) for name in target_names)
        for index, (item, work) in enumerate(ordered_map(compute, items, workers, cost=tensor_bytes)):
            name, t, b, role = item
            if progress is not None:
                progress(index, total, name)
            self.tensors[name] = self.record(name, t, b, role, work)
            if self.shards is not None and self.refinement is None:
                self.shards.maybe_flush()  # a refined delta stays queued until its scales are fitted
        for offset, name in enumerate(removed):
            if progress is not None:
                progress(len(target_names) + offset, total, name)
            base_fp.add_later(name, base_src.get(name))
        if progress is not None:
            progress(total, total, "")
        manifest = self.manifest(base_src, target_src, base_fp, target_fp, removed)
        return self.finish(manifest, base_src, target_src, out_dir)

    def manifest(self, base_src, target_src, base_fp, target_fp, removed: list[str]) -> Manifest:
        stats = self.stats
        coded = stats["encoded_bytes"] + stats["param_bytes"]
        stats["ratio"] = coded / stats["fp16_delta_bytes"] if stats["fp16_delta_bytes"] else None
        stats["stored_bytes"] = coded + stats["passthrough_bytes"]
        if self.plan is not None:
            _check_target(self.plan, coded, self.opts)
            stats["allocation"] = self.plan.allocation
            if self.plan.weighting is not None:
                stats["allocation_weighting"] = self.plan.weighting.source
                stats["calibration_tokens"] = self.plan.weighting.tokens
            stats["target_bytes"] = self.plan.target_bytes + (
                stats["passthrough_bytes"] if self.opts.size else 0
            )
        codec = self.codec
        return Manifest(
            codec=CodecInfo(codec.name, codec.version, dataclasses.asdict(self.cfg), self.budget.to_dict()),
            base=ModelIdentity(_model_name(base_src, self.opts.base_name), base_fp.fingerprint()),
            target=ModelIdentity(_model_name(target_src, self.opts.target_name), target_fp.fingerprint()),
            tensors=self.tensors,
            removed=removed,
            stats=stats,
        )

    def finish(self, manifest: Manifest, base_src, target_src, out_dir: Path | None) -> Delta:
        """Refine the scales (when asked, on the tensors still queued), flush the shards and write the
        manifest last."""
        if self.shards is None or out_dir is None:
            delta = Delta(manifest, None, self.memory)
            if self.refinement is not None:
                self.refinement.run(delta, base_src, self.opts.progress)
            return delta
        if self.refinement is not None:  # on the queued tensors: refinement may rewrite stored scales
            self.refinement.run(Delta(manifest, None, self.shards.buffered), base_src, self.opts.progress)
        self.shards.flush()
        manifest.files = dict(self.shards.files)
        manifest.aux_files = _aux_files(base_src, target_src, out_dir, manifest.files)
        write_manifest(out_dir, manifest)
        return Delta(manifest, out_dir)


def _check_target(plan: alloc.Plan, coded: int, opts: CompressOptions) -> None:
    """The planned bytes are exact; a delta over its target is refused rather than written."""
    if plan.per_tensor and coded > plan.target_bytes:
        raise BudgetError(
            f"the encoded matrices take {coded} bytes, over the {plan.target_bytes} bytes planned for them"
        )


def _aux_files(
    base_src: TensorSource, target_src: TensorSource, out_dir: Path, files: dict[str, FileEntry]
) -> dict[str, AuxFile]:
    """Record the fine-tune's config/tokenizer files: same bytes as the base's, or copied into extra/.

    Only the allowlisted plain files :meth:`CheckpointReader.aux_files` returns are considered.
    """
    if not isinstance(target_src, CheckpointReader):
        return {}
    aux: dict[str, AuxFile] = {}
    base_dir = base_src.path if isinstance(base_src, CheckpointReader) else None
    for file in target_src.aux_files():
        digest, size = file_sha256(file), file.stat().st_size
        twin = base_dir / file.name if base_dir is not None else None
        if twin is not None and twin.is_file() and file_sha256(twin) == digest:
            aux[file.name] = AuxFile("base", digest, size)
        else:
            rel = f"extra/{file.name}"
            (out_dir / "extra").mkdir(exist_ok=True)
            shutil.copyfile(file, out_dir / rel)
            files[rel] = FileEntry(digest, size)
            aux[file.name] = AuxFile("delta", digest, size, rel)
    return aux


@dataclasses.dataclass
class _Work:
    """What a worker decided for one tensor: its kind and, for a changed matrix, the codec's output and
    (under a size plan) the relative error it reached."""

    kind: str
    grown: bool = False
    encoded: Encoded | None = None
    actual_error: float | None = None


def encode_workers(codec: Codec, device: torch.device) -> int:
    """Tensors encoded side by side: :func:`~deltakit.ops.workers.cpu_workers` (each worker runs at one
    thread, which keeps the bytes thread-independent), or one for a codec that does not allow concurrent
    encode calls."""
    return cpu_workers(device) if codec.concurrent_encode else 1


def encode_threads(device: torch.device):
    """One intra-op thread for a codec's numerics on the CPU, so the stored bytes (and a delta's content
    address) do not depend on the thread count: parallel reductions and BLAS kernels sum in an order that
    changes with it. Fleet compression runs one worker per core instead (``deltakit compress-fleet``)."""
    return one_thread_on_cpu(device)
