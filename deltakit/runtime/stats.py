"""Records of what the runtime did: one :class:`SwapStats` per activation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SwapStats:
    """One activation of a delta (or of the base) in the resident model.

    ``restored_bytes``: pristine base bytes copied into the model (host -> device on CUDA);
    ``delta_bytes``: delta bytes moved to the device (0 on a device-cache hit or on CPU): what the
    prepared delta holds (:attr:`~deltakit.runtime.prepared.PreparedDelta.nbytes`: quantized factors
    travel dequantized too);
    ``written_bytes``: bytes of model parameters overwritten in place;
    ``read_bytes``: compressed delta bytes read from disk by this swap.
    """

    source: str | None  # delta active before (None: the base)
    target: str | None  # delta active after (None: the base)
    seconds: float  # wall time of the whole swap, device synchronised
    load_seconds: float  # reading from disk / cache lookups / host -> device copies of the delta
    apply_seconds: float  # restoring pristine tensors + decoding + writing in place
    tensors: int  # parameters overwritten
    restored_bytes: int
    delta_bytes: int
    written_bytes: int
    host_cache_hit: bool
    device_cache_hit: bool
    device: str
    read_bytes: int = 0  # compressed delta bytes read from disk for this swap (0: cached or prefetched)
    prefetched: bool = False  # the delta had been read ahead by :meth:`HotSwapRuntime.prefetch`

    @property
    def bytes_moved(self) -> int:
        """Bytes copied into the device for this swap (pristine restores + compressed delta)."""
        return self.restored_bytes + self.delta_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_moved": self.bytes_moved}
