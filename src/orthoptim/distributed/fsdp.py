"""Sharded parameters (DTensor on any mesh: FSDP2, HSDP, tensor and expert parallel): whole parameters travel
to their owner and each rank's block of the update comes back.

Every rank holds one rectangular block of each DTensor parameter (``placement.block_layout``): FSDP2's
``Shard(0)`` gives ``torch.chunk`` ranges of rows, ``(Replicate(), Shard(0))`` (HSDP) the same rows on every
replica, tensor parallel's ``Shard(1)`` ranges of columns, 2-D meshes products of both.

Scheme (per step, per param group): every rank computes the momentum of its own block (elementwise, exact;
replicas compute the same values); one ``all_to_all_single`` sends each parameter's distinct blocks — one
source per block, replicas do not all send — to its owner, which then holds the whole parameter: whole rows
and whole matrices for NorMuon's statistics and PolarGrad's nuclear norm, so both are exact rather than
per-shard approximations. The owner computes the update; a second ``all_to_all_single`` sends every rank
holding a block (replicas included) its block back. Both are asynchronous and issued per megabatch
(``start_gather_to_owners``/``start_scatter_from_owners``), so the executor sends the next megabatch's blocks
and returns the last one's update while it orthogonalizes one. Only the owner ever holds a whole parameter (no
``full_tensor()`` on every rank). Traffic per parameter: its size in, and its size times the replication
out, whatever the world size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .placement import BlockLayout, block_layout, row_state_placements


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (none exists until it is)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def shard_sizes(d0: int, world: int) -> list[int]:
    """Rows of dim 0 held by each rank under ``Shard(0)`` (``torch.chunk`` semantics, as FSDP2 and DTensor)."""
    chunk = -(-d0 // world)
    return [max(0, min(d0, (r + 1) * chunk) - r * chunk) for r in range(world)]


def check_sharded(p: Any, group_ranks: Sequence[int] | None, rank: int) -> BlockLayout:
    """Validate a DTensor parameter and return every group rank's block of it (``placement.block_layout``):
    ``ValueError`` naming the shape, placements and what is supported for anything the executor cannot move."""
    return block_layout(p, group_ranks, rank)


def zeros_row_state(p: Any, rows: int) -> Any:
    """A float32 DTensor holding one value per stacked matrix row of ``p``, laid out like ``p``'s rows.

    Global shape ``(d0, rows // d0)`` with ``d0 = p.shape[0]`` (the plain-tensor layout ``(count, m)``
    reshaped), on ``p``'s mesh, sharded where ``p``'s dim 0 is and replicated on the other mesh dimensions
    (``placement.row_state_placements``): each rank holds the statistics of exactly the rows it holds some of.
    A plain DTensor, so ``torch.distributed.checkpoint`` saves it once per distinct block and reshards it on
    load like the momentum.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    d0 = p.shape[0]
    per = rows // d0
    placements = row_state_placements(p.placements)
    shape = torch.Size((d0, per))
    local_shape, _ = compute_local_shape_and_global_offset(shape, p.device_mesh, placements)
    local = torch.zeros(local_shape, dtype=torch.float32, device=p.to_local().device)
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape, stride=(per, 1))


def _start_all_to_all(
    send: Sequence[Sequence[Tensor]], recv_numels: Sequence[Sequence[int]], dtype: torch.dtype, device: Any, group: Any
) -> Callable[[], list[list[Tensor]]]:
    """Start one ``all_to_all_single`` (asynchronous): ``send[d]`` (1-D tensors) go to rank d. The returned
    function waits for it and gives, per source rank s, the tensors of ``recv_numels[s]`` elements it sent here,
    in order."""
    in_splits = [sum(t.numel() for t in pieces) for pieces in send]
    out_splits = [sum(sizes) for sizes in recv_numels]
    flat = [t.reshape(-1) for pieces in send for t in pieces]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)

    def finish() -> list[list[Tensor]]:
        work.wait()  # the work object keeps `inp` alive until the exchange has read it
        parts = out.split([n for sizes in recv_numels for n in sizes])
        result: list[list[Tensor]] = []
        k = 0
        for sizes in recv_numels:
            result.append(list(parts[k : k + len(sizes)]))
            k += len(sizes)
        return result

    return finish


def _by_dtype(dtypes: Sequence[torch.dtype]) -> list[tuple[torch.dtype, list[int]]]:
    """Items grouped by dtype, groups in order of first appearance (identical on every rank)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, dt in enumerate(dtypes):
        groups.setdefault(dt, []).append(i)
    return list(groups.items())


def start_gather_to_owners(
    pieces: Sequence[Tensor], owners: Sequence[int], layouts: Sequence[BlockLayout], rank: int, group: Any
) -> Callable[[], list[Tensor | None]]:
    """Start sending every item's block to its owner, one source per distinct block (asynchronous: the caller
    computes meanwhile). The returned function waits and gives the whole item (shape ``layouts[i].shape``) for
    the items this rank owns, ``None`` for the others.

    ``pieces[i]`` is this rank's block of item i (any tensor of its block's numel). One ``all_to_all_single``
    per dtype; every rank must start the same items in the same order (``group=None``: the default group).
    """
    world = layouts[0].world if layouts else 1
    if world == 1:  # one rank holds and owns everything
        whole = [t.reshape(lay.shape) for t, lay in zip(pieces, layouts, strict=True)]
        return lambda: list(whole)
    sources = [lay.sources(o) for lay, o in zip(layouts, owners, strict=True)]
    started = []
    for dtype, items in _by_dtype([t.dtype for t in pieces]):
        device = pieces[items[0]].device
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for i in items:
            if rank in sources[i]:
                send[owners[i]].append(pieces[i])
        mine = [i for i in items if owners[i] == rank]
        recv = [[layouts[i].blocks[s].numel for i in mine if s in sources[i]] for s in range(world)]
        started.append((dtype, device, mine, _start_all_to_all(send, recv, dtype, device, group)))

    def finish() -> list[Tensor | None]:
        result: list[Tensor | None] = [None] * len(pieces)
        for dtype, device, mine, wait in started:
            got = wait()
            taken = [0] * world
            for i in mine:
                whole = torch.empty(layouts[i].shape, dtype=dtype, device=device)
                for s in sources[i]:
                    block = layouts[i].blocks[s]
                    whole[block.index()] = got[s][taken[s]].view(block.sizes)
                    taken[s] += 1
                result[i] = whole
        return result

    return finish


def start_scatter_from_owners(
    results: Sequence[Tensor | None],
    dtypes: Sequence[torch.dtype],
    owners: Sequence[int],
    layouts: Sequence[BlockLayout],
    rank: int,
    device: Any,
    group: Any,
) -> Callable[[], list[Tensor]]:
    """The inverse of :func:`start_gather_to_owners`: each owner sends every rank holding a non-empty block of
    item i (replicas included) that block of its whole result ``results[i]``; the returned function waits and
    gives this rank's block of every item, flat (1-D). ``dtypes[i]``: item i's result dtype (known on every rank,
    not only the owner).
    """
    world = layouts[0].world if layouts else 1
    if world == 1:
        flat = [t.reshape(-1) for t in results if t is not None]
        return lambda: list(flat)
    started = []
    for dtype, items in _by_dtype(dtypes):
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for i in items:
            full = results[i]
            if owners[i] == rank:
                assert full is not None
                for r, block in enumerate(layouts[i].blocks):
                    if block.numel:
                        send[r].append(full[block.index()].reshape(-1))
        recv = [[layouts[i].blocks[rank].numel for i in items if owners[i] == s] for s in range(world)]
        started.append((items, _start_all_to_all(send, recv, dtype, device, group)))

    def finish() -> list[Tensor]:
        out: list[Tensor] = [torch.empty(0)] * len(results)
        for items, wait in started:
            got = wait()
            taken = [0] * world
            for i in items:
                s = owners[i]
                out[i] = got[s][taken[s]]
                taken[s] += 1
        return out

    return finish
