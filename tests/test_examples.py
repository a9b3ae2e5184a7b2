"""Every script in examples/ runs end to end on tiny local models (``--tiny``) and prints what it claims."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/NAME --tiny ARGS`` in a fresh interpreter; returns its stdout (fails on exit != 0)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_every_example_has_a_docstring_and_a_test():
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    tested = {
        "01_compress_apply.py",
        "02_fleet_registry.py",
        "03_serve_openai.py",
        "04_codec_plugin.py",
        "05_peft_export.py",
    }
    assert tested <= set(scripts)
    for name in scripts:
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""') and "python examples/" in source, name


def test_01_compress_apply():
    out = run_example("01_compress_apply.py")
    match = re.search(r"base ([0-9.]+), base \+ delta ([0-9.]+)", out)
    assert match and float(match[2]) < 0.5 * float(match[1]), out
    assert re.search(r"delta: svd, \d+ bytes stored", out) and out.rstrip().splitlines()[-1].startswith("OK")


def test_02_fleet_registry():
    out = run_example("02_fleet_registry.py")
    assert "first run: 3 pushed, 0 failed" in out and "second run: 3 skipped" in out
    assert sorted(re.findall(r"^  (ft-\d:v1): svd", out, re.M)) == ["ft-0:v1", "ft-1:v1", "ft-2:v1"]
    assert re.search(r"rebuilt ft-0:v1: \d+ tensors", out) and out.rstrip().endswith("OK")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
    reason="needs the serve extra (fastapi, uvicorn) and httpx",
)
def test_03_serve_openai():
    out = run_example("03_serve_openai.py", "--max-tokens", "4")
    assert "models: base, tiny-0, tiny-1" in out
    replies = dict(re.findall(r"^  (base|tiny-0|tiny-1): '(.*)'$", out, re.M))
    assert set(replies) == {"base", "tiny-0", "tiny-1"} and all(replies.values())
    assert "chat (tiny-0):" in out and "server stopped" in out and out.rstrip().endswith("OK")


def test_04_codec_plugin():
    out = run_example("04_codec_plugin.py", "--set", "bits=6")
    assert re.search(r"registered codecs: .*example-rowint", out)
    assert "delta: codec example-rowint v1, config {'bits': 6}" in out
    err = float(re.search(r"error after apply is ([0-9.e+-]+)", out)[1])
    assert 0 < err < 0.2 and out.rstrip().endswith("OK")


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")
def test_05_peft_export():
    out = run_example("05_peft_export.py")
    assert re.search(r"adapter: 16 LoRA modules, r=8, lora_alpha=8", out), out
    gap, moved = map(
        float, re.search(r"= ([0-9.e+-]+) \(the delta itself moves logits by ([0-9.e+-]+)\)", out).groups()
    )
    assert gap < 0.1 * moved and out.rstrip().endswith("OK")
