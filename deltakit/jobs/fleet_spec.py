"""A fleet spec file: the base, the fine-tunes and their names, in JSON (or YAML when PyYAML is installed).

::

    {"base": "models/base",                       # a checkpoint dir or a registered base name
     "finetunes": ["ft/chat", {"name": "code-v2", "path": "ft/code"}],
     "method": "svd", "ratio": 0.125, "rank": null, "tag": "v1", "set": {"oversample": "8"}}

Relative paths are relative to the spec file's directory. Every key is checked; unknown keys are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError
from deltakit.jobs.fleet_compress import FleetItem, plan_items

_KEYS = {"base", "finetunes", "method", "ratio", "rank", "tag", "set"}
_ITEM_KEYS = {"name", "path"}


@dataclass(frozen=True)
class FleetSpec:
    """A parsed spec: ``options`` holds the optional method/ratio/rank/tag/set values it gave."""

    base: str
    items: list[FleetItem]
    options: dict[str, Any] = field(default_factory=dict)


def _parse_text(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FormatError(f"{path}: reading a YAML spec needs PyYAML (pip install pyyaml)") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FormatError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON ({exc})") from None


def _check_type(path: Path, key: str, value: Any, types: tuple[type, ...]) -> None:
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in types)
        raise FormatError(f"{path}: {key!r} must be {names}, not {type(value).__name__}")


def load_spec(path: str | Path) -> FleetSpec:
    """Parse and validate a fleet spec file. Raises FormatError naming the bad field."""
    path = Path(path)
    data = _parse_text(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: a fleet spec is a mapping with 'base' and 'finetunes'")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise FormatError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    for key, types in (("base", (str,)), ("method", (str,)), ("tag", (str,)), ("ratio", (int, float)),
                       ("rank", (int,)), ("set", (dict,)), ("finetunes", (list,))):  # fmt: skip
        _check_type(path, key, data.get(key), types)
    if not data.get("base") or not data.get("finetunes"):
        raise FormatError(f"{path}: 'base' and a non-empty 'finetunes' list are required")
    root = path.parent
    paths, names = [], []
    for i, entry in enumerate(data["finetunes"]):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or set(entry) - _ITEM_KEYS:
            raise FormatError(f"{path}: finetunes[{i}] must be a path or {{'name': ..., 'path': ...}}")
        item_path = root / entry["path"]
        paths.append(item_path)
        name = entry.get("name", item_path.resolve().name)
        _check_type(path, f"finetunes[{i}].name", name, (str,))
        names.append(name)
    base = data["base"]
    base = str(root / base) if (root / base).is_dir() else base
    options = {k: data[k] for k in ("method", "ratio", "rank", "tag") if data.get(k) is not None}
    if data.get("set"):
        options["overrides"] = {str(k): str(v) for k, v in data["set"].items()}
    return FleetSpec(base, plan_items(paths, names), options)
