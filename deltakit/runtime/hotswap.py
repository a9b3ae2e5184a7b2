"""Hot-swapping deltas in a resident base model, in place and bit-exact.

Activating delta D writes, for every parameter D touches, ``cast(pristine + decode(D))`` (fp32 sum, the
same arithmetic as :func:`deltakit.apply`) into ``param.data``; parameters the previous delta touched
and D does not are restored from their pristine copy. Returning to the base restores pristine copies,
so no rounding accumulates. Compressed deltas are cached twice, bounded by bytes: on the host (read
from disk once; pinned on CUDA) and on the device (decoding happens there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.codecs.base import Codec
from deltakit.core.rebuild import fused_batch, fused_write, rebuild
from deltakit.errors import (
    BaseMismatchError,
    DeltakitError,
    FormatError,
    NonFiniteError,
    NotFoundError,
    TensorMismatchError,
    UsageError,
)
from deltakit.format.delta import Delta, read_delta
from deltakit.format.manifest import Manifest
from deltakit.ops.finite import all_finite
from deltakit.ops.fused_batch import FusedBatch
from deltakit.runtime.lru import ByteLRU
from deltakit.runtime.prefetch import Prefetcher
from deltakit.runtime.prepared import PreparedDelta, TensorOp, prepare_delta
from deltakit.runtime.resident import ResidentModel
from deltakit.runtime.stats import SwapStats

DeltaSource = Path | Callable[[], Path]
log = logging.getLogger(__name__)


@dataclass
class DeltaEntry:
    """A registered delta: where to (re)load it from and what its manifest says."""

    name: str
    source: DeltaSource
    base_fingerprint: str
    codec: str
    path: Path | None = None  # set once the source has been resolved
    stored_bytes: int | None = None
    delta: Delta | None = None  # in-memory deltas (no directory to reload from)
    validated: bool = False  # every tensor decoded once onto the served base without error
    verify: bool = True  # check the files' sha256s at every read of the directory
    #: the manifest of the first read: a read after the delta left the caches must find the same one
    manifest: Manifest | None = None

    def resolve_path(self) -> Path:
        if self.path is None:
            self.path = Path(self.source() if callable(self.source) else self.source)
        return self.path


def restores_exact_bits(codec: Codec) -> bool:
    """Whether ``codec`` restores the exact bits of the fine-tune's dtype (it declares ``max_error = 0``):
    the served parameter must then have that dtype."""
    return codec.max_error == 0.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, DeltakitError) else f"{type(exc).__name__}: {text}"


def _swap_error(name: str | None, back: str | None, exc: Exception) -> DeltakitError:
    """The one-line error of a failed swap; keeps the class (and exit code) of deltakit errors."""
    where = "the base" if back is None else f"delta {back!r}"
    message = (
        f"swap to {'the base' if name is None else repr(name)} failed ({_one_line(exc)}); serving {where}"
    )
    if isinstance(exc, DeltakitError):
        try:
            return type(exc)(message)
        except TypeError:
            return DeltakitError(message)
    return FormatError(message)


def check_rebuilt(
    delta: str, canonical: str, value: torch.Tensor, param: torch.Tensor, *, finite: bool = True
) -> None:
    """Refuse a rebuilt tensor that cannot replace ``param`` as is: another shape (no broadcasting), a
    non-float dtype for a float parameter, and with ``finite`` NaN or Inf (NonFiniteError)."""
    if tuple(value.shape) != tuple(param.shape):
        raise TensorMismatchError(
            f"delta {delta!r} rebuilds {canonical} with shape {list(value.shape)}, "
            f"the served parameter is {list(param.shape)}"
        )
    if param.is_floating_point() and not value.is_floating_point():
        raise TensorMismatchError(
            f"delta {delta!r} rebuilds {canonical} as {value.dtype}, the served parameter is {param.dtype}"
        )
    if finite and not all_finite(value):
        raise NonFiniteError(f"delta {delta!r} decodes to NaN or Inf values in {canonical}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HotSwapRuntime:
    """One resident base, many registered deltas, one active at a time (or a batched mix).

    host_cache_bytes / device_cache_bytes: byte budgets of the two prepared-delta caches, counting what a
    delta holds in memory (:attr:`PreparedDelta.nbytes`: on the CPU its stored bytes, quantized factors
    held as their codes; on another device quantized factors travel dequantized to fp32). On the CPU
    the device cache is the host cache (no copy). All methods are thread-safe (one lock).
    """

    def __init__(
        self,
        resident: ResidentModel,
        *,
        host_cache_bytes: int = 4 << 30,
        device_cache_bytes: int = 2 << 30,
        history: int = 256,
    ):
        self.resident = resident
        self.device = resident.device
        self.host_cache: ByteLRU[PreparedDelta] = ByteLRU(host_cache_bytes, lambda d: d.nbytes)
        self.device_cache: ByteLRU[PreparedDelta] = ByteLRU(device_cache_bytes, lambda d: d.nbytes)
        self.entries: dict[str, DeltaEntry] = {}
        self.active: str | None = None
        self._active_ops: set[str] = set()  # canonical names the active delta changed
        self.history: deque[SwapStats] = deque(maxlen=history)
        self.lock = threading.RLock()
        self.prefetcher = Prefetcher(resident.resolve, self.device)

    @classmethod
    def from_pretrained(
        cls,
        base_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        name: str | None = None,
        fingerprint: str | None = None,
        **cache_limits: int,
    ) -> HotSwapRuntime:
        """Load the base checkpoint ``base_dir`` onto ``device`` and wrap it (see :class:`ResidentModel`)."""
        resident = ResidentModel.load(
            base_dir, device=device, dtype=dtype, name=name, fingerprint=fingerprint
        )
        return cls(resident, **cache_limits)

    @property
    def model(self) -> torch.nn.Module:
        return self.resident.model

    @property
    def fingerprint(self) -> str:
        return self.resident.fingerprint

    # -- registration --------------------------------------------------------------------------
    def add_delta(
        self,
        name: str,
        source: DeltaSource | Delta,
        *,
        base_fingerprint: str | None = None,
        codec: str | None = None,
        verify: bool = True,
        eager: bool = True,
    ) -> DeltaEntry:
        """Register delta ``name`` from a directory, a callable giving one (lazy registry refs) or a Delta.

        The delta's recorded base fingerprint must equal the served base's (BaseMismatchError otherwise).
        eager: read, verify (sha256 of every file) and prepare it now, caching it on the host; lazy
        sources need ``base_fingerprint`` and ``codec`` from a catalog and are checked again on first use.
        """
        with self.lock:
            if name in self.entries:
                raise UsageError(f"a delta named {name!r} is already loaded; unload it first")
            if isinstance(source, Delta):
                entry = DeltaEntry(
                    name,
                    source.path or Path("."),
                    source.manifest.base.fingerprint,
                    source.manifest.codec.name,
                    source.path,
                    delta=source,
                )
                self._check_base(name, entry.base_fingerprint, source.manifest.base.name)
                self._prepare(entry, source)
                self.entries[name] = entry
                return entry
            if callable(source) and not eager:
                if base_fingerprint is None or codec is None:
                    raise UsageError("a lazy delta source needs base_fingerprint and codec")
                self._check_base(name, base_fingerprint, "?")
                entry = DeltaEntry(name, source, base_fingerprint, codec, verify=verify)
                self.entries[name] = entry
                return entry
            path = Path(source() if callable(source) else source)
            manifest = Manifest.read(path)
            self._check_base(name, manifest.base.fingerprint, manifest.base.name)
            entry = DeltaEntry(
                name,
                path,
                manifest.base.fingerprint,
                manifest.codec.name,
                path,
                manifest.stats.get("stored_bytes"),
                verify=verify,
            )
            if eager:
                self._prepare(entry, read_delta(path, verify=verify))
            self.entries[name] = entry
            return entry

    def remove_delta(self, name: str) -> None:
        """Unregister ``name``; if it is active, the base is restored first."""
        with self.lock:
            if name not in self.entries:
                raise NotFoundError(f"no delta named {name!r} is loaded")
            if self.active == name:
                self.activate(None)
            del self.entries[name]
            self.host_cache.pop(name)
            self.device_cache.pop(name)
            self.prefetcher.discard(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.entries)

    def _check_base(self, name: str, fingerprint: str, base_name: str) -> None:
        if fingerprint != self.fingerprint:
            raise BaseMismatchError(
                f"delta {name!r} was made from base {base_name!r} ({fingerprint[:19]}…), not from the served "
                f"base {self.resident.name!r} ({self.fingerprint[:19]}…); refusing to load it"
            )

    def _prepare(self, entry: DeltaEntry, delta: Delta) -> PreparedDelta:
        prepared = prepare_delta(entry.name, delta, self.resident.resolve)
        if entry.manifest is None:  # before _admit marks it validated: a prefetch then finds both
            entry.manifest = delta.manifest
        return self._admit(entry, prepared, delta.manifest.base.name)

    def _admit(
        self, entry: DeltaEntry, prepared: PreparedDelta, base_name: str, *, pinned: bool = False
    ) -> PreparedDelta:
        """Check, take pristine copies for, validate (once) and cache a prepared delta; its host copy."""
        self._check_base(entry.name, prepared.base_fingerprint, base_name)
        for canonical in prepared.ops:
            self.resident.ensure_pristine(canonical)
        if not entry.validated:
            self._validate(prepared)
            entry.validated = prepared.checked = True
        entry.stored_bytes = prepared.stored_nbytes
        pin = self.device.type == "cuda" and not pinned
        host = prepared.to(self.device, pin=True) if pin else prepared
        self.host_cache.put(entry.name, host)
        return host

    @torch.no_grad()
    def _validate(self, prepared: PreparedDelta) -> None:
        """Refuse, before it is ever swapped in, a delta whose swap would fail or write garbage.

        Checks that an exact codec (:func:`restores_exact_bits`) finds the served parameters in the dtype whose
        bits it restores, then decodes every tensor once onto its pristine base (on ``self.device``,
        one tensor at a time) and checks shape, dtype and finiteness (:func:`check_rebuilt`).
        The model is not written.
        """
        exact = restores_exact_bits(prepared.codec)
        for canonical, op in prepared.ops.items():
            param = self.resident.param(canonical)
            if exact and op.kind == "encoded" and op.dtype != param.dtype:
                raise TensorMismatchError(
                    f"delta {prepared.name!r} ({prepared.codec.name}) restores the exact {op.dtype} bits of "
                    f"{canonical}, but the served model holds it as {param.dtype}; load the base with "
                    "dtype='auto' to serve it"
                )
        for canonical, op in prepared.ops.items():
            base = self.resident.pristine(canonical).to(self.device)
            try:
                value = self._rebuild(prepared, op.to(self.device), base)
            except DeltakitError:
                raise
            except Exception as exc:
                raise FormatError(
                    f"delta {prepared.name!r} cannot be decoded onto {canonical}: {_one_line(exc)}"
                ) from None
            check_rebuilt(prepared.name, canonical, value, self.resident.param(canonical))

    # -- cache lookups -------------------------------------------------------------------------
    def host_delta(self, name: str) -> tuple[PreparedDelta, bool]:
        """The host copy of a delta (from the cache, else read from disk); (delta, cache hit)."""
        prepared, hit, _read = self._host_delta(name)
        return prepared, hit

    def _host_delta(self, name: str) -> tuple[PreparedDelta, bool, int]:
        """(host copy, cache hit, bytes read from disk); a prefetched copy counts as no read."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise NotFoundError(f"no delta named {name!r} is loaded")
            cached = self.host_cache.get(name)
            if cached is not None:
                return cached, True, 0
            if entry.delta is not None:
                return self._prepare(entry, entry.delta), False, 0
            ahead = self.prefetcher.take(name, entry)
            if ahead is not None:
                host = self._admit(entry, ahead.host, "?", pinned=self.device.type == "cuda")
                device = ahead.device_copy()
                if device is not None:
                    self.device_cache.put(name, device)
                return host, False, 0
            delta = read_delta(entry.resolve_path(), verify=entry.verify, expected=entry.manifest, name=name)
            prepared = self._prepare(entry, delta)
            return prepared, False, prepared.stored_nbytes

    def prefetch(self, names: list[str | None]) -> threading.Thread | None:
        """Read the deltas ``names`` that are in no cache from disk on a background thread (without the
        runtime lock), so that their next swap does not wait for the disk. Unknown names, the base
        (None), in-memory and not yet resolved lazy deltas are skipped. Returns the thread or None."""
        jobs = []
        for name in dict.fromkeys(n for n in names if n is not None):
            entry = self.entries.get(name)
            if entry is None or entry.delta is not None or entry.path is None or entry.manifest is None:
                continue
            if name in self.host_cache or name in self.device_cache:
                continue
            jobs.append((name, entry.path, entry.verify, entry.manifest, entry))
        return self.prefetcher.start(jobs)

    def device_delta(self, name: str) -> tuple[PreparedDelta, dict[str, object]]:
        """The device copy of a delta; info: host/device hits and bytes moved to the device."""
        with self.lock:
            used = self.prefetcher.used
            if self.device.type == "cpu":
                host, hit, read = self._host_delta(name)
                ahead = self.prefetcher.used > used
                return host, {"host_hit": hit, "device_hit": hit, "moved": 0, "read": read, "ahead": ahead}
            cached = self.device_cache.get(name)
            if cached is not None:
                return cached, {"host_hit": True, "device_hit": True, "moved": 0, "read": 0, "ahead": False}
            host, hit, read = self._host_delta(name)
            ahead = self.prefetcher.used > used
            on_device = self.device_cache.get(name) if ahead else None  # copied on the prefetch stream
            if on_device is None:
                on_device = host.to(self.device, non_blocking=True)
                self.device_cache.put(name, on_device)
            info = {"host_hit": hit, "device_hit": False, "moved": host.nbytes, "read": read, "ahead": ahead}
            return on_device, info

    # -- swapping ------------------------------------------------------------------------------
    @torch.no_grad()
    def activate(self, name: str | None) -> SwapStats:
        """Make delta ``name`` (None: the base) the resident weights, in place; returns what it cost.

        Atomic: when anything fails (reading, decoding, a cast, a shape mismatch, a non-finite value),
        every touched parameter is restored from its pristine copy, the previously active delta is
        swapped back in, and a one-line :class:`DeltakitError` is raised. ``self.active`` always names
        what the parameters hold.
        """
        with self.lock:
            start = time.perf_counter()
            source = self.active
            if name == source:
                return self._record(
                    SwapStats(source, name, 0.0, 0.0, 0.0, 0, 0, 0, 0, True, True, str(self.device))
                )
            info: dict[str, object] = {"host_hit": True, "device_hit": True, "moved": 0}
            prepared = None
            if name is not None:  # nothing is written before this succeeds
                try:
                    prepared, info = self.device_delta(name)
                except DeltakitError:
                    raise
                except Exception as exc:
                    raise FormatError(f"cannot read delta {name!r}: {_one_line(exc)}") from None
            try:
                _sync(self.device)
                loaded = time.perf_counter()
                tensors, restored, written = self._write_delta(name, prepared)
                _sync(self.device)
            except Exception as exc:
                back = self._roll_back(source)
                raise _swap_error(name, back, exc) from None
            end = time.perf_counter()
            stats = SwapStats(
                source,
                name,
                end - start,
                loaded - start,
                end - loaded,
                tensors,
                restored,
                int(info["moved"]),
                written,
                bool(info["host_hit"]),
                bool(info["device_hit"]),
                str(self.device),
                int(info.get("read", 0)),
                bool(info.get("ahead", False)),
            )
            return self._record(stats)

    def _write_delta(self, name: str | None, prepared: PreparedDelta | None) -> tuple[int, int, int]:
        """Write delta ``prepared`` (None: the base) over the current weights; (tensors, restored, written).

        Invalidates ``active`` first and widens ``_active_ops`` to everything it may touch, so that a
        failure half-way leaves a state :meth:`_roll_back` can repair.
        """
        new_ops = prepared.ops if prepared is not None else {}
        previous = self._active_ops
        self.active = None
        self._active_ops = previous | set(new_ops)
        restored = written = 0
        for canonical in previous - set(new_ops):
            pristine = self.resident.pristine(canonical)
            self._write_param(canonical, pristine)
            restored += pristine.numel() * pristine.element_size()
            written += pristine.numel() * self.resident.param(canonical).element_size()
        pending = []
        for canonical, op in new_ops.items():
            param = self.resident.param(canonical)
            pristine = self.resident.pristine(canonical)
            base = pristine.to(self.device, non_blocking=True)
            restored += pristine.numel() * pristine.element_size()
            pending.append((canonical, PendingRebuild(prepared, op, base)))
            written += param.numel() * param.element_size()
        if prepared is not None:
            self._write_rebuilds(prepared, pending)
        if prepared is not None:
            prepared.checked = True  # this copy's rebuilds were all finite
        self._active_ops = set(new_ops)
        self.active = name
        return len(previous | set(new_ops)), restored, written

    def _write_rebuilds(self, prepared: PreparedDelta, pending: list[tuple[str, PendingRebuild]]) -> None:
        """Write every pending rebuild of ``prepared`` into its parameter: the single-pass ones together
        (:func:`~deltakit.core.rebuild.fused_batch`: one compiled call for all of them on the CPU), the
        others through :meth:`_write_param`. Finiteness is checked on a copy's first write only, as
        there."""
        plan = self._swap_plan(prepared, pending)
        if plan.fused:
            self._write_fused(plan.batch, check_finite=not prepared.checked)
        for canonical, value in pending:
            if canonical not in plan.fused:
                self._write_param(canonical, value)

    def _swap_plan(self, prepared: PreparedDelta, pending: list[tuple[str, PendingRebuild]]) -> SwapPlan:
        """The checked single-pass writes of ``pending``: the plan kept on this copy when the parameters
        and pristine copies it points into are still where they were (CPU), else a new one."""
        plan = prepared.swap_plan
        if isinstance(plan, SwapPlan) and all(
            self.resident.param(c).data_ptr() == out and self.resident.pristine(c).data_ptr() == base
            for c, out, base in plan.addresses
        ):
            return plan
        writes, addresses = [], []
        for canonical, value in pending:
            op, data = value.op, self.resident.param(canonical).data
            label = f"delta {prepared.name!r}: {op.name}"
            write = fused_write(prepared.codec, op.kind, op.dtype, value.base, op.view, data, label)
            if write is not None:
                writes.append(write)
                addresses.append((canonical, data.data_ptr(), value.base.data_ptr()))
        plan = SwapPlan(fused_batch(writes), frozenset(c for c, _, _ in addresses), tuple(addresses))
        if self.device.type == "cpu":  # a device copy of the pristine weights is new at every swap
            prepared.swap_plan = plan
        return plan

    @staticmethod
    def _write_fused(batch: FusedBatch, *, check_finite: bool) -> None:
        """The single-pass writes of one swap, into the parameters they name (see :meth:`_write_rebuilds`)."""
        batch.run(check_finite=check_finite)

    def _write_param(self, canonical: str, value: torch.Tensor | PendingRebuild) -> None:
        """Write ``value`` into parameter ``canonical``, in place (cast to the parameter dtype).

        A tensor is copied as is. A :class:`PendingRebuild` is rebuilt straight into ``param.data`` where
        the fused path applies (one pass), else rebuilt, checked (:func:`check_rebuilt`) and copied. Both
        paths check finiteness only the first time a copy of a delta is written: the rebuild is
        deterministic and reads the same pristine weights, so a copy found finite once stays finite (a
        delta read again from disk, or copied to the device, is a new copy and is checked again). Shapes
        and dtypes are checked on every write.
        """
        param = self.resident.param(canonical)
        if isinstance(value, PendingRebuild):
            data = param.data  # one wrapper: each ``param.data`` access makes a new tensor object
            rebuilt = self._rebuild(
                value.prepared, value.op, value.base, out=data, check_finite=not value.prepared.checked
            )
            if rebuilt is data:
                return
            check_rebuilt(value.prepared.name, canonical, rebuilt, param, finite=not value.prepared.checked)
            value = rebuilt
        param.data.copy_(value, non_blocking=True)

    def _roll_back(self, source: str | None) -> str | None:
        """After a failed swap: pristine into every touched parameter, then ``source`` again if it was a
        delta. Returns what is active afterwards (``source``, or None when re-activating it failed too)."""
        for canonical in self._active_ops:
            self.resident.param(canonical).data.copy_(self.resident.pristine(canonical))
        self._active_ops = set()
        self.active = None
        _sync(self.device)
        if source is None:
            return None
        try:
            prepared, _ = self.device_delta(source)
            self._write_delta(source, prepared)
            _sync(self.device)
            return source
        except Exception:
            log.warning("re-activating %r after a failed swap failed too; serving the base", source)
            for canonical in self._active_ops:
                self.resident.param(canonical).data.copy_(self.resident.pristine(canonical))
            self._active_ops = set()
            self.active = None
            return None

    def _record(self, stats: SwapStats) -> SwapStats:
        self.history.append(stats)
        return stats

    @staticmethod
    def _rebuild(
        prepared: PreparedDelta,
        op: TensorOp,
        base: torch.Tensor,
        out: torch.Tensor | None = None,
        check_finite: bool | None = None,
    ) -> torch.Tensor:
        """The fine-tuned tensor with the bits of ``Decoder.reconstruct``, on ``base``'s device.

        out: a tensor of the parameter's shape the fused path writes into (and returns); other paths
        return a new tensor (see :func:`deltakit.core.rebuild.rebuild`).
        """
        label = f"delta {prepared.name!r}: {op.name}"
        return rebuild(
            prepared.codec,
            op.kind,
            op.dtype,
            op.tensors,
            op.params,
            base,
            view=op.view,
            out=out,
            check_finite=check_finite,
            name=label,
        )


@dataclass(frozen=True)
class SwapPlan:
    """The single-pass writes of one delta copy onto the served model, checked and ready to run again."""

    batch: FusedBatch
    #: canonical names of the parameters the batch writes
    fused: frozenset[str]
    #: (canonical name, parameter address, pristine address) the batch points into
    addresses: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class PendingRebuild:
    """A parameter write still to be decoded: delta ``prepared``'s ``op`` onto ``base`` (device copy)."""

    prepared: PreparedDelta
    op: TensorOp
    base: torch.Tensor
