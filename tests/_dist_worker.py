"""Scenarios run inside spawned ranks by tests/test_distributed.py (gloo on 127.0.0.1, CPU).

Each scenario is a function ``(rank, world, tmpdir) -> None`` that raises on failure. One launch per world size
runs all of them in order (starting processes and importing torch dominates the time); every rank records
``"ok"`` or the traceback per scenario in ``<outdir>/rank<r>.json``.

Comparisons are against the same optimizer run in this process with ``process_group=None`` on the same full
gradients. Tolerance: ``ATOL`` absolute on parameters of unit scale. The split changes only which rank runs a
matrix and the batch composition of the batched products, which may change the last bits of float32 matmuls.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import orthoptim
from orthoptim.distributed import shard_sizes

ATOL = 2e-6  # float32 rounding on O(1) parameters (a few ulps after several steps)
SHAPES = [(16, 32), (16, 32), (16, 32), (32, 16), (24, 24), (24, 24), (24, 24), (24, 24), (24, 24), (8, 4, 3, 3)]
#: Pinned: the CPU default is bfloat16 where the CPU has native bf16 products; the tolerance is float32's.
F32: dict[str, Any] = {"compute_dtype": "float32"}
CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "muon": lambda ps, **kw: orthoptim.Muon(ps, lr=0.02, **F32, **kw),
    "normuon": lambda ps, **kw: orthoptim.NorMuon(ps, lr=0.02, **F32, **kw),
    "polargrad": lambda ps, **kw: orthoptim.PolarGrad(ps, lr=1e-3, **F32, **kw),
}


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def full_grads(shapes: list[tuple[int, ...]], step: int) -> list[torch.Tensor]:
    """The same gradients on every rank (as after DDP's all-reduce)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in shapes]


def shard(full: torch.Tensor, mesh: Any) -> Any:
    """This rank's ``Shard(0)`` DTensor of ``full`` (torch.chunk rows), built locally without communication."""
    from torch.distributed.tensor import DTensor, Shard

    sizes = shard_sizes(full.shape[0], mesh.size())
    r = mesh.get_local_rank()
    local = full[sum(sizes[:r]) : sum(sizes[: r + 1])].clone()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


def full_value(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def run_reference(make: Callable[..., torch.optim.Optimizer], shapes: list[tuple[int, ...]], steps: list[int]) -> list:
    params = make_params(shapes)
    opt = make(params, process_group=None)
    for s in steps:
        for p, g in zip(params, full_grads(shapes, s), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str, atol: float = ATOL) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = float((a - b).abs().max())
        assert err <= atol, f"{what}: parameter {i} of shape {tuple(b.shape)} differs by {err:.3g} > {atol}"


def assert_replicas_equal(tensors: list[torch.Tensor], what: str) -> None:
    """Bit-identical on every rank: rank 0's values broadcast and compared exactly."""
    for i, t in enumerate(tensors):
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        assert torch.equal(ref, t.detach()), f"{what}: tensor {i} differs between ranks"


# ---------------------------------------------------------------- replicated (DDP-style) parameters


def ddp_matches_single_process(rank: int, world: int, tmp: str) -> None:
    """Mixed shapes, uneven counts (3, 1, 5, 1 matrices), every class, three steps: equal to one process."""
    for name, make in [*CLASSES.items(), ("hybrid", None)]:
        shapes = [*SHAPES, (32,), (16,)] if name == "hybrid" else SHAPES
        if name == "hybrid":
            make = lambda ps, **kw: orthoptim.Hybrid((ps[:-2], ps[-2:]), lr=0.02, **F32, **kw)  # noqa: E731
        params = make_params(shapes)
        opt = make(params)
        assert opt.process_group is not None
        for s in range(3):
            for p, g in zip(params, full_grads(shapes, s), strict=True):
                p.grad = g
            opt.step()
        assert_close([p.detach() for p in params], run_reference(make, shapes, [0, 1, 2]), name)
        assert_replicas_equal([p.detach() for p in params], name)


def ddp_single_matrix(rank: int, world: int, tmp: str) -> None:
    """One matrix: one rank works, the others only receive."""
    shapes = [(16, 32)]
    params = make_params(shapes)
    opt = CLASSES["muon"](params)
    for s in range(2):
        params[0].grad = full_grads(shapes, s)[0]
        opt.step()
    assert_close([params[0].detach()], run_reference(CLASSES["muon"], shapes, [0, 1]), "single")
    assert_replicas_equal([params[0].detach()], "single")


def ddp_wrapper(rank: int, world: int, tmp: str) -> None:
    """A real DistributedDataParallel model, a different batch per rank: equals one process fed the same
    (all-reduced) gradients. (Comparing with a full-batch backward would also compare gradient rounding, which
    the polar factor amplifies along tiny singular directions of these low-rank gradients.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = orthoptim.Hybrid(model, lr=0.02, adamw_lr=1e-2, **F32)
    ref_opt = orthoptim.Hybrid(([ref[0], ref[2]], [ref[1], ref[3]]), lr=0.02, adamw_lr=1e-2, process_group=None, **F32)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = torch.randn(4 * world, 16, generator=gen), torch.randn(4 * world, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]).backward()
        for q, p in zip(ref, model.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert_close([p.detach() for p in model.parameters()], [q.detach() for q in ref], "ddp")
    assert_replicas_equal([p.detach() for p in model.parameters()], "ddp")


def nan_on_one_rank(rank: int, world: int, tmp: str) -> None:
    """A NaN in one rank's gradient only: every rank skips that step, replicas stay bit-identical."""
    shapes = SHAPES
    for name, make in CLASSES.items():
        params = make_params(shapes)
        opt = make(params)
        for s in range(3):
            grads = full_grads(shapes, s)
            if s == 1 and rank == world - 1:
                grads[4][2, 3] = float("nan")  # a matrix another rank may own
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            before = [p.detach().clone() for p in params]
            bufs = [opt.state[p]["momentum_buffer"].clone() for p in params] if s == 1 else []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            skipped = [w for w in caught if "step skipped" in str(w.message)]
            if s == 1:
                assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True)), name
                assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, params, strict=True))
                assert len(skipped) == (1 if rank == 0 else 0), (name, rank, len(skipped))
            else:
                assert not skipped, name
        assert opt.nonfinite_skips == 1, (name, opt.nonfinite_skips)
        assert all(int(opt.state[p]["step"]) == 2 for p in params)
        assert_close([p.detach() for p in params], run_reference(make, shapes, [0, 2]), f"{name} after skip")
        assert_replicas_equal([p.detach() for p in params], f"{name} after skip")


def raise_on_one_rank(rank: int, world: int, tmp: str) -> None:
    """``nonfinite="raise"`` with a NaN on one rank: every rank raises, nothing changes, the group still works."""
    shapes = SHAPES[:4]
    params = make_params(shapes)
    opt = CLASSES["muon"](params, nonfinite="raise")
    grads = full_grads(shapes, 0)
    if rank == 0:
        grads[1][0, 0] = float("inf")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except orthoptim.NonFiniteError as e:
        assert ("parameter of shape (16, 32)" in str(e)) == (rank == 0), str(e)
    else:
        raise AssertionError("no NonFiniteError")
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    for p, g in zip(params, full_grads(shapes, 0), strict=True):
        p.grad = g
    opt.step()
    assert_close([p.detach() for p in params], run_reference(CLASSES["muon"], shapes, [0]), "raise then step")


def grad_missing_on_one_rank(rank: int, world: int, tmp: str) -> None:
    """``.grad`` None on one rank only: a RuntimeError on every rank (no hang), nothing changed."""
    shapes = SHAPES[:4]
    params = make_params(shapes)
    opt = CLASSES["muon"](params)
    for p, g in zip(params, full_grads(shapes, 0), strict=True):
        p.grad = g
    if rank == world - 1:
        params[2].grad = None
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except RuntimeError as e:
        assert "on some ranks" in str(e), str(e)
    else:
        raise AssertionError("no RuntimeError")
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    params[2].grad = None  # now consistent everywhere: that parameter is simply not stepped
    opt.step()
    assert_replicas_equal([p.detach() for p in params], "after mismatch")


def _expect_layout_error(opt: torch.optim.Optimizer, params: list[nn.Parameter], *parts: str) -> None:
    """``opt.step()`` raises the layout RuntimeError containing every one of ``parts``, changes nothing, and the
    group still works after it (the check aborted nothing and left no collective half-issued)."""
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except RuntimeError as e:
        assert "hold different parameters" in str(e) and all(part in str(e) for part in parts), str(e)
    else:
        raise AssertionError("no RuntimeError")
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    total = torch.ones(1)
    dist.all_reduce(total)
    assert int(total) == dist.get_world_size()


def params_differ_in_count(rank: int, world: int, tmp: str) -> None:
    """The last rank's optimizer holds one parameter fewer: every rank raises the same RuntimeError naming each
    rank's count (no gloo abort, no hang), at every step, not just the first."""
    shapes = SHAPES[:4] if rank < world - 1 else SHAPES[:3]
    params = make_params(shapes)
    opt = CLASSES["muon"](params)
    for p, g in zip(params, full_grads(shapes, 0), strict=True):
        p.grad = g
    counts = "4 on rank 0; 3 on rank 1" if world == 2 else f"4 on ranks 0-{world - 2}; 3 on rank {world - 1}"
    where = f"position 3 over all param groups: rank 0 has shape (32, 16) float32 (param group 0), rank {world - 1} "
    for _ in range(2):
        _expect_layout_error(opt, params, f"parameter count: {counts})", where + "has no parameter there")


def params_differ_in_shape(rank: int, world: int, tmp: str) -> None:
    """Same count, the last rank's third parameter transposed: the error names that position and both shapes;
    once that rank's optimizer holds the right parameter, every rank steps, and the check is not redone."""
    shapes = SHAPES[:4]
    params = make_params(shapes)
    if rank == world - 1:
        params[2] = nn.Parameter(params[2].detach().T.contiguous())
    opt = CLASSES["muon"](params)
    for p, g in zip(params, full_grads(shapes, 0), strict=True):
        p.grad = g if p.shape == g.shape else g.T.contiguous()
    _expect_layout_error(
        opt,
        params,
        f"parameter count: 4 on ranks 0-{world - 1})",
        f"position 2 over all param groups: rank 0 has shape (16, 32) float32 (param group 0), rank {world - 1} "
        "has shape (32, 16) float32 (param group 0)",
    )
    if rank == world - 1:  # now every rank holds the same parameters: a changed set is checked again
        params[2] = make_params(shapes)[2]
        opt.param_groups[0]["params"][2] = params[2]
        params[2].grad = full_grads(shapes, 0)[2]
    opt.step()
    layout = opt._executor._layout  # type: ignore[attr-defined]
    opt.step()
    assert opt._executor._layout is layout  # type: ignore[attr-defined]  # encoded once per parameter set, not per step
    assert_close([p.detach() for p in params], run_reference(CLASSES["muon"], shapes, [0, 0]), "after fix")
    assert_replicas_equal([p.detach() for p in params], "after fix")


# ---------------------------------------------------------------- sharded (FSDP2 / DTensor) parameters


#: Row counts smaller than the world size (3, 2), not divisible by it (5), 3-D batches and a conv weight.
SHARDED = [(3, 16), (5, 16), (16, 32), (32, 16), (2, 24), (3, 8, 12), (6, 4, 3, 3)]
PLAIN = [(16, 32), (24, 24)]


def dtensor_matches_single_process(rank: int, world: int, tmp: str) -> None:
    """DTensor Shard(0) parameters mixed with plain ones in one optimizer, every class: equal to one process."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    k = len(SHARDED) + 2  # and two sharded vectors (3 and 16 rows) for Hybrid's AdamW half
    shapes = [*SHARDED, (3,), (16,), *PLAIN]

    def hybrid(ps: list[nn.Parameter], **kw: Any) -> torch.optim.Optimizer:
        return orthoptim.Hybrid(([*ps[: k - 2], *ps[k:]], ps[k - 2 : k]), lr=0.02, adamw_lr=1e-2, **F32, **kw)

    for name, make in [*CLASSES.items(), ("hybrid", hybrid)]:
        if name != "hybrid":
            make = partial(_without_vectors, make, k)
        full = make_params(shapes)
        params = [nn.Parameter(shard(p.detach(), mesh)) for p in full[:k]] + full[k:]
        opt = make(params)
        for s in range(3):
            grads = full_grads(shapes, s)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = shard(g, mesh) if i < k else g
            opt.step()
        got = [full_value(p) for p in params]
        assert_close(got, run_reference(make, shapes, [0, 1, 2]), name)
        assert_replicas_equal(got, name)
        if name == "normuon":  # the row statistics stay sharded like the rows
            v = opt.state[params[0]]["second_moment"]
            assert type(v).__name__ == "DTensor" and tuple(v.shape) == (3, 1), (type(v), v.shape)


def bfloat16_compute_matches_single_process(rank: int, world: int, tmp: str) -> None:
    """The other scenarios pin float32; in bfloat16 (the default on CPUs with native bf16 products, and on GPUs)
    the owner's O arrives in the parameters' dtype, and NorMuon's row factor and PolarGrad's norm must be applied
    with the roundings one process applies (the update finished in bfloat16: 6e-5 off after three NorMuon steps
    before). Replicated and DTensor Shard(0) parameters, Muon, NorMuon and PolarGrad."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    bf16 = {"compute_dtype": "bfloat16"}
    classes: dict[str, Callable[..., torch.optim.Optimizer]] = {
        "muon": lambda ps, **kw: orthoptim.Muon(ps, lr=0.02, **bf16, **kw),
        "normuon": lambda ps, **kw: orthoptim.NorMuon(ps, lr=0.02, **bf16, **kw),
        "polargrad": lambda ps, **kw: orthoptim.PolarGrad(ps, lr=1e-3, **bf16, **kw),
    }
    shapes = [(16, 32), (16, 32), (32, 16), (24, 24), (24, 24), (24, 24)]
    for sharded in (False, True):
        for name, make in classes.items():
            full = make_params(shapes)
            params = [nn.Parameter(shard(p.detach(), mesh)) for p in full] if sharded else full
            opt = make(params)
            for s in range(3):
                for p, g in zip(params, full_grads(shapes, s), strict=True):
                    p.grad = shard(g, mesh) if sharded else g
                opt.step()
            got = [full_value(p) for p in params]
            assert_close(got, run_reference(make, shapes, [0, 1, 2]), f"{name} (sharded={sharded})")
            assert_replicas_equal(got, name)


def split_blocks_match_single_process(rank: int, world: int, tmp: str) -> None:
    """``split=2`` (row blocks orthogonalized on their own) over DTensor Shard(0) parameters — an owner gathers
    whole matrices and cuts them — mixed with replicated ones, every class: equal to one process."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sharded, plain = [(16, 32), (32, 16), (4, 8, 12), (8, 24)], [(16, 32), (24, 24)]
    shapes = [*sharded, *plain]
    for name, make in CLASSES.items():
        make = partial(make, split=2)
        full = make_params(shapes)
        params = [nn.Parameter(shard(p.detach(), mesh)) for p in full[: len(sharded)]] + full[len(sharded) :]
        opt = make(params)
        for s in range(3):
            grads = full_grads(shapes, s)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = shard(g, mesh) if i < len(sharded) else g
            opt.step()
        got = [full_value(p) for p in params]
        assert_close(got, run_reference(make, shapes, [0, 1, 2]), f"{name}, split=2")
        assert_replicas_equal(got, f"{name}, split=2")


def split_sizes_match_single_process(rank: int, world: int, tmp: str) -> None:
    """``split=(8, 4, 4)`` (blocks of unequal sizes, as grouped-query q, k, v) over DTensor Shard(0) and
    replicated parameters, 3-D experts included, every class, with a NaN on one rank at the second step: every
    rank skips it, and the run equals one process's on the other steps."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sharded, plain = [(16, 32), (16, 8), (4, 16, 12)], [(16, 24), (16, 16)]
    shapes = [*sharded, *plain]
    for name, make in CLASSES.items():
        make = partial(make, split=(8, 4, 4), nonfinite="skip")
        full = make_params(shapes)
        params = [nn.Parameter(shard(p.detach(), mesh)) for p in full[: len(sharded)]] + full[len(sharded) :]
        opt = make(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip's warning: counted below instead
            for s in range(3):
                grads = full_grads(shapes, s)
                if s == 1 and rank == world - 1:
                    grads[0][-1, 0] = float("nan")  # in the last rank's rows of a sharded weight
                for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                    p.grad = shard(g, mesh) if i < len(sharded) else g
                opt.step()
        assert opt.nonfinite_skips == 1, (name, opt.nonfinite_skips)
        got = [full_value(p) for p in params]
        assert_close(got, run_reference(make, shapes, [0, 2]), f"{name}, split=(8, 4, 4)")
        assert_replicas_equal(got, f"{name}, split=(8, 4, 4)")


def _without_vectors(make: Callable[..., torch.optim.Optimizer], k: int, ps: list, **kw: Any) -> Any:
    """The optimizer over every parameter but the two vectors at k−2, k−1 (only Hybrid takes vectors)."""
    return make([*ps[: k - 2], *ps[k:]], **kw)


def one_rank_mesh(rank: int, world: int, tmp: str) -> None:
    """DTensor parameters on a one-rank mesh with ``process_group=None``: the local path, without collectives;
    a multi-rank mesh with ``process_group=None`` is refused."""
    from torch.distributed.device_mesh import init_device_mesh

    solo = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "solo"))["solo"]
    shapes = SHARDED[:4]
    for name, make in CLASSES.items():
        params = [nn.Parameter(shard(p.detach(), solo)) for p in make_params(shapes)]
        opt = make(params, process_group=None)
        for s in range(2):
            for p, g in zip(params, full_grads(shapes, s), strict=True):
                p.grad = shard(g, solo)
            opt.step()
        assert_close([p.to_local() for p in params], run_reference(make, shapes, [0, 1]), f"one-rank mesh {name}")
    mesh = init_device_mesh("cpu", (world,))
    try:
        CLASSES["muon"]([nn.Parameter(shard(torch.randn(8, 4), mesh))], process_group=None)
    except ValueError as e:
        assert "runs locally" in str(e), str(e)
    else:
        raise AssertionError("no ValueError for a sharded parameter with process_group=None")


def fsdp2_training(rank: int, world: int, tmp: str) -> None:
    """``fully_shard`` on a small MLP (a 3-row head: zero-row shards at 4 ranks), a different batch per rank, a
    NaN in one rank's gradient shard at step 1: equals one process fed the same (reduce-scattered) gradients."""
    from torch.distributed.fsdp import fully_shard

    for name in ("muon", "normuon"):
        model = _mlp()
        ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = CLASSES[name](list(model.parameters()))
        ref_opt = CLASSES[name](ref, process_group=None)
        gen = torch.Generator().manual_seed(7)
        for s in range(3):
            x, y = torch.randn(2 * world, 16, generator=gen), torch.randn(2 * world, 3, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[2 * rank : 2 * rank + 2]), y[2 * rank : 2 * rank + 2]).backward()
            for q, p in zip(ref, model.parameters(), strict=True):
                q.grad = p.grad.full_tensor()
            if s == 1 and rank == world - 1:  # a NaN in this rank's shard only: every rank skips
                model[0].weight.grad.to_local()[0, 0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            if s != 1:
                ref_opt.step()
        assert opt.nonfinite_skips == 1, (name, opt.nonfinite_skips)
        got = [p.full_tensor() for p in model.parameters()]
        assert_close(got, [q.detach() for q in ref], f"fsdp2 {name}")
        assert_replicas_equal(got, f"fsdp2 {name}")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 3, bias=False))


def fsdp2_checkpoint(rank: int, world: int, tmp: str) -> None:
    """DCP save/load of a sharded NorMuon state: resuming gives the uninterrupted run's parameters exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _mlp()
        fully_shard(model)
        return model, orthoptim.NorMuon(list(model.parameters()), lr=0.02, **F32)

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for s in steps:
            gen = torch.Generator().manual_seed(100 + s)
            x, y = torch.randn(2 * world, 16, generator=gen), torch.randn(2 * world, 3, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[2 * rank : 2 * rank + 2]), y[2 * rank : 2 * rank + 2]).backward()
            opt.step()

    model, opt = build()
    train(model, opt, range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    v = next(s["second_moment"] for s in optim_sd["state"].values())
    assert type(v).__name__ == "DTensor", type(v)  # sharded state stays sharded in the checkpoint
    path = os.path.join(tmp, "ckpt")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    train(model, opt, range(2, 4))

    fresh, fresh_opt = build()
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_opt, range(2, 4))
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local()), "resumed run differs"
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("momentum_buffer", "second_moment", "step"):
            x, y = opt.state[p][key], fresh_opt.state[q][key]
            x, y = (x.to_local(), y.to_local()) if hasattr(x, "to_local") else (x, y)
            assert torch.equal(x, y), key


SCENARIOS: dict[str, Callable[[int, int, str], None]] = {
    f.__name__: f
    for f in (
        ddp_matches_single_process,
        ddp_single_matrix,
        ddp_wrapper,
        nan_on_one_rank,
        raise_on_one_rank,
        grad_missing_on_one_rank,
        dtensor_matches_single_process,
        bfloat16_compute_matches_single_process,
        split_blocks_match_single_process,
        split_sizes_match_single_process,
        one_rank_mesh,
        fsdp2_training,
        fsdp2_checkpoint,
        # Last: before the fix a rank aborted here (gloo EnforceNotMet), taking every later scenario with it.
        params_differ_in_count,
        params_differ_in_shape,
    )
}


def run_rank(rank: int, world: int, port: int, names: list[str], outdir: str, paths: str = "cpu") -> None:
    """Entry point of one spawned rank: run ``names`` in order, record results, always tear the group down.

    ``paths="cuda"`` runs every optimizer with ``backend="torch@cuda"``, the torch backend's CUDA choices (stacked
    momentum held to the commit, device-side skip selects), which the CPU would not otherwise take; ``paths="fused"``
    with ``backend="triton"``, the fused elementwise kernels under Triton's interpreter (TRITON_INTERPRET=1 from the
    parent); ``paths="nd"`` runs ``_dist_worker_nd``'s scenarios (beyond one mesh dimension) instead."""
    table = SCENARIOS
    if paths == "nd":  # the scenarios beyond one mesh dimension, on the CPU's step path
        from ._dist_worker_nd import SCENARIOS as table
    if paths == "cuda":
        F32["backend"] = "torch@cuda"
    if paths == "fused":
        assert os.environ.get("TRITON_INTERPRET") == "1", "the fused ranks need Triton's interpreter"
        F32["backend"] = "triton"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # ranks share two cores
    results: dict[str, str] = {}
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60), init_method="env://"
    )
    try:
        for name in names:
            try:
                table[name](rank, world, outdir)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
        # torch 2.13 + gloo: let the collectives' worker threads release their tensors (they need the GIL)
        # before the interpreter exits, or the process may abort at exit (see examples/ddp_train.py).
        dist.barrier()
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()
