"""lm-evaluation-harness bridge: harness tasks on base + delta, built in memory (no merged checkpoint).

Importing this module registers the harness model type ``deltakit`` (needs ``pip install
'deltakit-llm[harness]'``), so harness code can name it::

    import deltakit.eval.harness  # registers model="deltakit"
    import lm_eval
    lm_eval.simple_evaluate(model="deltakit", model_args="base=models/base,delta=out/chat", tasks=[...])

:func:`run_harness` is the one-call form with local task files (``include_path``), used by
``deltakit eval-harness``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import UsageError
from deltakit.eval.delta_model import load_delta_model

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the harness bridge needs lm-eval: pip install 'deltakit-llm[harness]'") from exc

MODEL_TYPE = "deltakit"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise UsageError(f"dtype={name!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


@register_model(MODEL_TYPE)
class DeltakitLM(HFLM):
    """Harness model ``deltakit``: ``model_args="base=DIR,delta=DIR[,dtype=float32,device=cpu]"``.

    The fine-tune is rebuilt in memory from the base checkpoint and the delta; the tokenizer is the
    base's. Every other HFLM argument (batch_size, max_length, add_bos_token...) passes through.
    """

    def __init__(
        self,
        base: str,
        delta: str | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoTokenizer

        model = load_delta_model(base, delta or None, dtype=parse_dtype(dtype), device=device)
        tok = AutoTokenizer.from_pretrained(tokenizer or base)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)
        self.base_path, self.delta_path = str(base), str(delta) if delta else None


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | os.PathLike[str]]):
    """A harness TaskManager that knows ``tasks``: the local task files alone when they define every one
    (indexing the harness's thousands of built-in tasks takes seconds), else local and built-in tasks."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths or None)


def run_harness(
    base: str | os.PathLike[str],
    delta: str | os.PathLike[str] | None,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run harness ``tasks`` on ``base + delta`` (``delta=None``: the base) and return the harness's results.

    include_path: directories of task YAML files (local tasks, offline); their tasks join the built-ins.
    Returns the dict of :func:`lm_eval.simple_evaluate` (``results[task][metric]``...); with
    ``log_samples`` it also holds the per-document responses under ``samples``.
    """
    from lm_eval import simple_evaluate

    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or ())
    for p in paths:
        if not Path(p).is_dir():
            raise UsageError(f"include_path={str(p)!r} is not a directory of task files")
    manager = task_manager(tasks, paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"unknown harness task(s) {', '.join(unknown)}; add their YAML with include_path=DIR"
        )
    model = DeltakitLM(str(base), str(delta) if delta else None, dtype=dtype, device=device,
                       batch_size=batch_size)  # fmt: skip
    out = simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return dict(out) if out is not None else {}
