"""A least-recently-used cache bounded by bytes (the compressed-delta caches of the runtime)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """``key -> value`` with a byte budget; the least recently used entries are evicted first.

    ``size_of(value)`` gives an entry's bytes. A value larger than the whole budget is not stored
    (:meth:`put` returns False) so one huge delta cannot flush everything else. Thread-safe.
    """

    def __init__(self, limit_bytes: int, size_of: Callable[[V], int]):
        if limit_bytes < 0:
            raise ValueError(f"cache limit must be >= 0 bytes, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self._size_of = size_of
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def get(self, key: str) -> V | None:
        """The value (marked most recently used), or None on a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: V) -> bool:
        """Store ``value``, evicting old entries as needed; False when it exceeds the whole budget."""
        size = self._size_of(value)
        with self._lock:
            self._drop(key)
            if size > self.limit_bytes:
                return False
            while self._bytes + size > self.limit_bytes and self._items:
                old, (_, old_size) = self._items.popitem(last=False)
                self._bytes -= old_size
                self.evictions += 1
            self._items[key] = (value, size)
            self._bytes += size
            return True

    def pop(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]
