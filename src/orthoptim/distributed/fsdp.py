"""Sharded parameters (FSDP2 / DTensor ``Shard(0)``): whole matrices travel to their owner and rows come back.

``torch.distributed.fsdp.fully_shard`` places every parameter as a DTensor sharded on dim 0 over a 1-D mesh,
``torch.chunk``-style: rank r holds rows ``[r·c, min((r+1)·c, d0))`` with ``c = ceil(d0 / world)`` — possibly
none when d0 < world. Seen as a stack of rows of length n (a parameter is ``count`` matrices m×n, i.e.
``count·m`` rows, ``optim.options.matrix_layout``), each rank's shard is a contiguous range of whole rows.

Scheme (per step, per param group): every rank computes the momentum of its own rows (elementwise, exact); one
``all_to_all_single`` sends each parameter's rows to its owner, which then holds the whole matrix — and whole
rows and the whole matrix for NorMuon's statistics and PolarGrad's nuclear norm, so both are exact rather than
per-shard approximations; the owner computes the update; a second ``all_to_all_single`` sends each rank its
rows of the update back. Only the owner ever holds a full matrix (no ``full_tensor()`` on every rank), and the
traffic per parameter is its size twice (in and out), whatever the world size.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (none exists until it is)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def shard_sizes(d0: int, world: int) -> list[int]:
    """Rows of dim 0 held by each rank under ``Shard(0)`` (``torch.chunk`` semantics, as FSDP2 and DTensor)."""
    chunk = -(-d0 // world)
    return [max(0, min(d0, (r + 1) * chunk) - r * chunk) for r in range(world)]


def check_sharded(p: Any, group_ranks: Sequence[int] | None, rank: int) -> list[int]:
    """Validate a DTensor parameter and return its dim-0 rows per rank (``shard_sizes``).

    Supported: a 1-D device mesh whose ranks are the optimizer's process group (``group_ranks``, global ranks in
    group order; ``None`` when the optimizer runs locally: a one-rank mesh), placement ``(Shard(0),)``, this
    rank's local shard as ``torch.chunk`` gives it. Anything else raises ``ValueError`` naming what differs.
    """
    from torch.distributed.tensor import Shard

    shape = tuple(p.shape)
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"DTensor parameter of shape {shape} lives on a {mesh.ndim}-D device mesh; orthoptim supports 1-D "
            "meshes (FSDP2 fully_shard over one mesh dimension)"
        )
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"DTensor parameter of shape {shape} has placements {tuple(p.placements)}; orthoptim supports "
            "(Shard(0),) — as torch.distributed.fsdp.fully_shard places parameters"
        )
    mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if group_ranks is None:
        if len(mesh_ranks) != 1:
            raise ValueError(
                f"DTensor parameter of shape {shape} is sharded over {len(mesh_ranks)} ranks but the optimizer "
                "runs locally (process_group=None, or torch.distributed not initialized): pass the mesh's group, "
                "process_group=mesh.get_group(), or leave the default"
            )
        world = 1
    else:
        if mesh_ranks != list(group_ranks):
            raise ValueError(
                f"DTensor parameter of shape {shape} is sharded over ranks {mesh_ranks} but the optimizer's "
                f"process group is ranks {list(group_ranks)}; pass process_group=mesh.get_group()"
            )
        world = len(mesh_ranks)
    sizes = shard_sizes(shape[0], world)
    local = tuple(p.to_local().shape)
    if local != (sizes[rank], *shape[1:]):
        raise ValueError(
            f"DTensor parameter of shape {shape}: this rank holds a shard of shape {local}, expected "
            f"{(sizes[rank], *shape[1:])} (torch.chunk of dim 0 over {world} ranks); uneven custom sharding is "
            "not supported"
        )
    return sizes


def zeros_row_state(p: Any, rows: int) -> Any:
    """A float32 DTensor holding one value per stacked matrix row of ``p``, sharded like ``p``'s rows.

    Global shape ``(d0, rows // d0)`` with ``d0 = p.shape[0]``, placed ``Shard(0)`` on ``p``'s mesh: each rank
    holds the statistics of exactly the rows it holds of ``p`` (the plain-tensor layout ``(count, m)`` reshaped),
    so the state stays sharded and checkpoints with ``torch.distributed.checkpoint`` like the momentum.
    """
    from torch.distributed.tensor import DTensor

    d0 = p.shape[0]
    per = rows // d0
    local = torch.zeros(p.to_local().shape[0], per, dtype=torch.float32, device=p.to_local().device)
    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=torch.Size((d0, per)), stride=(per, 1)
    )


def _all_to_all(
    send: Sequence[Sequence[Tensor]], recv_numels: Sequence[Sequence[int]], dtype: torch.dtype, device: Any, group: Any
) -> list[list[Tensor]]:
    """One ``all_to_all_single``: ``send[d]`` (1-D tensors) go to rank d; returns, per source rank s, the
    tensors of ``recv_numels[s]`` elements it sent here, in order."""
    in_splits = [sum(t.numel() for t in pieces) for pieces in send]
    out_splits = [sum(sizes) for sizes in recv_numels]
    flat = [t.reshape(-1) for pieces in send for t in pieces]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    parts = out.split([n for sizes in recv_numels for n in sizes])
    result: list[list[Tensor]] = []
    k = 0
    for sizes in recv_numels:
        result.append(list(parts[k : k + len(sizes)]))
        k += len(sizes)
    return result


def _by_dtype(dtypes: Sequence[torch.dtype]) -> list[tuple[torch.dtype, list[int]]]:
    """Items grouped by dtype, groups in order of first appearance (identical on every rank)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, dt in enumerate(dtypes):
        groups.setdefault(dt, []).append(i)
    return list(groups.items())


def gather_to_owners(
    pieces: Sequence[Tensor], owners: Sequence[int], rows: Sequence[Sequence[int]], rank: int, group: Any
) -> list[Tensor | None]:
    """Send every item's local rows to its owner; return the whole item (rows of all ranks, in rank order) for
    the items this rank owns, ``None`` for the others.

    ``pieces[i]`` is this rank's ``(rows[i][rank], width_i)`` part of item i; ``rows[i][r]`` the rows rank r
    holds (its length is the world size; ``group=None`` is the default group). One ``all_to_all_single`` per
    dtype; every rank must pass the same items in the same order.
    """
    result: list[Tensor | None] = [None] * len(pieces)
    world = len(rows[0]) if rows else 1
    if world == 1:  # one rank holds and owns everything
        return list(pieces)
    for dtype, items in _by_dtype([t.dtype for t in pieces]):
        device = pieces[items[0]].device
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for i in items:
            send[owners[i]].append(pieces[i])
        mine = [i for i in items if owners[i] == rank]
        widths = {i: math.prod(pieces[i].shape[1:]) for i in mine}
        recv = [[rows[i][s] * widths[i] for i in mine] for s in range(world)]
        got = _all_to_all(send, recv, dtype, device, group)
        for j, i in enumerate(mine):
            parts = [got[s][j].view(rows[i][s], *pieces[i].shape[1:]) for s in range(world)]
            result[i] = torch.cat(parts)
    return result


def scatter_from_owners(
    results: Sequence[Tensor | None],
    like: Sequence[tuple[tuple[int, ...], torch.dtype]],
    owners: Sequence[int],
    rows: Sequence[Sequence[int]],
    rank: int,
    device: Any,
    group: Any,
) -> list[Tensor]:
    """The inverse of :func:`gather_to_owners`: each owner sends rank r rows ``rows[i][r]`` of its whole result
    ``results[i]``; every rank returns its rows of every item.

    ``like[i] = (trailing shape, dtype)`` of item i's result (known on every rank, not only the owner).
    """
    world = len(rows[0]) if rows else 1
    if world == 1:
        return [t for t in results if t is not None]
    out: list[Tensor] = [torch.empty(0)] * len(results)
    for dtype, items in _by_dtype([dt for _, dt in like]):
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for i in items:
            full = results[i]
            if owners[i] == rank:
                assert full is not None
                for r, part in enumerate(full.split(list(rows[i]))):
                    send[r].append(part)
        recv = [[rows[i][rank] * math.prod(like[i][0]) for i in items if owners[i] == s] for s in range(world)]
        got = _all_to_all(send, recv, dtype, device, group)
        taken = [0] * world
        for i in items:
            s = owners[i]
            out[i] = got[s][taken[s]].view(rows[i][rank], *like[i][0])
            taken[s] += 1
    return out
