"""``orthoptim demo`` at a GPU size: Hybrid vs AdamW vs torch.optim.Muon on a larger byte-level GPT.

The same comparison, table, ``results.json`` and PNG as ``orthoptim demo`` (same flags; see ``--help``), with
defaults sized for one GPU: 8 layers × 512 wide (8 heads, ~25M parameters), context 512, batch 64, 2000 steps.
The learning rates and warmup fractions are the demo's tuned defaults (``orthoptim.demo.train.TUNED_LRS`` and
``TUNED_WARMUP``; ``--warmup`` overrides them), tuned at the demo's size only; at this size they are a starting
point, not a tuned comparison.

    python benchmarks/train_gpt.py                                   # GPU size, on cuda if available
    python benchmarks/train_gpt.py --steps 20 --layers 2 --width 64 --context 64 --batch 8   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orthoptim.demo.cli import add_demo_parser, run_demo

GPU_DEFAULTS = {
    "steps": 2000,
    "layers": 8,
    "width": 512,
    "heads": 8,
    "context": 512,
    "batch": 64,
    "eval_every": 50,
    "out": "orthoptim-train-gpt",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_gpt.py")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    demo = subparsers.choices["demo"]  # the demo's own flags, with GPU-sized defaults
    demo.prog = "train_gpt.py"
    demo.set_defaults(**GPU_DEFAULTS)
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return run_demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
