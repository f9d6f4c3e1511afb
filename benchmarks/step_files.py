"""How many of orthoptim's files one optimizer step enters, and how often it switches between them.

A reader following ``opt.step()`` reads every function it calls; this counts them with ``sys.setprofile``
(Python-level calls only, after a warm-up step so one-time planning is not counted). Targets (README, "The
step"): at most 8 files and 20 file switches for a local CPU ``Muon.step()`` and ``NorMuon.step()``.

    python benchmarks/step_files.py            # Muon, NorMuon, PolarGrad, Hybrid on two 64x32 matrices
    python benchmarks/step_files.py --calls    # also list the functions, in call order
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

import orthoptim

PACKAGE_DIR = os.path.dirname(orthoptim.__file__) + os.sep


def trace_step(step: Callable[[], Any]) -> list[tuple[str, str]]:
    """The (file, function) of every call into orthoptim's code made by ``step()``, in order."""
    calls: list[tuple[str, str]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE_DIR):
            calls.append((frame.f_code.co_filename[len(PACKAGE_DIR) :], frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


def summarize(calls: list[tuple[str, str]]) -> tuple[int, int, int, int]:
    """``(calls, distinct functions, files, file switches)``."""
    files = [f for f, _ in calls]
    switches = sum(1 for a, b in itertools.pairwise(files) if a != b)
    return len(calls), len(set(calls)), len(set(files)), switches


def make_optimizer(name: str) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    if name == "Hybrid":
        bias = torch.nn.Parameter(torch.randn(32))
        params = [*weights, bias]
        return orthoptim.Hybrid([{"params": weights}, {"params": [bias], "algorithm": "adamw"}]), params
    return getattr(orthoptim, name)(weights, lr=0.02), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", action="store_true", help="list the functions each step calls, in order")
    args = parser.parse_args()
    print(f"orthoptim {orthoptim.__version__}, torch {torch.__version__}; one local CPU step, two 64x32 matrices")
    print(f"{'optimizer':<10} {'calls':>6} {'functions':>10} {'files':>6} {'switches':>9}")
    for name in ("Muon", "NorMuon", "PolarGrad", "Hybrid"):
        opt, params = make_optimizer(name)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # warm-up: plans, state and buffers are made once
        calls = trace_step(opt.step)
        n, funcs, files, switches = summarize(calls)
        print(f"{name:<10} {n:>6} {funcs:>10} {files:>6} {switches:>9}")
        if args.calls:
            print("    " + " → ".join(sorted({f for f, _ in calls})))
            for f, fn in calls:
                print(f"      {f}:{fn}")


if __name__ == "__main__":
    main()
