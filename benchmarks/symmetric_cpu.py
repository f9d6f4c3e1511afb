"""Symmetric products on the CPU: full ``mm`` vs orthoptim's lower row blocks (``polar/newton_schulz.py``).

    .venv/bin/python benchmarks/symmetric_cpu.py [--repeats 9] [--blocks 2 4 6 8]

For each shape and dtype: ms per call of the full product ``X Xᵀ`` (and ``bA + cA²`` for the m×m case) and of
the row-block version with each block count, the ratio, and the largest difference between the two results
(0 means identical bits). orthoptim uses ``SYMMETRIC_BLOCKS`` (4). Not a test: compare within
one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from orthoptim.polar import newton_schulz as ns
from orthoptim.timing import median_ms

CPU = torch.device("cpu")
B, C = -4.775, 2.0315  # torch.optim.Muon's quintic (b, c)


def cases(dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, Callable[[], Tensor], Callable[[], Tensor]]]:
    """(name, full product, row-block product) for GPT-2-small-like shapes and one larger one."""
    out: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor]]] = []
    for m, n in ((768, 768), (768, 2304), (768, 3072), (1024, 4096)):
        X = (torch.randn(m, n, generator=gen) / n**0.5).to(dtype)
        out.append((f"X Xᵀ, X {m}×{n}", partial(torch.mm, X, X.mT), partial(ns._symmetric_addmm, None, X, X.mT)))
        if m == n:
            A = X @ X.mT
            full = partial(torch.addmm, A, A, A, beta=B, alpha=C)
            out.append((f"bA + cA², A {m}×{m}", full, partial(ns._symmetric_addmm, A, A, A, beta=B, alpha=C)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 6, 8])
    args = parser.parse_args()
    default_blocks = ns.SYMMETRIC_BLOCKS
    print(f"# CPU symmetric products, torch {torch.__version__}, {torch.get_num_threads()} threads, median ms")
    print("\n| product | dtype | full | " + " | ".join(f"{k} blocks" for k in args.blocks) + " | max diff |")
    print("|---" * (4 + len(args.blocks)) + "|")
    gen = torch.Generator().manual_seed(0)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for name, full, blocked in cases(dtype, gen):
                t_full = median_ms(full, CPU, 2, args.repeats)
                cells, diff = [], 0.0
                for k in args.blocks:
                    ns.SYMMETRIC_BLOCKS = k
                    t = median_ms(blocked, CPU, 2, args.repeats)
                    diff = max(diff, float((blocked().float() - full().float()).abs().max()))
                    cells.append(f"{t:.2f} ({t / t_full:.2f}×)")
                dt = str(dtype).replace("torch.", "")
                print(f"| {name} | {dt} | {t_full:.2f} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)
    finally:
        ns.SYMMETRIC_BLOCKS = default_blocks


if __name__ == "__main__":
    main()
