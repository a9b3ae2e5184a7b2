"""The delta manifest (``manifest.json``): what a delta holds and how to check it.

Layout (format version 2)::

    {"format": "deltakit.delta", "format_version": 2, "deltakit_version": "0.1.0", "created": "...",
     "codec": {"name", "version", "config", "budget": {"ratio", "rank"}},
     "base":   {"name", "fingerprint"},     # fingerprint = sha256 over names, dtypes, shapes, bytes
     "target": {"name", "fingerprint"},
     "tensors": {NAME: {"kind": "unchanged" | "encoded" | "passthrough", "dtype", "shape", "role",
                        "layout"?, "in_base"?, "base_shape"?, "params"?, "stored"?: {local: key},
                        "value"?, "extra_rows"?, "shard"?}},
     "removed": [NAME...],                  # base tensors the fine-tune does not have
     "aux_files": {FILE: {"source": "base" | "delta", "sha256", "size", "path"?}},
     "files":   {RELPATH: {"sha256", "size"}},   # every file of the delta but manifest.json
     "stats":   {"stored_bytes", "fp16_delta_bytes", "ratio", ...}}

One entry per tensor: ``unchanged`` tensors cost nothing; ``passthrough`` tensors are stored exactly
under the key ``value`` (vectors, tensors the base lacks); ``encoded`` tensors hold the codec's
``params`` and ``stored`` tensors (local name -> key in ``shard``), and an encoded tensor whose rows grew
(resized vocabulary) stores the new rows exactly under the key ``extra_rows``. Every stored tensor of an
entry lives in its one ``shard``. Version 1 kept the codec's part in a separate ``groups`` table, one
group per tensor; :mod:`deltakit.format.migrate` folds it in on read. Readers accept unknown keys with a
warning, validate every field (a malformed manifest is one :class:`FormatError`), and refuse a newer
format version or an unknown format name.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from deltakit._version import __version__
from deltakit.errors import FormatError
from deltakit.format.paths import MANIFEST_NAME, check_aux_name, check_relpath
from deltakit.format.safetensors_io import DTYPE_TO_ST, dtype_from_name

FORMAT_NAME = "deltakit.delta"
FORMAT_VERSION = 2
#: largest manifest read (a manifest of a very large model is a few MiB) and deepest JSON nesting
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64

UNCHANGED, ENCODED, PASSTHROUGH = "unchanged", "encoded", "passthrough"
TENSOR_KINDS = (UNCHANGED, ENCODED, PASSTHROUGH)
_TOP_KEYS = (
    "format",
    "format_version",
    "deltakit_version",
    "created",
    "codec",
    "base",
    "target",
    "stats",
    "files",
    "aux_files",
    "removed",
    "tensors",
)


@dataclass
class ModelIdentity:
    name: str
    fingerprint: str


@dataclass
class CodecInfo:
    name: str
    version: int
    config: dict[str, Any]
    budget: dict[str, Any]


@dataclass
class FileEntry:
    """One file of the delta (a shard or a copied config file): hex sha256 and size in bytes."""

    sha256: str
    size: int


@dataclass
class AuxFile:
    """A config/tokenizer file of the fine-tune: the base's own bytes (``source="base"``) or a copy inside
    the delta at ``path`` (``source="delta"``)."""

    source: str
    sha256: str
    size: int
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.path is None:
            del out["path"]
        return out


@dataclass
class TensorEntry:
    """One tensor of the fine-tune and how the delta rebuilds it.

    shape: the fine-tune's shape; ``base_shape`` only when the rows grew (encoded embeddings/heads).
    stored: the codec's stored tensors (local name -> key in ``shard``), ``encoded`` entries only.
    value: key of the exact tensor, ``passthrough`` entries only; ``in_base``: whether the base has it.
    extra_rows: key of the exact new rows of a grown ``encoded`` tensor.
    layout: ``in_out`` for GPT-2 Conv1D-style linears (None: ``out_in``).
    """

    kind: str
    dtype: str
    shape: list[int]
    role: str = "other"
    layout: str | None = None
    in_base: bool | None = None
    base_shape: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    value: str | None = None
    extra_rows: str | None = None
    shard: str | None = None

    @property
    def shared_shape(self) -> list[int]:
        """The shape the base has (and the codec encodes): ``base_shape`` when the rows grew."""
        return self.base_shape if self.base_shape is not None else self.shape

    @property
    def needs_base(self) -> bool:
        """Whether the base must hold this tensor (everything but a passthrough the base lacks)."""
        return self.kind != PASSTHROUGH or bool(self.in_base)

    def to_dict(self) -> dict[str, Any]:
        """JSON form without the fields left at their empty defaults."""
        out: dict[str, Any] = {"kind": self.kind, "dtype": self.dtype, "shape": self.shape, "role": self.role}
        for f in fields(self)[4:]:
            value = getattr(self, f.name)
            if value is not None and value != {}:
                out[f.name] = value
        return out


@dataclass
class Manifest:
    codec: CodecInfo
    base: ModelIdentity
    target: ModelIdentity
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    aux_files: dict[str, AuxFile] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    deltakit_version: str = __version__
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["codec"], data["base"], data["target"] = (
            asdict(self.codec),
            asdict(self.base),
            asdict(self.target),
        )
        data["tensors"] = {name: entry.to_dict() for name, entry in self.tensors.items()}
        data["files"] = {rel: asdict(entry) for rel, entry in self.files.items()}
        data["aux_files"] = {name: entry.to_dict() for name, entry in self.aux_files.items()}
        return {key: data[key] for key in _TOP_KEYS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    def kind_counts(self) -> dict[str, int]:
        """How many tensors of each kind the delta holds."""
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
        return counts

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> Manifest:
        """Validate and build a manifest from parsed JSON (version 1 is migrated first)."""
        from deltakit.format.migrate import migrate

        data = migrate(check_header(data, source, FORMAT_NAME, FORMAT_VERSION, "deltakit delta"), source)
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown manifest key(s): {', '.join(unknown)}", stacklevel=2)
        try:
            return _build(cls, data, source)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{source}: malformed manifest ({exc})") from None

    @classmethod
    def read(cls, delta_dir: Path | str) -> Manifest:
        path = Path(delta_dir) / MANIFEST_NAME
        data = read_json(path, f"{delta_dir} is not a delta directory (no {MANIFEST_NAME})")
        return cls.from_dict(data, str(path))


def check_header(data: Any, source: str, name: str, max_version: int, what: str) -> dict[str, Any]:
    """A JSON object whose ``format`` is ``name`` and whose integer ``format_version`` this reader handles.

    Shared by delta manifests and compressed-model markers; ``what`` names the thing in messages.
    """
    if not isinstance(data, dict):
        raise FormatError(f"{source}: not a JSON object")
    fmt = data.get("format")
    if fmt != name:
        raise FormatError(f"{source}: not a {what} (format {fmt!r}, expected {name!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{source}: format_version missing or not an integer")
    if version > max_version:
        raise FormatError(
            f"{source}: format version {version} is newer than this deltakit reads ({max_version}); "
            "upgrade deltakit"
        )
    return data


def read_json(path: Path, missing: str) -> Any:
    """Parsed JSON of ``path``; ``missing`` is the FormatError message when there is no such file.

    Strict: at most :data:`MAX_MANIFEST_BYTES`, no duplicate keys, no NaN/Infinity literals, nesting at
    most :data:`MAX_JSON_DEPTH` deep; anything else is one FormatError naming ``path``.
    """
    if path.is_symlink() or not path.is_file():
        raise FormatError(missing if not path.is_symlink() else f"{path} is a symbolic link")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{path}: {size} bytes is larger than a manifest may be ({MAX_MANIFEST_BYTES})")
    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    try:
        depth = _depth(data)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    if depth > MAX_JSON_DEPTH:
        raise FormatError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate JSON key {key[:60]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise FormatError(f"JSON holds {name}, which is not a number a manifest may carry")


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON (iterative, so any depth the parser accepted can be measured).

    A number too large for a float (``1e999`` parses as inf) is a FormatError.
    """
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise FormatError("JSON holds a number out of float range")
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _check_shape(value: Any, what: str) -> list[int]:
    _require(
        isinstance(value, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value),
        f"{what} must be a list of non-negative integers",
    )
    return value


def _section(cls: type, values: Any, key: str, source: str) -> Any:
    """Build a manifest section dataclass; unknown keys (from a newer minor writer) warn and are dropped."""
    _require(_is_str_map(values), f"{key} is not an object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {key} key(s): {', '.join(unknown)}", stacklevel=4)
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(values))
    _require(not missing, f"{key} lacks {', '.join(missing)}")
    return cls(**{k: v for k, v in values.items() if k in known})


def _identity(values: Any, key: str, source: str) -> ModelIdentity:
    identity = _section(ModelIdentity, values, key, source)
    _require(
        isinstance(identity.name, str) and isinstance(identity.fingerprint, str), f"{key} must be strings"
    )
    return identity


def _codec_info(values: Any, source: str) -> CodecInfo:
    info = _section(CodecInfo, values, "codec", source)
    _require(isinstance(info.name, str) and bool(info.name), "codec name must be a non-empty string")
    _require(isinstance(info.version, int) and not isinstance(info.version, bool), "codec version: integer")
    _require(_is_str_map(info.config) and _is_str_map(info.budget), "codec config and budget must be objects")
    return info


def _tensor_entry(name: str, values: Any, source: str) -> TensorEntry:
    """Validate one tensor entry: known kind and dtype, integer shapes, string keys, kind-specific keys."""
    what = f"tensor {name!r}"
    entry = _section(TensorEntry, values, what, source)
    _require(
        entry.kind in TENSOR_KINDS, f"{what}: unknown kind {entry.kind!r} (known: {', '.join(TENSOR_KINDS)})"
    )
    _require(isinstance(entry.dtype, str), f"{what}: dtype must be a string")
    try:
        dtype = dtype_from_name(entry.dtype)
    except FormatError:
        raise ValueError(f"{what}: unknown dtype {entry.dtype!r}") from None
    _require(dtype in DTYPE_TO_ST, f"{what}: dtype {entry.dtype!r} cannot be stored in safetensors")
    _require(
        entry.kind != ENCODED or dtype.is_floating_point,
        f"{what}: an encoded weight must have a floating dtype, not {entry.dtype!r}",
    )
    _check_shape(entry.shape, f"{what} shape")
    if entry.base_shape is not None:
        _check_shape(entry.base_shape, f"{what} base_shape")
    _require(isinstance(entry.role, str), f"{what}: role must be a string")
    _require(entry.layout in (None, "out_in", "in_out"), f"{what}: layout must be out_in or in_out")
    _require(entry.in_base in (None, True, False), f"{what}: in_base must be a boolean")
    _require(_is_str_map(entry.params), f"{what}: params must be an object")
    _require(
        _is_str_map(entry.stored) and all(isinstance(v, str) for v in entry.stored.values()),
        f"{what}: stored must map local names to key strings",
    )
    for key in ("value", "extra_rows", "shard"):
        _require(
            getattr(entry, key) is None or isinstance(getattr(entry, key), str), f"{what}: {key}: string"
        )
    _require(
        (entry.kind == PASSTHROUGH) == (entry.value is not None), f"{what}: value is for passthrough only"
    )
    _require(
        entry.kind == ENCODED or not (entry.stored or entry.params), f"{what}: stored/params for encoded only"
    )
    return entry


def _file_entry(rel: str, values: Any, source: str) -> FileEntry:
    entry = _section(FileEntry, values, f"files {rel!r}", source)
    ok = isinstance(entry.sha256, str) and isinstance(entry.size, int) and not isinstance(entry.size, bool)
    _require(ok and entry.size >= 0, f"files {rel!r} needs a string sha256 and a non-negative integer size")
    check_relpath(rel)
    return entry


def _aux_file(name: str, values: Any, source: str, files: dict[str, FileEntry]) -> AuxFile:
    entry = _section(AuxFile, values, f"aux_files {name!r}", source)
    ok = isinstance(entry.sha256, str) and isinstance(entry.size, int) and not isinstance(entry.size, bool)
    _require(
        ok and entry.size >= 0, f"aux_files {name!r} needs a string sha256 and a non-negative integer size"
    )
    _require(entry.source in ("base", "delta"), f"aux_files {name!r}: source must be base or delta")
    check_aux_name(name)
    if entry.source == "delta":
        _require(isinstance(entry.path, str), f"aux_files {name!r}: a copied file needs its path")
        check_relpath(entry.path)
        _require(entry.path in files, f"aux_files {name!r}: its path {entry.path!r} is not a listed file")
    return entry


def _table(values: Any, key: str, build: Any, source: str) -> dict[str, Any]:
    _require(_is_str_map(values), f"{key} must be an object")
    return {name: build(name, entry, source) for name, entry in values.items()}


def _aux_table(values: Any, files: dict[str, FileEntry], source: str) -> dict[str, AuxFile]:
    _require(_is_str_map(values), "aux_files must be an object")
    return {name: _aux_file(name, entry, source, files) for name, entry in values.items()}


def _build(cls: type[Manifest], data: dict[str, Any], source: str) -> Manifest:
    tensors = data.get("tensors", {})
    _require(_is_str_map(tensors), "tensors must be an object")
    removed = data.get("removed", [])
    _require(isinstance(removed, list) and all(isinstance(n, str) for n in removed), "removed: list of names")
    stats = data.get("stats", {})
    _require(_is_str_map(stats), "stats must be an object")
    files = _table(data.get("files", {}), "files", _file_entry, source)
    manifest = cls(
        codec=_codec_info(data["codec"], source),
        base=_identity(data["base"], "base", source),
        target=_identity(data["target"], "target", source),
        tensors={name: _tensor_entry(name, entry, source) for name, entry in tensors.items()},
        removed=removed,
        aux_files=_aux_table(data.get("aux_files", {}), files, source),
        files=files,
        stats=stats,
        format=data["format"],
        format_version=data["format_version"],
        deltakit_version=str(data.get("deltakit_version", "unknown")),
        created=str(data.get("created", "")),
    )
    for name, entry in manifest.tensors.items():
        if entry.shard is not None:
            check_relpath(entry.shard)
        _require(
            entry.shard is None or not manifest.files or entry.shard in manifest.files,
            f"tensor {name!r}: shard {entry.shard!r} is not among the manifest's files",
        )
    return manifest
