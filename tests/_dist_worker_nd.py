"""Scenarios beyond one mesh dimension, run inside 4 spawned ranks by tests/test_distributed.py (gloo, CPU).

HSDP ``(Replicate(), Shard(0))`` on a (2, 2) mesh, tensor parallel ``Shard(0)``/``Shard(1)`` (hand-placed and by
``parallelize_module``), tensor parallel × FSDP (``_StridedShard``), expert parallel (whole matrices per rank),
2-D products of shards, the refusals, and a DCP checkpoint moved between mesh shapes. As in ``_dist_worker``,
every result is compared with the same optimizer run in this process with ``process_group=None`` on the whole
(unsharded) tensors; DTensors are placed from whole tensors by torch's own ``compute_local_shape_and_global_offset``
(not by orthoptim's block map, which one scenario checks against it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import orthoptim

from ._dist_worker import (
    CLASSES,
    F32,
    assert_close,
    assert_replicas_equal,
    full_grads,
    full_value,
    make_params,
    run_reference,
)


def _place(full: torch.Tensor, mesh: Any, placements: list[Any]) -> Any:
    """This rank's DTensor of ``full`` under ``placements``, its block cut where torch says it lies."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))].clone()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def _meshes() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    return {
        "1d": init_device_mesh("cpu", (4,)),
        "hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")),
    }


def _cases() -> list[tuple[str, list[tuple[tuple[int, ...], str, list[Any]]]]]:
    """(name, [(shape, mesh, placements)]) — each case one optimizer over those DTensors and two plain matrices."""
    from torch.distributed.tensor import Replicate, Shard

    R, S0, S1, S2 = Replicate(), Shard(0), Shard(1), Shard(2)
    return [
        (
            "hsdp",  # rows fewer than the shard ranks (3), uneven (5), experts (local), rows of experts, a conv
            [
                ((3, 16), "hsdp", [R, S0]),
                ((5, 16), "hsdp", [R, S0]),
                ((16, 32), "hsdp", [R, S0]),
                ((4, 8, 12), "hsdp", [R, S0]),
                ((2, 8, 12), "hsdp", [R, S1]),
                ((6, 4, 3, 3), "hsdp", [R, S0]),
            ],
        ),
        (
            "tensor parallel",  # colwise, rowwise (uneven: 10 columns on 4 ranks), rows/columns of experts
            [
                ((16, 32), "1d", [S0]),
                ((32, 10), "1d", [S1]),
                ((24, 24), "1d", [S1]),
                ((3, 8, 12), "1d", [S2]),
                ((3, 8, 12), "1d", [S1]),
                ((8, 12), "1d", [R]),
            ],
        ),
        (
            "2-D shards",  # TP × FSDP laid out by hand: both dims cut, the same dim twice, replicated columns
            [
                ((16, 32), "hsdp", [S0, S1]),
                ((32, 16), "hsdp", [S1, S0]),
                ((16, 24), "hsdp", [S0, S0]),
                ((12, 16), "hsdp", [S1, R]),
                ((2, 8, 12), "hsdp", [S0, S2]),
            ],
        ),
        (
            "expert parallel",  # whole experts per rank: orthogonalized where they live
            [((8, 16, 12), "1d", [S0]), ((4, 12, 16), "hsdp", [S0, S0]), ((4, 8, 8), "hsdp", [R, S0])],
        ),
    ]


def placements_match_single_process(rank: int, world: int, tmp: str) -> None:
    """Every case, every class (Hybrid too, with a sharded vector for its AdamW half): two steps equal one
    process's on the whole tensors; every rank holds bit-identical whole values; expert-parallel parameters are
    planned local (nothing gathered), every other DTensor gathered whole by an owner."""
    from torch.distributed.tensor import Shard

    meshes = _meshes()
    for case, entries in _cases():
        k = len(entries)
        shapes = [s for s, _, _ in entries] + [(16,), (16, 32), (24, 24)]

        def hybrid(ps: list[nn.Parameter], k: int = k, **kw: Any) -> torch.optim.Optimizer:
            return orthoptim.Hybrid(([*ps[:k], *ps[k + 1 :]], [ps[k]]), lr=0.02, adamw_lr=1e-2, **F32, **kw)

        makes: list[tuple[str, Callable[..., torch.optim.Optimizer]]] = [
            *((n, _without(m, k)) for n, m in CLASSES.items()),
            ("hybrid", hybrid),
        ]
        for name, make in makes:
            full = make_params(shapes)
            places = [(meshes[mesh], pl) for _, mesh, pl in entries] + [(meshes["1d"], [Shard(0)])]
            params = [nn.Parameter(_place(p.detach(), *mp)) for p, mp in zip(full, places, strict=False)]
            params += full[k + 1 :]
            opt = make(params)
            for s in range(2):
                grads = full_grads(shapes, s)
                for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                    p.grad = _place(g, *places[i]) if i <= k else g
                opt.step()
            got = [full_value(p) for p in params]
            assert_close(got, run_reference(make, shapes, [0, 1]), f"{case}, {name}")
            assert_replicas_equal(got, f"{case}, {name}")
            split = next(s for s in opt._executor._plans[next(iter(opt._executor._plans))] if s is not None)  # type: ignore[attr-defined]
            local = {i for mb in split.local for i in mb.indices}
            gathered = {i for mb in split.sharded for i in mb.indices}
            want_local = set(range(k)) if case == "expert parallel" else {3} if case == "hsdp" else set()
            assert local == want_local and gathered == set(range(k)) - want_local, (case, name, local, gathered)
            if name == "normuon":  # row statistics: a DTensor on the parameter's mesh, whole values right
                v = opt.state[params[0]]["second_moment"]
                assert type(v).__name__ == "DTensor" and v.device_mesh == params[0].device_mesh, (case, v)


def _without(make: Callable[..., torch.optim.Optimizer], k: int) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer over every parameter but the vector at position k (only Hybrid takes vectors)."""
    return lambda ps, **kw: make([*ps[:k], *ps[k + 1 :]], **kw)


def blocks_match_torch(rank: int, world: int, tmp: str) -> None:
    """orthoptim's block map against torch's ``compute_local_shape_and_global_offset`` for this rank, over every
    case's placements and an uneven 2-D product (7 rows, 5 columns)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from orthoptim.distributed import block_layout

    meshes = _meshes()
    entries = [e for _, es in _cases() for e in es]
    entries += [((7, 5), "hsdp", [Shard(0), Shard(1)]), ((7, 5), "hsdp", [Shard(1), Shard(1)])]
    entries += [((7, 5), "hsdp", [Replicate(), Replicate()])]
    for shape, mesh, pl in entries:
        p = _place(torch.zeros(shape), meshes[mesh], pl)
        block = block_layout(p, list(range(world)), rank).blocks[rank]
        local, offset = compute_local_shape_and_global_offset(torch.Size(shape), meshes[mesh], pl)
        assert block.sizes == tuple(local), (shape, pl, block, local)
        assert not block.numel or block.starts == tuple(offset), (shape, pl, block, offset)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 12, bias=False))


def _train_against_reference(model: nn.Module, name: str, batch: int, nan_at: int | None = None) -> None:
    """Three steps on ``model`` (parameters already placed), batch number ``batch`` of four on this rank (ranks of
    one tensor-parallel group take the same), against the single-process optimizer fed the same whole gradients;
    with ``nan_at``, a NaN in the last rank's gradient at that step: every rank skips it, state bit-identical."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = [nn.Parameter(p.full_tensor().detach().clone()) for p in model.parameters()]
    opt = CLASSES[name](list(model.parameters()))
    ref_opt = CLASSES[name](ref, process_group=None)
    gen = torch.Generator().manual_seed(7)
    for s in range(3):
        x, y = torch.randn(2 * world, 16, generator=gen), torch.randn(2 * world, 12, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[2 * batch : 2 * batch + 2]), y[2 * batch : 2 * batch + 2]).backward()
        for q, p in zip(ref, model.parameters(), strict=True):
            q.grad = p.grad.full_tensor()
        if s == nan_at and rank == world - 1:
            next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
        before = [(p.to_local().clone(), opt.state[p]["momentum_buffer"].to_local().clone()) for p in opt.state]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        if s == nan_at:
            for (a, b), p in zip(before, opt.state, strict=True):
                assert torch.equal(a, p.to_local()) and torch.equal(b, opt.state[p]["momentum_buffer"].to_local())
        else:
            ref_opt.step()
    assert opt.nonfinite_skips == (1 if nan_at is not None else 0), opt.nonfinite_skips  # type: ignore[attr-defined]
    got = [p.full_tensor() for p in model.parameters()]
    assert_close(got, [q.detach() for q in ref], name)
    assert_replicas_equal(got, name)


def modules_match_single_process(rank: int, world: int, tmp: str) -> None:
    """Real layouts from torch's APIs on a two-layer MLP: HSDP (``fully_shard`` on a (2, 2) mesh) with a NaN on
    one rank, tensor parallel (``ColwiseParallel`` then ``RowwiseParallel`` on 4 ranks) and tensor parallel × FSDP
    on a (2, 2) mesh (``_StridedShard`` on the colwise weight)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    tp = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for name in ("normuon", "polargrad"):
        model = _mlp()
        fully_shard(model, mesh=hsdp)
        _train_against_reference(model, name, rank, nan_at=1)
        model = _mlp()
        parallelize_module(model, tp, plan)
        _train_against_reference(model, name, 0)
        model = _mlp()
        parallelize_module(model, grid["tp"], plan)
        fully_shard(model, mesh=grid["dp"])
        assert "_StridedShard" in str(model[0].weight.placements), model[0].weight.placements
        _train_against_reference(model, name, grid["dp"].get_local_rank())


def refusals(rank: int, world: int, tmp: str) -> None:
    """What the optimizer cannot move is refused on every rank at construction, naming the shape, the placements
    and what is supported: a Partial placement, a mesh of some ranks only under the default (world) group."""
    from torch.distributed.tensor import Partial, Shard

    meshes = _meshes()
    cases = [
        (_place(torch.zeros(8, 6), meshes["1d"], [Shard(0)]), "ok"),
        (
            __import__("torch.distributed.tensor", fromlist=["DTensor"]).DTensor.from_local(
                torch.zeros(8, 6), meshes["1d"], [Partial()], run_check=False
            ),
            "placement P",
        ),
        (_place(torch.zeros(8, 6), meshes["hsdp"]["shard"], [Shard(0)]), "its mesh holds ranks"),
    ]
    for t, want in cases:
        try:
            CLASSES["muon"]([nn.Parameter(t)])
        except ValueError as e:
            text = str(e)
            assert want in text and "(8, 6)" in text and "placements" in text and "supported:" in text, text
        else:
            assert want == "ok", f"no error for {t.placements}"
    total = torch.ones(1)
    dist.all_reduce(total)  # every rank got here: nothing hung, no collective was left half-issued
    assert int(total) == world


def checkpoint_across_meshes(rank: int, world: int, tmp: str) -> None:
    """NorMuon state made by ``init_state()`` and two HSDP steps on a (2, 2) mesh, saved with DCP, then loaded
    (a) into a (4,) FSDP2 model and optimizer with DCP and (b) on rank 0 alone, into a plain model and a
    process-less optimizer (``dcp_to_torch_save``, then ``load_state_dict``): the same whole momentum and row
    statistics, and the next step of both equal to the HSDP run's next step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build(mesh: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _mlp()
        if mesh is not None:
            fully_shard(model, mesh=mesh)
        opt = orthoptim.NorMuon(list(model.parameters()), lr=0.02, **F32, **({} if mesh else {"process_group": None}))
        opt.init_state()
        return model, opt

    def backward(model: nn.Module, s: int) -> None:
        gen = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(2 * world, 16, generator=gen), torch.randn(2 * world, 12, generator=gen)
        model.zero_grad()
        nn.functional.mse_loss(model(x[2 * rank : 2 * rank + 2]), y[2 * rank : 2 * rank + 2]).backward()

    model, opt = build(init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    for s in range(2):
        backward(model, s)
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    path = os.path.join(tmp, "ckpt-hsdp")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    fresh, fresh_opt = build(init_device_mesh("cpu", (4,)))
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    plain, plain_opt = build(None)
    if rank == 0:  # one process, no mesh: the checkpoint as one file, loaded by position
        dcp_to_torch_save(path, os.path.join(tmp, "ckpt.pt"))
        saved = torch.load(os.path.join(tmp, "ckpt.pt"), weights_only=False)
        names = [n for n, _ in plain.named_parameters()]
        plain.load_state_dict(saved["model"])
        groups = [{**g, "params": list(range(len(names)))} for g in saved["optim"]["param_groups"]]
        plain_opt.load_state_dict(
            {"state": dict(enumerate(saved["optim"]["state"][n] for n in names)), "param_groups": groups}
        )
    differ = []  # every collective first (full_tensor), the checks after: a failing rank leaves none hanging
    for p, q, r in zip(model.parameters(), fresh.parameters(), plain.parameters(), strict=True):
        for key in ("param", "momentum_buffer", "second_moment", "step"):
            x, y, z = (
                (p, q, r) if key == "param" else (opt.state[p][key], fresh_opt.state[q][key], plain_opt.state[r][key])
            )
            whole = full_value(x)
            if not torch.equal(whole, full_value(y)):
                differ.append(f"{key} of {tuple(p.shape)} after the load into (4,)")
            if rank == 0 and not torch.equal(whole.reshape(z.shape), z.detach()):
                differ.append(f"{key} of {tuple(p.shape)} after the load into one process: {whole} {z}")
    assert not differ, differ
    backward(model, 2)
    grads = [p.grad.full_tensor() for p in model.parameters()]
    opt.step()
    backward(fresh, 2)
    fresh_opt.step()
    want = [p.full_tensor() for p in model.parameters()]
    assert_close([q.full_tensor() for q in fresh.parameters()], want, "dcp into (4,)")
    if rank == 0:
        for r, g in zip(plain.parameters(), grads, strict=True):
            r.grad = g
        plain_opt.step()
        assert_close([r.detach() for r in plain.parameters()], want, "dcp into one process")


SCENARIOS: dict[str, Callable[[int, int, str], None]] = {
    f.__name__: f
    for f in (
        blocks_match_torch,
        placements_match_single_process,
        modules_match_single_process,
        refusals,
        checkpoint_across_meshes,
    )
}
