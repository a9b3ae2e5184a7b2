"""A PEFT LoRA adapter as a deltakit delta: merged in memory into the base, then compressed.

The adapter is hostile input: ``adapter_config.json`` is validated field by field (LoRA only, integer
ranks, numeric alphas, no DoRA), only ``adapter_model.safetensors`` is read (``adapter_model.bin`` only
with ``torch.load(weights_only=True)``), every key must be ``base_model.model.<module>.lora_{A,B}.weight``
for a 2-D base weight ``<module>.weight`` with matching shapes. Pattern keys (``rank_pattern``,
``alpha_pattern``) match a module name exactly or as a dotted suffix (no regular expressions).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deltakit.core.compress import compress
from deltakit.errors import FormatError, TensorMismatchError, UsageError
from deltakit.format.delta import Delta
from deltakit.models.checkpoint import open_checkpoint
from deltakit.models.roles import infer_roles

CONFIG_FILE = "adapter_config.json"
_KEY = re.compile(r"base_model\.model\.([A-Za-z0-9_.]+)\.lora_([AB])\.weight")
_MAX_CONFIG_BYTES = 1 << 20


def _number(config: dict, key: str, *, integer: bool) -> float:
    value = config.get(key)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise FormatError(f"{CONFIG_FILE}: {key} must be a positive {'integer' if integer else 'number'}")
    return value


def _pattern(config: dict, key: str, *, integer: bool) -> dict[str, float]:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise FormatError(f"{CONFIG_FILE}: {key} must be an object")
    for name in pattern:
        _number(pattern, name, integer=integer)
    return pattern


def read_config(adapter_dir: Path) -> dict[str, Any]:
    """The validated LoRA fields of ``adapter_dir/adapter_config.json``."""
    path = adapter_dir / CONFIG_FILE
    if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
        raise FormatError(f"{adapter_dir}: no {CONFIG_FILE} (or larger than 1 MiB)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise FormatError(f'{path}: peft_type must be "LORA"')
    if config.get("use_dora"):
        raise FormatError(f"{path}: DoRA adapters (use_dora) are not supported")
    for flag in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(config.get(flag, False), bool):
            raise FormatError(f"{path}: {flag} must be true or false")
    return {
        "r": _number(config, "r", integer=True),
        "lora_alpha": _number(config, "lora_alpha", integer=False),
        "rank_pattern": _pattern(config, "rank_pattern", integer=True),
        "alpha_pattern": _pattern(config, "alpha_pattern", integer=False),
        "fan_in_fan_out": config.get("fan_in_fan_out", False),
        "use_rslora": config.get("use_rslora", False),
    }


def _lookup(pattern: dict[str, float], module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def scaling(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling of ``module``: alpha / r (alpha / √r with rsLoRA)."""
    r = _lookup(config["rank_pattern"], module, config["r"])
    alpha = _lookup(config["alpha_pattern"], module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def read_weights(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": (r, in), "B": (out, r)}}`` from the adapter's weights file."""
    st, binary = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        tensors = load_file(str(st))
    elif binary.is_file():
        tensors = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FormatError(f"{adapter_dir}: no adapter_model.safetensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            unknown.append(str(key))
            continue
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    if unknown:
        raise FormatError(f"adapter holds keys deltakit cannot import: {', '.join(sorted(unknown)[:8])}")
    incomplete = sorted(m for m, pair in modules.items() if set(pair) != {"A", "B"})
    if incomplete or not modules:
        raise FormatError(f"adapter has no complete lora_A/lora_B pairs (incomplete: {incomplete[:8]})")
    return modules


def _merged(base_w: torch.Tensor, pair: dict[str, torch.Tensor], scale: float, layout: str, module: str,
            fan_in_fan_out: bool) -> torch.Tensor:  # fmt: skip
    """fp32 ``base + scale·B·A`` in the base's stored layout; shapes and layout checked."""
    a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)  # (r, in), (out, r)
    if a.shape[0] != b.shape[1]:
        raise TensorMismatchError(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} ranks differ")
    if fan_in_fan_out != (layout == "in_out"):
        raise FormatError(f"{module}: fan_in_fan_out={fan_in_fan_out} does not fit the base layer ({layout})")
    update = b @ a * scale  # (out, in)
    if layout == "in_out":
        update = update.T
    if tuple(update.shape) != tuple(base_w.shape):
        raise TensorMismatchError(f"{module}: LoRA update {list(update.shape)} != base {list(base_w.shape)}")
    return base_w.to(torch.float32) + update


def merged_state(adapter_dir: str | os.PathLike[str], base: Any) -> tuple[dict[str, torch.Tensor], int]:
    """The base's tensors with the adapter merged in (changed tensors in fp32) and the largest rank."""
    adapter_dir = Path(adapter_dir)
    config, modules = read_config(adapter_dir), read_weights(adapter_dir)
    source = open_checkpoint(base)
    names = source.names()
    roles = infer_roles({n: source.spec(n) for n in names})
    missing = sorted(m for m in modules if f"{m}.weight" not in roles or not roles[f"{m}.weight"].is_matrix)
    if missing:
        raise TensorMismatchError(
            f"adapter targets modules without a 2-D base weight: {', '.join(missing[:8])}"
        )
    state = {name: source.get(name) for name in names}
    for module, pair in modules.items():
        name = f"{module}.weight"
        state[name] = _merged(state[name], pair, scaling(config, module), roles[name].layout, module,
                              config["fan_in_fan_out"])  # fmt: skip
    return state, max(int(p["A"].shape[0]) for p in modules.values())


def import_peft(
    adapter_dir: str | os.PathLike[str],
    base: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    method: str | None = None,
    ratio: float | None = None,
    overwrite: bool = False,
    target_name: str | None = None,
) -> Delta:
    """The adapter at ``adapter_dir`` as a delta against checkpoint directory ``base``.

    method None: exact low rank, an ``svd`` delta (exact SVD, float32 factors) at the adapter's largest
    rank, which applies to PEFT's merged model up to fp32 rounding. method M (ratio optional):
    recompress the merged model with codec M. output None keeps the delta in memory.
    """
    if method is None and ratio is not None:
        raise UsageError("ratio= needs method=; the exact import keeps the adapter's ranks")
    state, rank = merged_state(adapter_dir, base)
    name = target_name or Path(adapter_dir).name
    if method is None:
        return compress(
            base, state, output, method="svd", rank=rank, overwrite=overwrite, target_name=name,
            overrides={"svd_method": "exact", "factor_dtype": "float32", "factor_bits": "16"},
        )  # fmt: skip
    return compress(base, state, output, method=method, ratio=ratio, overwrite=overwrite, target_name=name)
