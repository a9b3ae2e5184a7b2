"""Model mode: factorise a model's own Linears, distil block by block, save / load / export the result.

A compressed directory holds the source's ``config.json``, tokenizer and generation files, ``lillama.json``
(the rank of every factorised module) and ``model.safetensors`` whose factorised modules are stored as
``<module>.down.weight`` (r, in) and ``<module>.up.weight`` (out, r) (+ ``up.bias``), in the source dtype.

Memory: the whole model is held on the CPU in fp32 (SmolLM2-135M: 0.5 GB); the compute device holds one
block and its minibatch activations. The block inputs/outputs of every calibration window are kept on the
CPU in fp32: four (windows, seq, hidden) tensors, e.g. 4 × 64k tokens × 576 × 4 B = 0.6 GB for SmolLM2 at
64k tokens, which fits at these sizes (stream them from disk for much larger budgets).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltakit.distill.data import load_tokenizer as load_calibration_tokenizer
from deltakit.errors import FormatError, TensorMismatchError, UsageError
from deltakit.lillama.blocks import block_linears, capture_block_inputs, decoder_layers
from deltakit.lillama.distill import DistillSettings, Progress, distill_blocks
from deltakit.lillama.lowrank import LowRankLinear, set_submodule
from deltakit.lillama.ranks import LinearSpec, allocate_ranks, model_params_after

RANKS_FILE = "lillama.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: files written by us that must not be copied from the source directory
_OWN_FILES = (RANKS_FILE, WEIGHTS_FILE, "deltakit_model.json", "modeling_deltakit_lillama.py")


def quiet_load(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` on the CPU, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_tokenizer(*paths: Path) -> Any:
    """The tokenizer saved in the first of ``paths`` that has one (UsageError naming lillama otherwise)."""
    return load_calibration_tokenizer(*paths, needed_for="lillama")


def source_dtype(model_dir: Path) -> torch.dtype:
    """dtype of the first floating tensor of a checkpoint directory."""
    from deltakit.models.checkpoint import open_checkpoint

    reader = open_checkpoint(model_dir)
    for name in reader.names():
        dtype = reader.spec(name).dtype
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def count_params(model: nn.Module) -> int:
    """Number of parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already skips shared tensors


def linear_specs(model: nn.Module, modules: str) -> list[LinearSpec]:
    """The Linears of the decoder blocks in group ``modules`` (``all``, ``attention``, ``mlp``), in order."""
    prefix, layers = decoder_layers(model)
    specs = []
    for index, block in enumerate(layers):
        for name, linear in block_linears(block, modules):
            specs.append(
                LinearSpec(f"{prefix}.{index}.{name}", index, linear.out_features, linear.in_features)
            )
    return specs


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Too few calibration windows for one minibatch is an error naming the fix."""
    n, seq = windows.shape
    if n < batch_size:
        raise UsageError(
            f"calibration gives {n} window(s) of {seq} tokens ({n * seq} tokens), fewer than one batch of "
            f"{batch_size}; raise tokens= to at least {batch_size * seq} or lower overrides[batch_size]"
        )


def compress_model_dir(
    model_dir: Path,
    output: Path,
    *,
    reduction: float,
    windows: torch.Tensor,
    settings: DistillSettings,
    strategy: str,
    rank_step: int,
    min_rank_ratio: float,
    skip_first: int,
    modules: str,
    distill: bool,
    svd_kwargs: dict[str, Any],
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compress ``model_dir`` into ``output`` (an existing empty directory); returns a JSON-able report.

    windows: (n, seq) int64 calibration tokens. distill=False stops after the SVD initialisation (the
    truncated-SVD baseline at the same ranks).
    """
    started = time.perf_counter()
    check_windows(windows, settings.batch_size)
    dtype = source_dtype(model_dir)
    model = quiet_load(model_dir)
    prefix, layers = decoder_layers(model)
    specs = linear_specs(model, modules)
    total = count_params(model)
    ranks = allocate_ranks(
        specs, total, reduction, strategy=strategy, step=rank_step, min_rank_ratio=min_rank_ratio,
        skip_first=skip_first,
    )  # fmt: skip
    by_layer: dict[int, dict[str, int]] = {}
    for spec in specs:
        if spec.name in ranks:
            local = spec.name.removeprefix(f"{prefix}.{spec.layer}.")
            by_layer.setdefault(spec.layer, {})[local] = ranks[spec.name]

    def make_student(index: int) -> nn.Module:
        student = copy.deepcopy(layers[index])
        for p in student.parameters():
            p.requires_grad_(False)
        for local, rank in by_layer[index].items():
            low_rank = LowRankLinear.from_linear(
                student.get_submodule(local), rank, seed=settings.seed + index, **svd_kwargs
            )
            set_submodule(student, local, low_rank)
        return student

    active = sorted(by_layer)
    reports: list[dict[str, Any]] = []
    if distill:
        hidden, kwargs = capture_block_inputs(model, windows, settings.batch_size)
        students, reports = distill_blocks(
            layers, make_student, active, hidden, kwargs, settings, device, progress=progress
        )
        del hidden
    else:
        students = {i: make_student(i) for i in active}
    for index, student in students.items():
        layers[index] = student
    model.to(dtype)
    save_compressed(model, output, ranks, model_dir)
    after = model_params_after(total, specs, ranks)
    if count_params(model) != after:
        raise AssertionError(f"parameter count {count_params(model)} differs from the plan {after}")
    report = {"params_before": total, "params_after": after, "reduction_target": reduction}
    report.update(reduction=1 - after / total, factorised_modules=len(ranks), blocks_distilled=len(reports))
    report.update(_windows_report(windows), distilled=distill, blocks=reports)
    return {**report, "seconds": round(time.perf_counter() - started, 3)}


def _windows_report(windows: torch.Tensor) -> dict[str, int]:
    """Calibration size as reports show it: windows, window length and tokens."""
    return {
        "calibration_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "calibration_tokens": int(windows.numel()),
    }


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tied.add(name)
        else:
            seen[ptr] = name
    return tied


def save_compressed(model: nn.Module, output: Path, ranks: dict[str, int], source_dir: Path) -> None:
    """Write ``model`` (with its LowRankLinear modules) and its rank table into ``output`` (must exist)."""
    tied = _tied_names(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(output / WEIGHTS_FILE), metadata={"format": "pt", "deltakit": "lillama"})
    (output / RANKS_FILE).write_text(
        json.dumps(
            {
                "format": "deltakit.lillama",
                "format_version": FORMAT_VERSION,
                "ranks": ranks,
                "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
                "tied": sorted(tied),
            },
            indent=1,
        )
        + "\n"
    )
    for file in sorted(Path(source_dir).iterdir()):
        if (
            file.is_file()
            and file.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf")
            and file.name not in _OWN_FILES
            and not file.name.endswith(".index.json")
        ):
            shutil.copyfile(file, output / file.name)


def remote_code_plan(model_dir: Path) -> dict[str, Any]:
    """The plan the shipped modeling file needs (``config.json``'s ``deltakit_plan``): ranks and tied names."""
    table = json.loads((Path(model_dir) / RANKS_FILE).read_text())
    return {"format": "deltakit.lillama", "ranks": dict(table["ranks"]), "tied": list(table.get("tied", []))}


def load_compressed(model_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """A transformers model with :class:`LowRankLinear` modules from a directory written by
    :func:`save_compressed`; weights in their stored dtype, on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM

    from deltakit.compressors.hf_config import load_config

    path = Path(model_dir)
    table = json.loads((path / RANKS_FILE).read_text())
    if table.get("format") != "deltakit.lillama" or table.get("format_version", 0) > FORMAT_VERSION:
        raise FormatError(f"{path / RANKS_FILE}: not a lillama rank table this deltakit reads")
    dtype = getattr(torch, table.get("dtype", "float32"))
    config = load_config(path)
    model = AutoModelForCausalLM.from_config(config)
    for name, rank in table["ranks"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise FormatError(f"{path}: module {name} is {type(linear).__name__}, expected a Linear")
        set_submodule(
            model,
            name,
            LowRankLinear(linear.in_features, linear.out_features, int(rank), bias=linear.bias is not None),
        )
    model.to(dtype)
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = set(table.get("tied", []))
    missing = [m for m in missing if m not in allowed]
    if missing or unexpected:
        raise TensorMismatchError(
            f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if allowed:
        model.tie_weights()
    return model.to(device).eval()


def export_dense(model_dir: Path, output: Path, dtype: torch.dtype | None = None) -> None:
    """Write a plain Hugging Face checkpoint: each low-rank module becomes a Linear with weight up @ down
    (computed in fp32, cast to ``dtype`` or the stored dtype). ``output`` must exist (empty)."""
    model = load_compressed(model_dir)
    target = dtype or next(model.parameters()).dtype
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankLinear):
                dense = nn.Linear(
                    module.in_features, module.out_features, bias=module.up.bias is not None, dtype=target
                )
                dense.weight.copy_(module.dense_weight().to(target))
                if module.up.bias is not None:
                    dense.bias.copy_(module.up.bias.to(target))
                set_submodule(model, name, dense)
    model.to(target)
    model.config.dtype = target
    model.save_pretrained(str(output))
    for file in sorted(Path(model_dir).iterdir()):
        if (
            file.is_file()
            and not (output / file.name).exists()
            and file.suffix != ".safetensors"
            and file.name not in _OWN_FILES
        ):
            shutil.copyfile(file, output / file.name)
