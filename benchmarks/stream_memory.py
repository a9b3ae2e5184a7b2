"""Time and peak memory of compress/apply on a real checkpoint, against a plain load + save of it.

Each step runs as its own process under ``/usr/bin/time -v`` (wall time and maximum resident set
size), so the figures are what a user sees from the command line. Writes docs/stream_memory.md.

    python benchmarks/stream_memory.py --base BASE_DIR --finetune FT_DIR [--methods dqrelo,svd,...]

Without --base/--finetune it uses the fleet's SmolLM2-135M base and its first variant.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_SAVE_SAFETENSORS = """
import sys
from safetensors.torch import load_file, save_file
import glob
tensors = {}
for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):
    tensors.update(load_file(f))
save_file(tensors, sys.argv[2] + '/model.safetensors', metadata={'format': 'pt'})
"""

LOAD_SAVE_TRANSFORMERS = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')
model.save_pretrained(sys.argv[2])
"""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; return wall seconds and peak RSS in MiB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", proc.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1)}


def default_pair() -> tuple[Path, Path]:
    from deltakit.zoo.base import base_dir
    from deltakit.zoo.fleet import list_fleet

    fleet = list_fleet()
    if not fleet:
        sys.exit("no fleet variant built yet: run `deltakit fleet build` or pass --base/--finetune")
    return base_dir(), Path(fleet[0]["path"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path)
    parser.add_argument("--finetune", type=Path)
    parser.add_argument("--methods", default="dqrelo,bitdelta,svd,dare,lossless")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "stream_memory.md")
    args = parser.parse_args()
    base, ft = (args.base, args.finetune) if args.base else default_pair()
    deltakit = [sys.executable, "-m", "deltakit_cli.main"]
    from deltakit.models.checkpoint import CheckpointReader

    reader = CheckpointReader(ft)
    params = sum(__import__("math").prod(reader.spec(n).shape) for n in reader.names())
    checkpoint_mib = sum(f.stat().st_size for f in ft.glob("*.safetensors")) / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "st").mkdir()
        rows.append(
            {
                "step": "load + save (safetensors load_file/save_file)",
                **timed([sys.executable, "-c", LOAD_SAVE_SAFETENSORS, str(ft), str(tmp / "st")]),
            }
        )
        rows.append(
            {
                "step": "load + save (transformers from_pretrained/save_pretrained)",
                **timed([sys.executable, "-c", LOAD_SAVE_TRANSFORMERS, str(ft), str(tmp / "tf")]),
            }
        )
        for method in args.methods.split(","):
            delta = tmp / f"delta-{method}"
            rows.append(
                {
                    "step": f"deltakit compress --method {method}",
                    **timed(
                        [
                            *deltakit,
                            "compress",
                            "-m",
                            method,
                            "--base",
                            str(base),
                            str(ft),
                            "-o",
                            str(delta),
                            "--json",
                        ]
                    ),
                }
            )
            size = sum(f.stat().st_size for f in delta.rglob("*") if f.is_file())
            rows[-1]["output_mib"] = round(size / 2**20, 2)
            out = tmp / f"out-{method}"
            rows.append(
                {
                    "step": f"deltakit apply ({method})",
                    **timed([*deltakit, "apply", str(base), str(delta), "-o", str(out), "--json"]),
                }
            )
            shutil.rmtree(out)
    lines = [
        "# Streaming compress/apply: time and peak memory",
        "",
        f"Command: `python benchmarks/stream_memory.py --base {base} --finetune {ft}`",
        "",
        f"Model: `{ft.name}` ({params / 1e6:.1f}M parameters, {checkpoint_mib:.0f} MiB checkpoint); "
        "each step a separate process under `/usr/bin/time -v`; 2-core CPU machine, no GPU.",
        "Peak RSS includes the Python interpreter with torch and transformers imported (~350-450 MiB).",
        "",
        "| step | wall s | peak RSS MiB | delta MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['step']} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {row.get('output_mib', '')} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(
        json.dumps({"base": str(base), "finetune": str(ft), "rows": rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
