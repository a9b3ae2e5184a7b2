"""Export a low-rank delta as a PEFT LoRA adapter and load it with ``peft.PeftModel`` on the base.

Compresses a fine-tune with the ``svd`` codec, writes the delta as ``adapter_config.json`` +
``adapter_model.safetensors`` (``deltakit.interop.peft_export.export_peft``, the library behind
``deltakit export-peft``), loads the adapter on the base with PEFT and compares its logits with deltakit's
own apply of the delta. Needs the ``peft`` extra.

    python examples/05_peft_export.py --tiny                       # tiny local models, offline
    python examples/05_peft_export.py --base BASE_DIR --finetune FT_DIR --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _tiny import ensure_pair, pair_parser, parse_pair

import deltakit
from deltakit.eval.delta_model import load_delta_model
from deltakit.interop.peft_export import export_peft


def main() -> int:
    parser = pair_parser(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    args = parse_pair(parser)
    with tempfile.TemporaryDirectory(prefix="deltakit-example-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    """Compress, export, load in PEFT and compare; ``work`` holds the delta, adapter (and tiny models)."""
    from peft import PeftModel

    ensure_pair(args, work)
    delta = work / "delta"
    deltakit.compress(args.base, args.finetune, delta, method="svd", rank=args.rank)
    report = export_peft(delta, work / "adapter")
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    print(
        f"adapter: {len(report.lora_modules)} LoRA modules, r={config['r']}, lora_alpha={config['lora_alpha']}"
    )
    ids = torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_delta_model(args.base, delta)(ids).logits
        peft_model = PeftModel.from_pretrained(
            load_delta_model(args.base, None), str(work / "adapter")
        ).eval()
        logits = peft_model(ids).logits
        base_logits = load_delta_model(args.base, None)(ids).logits
    gap = float((logits - reference).abs().max())
    moved = float((base_logits - reference).abs().max())
    print(f"max |PEFT - deltakit apply| = {gap:.3g} (the delta itself moves logits by {moved:.3g})")
    # apply rounds the rebuilt weights to the checkpoint dtype (bf16 here); PEFT adds the fp32 update
    ok = gap < 0.1 * moved
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
