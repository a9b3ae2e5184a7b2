"""GGUF file → plain Hugging Face checkpoint dir (config.json, tokenizer files, model.safetensors).

transformers can read GGUF (it dequantizes every tensor) but refuses to ``save_pretrained`` a model loaded
that way. We use its GGUF reader only for the name mapping and dequantization, build nothing but a model on
the ``meta`` device (for the tensor-name table), and write the tensors ourselves with safetensors.

Llama-family GGUF files store q/k projections permuted for llama.cpp's rotary layout; transformers' reader
undoes that permutation, so the checkpoint written here has the usual Hugging Face layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deltakit.errors import FormatError, TensorMismatchError
from deltakit.eval.models import quiet_transformers
from deltakit.format.safetensors_io import file_sha256
from deltakit.zoo.paths import atomic_dir

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _config_from_gguf(gguf_path: Path, dtype: str):
    """A transformers config built from the GGUF metadata (no quantization_config, ``dtype`` recorded)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(gguf_path))
    except Exception as exc:  # the reader raises ValueError/KeyError/NotImplementedError on odd files
        raise FormatError(f"cannot read GGUF {gguf_path}: {exc}") from exc
    cfg = dict(parsed["config"])
    cfg.pop("quantization_config", None)  # the weights we write are dequantized, dense
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.dtype = dtype
    return config


def _load_quietly(path: Path, skeleton: torch.nn.Module) -> dict:
    """transformers' GGUF reader with its module-level tqdm bar switched off (it ignores logging settings)."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        return gguf_utils.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    finally:
        gguf_utils.tqdm = saved


def read_gguf_tensors(
    gguf_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[object, dict[str, torch.Tensor]]:
    """Dequantize a GGUF file: ``(config, {hf_name: tensor})`` with HF names and layouts, CPU, ``dtype``.

    Tied output weights (``lm_head.weight`` when ``tie_word_embeddings``) are not included, as in HF
    checkpoints. Raises :class:`TensorMismatchError` when tensors the architecture needs are missing.
    """
    from transformers import AutoModelForCausalLM

    path = Path(gguf_path)
    if not path.is_file():
        raise FormatError(f"no GGUF file at {path}")
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), "float32")
    with quiet_transformers():
        config = _config_from_gguf(path, dtype_name)
        with torch.device("meta"):  # only the parameter names are needed, no memory
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = _load_quietly(path, skeleton)
    tensors = {k: v.to(dtype).contiguous() for k, v in parsed["tensors"].items()}
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise TensorMismatchError(f"GGUF {path.name} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    extra = sorted(set(tensors) - expected)
    for name in extra:  # e.g. rope frequency tables llama.cpp keeps; not model parameters
        del tensors[name]
    return config, tensors


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    with_tokenizer: bool = True,
) -> Path:
    """Write ``out_dir`` as a HF checkpoint dir from any GGUF file transformers can read.

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (every tensor cast to ``dtype``; bfloat16 by
    default, what real fleets store), the tokenizer files when ``with_tokenizer``, and ``source.json``
    (the GGUF's name and sha256). The dir is written to a temp dir and renamed, so it appears whole or not
    at all. Returns ``Path(out_dir)``.
    """
    from safetensors.torch import save_file

    src = Path(gguf_path)
    final = Path(out_dir)
    config, tensors = read_gguf_tensors(src, dtype)
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if with_tokenizer:
            from transformers import AutoTokenizer

            try:
                with quiet_transformers():
                    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            except Exception as exc:  # transformers raises many types on tokenizer metadata it cannot map
                raise FormatError(f"cannot build a tokenizer from GGUF {src.name}: {exc}") from exc
            tok.save_pretrained(tmp)
        source = {
            "gguf_file": src.name,
            "gguf_sha256": file_sha256(src),
            "dtype": str(dtype).removeprefix("torch."),
            "note": "weights dequantized from the GGUF (4-bit values for Q4 files), then cast to dtype",
        }
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return final
