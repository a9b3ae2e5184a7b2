"""A DeltaLLM model on disk: write, load (real parameter sharing), export (materialised), describe.

Directory layout::

    deltallm.json          format, plan, parameter counts, the source checkpoint's tensor list
    deltallm.safetensors   every source tensor except the followers' shared matrices, plus
                           ``<follower module>.lora_A`` (out, r) and ``.lora_B`` (r, in)
    training.json          loss curve (when trained)
    model.safetensors.index.json   every stored tensor -> deltallm.safetensors (for transformers' loader)
    modeling_deltakit_deltallm.py  the config/model classes for ``trust_remote_code=True``
    config.json, tokenizer files ...   copied from the source, then sealed (``compressors.hf_config``)

There is deliberately no ``model.safetensors``, and the sealed config makes a plain ``from_pretrained``
refuse instead of silently initialising the followers' missing weights at random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from deltakit.deltallm.modules import DeltaLinear, count_parameters, install_deltas_
from deltakit.deltallm.plan import SharingPlan
from deltakit.errors import FormatError
from deltakit.format.safetensors_io import StreamingSafetensorsWriter, TensorSpec, dtype_from_name, dtype_name
from deltakit.models.checkpoint import CheckpointReader, CheckpointWriter, copy_aux_files

FORMAT = "deltakit.deltallm"
FORMAT_VERSION = 1
META_FILE = "deltallm.json"
TENSOR_FILE = "deltallm.safetensors"
TRAINING_FILE = "training.json"
INDEX_FILE = "model.safetensors.index.json"
OWN_FILES = (
    META_FILE,
    TENSOR_FILE,
    TRAINING_FILE,
    INDEX_FILE,
    "deltakit_model.json",
    "modeling_deltakit_deltallm.py",
)


def follower_weight_names(plan: SharingPlan) -> dict[str, str]:
    """``{follower weight tensor: anchor weight tensor}`` for every shared matrix."""
    return {f"{f}.weight": f"{a}.weight" for f, a in plan.shared_modules()}


def write_compressed(
    output: Path,
    source: CheckpointReader,
    plan: SharingPlan,
    deltas: dict[str, DeltaLinear],
    *,
    dtype: torch.dtype | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write ``output`` (an existing directory): source tensors streamed one at a time, plus the factors.

    dtype: dtype of the stored factors (None: each follower weight's source dtype). deltas are not mutated.
    Returns the metadata written to ``deltallm.json``.
    """
    shared = follower_weight_names(plan)
    missing = [n for n in shared if n not in source]
    if missing:
        raise FormatError(f"{source.path} lacks shared weight(s) {', '.join(missing[:3])}")
    specs: list[TensorSpec] = []
    factor_of: dict[str, torch.Tensor] = {}
    for name in source.names():
        if name in shared:
            continue
        specs.append(source.spec(name))
    for module_name, module in deltas.items():
        fdtype = dtype or source.spec(f"{module_name}.weight").dtype
        for part in ("lora_A", "lora_B"):
            tensor = getattr(module, part).detach().to("cpu", fdtype)
            factor_of[f"{module_name}.{part}"] = tensor
            specs.append(TensorSpec(f"{module_name}.{part}", fdtype, tuple(tensor.shape)))
    with StreamingSafetensorsWriter(
        output / TENSOR_FILE, specs, metadata={"format": "pt"}, digest=False
    ) as writer:
        for spec in specs:
            writer.write(spec.name, factor_of[spec.name] if spec.name in factor_of else source.get(spec.name))
    copy_aux_files([p for p in source.aux_files() if p.name not in OWN_FILES], output)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": plan.to_dict(),
        "params": param_summary(plan),
        "source_tensors": [
            [s.name, dtype_name(s.dtype), list(s.shape)] for s in (source.spec(n) for n in source.names())
        ],
        "tied_embeddings": bool(source.config.get("tie_word_embeddings", False)),
        **extra,
    }
    (output / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def write_weight_index(model_dir: Path) -> None:
    """Write ``model.safetensors.index.json`` mapping every tensor of ``deltallm.safetensors`` to that file.

    transformers' loader finds the stored tensors through it under their own names (nothing is copied).
    """
    model_dir = Path(model_dir)
    with safe_open(str(model_dir / TENSOR_FILE), framework="pt", device="cpu") as fh:
        names = sorted(fh.keys())
    size = (model_dir / TENSOR_FILE).stat().st_size
    index = {"metadata": {"total_size": size}, "weight_map": dict.fromkeys(names, TENSOR_FILE)}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")


def remote_code_plan(model_dir: Path) -> dict[str, Any]:
    """The plan the shipped modeling file needs (``config.json``'s ``deltakit_plan``).

    shared: ``[follower module, anchor module]`` pairs (the follower uses the anchor's weight plus its own
    ``lora_A`` (out, r) @ ``lora_B`` (r, in)); rank: r.
    """
    plan = SharingPlan.from_dict(read_meta(model_dir)["plan"])
    return {"format": FORMAT, "rank": plan.rank, "shared": [list(pair) for pair in plan.shared_modules()]}


def param_summary(plan: SharingPlan) -> dict[str, Any]:
    """Parameter counts before/after and the reduction (elements, tied embeddings counted once)."""
    return {
        "original": plan.total_params,
        "compressed": plan.compressed_params,
        "removed": plan.removed_params(),
        "reduction": round(plan.reduction, 6),
        "delta_factors": plan.delta_params(),
        "shared_matrices": len(plan.anchor_of) * len(plan.kinds),
    }


def read_meta(model_dir: Path | str) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FormatError(f"{model_dir} is not a deltallm model (no {META_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: not a deltallm model (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {meta['format_version']} is newer than this deltakit reads"
        )
    return meta


def load_compressed(
    model_dir: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A transformers causal LM whose followers are :class:`DeltaLinear` sharing their anchor's Parameter.

    dtype: compute dtype (default: the stored dtype of the embedding / first tensor). Eval mode, on ``device``.
    Raises FormatError when stored tensors and the model's do not match exactly.
    """
    import transformers as tf

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    plan = SharingPlan.from_dict(meta["plan"])
    if dtype is None:
        dtype = dtype_from_name(meta["source_tensors"][0][1])
    from deltakit.compressors.hf_config import load_config

    config = load_config(model_dir)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_deltas_(model, plan, init="zeros", dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / TENSOR_FILE), framework="pt", device="cpu") as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            state[name] = fh.get_tensor(name).to(dtype)
    result = model.load_state_dict(state, strict=False)
    expected_missing = set(follower_weight_names(plan))
    if meta.get("tied_embeddings"):
        expected_missing.add("lm_head.weight")
    bad_missing = sorted(set(result.missing_keys) - expected_missing)
    if bad_missing or result.unexpected_keys:
        raise FormatError(
            f"{model_dir}: stored tensors do not fit the model: missing {bad_missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    if meta.get("tied_embeddings"):
        model.tie_weights()
    return model.to(device).eval()


def export_plain(model_dir: Path | str, output: Path, dtype: torch.dtype | None = None) -> None:
    """Write a plain HF checkpoint into ``output`` (existing dir): follower weights = W_anchor + A @ B.

    Merged in fp32, cast to ``dtype`` (default: each tensor's source dtype). Streams one tensor at a time.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    plan = SharingPlan.from_dict(meta["plan"])
    shared = follower_weight_names(plan)
    specs = [TensorSpec(n, dtype or dtype_from_name(d), tuple(s)) for n, d, s in meta["source_tensors"]]
    writer = CheckpointWriter(output, specs)
    with safe_open(str(model_dir / TENSOR_FILE), framework="pt", device="cpu") as fh:
        for spec in specs:
            if spec.name in shared:
                module = spec.name.removesuffix(".weight")
                anchor = fh.get_tensor(shared[spec.name]).float()  # (out, in)
                a = fh.get_tensor(f"{module}.lora_A").float()  # (out, r)
                b = fh.get_tensor(f"{module}.lora_B").float()  # (r, in)
                tensor = (anchor + a @ b).to(spec.dtype)
            else:
                tensor = fh.get_tensor(spec.name).to(spec.dtype)
            writer.write(spec.name, tensor)
    writer.close()
    copy_aux_files(
        [p for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in OWN_FILES], output
    )
    from deltakit.compressors.hf_config import unseal

    unseal(output)
    if dtype is not None and (output / "config.json").is_file():
        config = json.loads((output / "config.json").read_text())
        config["dtype"] = dtype_name(dtype)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def describe_model(model_dir: Path | str) -> dict[str, Any]:
    """The sharing plan and parameter counts of a deltallm directory, for ``deltakit inspect`` (JSON-able).

    Keys: method, layout, share, rank, keep_first, keep_last, groups ([anchor, followers...]), blocks (role per
    block), shared_matrices (kinds), params (original / compressed / removed / reduction / delta_factors),
    file_bytes, training (steps, tokens, final loss, pmr) when trained.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    plan = SharingPlan.from_dict(meta["plan"])
    blocks = [
        {"block": i, "role": plan.role(i), **({"anchor": plan.anchor_of[i]} if i in plan.anchor_of else {})}
        for i in range(plan.num_layers)
    ]
    out: dict[str, Any] = {
        "method": "deltallm",
        "format_version": meta["format_version"],
        "layout": plan.layout,
        "followers_per_anchor": plan.followers_per_anchor,
        "share": plan.share,
        "shared_matrices": list(plan.kinds),
        "rank": plan.rank,
        "keep_first": plan.keep_first,
        "keep_last": plan.keep_last,
        "groups": [g for g in plan.groups if len(g) > 1],
        "blocks": blocks,
        "params": meta["params"],
        "file_bytes": (model_dir / TENSOR_FILE).stat().st_size
        if (model_dir / TENSOR_FILE).is_file()
        else None,
    }
    if meta.get("training"):
        out["training"] = meta["training"]
    return out


def loaded_parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters of a loaded model (shared anchor weights counted once)."""
    return count_parameters(model)


def format_description(desc: dict[str, Any]) -> list[str]:
    """Plain-text lines for a :func:`describe_model` dict (what ``deltakit inspect`` prints; no rich markup)."""
    p = desc["params"]
    lines = [
        f"deltallm v{desc['format_version']}  layout {desc['layout']}"
        + (f" (followers/anchor {desc['followers_per_anchor']})" if desc["layout"] == "sequential" else "")
        + f"  share {desc['share']} ({', '.join(desc['shared_matrices'])})  rank {desc['rank']}",
        f"params {p['original']:,} -> {p['compressed']:,}  (removed {p['removed']:,} = {p['reduction']:.2%}; "
        f"delta factors {p['delta_factors']:,} in {p['shared_matrices']} shared matrices)",
        "groups " + "  ".join(f"[{g[0]}]<-{','.join(map(str, g[1:]))}" for g in desc["groups"]),
        "blocks "
        + " ".join(f"{b['block']}:{b['role'][0].upper()}" for b in desc["blocks"])
        + "   (K kept, A anchor, F follower, I intact)",
    ]
    if desc.get("file_bytes"):
        lines.append(f"stored {desc['file_bytes'] / 2**20:.1f} MiB in {TENSOR_FILE}")
    t = desc.get("training")
    if t:
        lines.append(
            f"trained {t['steps']} steps, {t['tokens']:,} tokens, pmr={t['pmr']}, loss "
            f"{t['first_loss']:.4f} -> {t['final_loss']:.4f}"
        )
    else:
        lines.append("untrained (SVD initialisation only)")
    return lines
