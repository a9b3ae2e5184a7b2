"""The deltakit cache root: compiled kernels, tensor digests and the real fleet live below it."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "DELTAKIT_CACHE"


def cache_dir() -> Path:
    """``$DELTAKIT_CACHE`` if set, else ``platformdirs.user_cache_dir("deltakit")`` (not created here)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("deltakit"))
