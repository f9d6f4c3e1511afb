"""Stress benchmark: the test suite's 'never unstable' check at a larger size, printed as a table.

    .venv/bin/python benchmarks/stress.py [--per-shape 10000] [--seed 1]

Each configuration (schedule × normalization × compute dtype) sees per-shape × 6 shapes matrices from
orthoptim.stress.adversarial_batch (10 spectra incl. rank-1, exactly orthogonal, clusters at σmax, a dominant
σmax, heavy tails; wide, tall, vectors; scales 1e-35..1e35). Columns: non-finite outputs, largest output
singular value vs the stated bound, negative gains on directions inside the validated interval, smallest such gain.
"""

from __future__ import annotations

import argparse
import time

import torch

from orthoptim.stress import run_stress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, default=10_000, help="matrices per shape (6 shapes)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = run_stress(args.per_shape, seed=args.seed, compute_dtypes=(torch.float32, torch.bfloat16), progress=True)
    print("| schedule | normalization | dtype | matrices | non-finite | max σ(O) | bound | negative gains | min gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.refused:
            print(f"| {r.schedule} | {r.normalization} | {r.compute_dtype} | — | refused up front | | | | |")
            continue
        print(
            f"| {r.schedule} | {r.normalization} | {r.compute_dtype} | {r.matrices} | {r.nonfinite} | "
            f"{r.max_singular_value:.4f} | {r.bound:.3f} | {r.negative_gains} | {r.min_covered_gain:.4f} |"
        )
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} configurations, {len(bad)} failing, {time.perf_counter() - t0:.0f} s")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
