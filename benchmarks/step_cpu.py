"""Optimizer step time on GPT-2-small's 48 hidden matrices, orthoptim vs torch.optim.Muon, same process.

    .venv/bin/python benchmarks/step_cpu.py [--layers 12] [--repeats 3] [--rounds 3] [--device cpu] [--configs 0 1 2]

Matrices: per layer {768×2304, 768×768, 3072×768, 768×3072} (the shapes listed for GPT-2 small in the project's
issue), fp32 parameters with random gradients. Each configuration runs in fresh processes, in turn with the others
(``time_in_subprocesses``). Prints median ms per ``step()`` and the ratio to torch.optim.Muon measured in the same
run. Not a test: machines are shared and noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import orthoptim
from orthoptim.polar.orthogonalize import resolve_compute_dtype

SHAPES = ((768, 2304), (768, 768), (3072, 768), (768, 3072))
#: What ``compute_dtype=None`` resolves to on this machine's CPU (bfloat16 where it has native bf16 products).
DEFAULT_DTYPE = str(resolve_compute_dtype(None, torch.device("cpu"))).replace("torch.", "")


def params_and_grads(layers: int, device: str) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for _ in range(layers) for s in SHAPES]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    return params, grads


def one_step_ms(opt: torch.optim.Optimizer, device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def time_alone(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], args: argparse.Namespace) -> float:
    """Median ms per step of one optimizer (after a warm-up step that allocates its state)."""
    params, grads = params_and_grads(args.layers, args.device)
    opt = make(params)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    return statistics.median(one_step_ms(opt, args.device) for _ in range(args.repeats))


def time_in_subprocesses(configs: list[int], args: argparse.Namespace) -> list[float]:
    """Each configuration in a fresh process, ``--rounds`` times in turn; the median over rounds of each.

    Why fresh processes: on the CPU the step's speed depends on the allocator's state (which pages are already
    mapped), so a configuration timed after another in one process inherits its heap; a shared machine that
    drifts then slows all configurations of a round alike instead of whichever ran at a bad moment.
    """
    per: list[list[float]] = [[] for _ in configs]
    base = [sys.executable, __file__, "--layers", str(args.layers), "--repeats", str(args.repeats)]
    for _ in range(args.rounds):
        for j, k in enumerate(configs):
            out = subprocess.run([*base, "--device", args.device, "--only", str(k)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"configuration {k} failed:\n{out.stderr}")
            per[j].append(float(out.stdout.strip().splitlines()[-1]))
    return [statistics.median(t) for t in per]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="rows to run (default: all; 0 first)")
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    jordan = (3.4445, -4.7750, 2.0315)
    configs: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = [
        ("torch.optim.Muon (Jordan NS5, bf16, per-matrix loop)", lambda ps: torch.optim.Muon(ps, lr=0.02)),
        (
            "orthoptim.Muon, same math (Jordan NS5, bf16), megabatched",
            lambda ps: orthoptim.Muon(ps, lr=0.02, ns_coefficients=jordan, ns_steps=5, compute_dtype="bfloat16"),
        ),
        (
            f"orthoptim.Muon defaults (compute dtype here: {DEFAULT_DTYPE})",
            lambda ps: orthoptim.Muon(ps, lr=0.02),
        ),
        (
            "orthoptim.Muon defaults, float32 compute (Gram form where cheaper)",
            lambda ps: orthoptim.Muon(ps, lr=0.02, compute_dtype="float32"),
        ),
        (
            "orthoptim.Muon defaults, float32 compute, standard form only",
            lambda ps: orthoptim.Muon(ps, lr=0.02, compute_dtype="float32", iteration="standard"),
        ),
    ]
    if args.only is not None:
        print(time_alone(configs[args.only][1], args))
        return
    print(
        f"# optimizer step, {4 * args.layers} matrices (GPT-2 small shapes), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} steps per process, "
        f"median over {args.rounds} fresh processes per configuration, run in turn"
    )
    print("\n| configuration | ms / step | × torch.optim.Muon |\n|---|---|---|")
    chosen = list(range(len(configs))) if args.configs is None else args.configs
    if not chosen or chosen[0] != 0 or any(not 0 <= k < len(configs) for k in chosen):
        parser.error(f"--configs: row numbers in [0, {len(configs) - 1}], starting with 0 (torch.optim.Muon)")
    results = time_in_subprocesses(chosen, args)
    for k, ms in zip(chosen, results, strict=True):
        print(f"| {configs[k][0]} | {ms:.0f} | {ms / results[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
