"""Test helper: copies of delta directories whose manifest is edited the way an older writer left it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

#: config fields that quantized low-rank factors added; deltas written before them hold fp16 factors
FACTOR_FIELDS = ("factor_bits", "factor_group", "factor_rounding")


def copy_without_config_fields(delta_dir: Path, out: Path, fields: tuple[str, ...] = FACTOR_FIELDS) -> Path:
    """Copy ``delta_dir`` to ``out`` and delete ``fields`` from the codec config of its manifest."""
    shutil.copytree(delta_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in fields:
        del manifest["codec"]["config"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
