"""Streaming compression of a fine-tune into a delta against its base.

Tensors are read one pair at a time; each changed matrix is encoded by the chosen codec, vectors
(norms, biases) and tensors the base lacks are stored exactly, identical tensors cost nothing. Peak
memory is one tensor pair plus the codec's work and one output shard.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.base import Budget, Calibration, CodecConfig, EncodeContext
from deltakit.codecs.registry import get_codec
from deltakit.core.device import resolve_device
from deltakit.errors import NonFiniteError, TensorMismatchError, UsageError
from deltakit.format.atomic import atomic_directory
from deltakit.format.delta import Delta, ShardWriter, fp16_delta_bytes, write_manifest
from deltakit.format.fingerprint import FingerprintBuilder
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED, CodecInfo, Manifest, ModelIdentity
from deltakit.format.safetensors_io import dtype_name, file_sha256
from deltakit.models.checkpoint import CheckpointReader, TensorSource, open_checkpoint
from deltakit.models.roles import EMBEDDING, LM_HEAD, infer_roles

Progress = Callable[[int, int, str], None]
#: matrix roles encoded by the codec by default; other matrices are encoded too unless excluded
DEFAULT_MATRIX_ROLES = ("linear", "embedding", "lm_head", "other")


def build_config(
    codec, config: CodecConfig | dict[str, Any] | None, overrides: dict[str, str] | None
) -> CodecConfig:
    """The codec's config from defaults, a dict or config object, then ``--set`` string overrides."""
    if config is None:
        cfg = codec.config_class()
    elif isinstance(config, CodecConfig):
        if not isinstance(config, codec.config_class):
            raise UsageError(f"config {type(config).__name__} does not belong to codec {codec.name}")
        cfg = config
    else:
        cfg = codec.config_class.from_dict(dict(config))
    cfg.validate()
    return cfg.with_overrides(overrides) if overrides else cfg


def _check_finite(name: str, tensor: torch.Tensor, which: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{which} tensor {name} contains NaN or Inf")


def _model_name(source: TensorSource, given: str | None) -> str:
    if given:
        return given
    path = getattr(source, "path", None)
    return Path(path).name if path is not None else "in-memory"


def compress(
    base: str | Path | dict[str, torch.Tensor] | TensorSource | None,
    target: str | Path | dict[str, torch.Tensor] | TensorSource,
    output: str | Path | None = None,
    *,
    data: list[str | Path] | tuple[str | Path, ...] | None = None,
    tokens: int = 65536,
    seq_len: int = 256,
    reduction: float | None = None,
    method: str = "dqrelo",
    ratio: float | None = None,
    rank: int | None = None,
    config: CodecConfig | dict[str, Any] | None = None,
    overrides: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    base_name: str | None = None,
    target_name: str | None = None,
    exclude_roles: tuple[str, ...] = (),
    overwrite: bool = False,
    max_shard_bytes: int = 1 << 30,
    progress: Progress | None = None,
) -> Delta:
    """Compress ``target`` (a fine-tune) against ``base`` with codec ``method``.

    base, target: checkpoint directories, in-memory state dicts, or tensor sources; never mutated.
    output: delta directory to write atomically; ``None`` keeps the delta in memory.
    ratio / rank: size budget (fraction of the fp16 delta, or a fixed rank); default: the codec's.
    exclude_roles: matrix roles (``embedding``, ``lm_head``, ``linear``, ``other``) stored exactly
    instead of encoded.
    data, tokens, seq_len: calibration text for data-aware codecs (files, directories, JSONL).
    base=None compresses ``target``'s own weights with a codec that supports it (``reduction``: the
    fraction of parameters to remove); see :func:`deltakit.core.model_mode.compress_model`.
    Returns the :class:`Delta` (backed by ``output`` when given).
    """
    codec = get_codec(method)
    calibration = None
    if codec.needs_data:
        if not data:
            raise UsageError(
                f"method {method!r} needs calibration data: pass --data FILE_OR_DIR (text or JSONL)"
            )
        calibration = Calibration(tuple(str(d) for d in data), tokens=tokens, seq_len=seq_len, seed=seed)
    if base is None:
        from deltakit.core.model_mode import compress_model

        if output is None:
            raise UsageError("compressing a model (no --base) needs an output directory")
        return compress_model(
            target,
            output,
            method=method,
            reduction=reduction,
            calibration=calibration,
            config=config,
            overrides=overrides,
            device=device,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        )
    if reduction is not None:
        raise UsageError(
            "--reduction applies to model compression (no --base); for deltas use --ratio or --rank"
        )
    cfg = build_config(codec, config, overrides)
    budget = Budget(ratio=ratio, rank=rank)
    codec.check_budget(budget)
    if ratio is None and rank is None and codec.default_ratio is not None:
        budget = Budget(ratio=codec.default_ratio)
    dev = resolve_device(device)
    base_src, target_src = open_checkpoint(base), open_checkpoint(target)
    codec.prepare(base_src, target_src, cfg, budget, calibration, dev, seed, progress)

    run = functools.partial(
        _compress_into,
        codec=codec,
        cfg=cfg,
        budget=budget,
        dev=dev,
        seed=seed,
        base_src=base_src,
        target_src=target_src,
        base_name=base_name,
        target_name=target_name,
        exclude_roles=exclude_roles,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    if output is None:
        return run(None)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        run(tmp)
    from deltakit.format.delta import load_delta

    return load_delta(output, verify=False)


def _compress_into(
    out_dir: Path | None,
    codec,
    cfg: CodecConfig,
    budget: Budget,
    dev: torch.device,
    seed: int,
    base_src: TensorSource,
    target_src: TensorSource,
    base_name: str | None,
    target_name: str | None,
    exclude_roles: tuple[str, ...],
    max_shard_bytes: int,
    progress: Progress | None,
) -> Delta:
    base_names = base_src.names()
    base_set = set(base_names)
    target_names = target_src.names()
    target_specs = {n: target_src.spec(n) for n in target_names}
    roles = infer_roles(target_specs)
    base_fp, target_fp = FingerprintBuilder(), FingerprintBuilder()
    memory: dict[str, torch.Tensor] = {}
    shards = ShardWriter(out_dir, max_shard_bytes) if out_dir is not None else None

    def store(key: str, tensor: torch.Tensor) -> str | None:
        if shards is None:
            memory[key] = tensor.detach().cpu().contiguous()
            return None
        return shards.add(key, tensor)

    tensors: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    stats = {
        "encoded_bytes": 0,
        "param_bytes": 0,
        "fp16_delta_bytes": 0,
        "passthrough_bytes": 0,
        "encoded_tensors": 0,
        "unchanged_tensors": 0,
        "passthrough_tensors": 0,
    }

    def store_exact(entry: dict[str, Any], name: str, t: torch.Tensor, in_base: bool) -> dict[str, Any]:
        """Record ``t`` as a passthrough tensor stored bit for bit."""
        entry.update(kind=PASSTHROUGH, in_base=in_base, stored={"value": name}, shard=store(name, t))
        stats["passthrough_bytes"] += t.numel() * t.element_size()
        stats["passthrough_tensors"] += 1
        return entry

    total = len(target_names) + len(base_set - set(target_names))

    for index, name in enumerate(target_names):
        if progress is not None:
            progress(index, total, name)
        t = target_src.get(name)
        _check_finite(name, t, "fine-tuned")
        target_fp.add(name, t)
        role = roles[name]
        entry: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "role": role.role}
        if role.role == "linear" and role.layout != "out_in":
            entry["layout"] = role.layout
        if name not in base_set:
            tensors[name] = store_exact(entry, name, t, in_base=False)
            continue
        b = base_src.get(name)
        _check_finite(name, b, "base")
        base_fp.add(name, b)
        same_shape = tuple(b.shape) == tuple(t.shape)
        if same_shape and b.dtype == t.dtype and torch.equal(b, t):
            entry["kind"] = UNCHANGED
            stats["unchanged_tensors"] += 1
            tensors[name] = entry
            continue
        grown = (
            not same_shape
            and t.ndim == 2
            and b.ndim == 2
            and t.shape[1] == b.shape[1]
            and t.shape[0] > b.shape[0]
            and role.role in (EMBEDDING, LM_HEAD)
        )
        if not same_shape and not grown:
            raise TensorMismatchError(
                f"tensor {name}: base shape {list(b.shape)} and fine-tune shape {list(t.shape)} differ "
                "(only embedding/lm_head rows may grow)"
            )
        if t.ndim != 2 or not t.is_floating_point() or role.role in exclude_roles:
            tensors[name] = store_exact(entry, name, t, in_base=True)
            continue
        shared = t[: b.shape[0]] if grown else t  # (base rows, cols)
        ctx = EncodeContext(budget=budget, device=dev, seed=seed, name=name)
        encoded = codec.encode(b, shared, cfg, ctx)
        stored_keys: dict[str, str] = {}
        shard = None
        for local, tensor in encoded.tensors.items():
            key = f"{name}::{local}"
            shard = store(key, tensor)
            stored_keys[local] = key
            stats["encoded_bytes"] += tensor.numel() * tensor.element_size()
        stats["param_bytes"] += 4 * sum(1 for v in encoded.params.values() if isinstance(v, float))
        stats["fp16_delta_bytes"] += fp16_delta_bytes(tuple(b.shape))
        groups[name] = {"members": [name], "params": encoded.params, "stored": stored_keys, "shard": shard}
        entry.update(kind=ENCODED, group=name)
        if grown:
            entry["base_shape"] = list(b.shape)
            extra_key = f"{name}::extra_rows"
            entry["stored"] = {"extra_rows": extra_key}
            entry["shard"] = store(extra_key, t[b.shape[0] :])
            stats["passthrough_bytes"] += t[b.shape[0] :].numel() * t.element_size()
        tensors[name] = entry
        stats["encoded_tensors"] += 1
        if shards is not None:
            shards.maybe_flush()

    removed = [n for n in base_names if n not in target_specs]
    for offset, name in enumerate(removed):
        if progress is not None:
            progress(len(target_names) + offset, total, name)
        base_fp.add(name, base_src.get(name))
    if progress is not None:
        progress(total, total, "")

    coded = stats["encoded_bytes"] + stats["param_bytes"]
    stats["ratio"] = coded / stats["fp16_delta_bytes"] if stats["fp16_delta_bytes"] else None
    stats["stored_bytes"] = coded + stats["passthrough_bytes"]
    manifest = Manifest(
        codec=CodecInfo(codec.name, codec.version, dataclasses.asdict(cfg), budget.to_dict()),
        base=ModelIdentity(_model_name(base_src, base_name), base_fp.fingerprint()),
        target=ModelIdentity(_model_name(target_src, target_name), target_fp.fingerprint()),
        tensors=tensors,
        groups=groups,
        removed=removed,
        stats=stats,
    )
    if shards is None:
        return Delta(manifest, None, memory)
    shards.flush()
    manifest.files = dict(shards.files)
    manifest.aux_files = _aux_files(base_src, target_src, out_dir, manifest.files)
    write_manifest(out_dir, manifest)
    return Delta(manifest, out_dir)


def _aux_files(base_src: TensorSource, target_src: TensorSource, out_dir: Path, files: dict) -> dict:
    """Record the fine-tune's config/tokenizer files: same bytes as the base's, or copied into extra/."""
    if not isinstance(target_src, CheckpointReader):
        return {}
    aux: dict[str, dict[str, Any]] = {}
    base_dir = base_src.path if isinstance(base_src, CheckpointReader) else None
    for file in target_src.aux_files():
        digest = file_sha256(file)
        entry = {"sha256": digest, "size": file.stat().st_size}
        twin = base_dir / file.name if base_dir is not None else None
        if twin is not None and twin.is_file() and file_sha256(twin) == digest:
            aux[file.name] = {"source": "base", **entry}
        else:
            rel = f"extra/{file.name}"
            (out_dir / "extra").mkdir(exist_ok=True)
            shutil.copyfile(file, out_dir / rel)
            files[rel] = dict(entry)
            aux[file.name] = {"source": "delta", "path": rel, **entry}
    return aux
