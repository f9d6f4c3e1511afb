"""Optimizer step time on GPT-2-small's 48 hidden matrices, orthoptim vs torch.optim.Muon, same process.

    .venv/bin/python benchmarks/step_cpu.py [--layers 12] [--rounds 8] [--device cpu] [--configs 0 1 2]

Matrices: per layer {768×2304, 768×768, 3072×768, 768×3072} (the shapes listed for GPT-2 small in the project's
issue), fp32 parameters with random gradients. Every configuration gets its own parameters and optimizer in this
one process and one warm-up step; then each round steps every configuration once, in turn (forward order in even
rounds, reverse in odd ones, so a drifting machine favours none). Printed per configuration: median ms per
``step()``, and the median over rounds of its time divided by torch.optim.Muon's *in the same round* — the number
to read on a shared machine, whose speed moves by ±20% from minute to minute but alike for neighbouring steps —
with the smallest and largest of those per-round ratios. Not a test.

Why one process (earlier versions ran each configuration in fresh processes): a configuration that allocates
large blocks afresh every step pays page faults whose cost depends on the heap state other code left. Neither
optimizer does in steady state any more (orthoptim keeps its buffers on the CPU, torch.optim.Muon's per-matrix
temporaries are reused from the heap), and the last column shows it: minor page faults per step (median).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

import orthoptim
from orthoptim.polar.orthogonalize import resolve_compute_dtype

SHAPES = ((768, 2304), (768, 768), (3072, 768), (768, 3072))
#: What ``compute_dtype=None`` resolves to on this machine's CPU (bfloat16 where it has native bf16 products).
DEFAULT_DTYPE = str(resolve_compute_dtype(None, torch.device("cpu"))).replace("torch.", "")
JORDAN = (3.4445, -4.7750, 2.0315)

Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
CONFIGS: list[tuple[str, Maker]] = [
    ("torch.optim.Muon (Jordan NS5, bf16, per-matrix loop)", lambda ps: torch.optim.Muon(ps, lr=0.02)),
    (
        "orthoptim.Muon, same math (Jordan NS5, bf16), megabatched",
        lambda ps: orthoptim.Muon(ps, lr=0.02, ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16"),
    ),
    (f"orthoptim.Muon defaults (compute dtype here: {DEFAULT_DTYPE})", lambda ps: orthoptim.Muon(ps, lr=0.02)),
    (
        "orthoptim.Muon defaults, float32 compute (Gram form where cheaper)",
        lambda ps: orthoptim.Muon(ps, lr=0.02, compute_dtype="float32"),
    ),
    (
        "orthoptim.Muon defaults, float32 compute, standard form only",
        lambda ps: orthoptim.Muon(ps, lr=0.02, compute_dtype="float32", iteration="standard"),
    ),
]


def params_and_grads(layers: int, device: str) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for _ in range(layers) for s in SHAPES]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    return params, grads


def timed_step(opt: torch.optim.Optimizer, device: str) -> tuple[float, int]:
    """(ms, minor page faults) of one ``step()``."""
    if device != "cpu":
        torch.cuda.synchronize()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per configuration, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="rows to run (default: all; 0 first)")
    args = parser.parse_args()
    chosen = list(range(len(CONFIGS))) if args.configs is None else args.configs
    if not chosen or chosen[0] != 0 or any(not 0 <= k < len(CONFIGS) for k in chosen):
        parser.error(f"--configs: row numbers in [0, {len(CONFIGS) - 1}], starting with 0 (torch.optim.Muon)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    opts = []
    for k in chosen:
        params, grads = params_and_grads(args.layers, args.device)
        opt = CONFIGS[k][1](params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()  # warm-up: allocates the optimizer's state
        opts.append(opt)
    ms: list[list[float]] = [[] for _ in chosen]
    faults: list[list[int]] = [[] for _ in chosen]
    for r in tqdm(range(args.rounds), desc="rounds", leave=False):
        order = list(range(len(chosen))) if r % 2 == 0 else list(reversed(range(len(chosen))))
        for j in order:
            t, f = timed_step(opts[j], args.device)
            ms[j].append(t)
            faults[j].append(f)
    print(
        f"# optimizer step, {4 * args.layers} matrices (GPT-2 small shapes), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds in one "
        "process after a warm-up step each"
    )
    print(
        "\n| configuration | ms / step (median) | × torch.optim.Muon (median of per-round ratios) | range | faults |"
        "\n|---|---|---|---|---|"
    )
    for j, k in enumerate(chosen):
        ratios = [a / b for a, b in zip(ms[j], ms[0], strict=True)]
        print(
            f"| {CONFIGS[k][0]} | {statistics.median(ms[j]):.0f} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {statistics.median(faults[j]):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
