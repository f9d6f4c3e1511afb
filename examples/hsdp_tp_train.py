"""HSDP, tensor parallel, TP × FSDP and expert parallel with one orthoptim optimizer each, on 4 ranks.

    torchrun --nproc-per-node 4 examples/hsdp_tp_train.py                 # CPU (gloo) or 4 GPUs (nccl)
    torchrun --nproc-per-node 4 examples/hsdp_tp_train.py --layout tp     # one layout: hsdp, tp, tp_fsdp, ep

Each layout trains the same tiny model (a two-layer MLP, and for ``ep`` a stack of 4 experts) against a fixed
teacher and prints its loss and how rank 0 holds the weights:

* ``hsdp``: ``fully_shard`` on a (2, 2) mesh ``("replicate", "shard")`` — placements ``(Replicate(), Shard(0))``;
* ``tp``: ``ColwiseParallel`` then ``RowwiseParallel`` over 4 ranks — ``Shard(0)`` and ``Shard(1)``;
* ``tp_fsdp``: tensor parallel over 2 ranks, ``fully_shard`` over the other mesh dimension of a (2, 2) mesh;
* ``ep``: experts ``(4, 64, 32)`` sharded over the expert dimension, one whole expert per rank.

The optimizer needs nothing but the parameters: its process group defaults to the world, which every mesh here
spans. Each matrix is orthogonalized whole — by one owner rank that gathers its blocks (one copy of each, not
every replica's) and sends every holder its block of the update — except the experts, which each rank
orthogonalizes where they live.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import orthoptim

LAYOUTS = ("hsdp", "tp", "tp_fsdp", "ep")


class Experts(nn.Module):
    """``E`` linear experts ``(E, out, in)``, each input row through every expert, outputs averaged (a stand-in for
    a routed mixture: the optimizer sees the same stacked 3-D weight)."""

    def __init__(self, experts: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_out, d_in) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.full_tensor() if isinstance(self.weight, DTensor) else self.weight
        return torch.einsum("eoi,bi->bo", w, x) / w.shape[0]


def build(layout: str, device_type: str, world: int) -> tuple[nn.Module, int]:
    """The model laid out for ``layout``, and which batch of the data this rank trains on (ranks of one tensor
    parallel group see the same batch)."""
    torch.manual_seed(0)
    rank = dist.get_rank()
    if layout == "ep":
        model = nn.Sequential(Experts(world, 32, 64), nn.GELU(), nn.Linear(64, 8, bias=False)).to(device_type)
        mesh = init_device_mesh(device_type, (world,))
        w = model[0].weight
        model[0].weight = nn.Parameter(DTensor.from_local(w.detach().chunk(world)[rank].clone(), mesh, [Shard(0)]))
        fully_shard(model[2], mesh=mesh)
        return model, 0  # every rank the same batch: the experts' forward gathers them (a stand-in, not routing)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.GELU(), nn.Linear(64, 8, bias=False)).to(device_type)
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    if layout == "hsdp":
        fully_shard(model, mesh=init_device_mesh(device_type, (2, world // 2), mesh_dim_names=("replicate", "shard")))
        return model, rank
    if layout == "tp":
        parallelize_module(model, init_device_mesh(device_type, (world,)), plan)
        return model, 0
    grid = init_device_mesh(device_type, (world // 2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, grid["tp"], plan)
    fully_shard(model, mesh=grid["dp"])
    return model, grid["dp"].get_local_rank()


def train(layout: str, steps: int, device_type: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batch = build(layout, device_type, world)
    opt = orthoptim.NorMuon(list(model.parameters()), lr=0.02)
    opt.init_state()  # state for every parameter now: a checkpoint taken before the first step covers them all
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(device_type)
    gen = torch.Generator(device=device_type).manual_seed(batch)
    for step in range(steps):
        x = torch.randn(16, 32, generator=gen, device=device_type)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (0, steps - 1):
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"{layout:8s} step {step:3d}  loss {float(mean) / world:.5f}", flush=True)
    if rank == 0:
        for name, p in model.named_parameters():
            local = tuple(p.to_local().shape)
            print(f"{layout:8s} {name}: {tuple(p.shape)} as {tuple(p.placements)}, rank 0 holds {local}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=LAYOUTS, help="one layout (default: all, one after another)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    # TP × FSDP: RowwiseParallel hands FSDP a view as the model's output, and FSDP2 warns that an in-place op on it
    # would skip a hook; the loss here reads it out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.get_world_size() != 4:
        raise SystemExit("run on 4 ranks: torchrun --nproc-per-node 4 examples/hsdp_tp_train.py")
    try:
        for layout in [args.layout] if args.layout else LAYOUTS:
            train(layout, args.steps, "cuda" if cuda else "cpu")
        # torch 2.13 + gloo: let the collectives' worker threads finish before the interpreter exits (see
        # examples/fsdp2_train.py).
        dist.barrier()
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
