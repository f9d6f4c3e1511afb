"""Phase 1 of the step: every megabatch's new state and update computed, nothing written (``Pending``); on one
process, over replicated ranks (each orthogonalizes its share), or for FSDP2 shards (rows sent to an owner)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor

from ..distributed import gather_to_owners, is_dtensor, orthogonalize_split, scatter_from_owners
from ..polar.orthogonalize import resolve_compute_dtype
from ..polar.workspace import Workspace
from . import fused
from .megabatch import Megabatch
from .momentum import momentum_stacks
from .update import finish_update, group_alpha, group_decay, orthogonalizer


@dataclass
class Pending:
    """A megabatch's update, computed in phase 1, and what its commit needs (the step-wide finite flag aside).

    The new momentum is not held unless the commit selects on a device-side flag: the commit recomputes it in
    place from the gradients, with the very operation that produced phase 1's copy inside ``M`` (``lerp``), so
    both have the same bits. For a selecting commit ``old_bufs``/``new_bufs`` hold the stacked momentum
    (``momentum_stacks``).
    """

    params: list[Tensor]
    bufs: list[Tensor]
    grads: list[Tensor]
    momentum: float
    update: Tensor  # (matrices, m, n): O, or O·(−lr·‖M‖_*) in the nuclear mode
    alpha: float | Tensor  # the update is added with this factor (−lr·scale; 1 in the nuclear mode)
    counts: tuple[int, ...]
    decay: float | Tensor  # 1 − lr·wd; the float 1.0 when there is no weight decay
    out_sum: Tensor | None  # 0-d: the sum of O, finite iff every orthogonalized matrix of the megabatch is
    second: list[Tensor] | None = None
    old_second: Tensor | None = None
    new_second: Tensor | None = None
    steps: list[Tensor] | None = None
    second_counts: tuple[int, ...] | None = None  # splits of the second moments, when not ``counts`` (sharded)
    old_bufs: Tensor | None = None  # stacked old and new momentum, held for a commit that selects
    new_bufs: Tensor | None = None  # on a device-side flag (``momentum_stacks``)
    # Left for the commit to multiply the update by (``finish_update``'s ``defer``): NorMuon's (matrices, m, 1) float32
    # row factor, or PolarGrad's (matrices, 1, 1) −lr·⟨O, M⟩ in the update's dtype.
    update_factor: Tensor | None = None
    table: fused.Table | None = None  # the megabatch's address table where the fused kernels apply (``fused.table``)


#: ``start(k, M, orthogonalize)`` begins orthogonalizing megabatch k's ``M`` and returns a thunk yielding O.
StartFn: TypeAlias = Callable[[int, Tensor, Callable[[Tensor], Tensor]], Callable[[], Tensor]]


def orthogonalized_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    megabatches: Sequence[Megabatch],
    group: dict[str, Any],
    *,
    need_flags: bool,
    start: StartFn | None = None,
    held: Workspace | None = None,
    role: str = "",
    selects: bool = True,
    tables: fused.PointerTables | None = None,
) -> list[Pending]:
    """Phase 1 of the functional update: compute every megabatch's new state and update, commit nothing.

    ``need_flags`` asks for a finite flag per megabatch of the output. Non-finite gradients need no cleaning
    here: the commit selects (``torch.where``) rather than multiplies, so a discarded NaN never leaks.
    ``start`` (distributed): every megabatch's orthogonalization is started first — each rank computes its share
    while earlier results travel — and the updates are finished once all have started.
    ``held`` (the CPU, one process): the optimizer's buffers kept between steps; megabatch k's O is written into
    its role ``f"{role}{k}"`` (``_held_update``) instead of a fresh tensor. ``selects``: the commit will select
    on a device-side flag, so the new momentum is held (``momentum_stacks``). ``tables``: the optimizer's address
    tables for the fused kernels (``optim/fused.py``; None: the torch ops).
    """
    mu = group["momentum"]
    orth = orthogonalizer(group, compute_dtype_out=start is None)
    pending = []
    started = []
    for k, mb in enumerate(megabatches):
        m, n = mb.matrix_shape
        idx = mb.indices
        b_mb, g_mb = [bufs[i] for i in idx], [grads[i] for i in idx]
        table = None if tables is None else fused.table(tables, [params[i] for i in idx], b_mb, g_mb, mb.counts, m * n)
        M, old, new = momentum_stacks(b_mb, g_mb, mu, group["nesterov"], (mb.matrices, m, n), held, selects, table)
        if start is None:
            out = None if held is None else _held_update(held, f"{role}{k}", M, group)
            O = orth(M, out, held)
            p = _megabatch_pending(mb, params, grads, bufs, second, steps, M, O, group, need_flags, held)
            p.old_bufs, p.new_bufs, p.table = old, new, table
            pending.append(p)
        else:
            started.append((mb, M, old, new, table, start(k, M, orth)))
    for mb, M, old, new, table, wait in started:
        p = _megabatch_pending(mb, params, grads, bufs, second, steps, M, wait(), group, need_flags)
        p.old_bufs, p.new_bufs, p.table = old, new, table
        pending.append(p)
    return pending


def _held_update(held: Workspace, role: str, M: Tensor, group: dict[str, Any]) -> Tensor:
    """A buffer for megabatch M's orthogonalized update, in the compute dtype, laid out wide (the iteration's
    orientation, so its last product writes straight into it), kept in ``held`` from step to step.

    Why (CPU): every update is held until the commit, and freeing them all at the end of a step let glibc return
    the memory to the OS, to be page-faulted back in on the next step — ~40k faults and 0.1–0.5 s of system time
    on a 2.5 s GPT-2-small step (measured 2026-11-23, 2-core CPU; benchmarks/RESULTS.md). The price is that
    memory held between steps: the size of the updates (half the momentum's in bfloat16).
    """
    dtype = resolve_compute_dtype(group["compute_dtype"], M.device)
    b, m, n = M.shape
    if m > n:
        return held.get(role, (b, n, m), dtype, M.device).mT
    return held.get(role, (b, m, n), dtype, M.device)


def _megabatch_pending(
    mb: Megabatch,
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    M: Tensor,
    O: Tensor,
    group: dict[str, Any],
    need_flags: bool,
    work: Workspace | None = None,
) -> Pending:
    m, n = mb.matrix_shape
    idx = mb.indices
    decay = group_decay(group)
    p = Pending(
        [params[i] for i in idx],
        [bufs[i] for i in idx],
        [grads[i] for i in idx],
        group["momentum"],
        O,
        group_alpha(group, m, n),
        mb.counts,
        decay,
        None,
    )
    if group["row_norm"]:
        assert second is not None
        p.second = [second[i] for i in idx]
        p.old_second = torch.cat([second[i].reshape(c, m) for i, c in zip(idx, mb.counts, strict=True)])
    p.update, p.new_second, p.out_sum, p.update_factor = finish_update(
        O, M, p.old_second, group, need_flags, work, True
    )
    p.steps = [steps[i] for i in idx]
    return p


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """DTensors replaced by their local shards (views of the same storage under no_grad), others unchanged."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


def split_starter(counts: list[tuple[int, ...]], rank: int, process_group: Any) -> StartFn:
    """Replicated megabatch k: this rank orthogonalizes its ``counts[k][rank]`` matrices, all ranks all-gather."""

    def start(k: int, M: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return orthogonalize_split(M, counts[k], rank, process_group, fn).wait

    return start


def sharded_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    megabatches: Sequence[Megabatch],
    owners: dict[int, int],
    rows: dict[int, list[int]],
    group: dict[str, Any],
    *,
    need_flags: bool,
    rank: int,
    process_group: Any,
    selects: bool = True,
) -> list[Pending]:
    """Phase 1 for DTensor ``Shard(0)`` parameters (FSDP2); ``megabatches`` group them by full matrix shape.

    Every rank computes the momentum of its own rows (elementwise, as the replicated path); each parameter's
    rows of M (and of NorMuon's second moment) go to its owner (``owners``), which orthogonalizes whole
    matrices and computes the whole update — row statistics on whole rows, the Frobenius rescale and the nuclear
    norm over whole matrices, as on one device — and each rank gets its rows of the update back. The pending
    state is flat (1-D) over this rank's shards; ``rows[i][r]`` is how many stacked matrix rows rank r holds.
    ``selects``: as in ``orthogonalized_prepare``.
    """
    mu, decay = group["momentum"], group_decay(group)
    row_norm = group["row_norm"]
    pieces: list[Tensor] = []
    item_owner: list[int] = []
    item_rows: list[list[int]] = []
    staged = []
    for mb in megabatches:
        m, n = mb.matrix_shape
        idx = mb.indices
        p_loc, b_loc, g_loc = (
            local_shards([params[i] for i in idx]),
            local_shards([bufs[i] for i in idx]),
            local_shards([grads[i] for i in idx]),
        )
        numels = tuple(t.numel() for t in p_loc)
        M, old, new = momentum_stacks(b_loc, g_loc, mu, group["nesterov"], (sum(numels),), selects=selects)
        base = len(pieces)
        for i, part in zip(idx, M.split(numels), strict=True):
            pieces.append(part.view(-1, n))
            item_owner.append(owners[i])
            item_rows.append(rows[i])
        s_loc, old_s, s_numels = None, None, None
        if row_norm:
            assert second is not None
            s_loc = local_shards([second[i] for i in idx])
            s_numels = tuple(t.numel() for t in s_loc)
            old_s = torch.cat([s.reshape(-1) for s in s_loc])
            for i, part in zip(idx, old_s.split(s_numels), strict=True):
                pieces.append(part.view(-1, 1))
                item_owner.append(owners[i])
                item_rows.append(rows[i])
        staged.append((mb, base, p_loc, b_loc, g_loc, numels, M, old, new, s_loc, old_s, s_numels))
    full = gather_to_owners(pieces, item_owner, item_rows, rank, process_group)
    orth = orthogonalizer(group)
    results: list[Tensor | None] = [None] * len(pieces)
    like: list[tuple[tuple[int, ...], torch.dtype]] = []
    flags: list[Tensor | None] = []
    for mb, base, _, _, _, _, M, *_ in staged:
        m, n = mb.matrix_shape
        k = len(mb.indices)
        like += [((n,), M.dtype)] * k + ([((1,), torch.float32)] * k if row_norm else [])
        mine = [j for j, i in enumerate(mb.indices) if owners[i] == rank]
        if not mine:
            flags.append(None)
            continue
        counts = [mb.counts[j] for j in mine]
        M_full = torch.cat([full[base + j].view(c, m, n) for j, c in zip(mine, counts, strict=True)])  # type: ignore[union-attr]
        v_full = None
        if row_norm:
            v_full = torch.cat([full[base + k + j].view(c, m) for j, c in zip(mine, counts, strict=True)])  # type: ignore[union-attr]
        update, new_v, out_sum, _ = finish_update(orth(M_full), M_full, v_full, group, need_flags)  # not deferred
        flags.append(out_sum)
        for j, u in zip(mine, update.split(counts), strict=True):
            results[base + j] = u.reshape(-1, n)
        if new_v is not None:
            for j, v in zip(mine, new_v.split(counts), strict=True):
                results[base + k + j] = v.reshape(-1, 1)
    device = pieces[0].device if pieces else torch.device("cpu")
    back = scatter_from_owners(results, like, item_owner, item_rows, rank, device, process_group)
    pending = []
    for (mb, base, p_loc, b_loc, g_loc, numels, _, old, new, s_loc, old_s, s_numels), out_sum in zip(
        staged, flags, strict=True
    ):
        k = len(mb.indices)
        update = torch.cat([back[base + j].reshape(-1) for j in range(k)])
        alpha = group_alpha(group, *mb.matrix_shape)
        p = Pending(p_loc, b_loc, g_loc, mu, update, alpha, numels, decay, out_sum, old_bufs=old, new_bufs=new)
        if row_norm:
            p.second, p.old_second, p.second_counts = s_loc, old_s, s_numels
            p.new_second = torch.cat([back[base + k + j].reshape(-1) for j in range(k)])
        p.steps = [steps[i] for i in mb.indices]
        pending.append(p)
    return pending
