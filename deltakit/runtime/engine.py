"""The serving engine: a resident base, its deltas by name, the scheduler, and name resolution.

Models are addressed by name: the base's name, a delta loaded under a name (``--delta NAME=DIR`` or
``load_adapter``), or a registry reference ``name:tag`` (``name`` alone means ``name:latest``). Registry
deltas made from the served base are listed at start and read on first use. Unknown names are errors:
nothing ever falls back to the base or to another delta.

Delta paths given at run time (``load_adapter``) are confined to ``allowed_roots``; a path outside them
and a path that does not exist get the same error, so a client learns nothing about the server's files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import NotFoundError, UsageError
from deltakit.runtime.generate import GenerationRequest
from deltakit.runtime.hotswap import DeltaEntry, HotSwapRuntime
from deltakit.runtime.multidelta import MultiDeltaExecutor
from deltakit.runtime.sampling import SamplingParams
from deltakit.runtime.scheduler import Job, Scheduler

DEFAULT_TAG = "latest"
#: default cap on prompt tokens per request
DEFAULT_MAX_PROMPT_TOKENS = 8192


class ServingEngine:
    """Everything the HTTP server needs, without HTTP. Thread-safe."""

    def __init__(
        self,
        runtime: HotSwapRuntime,
        *,
        base_name: str,
        registry_path: str | Path | None = None,
        max_batch: int = 8,
        sign_cache_bytes: int = 256 << 20,
        allowed_roots: list[str | Path] | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ):
        self.runtime = runtime
        self.base_name = base_name
        self.registry_path = registry_path
        #: directories under which load_adapter may read deltas (resolved, symlinks followed)
        self.allowed_roots: list[Path] = [Path(r).resolve() for r in (allowed_roots or [])]
        if registry_path is not None:
            self.allowed_roots.append(Path(registry_path).resolve())
        self.max_prompt_tokens = max_prompt_tokens
        self.executor = MultiDeltaExecutor(runtime, sign_cache_bytes=sign_cache_bytes)
        self.scheduler = Scheduler(runtime, self.executor, max_batch=max_batch)
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_base(
        cls,
        base: str | Path,
        *,
        registry_path: str | Path | None = None,
        deltas: dict[str, str] | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        host_cache_bytes: int = 4 << 30,
        device_cache_bytes: int = 2 << 30,
        max_batch: int = 8,
        use_registry: bool | None = None,
        allowed_roots: list[str | Path] | None = None,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> ServingEngine:
        """Load base ``base`` (a checkpoint directory, or a registry base name) and its deltas.

        deltas: ``{name: directory or registry ref}`` loaded (and verified) now.
        use_registry: list every registry delta made from this base (default: when a registry is given).
        allowed_roots: directories ``load_adapter`` may read from at run time; None: the registry and
        the delta directories in ``deltas``.
        """
        base_path = Path(base)
        if base_path.is_dir():
            base_dir, base_name = base_path, base_path.name
        else:
            if registry_path is None and not _default_registry_exists():
                raise UsageError(
                    f"{base} is not a model directory, and no registry is configured to resolve it"
                )
            with _open_registry(registry_path) as reg:
                base_dir, base_name = reg.resolve_base(str(base)), str(base)
        runtime = HotSwapRuntime.from_pretrained(
            base_dir,
            device=device,
            dtype=dtype,
            name=base_name,
            host_cache_bytes=host_cache_bytes,
            device_cache_bytes=device_cache_bytes,
        )
        if allowed_roots is None:
            allowed_roots = [p for p in (deltas or {}).values() if Path(p).is_dir()]
        engine = cls(
            runtime,
            base_name=base_name,
            registry_path=registry_path,
            max_batch=max_batch,
            allowed_roots=allowed_roots,
            max_prompt_tokens=max_prompt_tokens,
        )
        if use_registry if use_registry is not None else registry_path is not None:
            engine.add_registry_deltas()
        for name, source in (deltas or {}).items():
            engine.load_adapter(name, source, confine=False)
        return engine

    # -- names ---------------------------------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """The delta name for request field ``model`` (None: the base); NotFoundError when unknown."""
        if model == self.base_name:
            return None
        names = set(self.runtime.names())
        if model in names:
            return model
        alias = self._aliases.get(model)
        if alias in names:
            return alias
        if ":" not in model and f"{model}:{DEFAULT_TAG}" in names:
            return f"{model}:{DEFAULT_TAG}"
        raise NotFoundError(f"The model `{model}` does not exist.")

    def models(self) -> list[dict[str, Any]]:
        """OpenAI model cards: the base, then every delta with the base as ``parent``; no server paths."""
        cards = [
            {
                "id": self.base_name,
                "object": "model",
                "created": 0,
                "owned_by": "deltakit",
                "root": self.base_name,
                "parent": None,
            }
        ]
        for name, entry in sorted(self.runtime.entries.items()):
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "deltakit",
                    "root": name,  # never the server path it was read from
                    "parent": self.base_name,
                    "codec": entry.codec,
                }
            )
        return cards

    # -- loading -------------------------------------------------------------------------------
    def add_registry_deltas(self) -> list[str]:
        """Register (lazily) every registry delta whose base fingerprint is the served base's."""
        added = []
        with _open_registry(self.registry_path) as reg:
            infos = reg.ls()
        for info in infos:
            if info.base_fingerprint != self.runtime.fingerprint or info.ref in self.runtime.entries:
                continue
            loader = _registry_loader(self.registry_path, info.ref)
            self.runtime.add_delta(
                info.ref, loader, base_fingerprint=info.base_fingerprint, codec=info.codec or "?", eager=False
            )
            added.append(info.ref)
        return added

    def load_adapter(self, name: str, source: str | Path, *, confine: bool = True) -> DeltaEntry:
        """Load delta ``name`` from a directory or a registry ref; refused when its base differs.

        confine: a directory must lie under ``allowed_roots`` (after resolving symlinks); outside them
        it is reported exactly like a missing one (NotFoundError). With confine, a source without a path
        separator (and not starting with ``.`` or ``~``) is a registry ref, never a directory.
        """
        if not name or name == self.base_name:
            raise UsageError(f"invalid adapter name {name!r} (it must differ from the base's name)")
        text = str(source)
        if _looks_like_path(text) or (not confine and Path(text).is_dir()):
            path = self._confined(text) if confine else Path(text)
            if not path.is_dir():
                raise NotFoundError(f"no delta directory {text!r} that this server may read")
            return self.runtime.add_delta(name, path)
        if self.registry_path is None and not _default_registry_exists():
            raise NotFoundError(f"no delta directory {text!r} that this server may read")
        with _open_registry(self.registry_path) as reg:
            path = reg.resolve_delta(text)
        return self.runtime.add_delta(name, path)

    def _confined(self, text: str) -> Path:
        """``text`` resolved (symlinks followed) if it lies under an allowed root; NotFoundError if not."""
        try:
            path = Path(text).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            path = None
        if path is None or not any(path == root or path.is_relative_to(root) for root in self.allowed_roots):
            raise NotFoundError(f"no delta directory {text!r} that this server may read")
        return path

    def unload_adapter(self, name: str) -> None:
        self.runtime.remove_delta(name)

    # -- generation ----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.runtime.resident.tokenizer

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, through the tokenizer's chat template (a plain one when it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_prompt(text)

    def submit(
        self,
        model: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Future:
        """Queue one generation; the future gives a :class:`GenerationResult`.

        cancel: set it to stop the generation at its next token (finish reason ``cancelled``).
        """
        delta = self.resolve(model)
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise UsageError(
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most {self.max_prompt_tokens}"
            )
        limit = getattr(self.runtime.model.config, "max_position_embeddings", None)
        if limit is not None and len(prompt_ids) + params.max_tokens > limit:
            raise UsageError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {limit} tokens"
            )
        request = GenerationRequest(prompt_ids, params, on_text, cancel or threading.Event())
        return self.scheduler.submit(Job(delta, request))

    def close(self) -> None:
        self.scheduler.stop()

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def _looks_like_path(text: str) -> bool:
    """Whether a load_adapter source names a file-system path (else it is a registry ref)."""
    return "/" in text or "\\" in text or text.startswith((".", "~"))


def _default_registry_exists() -> bool:
    try:
        from deltakit.registry import default_registry_path

        return Path(default_registry_path()).exists()
    except Exception:
        return False


def _open_registry(path: str | Path | None):
    from deltakit.registry import Registry

    return Registry.open(path, create=False)


def _registry_loader(path: str | Path | None, ref: str) -> Callable[[], Path]:
    """Resolve ``ref`` on first use, with a registry handle opened in the calling thread."""

    def load() -> Path:
        with _open_registry(path) as reg:
            return reg.resolve_delta(ref)

    return load
