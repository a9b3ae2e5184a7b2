"""The library's imports go one way: a module never imports from a layer above its own.

Layers, lowest first (docs/architecture.md); the package root only re-exports, lazily, and counts as the
top of the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "deltakit"
LAYERS = [
    ("deltakit._version", "deltakit.errors", "deltakit.plugins", "deltakit.cachedir"),
    ("deltakit.ops",),
    ("deltakit.format", "deltakit.models"),
    ("deltakit.codecs", "deltakit.compressors", "deltakit.lillama", "deltakit.deltallm", "deltakit.distill"),
    ("deltakit.core",),
    (
        "deltakit.registry",
        "deltakit.runtime",
        "deltakit.eval",
        "deltakit.zoo",
        "deltakit.publish",
        "deltakit.refs",
        "deltakit.interop",
    ),
    ("deltakit.jobs",),
    ("deltakit",),
]


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (rank, len(prefix))
    assert best is not None, module
    return best[0]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every deltakit import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [
                (node.lineno, f"{node.module}.{a.name}") for a in node.names
            ]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "deltakit" or m.startswith("deltakit.")]


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_import_from_a_higher_layer(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    own = layer_of(module)
    upward = [(line, m) for line, m in imports(path) if layer_of(m) > own]
    assert not upward, f"{module} (layer {own}) imports from above: {upward}"
