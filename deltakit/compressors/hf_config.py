"""The ``config.json`` of a compressed-model directory, sealed so transformers refuses to load it plainly.

A lillama or deltallm directory's weights do not fit the source architecture, and a plain
``AutoModelForCausalLM.from_pretrained`` would build the model with random weights in their place. Sealing
sets ``model_type`` to ``deltakit_<compressor>`` (unknown to transformers, which then raises a clear
error) and keeps the original under ``deltakit_model_type``; :func:`load_config` undoes it for
:func:`deltakit.load_model`, and :func:`unseal` gives exported plain checkpoints their original config.

With a ``plan`` (the compressor's module plan, JSON-able), sealing also ships
``hf_modeling/modeling_deltakit_<compressor>.py`` into the directory and points ``auto_map`` at its config
and model classes: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then builds the
compressed architecture itself, while a load without ``trust_remote_code`` is still refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError, UsageError

CONFIG_FILE = "config.json"
ORIGINAL_KEY = "deltakit_model_type"
PLAN_KEY = "deltakit_plan"
AUTO_MAP_KEY = "auto_map"
MODELING_DIR = Path(__file__).parent / "hf_modeling"
_CLASS_NAMES = {"lillama": "DeltakitLillama", "deltallm": "DeltakitDeltaLLM"}


def modeling_file_name(compressor: str) -> str:
    """Name of the modeling file shipped for ``compressor`` (``modeling_deltakit_<compressor>.py``)."""
    return f"modeling_deltakit_{compressor}.py"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise FormatError(f"{path}: config.json must be an object with a string model_type")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def seal(model_dir: Path, compressor: str, plan: dict[str, Any] | None = None) -> None:
    """Rewrite ``model_dir/config.json`` in place: model_type ``deltakit_<compressor>``, original kept.

    plan: stored under ``deltakit_plan``; with it the compressor's modeling file is copied into
    ``model_dir`` and ``auto_map`` names its classes (the directory loads with ``trust_remote_code=True``).
    """
    path = Path(model_dir) / CONFIG_FILE
    data = _read(path)
    if ORIGINAL_KEY not in data:
        data[ORIGINAL_KEY] = data["model_type"]
    data["model_type"] = f"deltakit_{compressor}"
    if plan is not None:
        if compressor not in _CLASS_NAMES:
            raise UsageError(f"no modeling file ships for compressor {compressor!r}; seal it with plan=None")
        name = modeling_file_name(compressor)
        shutil.copyfile(MODELING_DIR / name, Path(model_dir) / name)
        module, prefix = name.removesuffix(".py"), _CLASS_NAMES[compressor]
        data[PLAN_KEY] = plan
        data[AUTO_MAP_KEY] = {
            "AutoConfig": f"{module}.{prefix}Config",
            "AutoModelForCausalLM": f"{module}.{prefix}ForCausalLM",
        }
    _write(path, data)


def plain_config_dict(model_dir: Path) -> dict[str, Any]:
    """The source model's config as a dict (sealed or not; the plan and ``auto_map`` of a sealed one dropped)."""
    data = _read(Path(model_dir) / CONFIG_FILE)
    original = data.pop(ORIGINAL_KEY, None)
    if original is not None:
        if not isinstance(original, str):
            raise FormatError(f"{model_dir}/{CONFIG_FILE}: {ORIGINAL_KEY} must be a string")
        data["model_type"] = original
        data.pop(PLAN_KEY, None)
        data.pop(AUTO_MAP_KEY, None)
    return data


def load_config(model_dir: Path) -> Any:
    """A transformers ``PretrainedConfig`` of the source architecture from a (sealed) directory."""
    from transformers import AutoConfig

    data = plain_config_dict(model_dir)
    model_type = data.pop("model_type")
    data.pop("transformers_version", None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise FormatError(f"{model_dir}: model_type {model_type!r} unknown to transformers ({exc})") from None


def unseal(model_dir: Path) -> None:
    """Give ``model_dir/config.json`` back its original model_type (no-op on a plain config)."""
    path = Path(model_dir) / CONFIG_FILE
    if path.is_file():
        _write(path, plain_config_dict(model_dir))
