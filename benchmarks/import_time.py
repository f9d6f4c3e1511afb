"""``import orthoptim`` against ``import torch, torch.optim``, each in fresh interpreters, taken in turns.

Target (README, "The step"): orthoptim's import at most 1.35× torch's. What made it 2× before: ``torch._dynamo``
(and triton through it) loaded at import by a ``@torch.compiler.disable`` decorator; both now load when first
needed (``tests/test_import.py`` checks that they do not load at import).

    python benchmarks/import_time.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

TORCH = "import torch, torch.optim"
ORTHOPTIM = "import torch, torch.optim, orthoptim"


def seconds(statement: str) -> float:
    """Wall time of ``statement`` in a fresh interpreter, measured inside it (interpreter start-up excluded)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per statement (default 7)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be ≥ 1")
    torch_s, ours_s = [], []
    for _ in range(args.runs):  # in turns, so a slow spell of the machine hits both
        torch_s.append(seconds(TORCH))
        ours_s.append(seconds(ORTHOPTIM))
    t, o = statistics.median(torch_s), statistics.median(ours_s)
    print(f"median of {args.runs} fresh interpreters each")
    print(f"{TORCH:<40} {t:6.2f} s")
    print(f"{ORTHOPTIM:<40} {o:6.2f} s   {o / t:.2f}× (target ≤ 1.35×)")


if __name__ == "__main__":
    main()
