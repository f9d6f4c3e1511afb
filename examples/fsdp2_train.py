"""Sharded training with FSDP2 (``fully_shard``) and orthoptim.Hybrid, with a torch.distributed.checkpoint round trip.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py                        # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --ckpt /tmp/ck          # train, save a sharded checkpoint
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --resume /tmp/ck        # load it and continue

Every parameter is a DTensor sharded by rows (``Shard(0)``); no rank holds a whole matrix. For each matrix the
optimizer gathers the rows of its momentum to one owner rank (owners balance FLOPs), which orthogonalizes it —
NorMuon's row statistics and Frobenius rescale on the whole matrix, exactly — and sends each rank its rows of
the update back. The optimizer state stays sharded, so the checkpoint is sharded too (one file per rank).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import orthoptim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--ckpt", help="save model + optimizer here (torch.distributed.checkpoint) at the end")
    parser.add_argument("--resume", help="load model + optimizer from here before training")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device_type = "cuda" if cuda else "cpu"
    try:
        mesh = init_device_mesh(device_type, (world,))
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(32, args.width), nn.Tanh(), nn.Linear(args.width, 8)).to(device_type)
        model = nn.Sequential(
            nn.Linear(32, args.width), nn.GELU(), nn.Linear(args.width, args.width), nn.GELU(), nn.Linear(args.width, 8)
        ).to(device_type)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # Matrices → NorMuon (row_norm=True), biases → AdamW; the parameters are DTensors from here on.
        matrices = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim < 2]
        opt = orthoptim.Hybrid((matrices, others), lr=0.02, adamw_lr=3e-3, row_norm=True)
        if args.resume:
            model_sd, optim_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=args.resume)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            if rank == 0:
                print(f"resumed from {args.resume} at optimizer step {_step(opt)}", flush=True)
        start = _step(opt)  # 0, or the optimizer step the checkpoint was saved at
        gen = torch.Generator(device=device_type).manual_seed(1000 * start + rank)  # each rank its own data
        for step in range(start, start + args.steps):
            x = torch.randn(args.batch, 32, generator=gen, device=device_type)
            with torch.no_grad():
                y = teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in (start, start + args.steps - 1) or step % 10 == 0:
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                if rank == 0:
                    print(f"step {step:4d}  loss {float(mean) / world:.5f}", flush=True)
        local = tuple(model[2].weight.to_local().shape)
        if args.ckpt:
            model_sd, optim_sd = get_state_dict(model, opt)  # DTensor state: saved sharded, one file per rank
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.ckpt)
        if rank == 0:
            print(
                f"world {world}: rank 0 holds {local} of the {tuple(model[2].weight.shape)} hidden matrix; "
                f"skipped steps: {opt.nonfinite_skips}" + (f"; saved to {args.ckpt}" if args.ckpt else "")
            )
        # torch 2.13 + gloo: a collective's worker thread may still be releasing tensors (which needs the GIL)
        # when the interpreter exits, and then the process aborts ("terminate called without an active
        # exception"; 5 of 20 runs on a loaded 2-core machine). Waiting a moment first: 0 of 12.
        dist.barrier()
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()


def _step(opt: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far (0 before the first)."""
    return next((int(s["step"]) for s in opt.state.values() if "step" in s), 0)


if __name__ == "__main__":
    main()
