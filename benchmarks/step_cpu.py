"""Optimizer step time on GPT-2-small's 48 hidden matrices, orthoptim vs torch.optim.Muon, same process.

    .venv/bin/python benchmarks/step_cpu.py [--layers 12] [--rounds 8] [--device cpu] [--configs 0 1 2] [--model]

Matrices: per layer {768×2304, 768×768, 3072×768, 768×3072} (the shapes listed for GPT-2 small in the project's
issue), fp32 parameters with random gradients. ``--model``: the whole GPT-2-small parameter set instead (token and
position embeddings, biases, LayerNorms, an untied 50257×768 head), orthoptim.Hybrid against torch.optim.Muon on
the hidden matrices plus torch.optim.AdamW (foreach, and fused: the kernel Hybrid's AdamW half runs) on the rest,
the split made by ``orthoptim.split_params``.

Every configuration gets its own parameters and optimizer in this one process and one warm-up step; then each
round steps every configuration once, in turn (forward order in even rounds, reverse in odd ones, so a drifting
machine favours none). Printed per configuration: median ms per step, and the median over rounds of its time
divided by row 0's (torch's optimizers) *in the same round* — the number to read on a shared machine, whose speed
moves by ±20% from minute to minute but alike for neighbouring steps — with the smallest and largest of those
per-round ratios. Not a test.

Why one process (earlier versions ran each configuration in fresh processes): a configuration that allocates
large blocks afresh every step pays page faults, and in a fresh process torch.optim.Muon still faulted in its
second and third steps. In steady state orthoptim allocates nothing large (it keeps its buffers on the CPU) and
torch.optim.Muon's per-matrix temporaries are reused from the heap; torch.optim.AdamW's foreach temporaries (the
size of the embeddings and head) are not. The last column shows it: minor page faults per step (median).
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


ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.01}
ModelMaker = Callable[[nn.Module], list[torch.optim.Optimizer]]


def _torch_pair(model: nn.Module) -> list[torch.optim.Optimizer]:
    mats, rest = orthoptim.split_params(model)
    return [torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(rest, foreach=True, **ADAMW)]  # type: ignore[arg-type]


def _torch_pair_fused(model: nn.Module) -> list[torch.optim.Optimizer]:
    mats, rest = orthoptim.split_params(model)
    return [torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(rest, fused=True, **ADAMW)]  # type: ignore[arg-type]


def _hybrid(**kw: object) -> ModelMaker:
    adamw = {"adamw_lr": ADAMW["lr"], "adamw_betas": ADAMW["betas"], "adamw_weight_decay": ADAMW["weight_decay"]}
    return lambda model: [orthoptim.Hybrid(model, lr=0.02, **adamw, **kw)]  # type: ignore[arg-type]


MODEL_CONFIGS: list[tuple[str, ModelMaker]] = [
    ("torch.optim.Muon (hidden matrices) + torch.optim.AdamW (foreach, the rest)", _torch_pair),
    ("torch.optim.Muon (hidden matrices) + torch.optim.AdamW (fused, the rest)", _torch_pair_fused),
    (
        "orthoptim.Hybrid, same math (Jordan NS5, bf16)",
        _hybrid(ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16"),
    ),
    (f"orthoptim.Hybrid defaults (compute dtype here: {DEFAULT_DTYPE})", _hybrid()),
]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(768), nn.LayerNorm(768)
        self.c_attn, self.c_proj = nn.Linear(768, 2304), nn.Linear(768, 768)
        self.c_fc, self.mlp_proj = nn.Linear(768, 3072), nn.Linear(3072, 768)


class GPT2Small(nn.Module):
    """GPT-2 small's parameters (no forward: the benchmark sets random gradients)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(50257, 768), nn.Embedding(1024, 768)
        self.h = nn.ModuleList(Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(768)
        self.lm_head = nn.Linear(768, 50257, bias=False)


def model_with_grads(layers: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = GPT2Small(layers).to(device)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return model


def params_and_grads(layers: int, device: str) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for _ in range(layers) for s in SHAPES]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    return params, grads


def timed_step(opts: list[torch.optim.Optimizer], device: str) -> tuple[float, int]:
    """(ms, minor page faults) of one ``step()`` of each optimizer of a configuration."""
    if device != "cpu":
        torch.cuda.synchronize()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for opt in opts:
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
    parser.add_argument("--model", action="store_true", help="the whole GPT-2-small parameter set, Hybrid vs torch")
    args = parser.parse_args()
    names = [name for name, _ in (MODEL_CONFIGS if args.model else CONFIGS)]
    chosen = list(range(len(names))) if args.configs is None else args.configs
    if not chosen or chosen[0] != 0 or any(not 0 <= k < len(names) for k in chosen):
        parser.error(f"--configs: row numbers in [0, {len(names) - 1}], starting with 0 (torch's optimizers)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    opts: list[list[torch.optim.Optimizer]] = []
    for k in chosen:
        if args.model:
            built = MODEL_CONFIGS[k][1](model_with_grads(args.layers, args.device))
        else:
            params, grads = params_and_grads(args.layers, args.device)
            built = [CONFIGS[k][1](params)]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        for opt in built:
            opt.step()  # warm-up: allocates the optimizer's state
        opts.append(built)
    ms: list[list[float]] = [[] for _ in chosen]
    faults: list[list[int]] = [[] for _ in chosen]
    for r in tqdm(range(args.rounds), desc="rounds", leave=False):
        order = list(range(len(chosen))) if r % 2 == 0 else list(reversed(range(len(chosen))))
        for j in order:
            t, f = timed_step(opts[j], args.device)
            ms[j].append(t)
            faults[j].append(f)
    what = f"GPT-2 small's parameters, {args.layers} layers" if args.model else f"{4 * args.layers} matrices"
    print(
        f"# optimizer step, {what} (GPT-2 small shapes), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds in one "
        "process after a warm-up step each"
    )
    print(
        "\n| configuration | ms / step (median) | × row 0 (median of per-round ratios) | range | faults |"
        "\n|---|---|---|---|---|"
    )
    for j, k in enumerate(chosen):
        ratios = [a / b for a, b in zip(ms[j], ms[0], strict=True)]
        print(
            f"| {names[k]} | {statistics.median(ms[j]):.0f} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {statistics.median(faults[j]):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
