"""The serving runtime: a resident base with hot-swapped deltas, multi-delta batches, and the server.

>>> from deltakit.runtime import HotSwapRuntime
>>> rt = HotSwapRuntime.from_pretrained("models/base")
>>> rt.add_delta("chat", "deltas/chat")
>>> stats = rt.activate("chat")          # in place, bit-exact with deltakit.apply
>>> rt.activate(None)                    # back to the base, bit-exact

Imports are lazy so ``import deltakit.runtime`` stays cheap; the server needs fastapi + uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HotSwapRuntime": "deltakit.runtime.hotswap",
    "DeltaEntry": "deltakit.runtime.hotswap",
    "ResidentModel": "deltakit.runtime.resident",
    "SwapStats": "deltakit.runtime.stats",
    "ByteLRU": "deltakit.runtime.lru",
    "PreparedDelta": "deltakit.runtime.prepared",
    "MultiDeltaExecutor": "deltakit.runtime.multidelta",
    "SamplingParams": "deltakit.runtime.sampling",
    "GenerationRequest": "deltakit.runtime.generate",
    "GenerationResult": "deltakit.runtime.generate",
    "generate": "deltakit.runtime.generate",
    "Scheduler": "deltakit.runtime.scheduler",
    "ServingEngine": "deltakit.runtime.engine",
    "create_app": "deltakit.runtime.server",
    "ServerLimits": "deltakit.runtime.server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltakit.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
