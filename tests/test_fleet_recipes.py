"""The heavy fleet variant and the default variant set are recipes (no training here); the codec benchmark
plans its size-target settings without a fleet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deltakit.errors import UsageError
from deltakit.zoo import fleet

ROOT = Path(__file__).resolve().parents[1]


def test_heavy_variant_trains_longer_and_hotter_on_its_domain():
    assert fleet.parse_variant("shakespeare-heavy") == "shakespeare-heavy"
    heavy = fleet.variant_recipe("shakespeare-heavy", fleet.DEFAULT_STEPS, fleet.DEFAULT_LR, seed=0)
    plain = fleet.variant_recipe("shakespeare", fleet.DEFAULT_STEPS, fleet.DEFAULT_LR, seed=0)
    assert heavy.domain == plain.domain == "shakespeare"
    assert heavy.steps * heavy.lr >= 3 * plain.steps * plain.lr
    assert heavy != plain  # a different recipe: cached separately


def test_default_fleet_has_five_domains_and_the_heavy_variant():
    assert "fortunes-politics" in fleet.DEFAULT_VARIANTS and "shakespeare-heavy" in fleet.DEFAULT_VARIANTS
    domains = {fleet.variant_recipe(n, 40, 3e-4, 0).domain for n in fleet.DEFAULT_VARIANTS}
    assert len(domains) == 5


def test_unknown_variant_is_refused():
    with pytest.raises(UsageError):
        fleet.parse_variant("shakespeare-heavier")


def test_benchmark_plans_every_codec_at_every_bit_rate():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fleet_codecs.py"),
            "--bits-per-weight",
            "2,1,0.5,0.25",
            "--factor-bits",
            "16,4",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for bits in ("2", "1", "0.5", "0.25"):
        for method in ("svd", "deltacome", "dare"):
            assert any(line.startswith(f"{method} {bits}bpw-") for line in out), (method, bits)
    assert any(line.startswith("svd 0.25bpw-rd-f4") for line in out)
    assert any(line.startswith("svd 0.25bpw-uniform-f4") for line in out)
    assert not any(line.startswith("dqrelo 0.5bpw") for line in out)  # below its 1/16 floor
