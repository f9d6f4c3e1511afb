"""Distributed orthogonalization: work and traffic per rank vs world size, and step time on gloo.

    .venv/bin/python benchmarks/distributed.py [--layers 12] [--steps 3] [--worlds 1 2 4] [--plan-worlds 1 2 4 8 16]
        [--plan-only]

Parameters: GPT-2 small's hidden matrices, 12 × {768×2304, 768×768, 3072×768, 768×3072}, float32, the same random
gradients on every rank (as after DDP's all-reduce). Optimizer: ``orthoptim.Muon`` with its defaults (the compute
dtype is auto: bfloat16 on CPUs with native bf16 products, float32 elsewhere).

1. Plan (no processes): the owner assignment ``orthoptim.distributed`` computes — the optimizer's own functions —
   for each world size: matrices and Newton–Schulz FLOPs of the busiest rank (5 steps; ``matrix_flops``), their
   ratio to a perfect 1/world split, and the bytes each rank receives per step: replicated parameters (DDP:
   one all-gather per shape) and row-sharded ones (FSDP2: rows to the owner and back).
2. Every layout (no processes): DDP, FSDP2, HSDP, tensor parallel and TP × FSDP as torch's APIs place the
   parameters, for GPT-2 small and a mixture of experts (OLMoE-1B-7B's shapes): orthogonalization FLOPs of the
   busiest rank against total/world, and the bytes each rank sends plus receives in the optimizer's exchange
   per step (logical point-to-point bytes; how a collective routes them is the backend's), computed with the
   executor's own block map (``BlockLayout``), owner assignment and choice of local experts.
3. Step time: ``world`` processes on 127.0.0.1 (gloo), each with cpu_count/world threads, DDP-style replicated
   parameters and FSDP2-style ``Shard(0)`` DTensor parameters; the median over ``--steps`` timed steps (after one
   warm-up) of the slowest rank's ``step()``, and the matrices each rank orthogonalized (counted in the run).

Not a test: machines are shared and noisy. On a CPU with fewer cores than ranks the ranks share cores, so step
time cannot fall there; the per-rank work is the number that transfers to one GPU per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import orthoptim
import orthoptim.optim.backends.torch as update  # the torch backend: its polar calls are counted
from orthoptim.distributed import BlockLayout, assign_owners, gather_bytes, matrix_flops, rank_counts, shard_sizes
from orthoptim.distributed.exchange import uses_all_gather

SHAPES = ((768, 2304), (768, 768), (3072, 768), (768, 3072))
NS_STEPS = 5  # orthoptim's default schedule

#: Per layer, (out, in) as nn.Linear stores them, and how tensor parallel cuts each: "col" (ColwiseParallel:
#: output rows) or "row" (RowwiseParallel: input columns). GPT-2 small: fused qkv, attention out, MLP up, down.
GPT2_LAYER = (((2304, 768), "col"), ((768, 768), "row"), ((3072, 768), "col"), ((768, 3072), "row"))
#: A mixture of experts: OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924 config.json: hidden_size 2048, 16 layers, 64
#: experts of intermediate_size 1024), each layer's q, k, v, o and its experts' gate, up, down stacked (E, m, n).
MOE_LAYER = (
    *(((2048, 2048), "col"),) * 3,
    ((2048, 2048), "row"),
    ((64, 1024, 2048), "col"),
    ((64, 1024, 2048), "col"),
    ((64, 2048, 1024), "row"),
)
MODELS = {"GPT-2 small": (GPT2_LAYER, 12), "OLMoE-1B-7B": (MOE_LAYER, 16)}
LAYOUTS = ("DDP", "FSDP", "HSDP", "TP", "TP×FSDP")


def _placements(layout: str, shape: tuple[int, ...], cut: str, world: int) -> tuple[tuple[int, ...], list[Any]]:
    """(mesh shape, placements) of one parameter under ``layout`` as torch's APIs place it: ``fully_shard`` dim 0,
    HSDP on a (2, world/2) mesh, ``ColwiseParallel``/``RowwiseParallel`` on the matrices' output/input dim, and
    TP × FSDP on a (world/2, 2) mesh (``_StridedShard`` where both cut dim 0, as torch 2.13 places it)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    tp_dim = len(shape) - 2 if cut == "col" else len(shape) - 1
    if layout == "FSDP":
        return (world,), [Shard(0)]
    if layout == "HSDP":
        return (2, world // 2), [Replicate(), Shard(0)]
    if layout == "TP":
        return (world,), [Shard(tp_dim)]
    assert layout == "TP×FSDP", layout
    dp = _StridedShard(0, split_factor=2) if tp_dim == 0 else Shard(0)
    return (world // 2, 2), [dp, Shard(tp_dim)]


def layout_rows(model: str, world: int) -> list[str]:
    """One table row per layout: the optimizer's exchange and orthogonalization work on the busiest rank, from
    the same owner assignment (``assign_owners``) and block map (``BlockLayout``) the executor uses."""
    layer, layers = MODELS[model]
    params = [p for _ in range(layers) for p in layer]
    total = sum(math.prod(s[:-2]) * matrix_flops(*s[-2:], NS_STEPS) for s, _ in params)
    rows = []
    for layout in LAYOUTS:
        flops, moved = [0] * world, [0] * world
        costs, items = [], []  # owned work: (parameter, matrices, block map or None for a replicated matrix)
        for i, (shape, cut) in enumerate(params):
            count, cost = math.prod(shape[:-2]), matrix_flops(*shape[-2:], NS_STEPS)
            if layout == "DDP":
                costs += [cost] * count
                items += [(i, 1, None)] * count
                continue
            blocks = BlockLayout.of(shape, *_placements(layout, shape, cut, world))
            if blocks.local_matrices():  # experts orthogonalized where they live (replicas each compute theirs)
                for r, b in enumerate(blocks.blocks):
                    flops[r] += count * cost * b.numel // math.prod(shape)
                continue
            costs.append(count * cost)
            items.append((i, count, blocks))
        owners, loads = assign_owners(costs, world)
        for r in range(world):
            flops[r] += loads[r]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for (i, _, blocks), owner in zip(items, owners, strict=True):
            shape = params[i][0]
            if blocks is None:  # DDP: one all-gather (or broadcasts) per megabatch of same-shape matrices
                by_shape.setdefault(shape[-2:], []).append(owner)
                continue
            for r, b in enumerate(blocks.exchange_bytes(owner, 4)):
                moved[r] += b
        for (m, n), shape_owners in by_shape.items():
            counts = rank_counts(shape_owners, world)
            width = max(counts) if uses_all_gather(counts) else None  # padded slices, or one broadcast per owner
            for r in range(world):
                sent = (counts[r] if width is None else width) * m * n * 4 * (world - 1)
                moved[r] += gather_bytes(counts, r, m * n, 4) + sent
        busiest = max(range(world), key=lambda r: flops[r])
        rows.append(
            f"| {model} | {layout} | {world} | {flops[busiest] / 1e9:.1f} | {flops[busiest] * world / total:.3f} "
            f"| {max(moved) / 2**20:.1f} | {sum(moved) / world / 2**20:.1f} |"
        )
    return rows


def layouts_table(worlds: list[int]) -> str:
    lines = [
        "| model | layout | world | GFLOP, busiest rank | busiest / (total/world) | MB moved, busiest rank "
        "| MB moved, mean per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for world in worlds:
            lines += layout_rows(model, world)
    return "\n".join(lines)


def plan_table(layers: int, worlds: list[int]) -> str:
    shapes = [s for _ in range(layers) for s in SHAPES]
    costs = [matrix_flops(m, n, NS_STEPS) for m, n in shapes]
    total = sum(costs)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(s, []).append(i)
    lines = [
        "| world | matrices, busiest rank | GFLOP, busiest rank | busiest / (total/world) "
        "| DDP MB received, busiest rank | FSDP2 MB in+out, busiest rank |",
        "|---|---|---|---|---|---|",
    ]
    for world in worlds:
        owners, loads = assign_owners(costs, world)
        busiest = max(range(world), key=lambda r: loads[r])
        ddp = max(
            sum(
                gather_bytes(rank_counts([owners[i] for i in idx], world), r, m * n, 4)
                for (m, n), idx in by_shape.items()
            )
            for r in range(world)
        )
        fsdp = [0] * world
        for (m, n), owner in zip(shapes, owners, strict=True):
            rows = shard_sizes(m, world)
            for r in range(world):
                if r != owner:  # rank r sends its rows to the owner and gets them back, both ways
                    fsdp[r] += 2 * rows[r] * n * 4
                    fsdp[owner] += 2 * rows[r] * n * 4
        lines.append(
            f"| {world} | {owners.count(busiest)} | {loads[busiest] / 1e9:.1f} | {loads[busiest] * world / total:.3f} "
            f"| {ddp / 2**20:.1f} | {max(fsdp) / 2**20:.1f} |"
        )
    return "\n".join(lines)


def _rank_main(rank: int, world: int, port: int, layers: int, steps: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for layout in ("replicated", "sharded"):
            results[layout] = _time(rank, world, layers, steps, layout)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()
        time.sleep(0.2)  # see examples/ddp_train.py: let gloo's worker threads finish before exit
    finally:
        dist.destroy_process_group()


def _time(rank: int, world: int, layers: int, steps: int, layout: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) * 0.02 for _ in range(layers) for s in SHAPES]
    grads = [torch.randn(p.shape, generator=gen) for p in full]
    if layout == "sharded":
        mesh = init_device_mesh("cpu", (world,))

        def shard(t: torch.Tensor) -> Any:
            sizes = shard_sizes(t.shape[0], world)
            local = t[sum(sizes[:rank]) : sum(sizes[: rank + 1])].clone()
            return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())

        params = [nn.Parameter(shard(t)) for t in full]
        grads = [shard(g) for g in grads]
    else:
        params = [nn.Parameter(t) for t in full]
    opt = orthoptim.Muon(params, lr=0.02)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    counted = [0]
    original = update.polar

    def counting(M: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        counted[0] += M.shape[0]
        return original(M, *args, **kw)

    update.polar = counting  # type: ignore[assignment]
    opt.step()  # warm-up: state, plan
    counted[0] = 0
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
        times.append(float(elapsed))
    update.polar = original  # type: ignore[assignment]
    per_rank = torch.tensor([counted[0] / steps])
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, per_rank)
    return {"ms": 1e3 * statistics.median(times), "matrices": [int(t) for t in gathered]}


def time_table(layers: int, steps: int, worlds: list[int]) -> str:
    lines = [
        "| world | threads/rank | replicated (DDP) ms/step | sharded (FSDP2) ms/step | matrices per rank |",
        "|---|---|---|---|---|",
    ]
    for world in worlds:
        out = os.path.join(tempfile.mkdtemp(), "result.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_rank_main, args=(world, port, layers, steps, out), nprocs=world, start_method="spawn")
        with open(out) as f:
            res = json.load(f)
        threads = max(1, (os.cpu_count() or 1) // world)
        lines.append(
            f"| {world} | {threads} | {res['replicated']['ms']:.0f} | {res['sharded']['ms']:.0f} "
            f"| {'/'.join(map(str, res['replicated']['matrices']))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--plan-worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--plan-only", action="store_true", help="print the plan tables only (no processes)")
    args = parser.parse_args()
    dtype = orthoptim.resolve_compute_dtype(None, torch.device("cpu"))
    print(f"GPT-2 small hidden matrices: {args.layers} × {list(SHAPES)}, float32, Muon defaults (compute {dtype})\n")
    print("Per-rank orthogonalization work and traffic per step (from the owner plan):\n")
    print(plan_table(args.layers, args.plan_worlds))
    worlds = [w for w in args.plan_worlds if w >= 4 and w % 2 == 0]
    print("\nEvery layout (Muon, float32 momentum; bytes each rank sends plus receives in the optimizer's exchange):\n")
    print(layouts_table(worlds))
    if args.plan_only:
        return
    print(f"\nStep time on gloo, {os.cpu_count()} CPU cores, median of {args.steps} steps:\n")
    print(time_table(args.layers, args.steps, args.worlds))


if __name__ == "__main__":
    main()
