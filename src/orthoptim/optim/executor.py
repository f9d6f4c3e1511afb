"""Phases 1–3 of the step, on one process or over a process group: who computes what, with which backend.

``LocalExecutor``: each group's megabatches through its backend. ``DistributedExecutor``: the same over a process
group — ``orthoptim.distributed`` moves the tensors (owners, gathers, all-to-alls); this module plans the work and
hands the backend's computation to it:

- **replicated** parameters (DDP): every rank computes the momentum of every matrix but orthogonalizes only
  the matrices it owns; the results are all-gathered (``distributed.orthogonalize_split``);
- **sharded** DTensor parameters on any device mesh (FSDP2 ``Shard(0)``, HSDP ``(Replicate, Shard(0))``, tensor
  parallel ``Shard(0)``/``Shard(1)``, their 2-D combinations): each rank computes the momentum of its block
  (``distributed.placement``) and one holder of each distinct block sends it to the parameter's owner, which
  computes the whole update — NorMuon's row statistics and Frobenius rescale, PolarGrad's nuclear norm, on
  whole matrices, as on one device — and sends every holder (replicas included) its block back;
- **local** DTensor parameters whose every rank holds whole matrices (expert parallel: ``(E, m, n)`` sharded
  over the experts): each rank orthogonalizes its own matrices, nothing moves.

Owners balance the orthogonalization FLOPs over all groups at once (largest first to the least-loaded rank).
The plan depends only on the parameters' shapes, so every rank builds the same one and issues the same
collectives in the same order whatever the data. It is cached per set of parameters with gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..distributed import (
    BlockLayout,
    GroupRef,
    ParamLayout,
    agree_params,
    assign_owners,
    check_sharded,
    is_dtensor,
    matrix_flops,
    orthogonalize_split,
    rank_counts,
    start_gather_to_owners,
    start_scatter_from_owners,
)
from ..polar.workspace import Workspace
from . import backends
from .adamw import adamw_prepare
from .backends import reference
from .backends import torch as torch_backend
from .megabatch import CPU_MEGABATCH_BYTES, Megabatch, plan_megabatches
from .options import MatrixOptions, lr_scale, matrix_layout


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """DTensors replaced by their local shards (views of the same storage under no_grad), others unchanged."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


@dataclass
class _GroupSplit:
    """One orthogonalized group's part of the plan (indices are positions in the step's lists)."""

    plain: list[Megabatch] = field(default_factory=list)  # replicated parameters
    counts: list[tuple[int, ...]] = field(default_factory=list)  # per plain megabatch: matrices per rank
    sharded: list[Megabatch] = field(default_factory=list)  # DTensor parameters gathered whole, by matrix shape
    owners: dict[int, int] = field(default_factory=dict)  # sharded position → owner rank
    blocks: dict[int, BlockLayout] = field(default_factory=dict)  # sharded position → every rank's block
    row_blocks: dict[int, BlockLayout] = field(default_factory=dict)  # the same for its NorMuon row statistics
    local: list[Megabatch] = field(default_factory=list)  # DTensors whose every shard is whole matrices (experts)


class LocalExecutor:
    """Phases 1–3 on one process: each group's megabatches (planned once per parameter set) through its backend."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], list[Megabatch]] = {}

    def prepare(
        self,
        gathered: list[Any],
        layouts: Callable[[dict[str, Any], MatrixOptions, list[Tensor]], list[tuple[int, int, int]]],
        need_flags: bool,
        selects: bool,
        tables: Any,
        held: Workspace,
    ) -> list[Any]:
        """Every group's pending update (``gathered`` as for ``DistributedExecutor.prepare``; ``selects``: the
        commit selects on a device flag; ``held``: the optimizer's buffers kept between steps, on the CPU)."""
        pending: list[Any] = []
        for g, (group, opts, params, grads, lists) in enumerate(gathered):
            if not params:
                continue
            if opts is None:
                pending.append(adamw_prepare(params, grads, lists, group))  # the commit takes the step
                continue
            state = (lists["momentum_buffer"], lists.get("second_moment"), lists["step"])
            if opts.backend == "reference":
                pending.append(reference.prepare(params, grads, *state, layouts(group, opts, params), opts))
                continue
            backend = opts.backends.get(grads[0].device.type) or opts.backend_for(grads[0].device)
            # A compiled step keeps no buffers: inductor refuses persistent views of one buffer as graph inputs.
            keep = backend.host_ways and not torch.compiler.is_compiling()
            key = (id(group), opts.shape_policy, *(id(p) for p in params))
            megabatches = self._plans.get(key)
            if megabatches is None:
                # On the CPU each megabatch stays under CPU_MEGABATCH_BYTES: the kept buffers are sized by the largest.
                on_cpu = all(p.device.type == "cpu" for p in params)
                megabatches = self._plans[key] = plan_megabatches(
                    layouts(group, opts, params),
                    [p.dtype for p in params],
                    [p.device for p in params],
                    max_bytes=CPU_MEGABATCH_BYTES if on_cpu else None,
                )
            pending += torch_backend.prepare(
                backend,
                params,
                grads,
                *state,
                megabatches,
                opts,
                need_flags=need_flags,
                selects=selects,
                held=held if keep else None,
                role=f"update{g}.",
                tables=tables if backend.fused else None,
            )
        return pending


class DistributedExecutor:
    """Runs phase 1 over a process group (``pg_ref``; None: DTensor parameters on a one-rank mesh)."""

    def __init__(self, pg_ref: GroupRef | None) -> None:
        self.pg_ref = pg_ref
        self.rank = 0 if pg_ref is None else pg_ref.rank
        self.world = 1 if pg_ref is None else pg_ref.size
        self._plans: dict[tuple[Any, ...], list[_GroupSplit | None]] = {}

    def prepare(
        self,
        gathered: list[Any],
        layouts: Callable[[dict[str, Any], MatrixOptions, list[Tensor]], list[tuple[int, int, int]]],
        need_flags: bool,
        selects: bool,
        tables: Any,
        held: Workspace | None = None,
    ) -> list[Any]:
        """Every group's pending update (``gathered``: (group, options or None for AdamW, params, grads, state
        lists) per group; ``layouts``: each parameter as (matrices, m, n)). ``held`` is not used: every buffer of
        the distributed phases is fresh (the exchanges allocate anyway)."""
        splits = self._plan(gathered, layouts)
        pg = None if self.pg_ref is None else self.pg_ref.group  # None: the default group (or no collective)
        pending: list[Any] = []
        for (group, opts, params, grads, lists), split in zip(gathered, splits, strict=True):
            if not params:
                continue
            if opts is None:  # AdamW: elementwise, so each rank updates its own shards (or replicas)
                local_lists = {k: local_shards(v) for k, v in lists.items()}
                pending.append(adamw_prepare(local_shards(params), local_shards(grads), local_lists, group))
                continue
            state = (lists["momentum_buffer"], lists.get("second_moment"), lists["step"])
            if opts.backend == "reference":  # every rank computes every update: identical results, no exchange
                pending.append(reference.prepare(params, grads, *state, layouts(group, opts, params), opts))
                continue
            assert split is not None
            backend = opts.backends.get(grads[0].device.type) or opts.backend_for(grads[0].device)
            if split.plain:
                counts, rank = split.counts, self.rank

                def start(
                    k: int, M: Tensor, fn: Callable[[Tensor], Tensor], counts: Any = counts, rank: int = rank
                ) -> Any:
                    return orthogonalize_split(M, counts[k], rank, pg, fn).wait

                pending.extend(
                    torch_backend.prepare(
                        backend,
                        params,
                        grads,
                        *state,
                        split.plain,
                        opts,
                        need_flags=need_flags,
                        selects=selects,
                        tables=tables,
                        # One rank (a DTensor mesh of one): no exchange.
                        start=None if self.pg_ref is None else _split_starter(split.counts, self.rank, pg),
                    )
                )
            if split.sharded:
                pending.extend(self._sharded(backend, params, grads, *state, split, opts, need_flags, selects, pg))
            if split.local:  # each rank's own whole matrices, as on one process: no exchange
                second = None if state[1] is None else local_shards(state[1])
                pending.extend(
                    torch_backend.prepare(
                        backend,
                        local_shards(params),
                        local_shards(grads),
                        local_shards(state[0]),
                        second,
                        state[2],
                        split.local,
                        opts,
                        need_flags=need_flags,
                        selects=selects,
                    )
                )
        return pending

    #: The encoded layout of the parameters last checked, keyed by their ids per group: encoded once per parameter
    #: set, not per step (a parameter whose shape changes in place is not re-checked, as plans are not rebuilt).
    _layout: tuple[tuple[tuple[int, ...], ...], ParamLayout] | None = None

    def check_presence(self, param_groups: list[dict[str, Any]]) -> None:
        """Raise ``RuntimeError`` on every rank, before any other collective, if the ranks' optimizers hold
        different parameters — naming each rank's count and the first position whose shape, dtype or param group
        differs — or if some parameter has a gradient on some ranks only.

        Checked at the first step (and whenever the parameters change), not in the constructor: an optimizer made
        on some ranks only (a local reference copy) would hang there. One fixed-size all-reduce per step, both
        checks together (``distributed.agree_params``): ranks holding different parameters cannot make it abort.
        """
        params = [p for g in param_groups for p in g["params"]]
        key = tuple(tuple(map(id, g["params"])) for g in param_groups)
        if self._layout is None or self._layout[0] != key:
            entries = [
                (i, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for i, g in enumerate(param_groups)
                for p in g["params"]
            ]
            self._layout = (key, ParamLayout.of(entries))
        assert self.pg_ref is not None, "check_presence needs a process group"
        present = [p.grad is not None for p in params]
        # A rank without parameters still takes part (the others wait for it); agree_params picks its device.
        bad = agree_params(self._layout[1], present, params[0].device if params else None, self.pg_ref.group)
        if bad:
            p = params[bad[0]]
            raise RuntimeError(
                f"orthoptim: {len(bad)} parameter(s) (the first of shape {tuple(p.shape)}, position {bad[0]} over "
                "all param groups) have a gradient on some ranks and .grad=None on others. Every rank must step "
                "the same parameters: give the missing ones zero gradients (p.grad = torch.zeros_like(p)) on every "
                "rank, or set them to None everywhere"
            )

    def _plan(
        self, gathered: list[Any], layouts: Callable[..., list[tuple[int, int, int]]]
    ) -> list[_GroupSplit | None]:
        key = tuple(
            x
            for group, opts, params, _, _ in gathered
            for x in (id(group), None if opts is None else opts.shape_policy, len(params), *map(id, params))
        )
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        splits: list[_GroupSplit | None] = []
        costs: list[int] = []
        refs: list[tuple[_GroupSplit, int, int]] = []  # (split, plain megabatch k or -1, sharded position)
        ranks = None if self.pg_ref is None else self.pg_ref.ranks
        for group, opts, params, _, lists in gathered:
            if opts is None or opts.backend == "reference":
                splits.append(None)
                continue
            shapes = layouts(group, opts, params)
            split = _GroupSplit()
            blocks = {i: check_sharded(p, ranks, self.rank) for i, p in enumerate(params) if is_dtensor(p)}
            local = {i for i, b in blocks.items() if _whole_matrices_everywhere(params[i], b, opts)}
            for kind in ("plain", "sharded", "local"):
                pos = [i for i in range(len(params)) if _kind(i, blocks, local) == kind]
                # Local megabatches count this rank's matrices only (its own shards: no collective depends on them).
                lay = [_local_layout(shapes[i], blocks[i], self.rank) if kind == "local" else shapes[i] for i in pos]
                sub = plan_megabatches(lay, [params[i].dtype for i in pos], [params[i].device for i in pos])
                setattr(
                    split,
                    kind,
                    [Megabatch(tuple(pos[j] for j in mb.indices), mb.matrix_shape, mb.counts) for mb in sub],
                )
            for k, mb in enumerate(split.plain):
                costs += [matrix_flops(*mb.matrix_shape)] * mb.matrices
                refs += [(split, k, -1)] * mb.matrices
            second = lists.get("second_moment") if opts.row_norm else None
            for mb in split.sharded:
                for i, count in zip(mb.indices, mb.counts, strict=True):
                    split.blocks[i] = blocks[i]
                    if second is not None:
                        split.row_blocks[i] = check_sharded(second[i], ranks, self.rank)
                    costs.append(count * matrix_flops(*mb.matrix_shape))
                    refs.append((split, -1, i))
            splits.append(split)
        owners, _ = assign_owners(costs, self.world)
        plain_owners: dict[tuple[int, int], list[int]] = {}
        for (target, k, i), owner in zip(refs, owners, strict=True):
            if k >= 0:
                plain_owners.setdefault((id(target), k), []).append(owner)
            else:
                target.owners[i] = owner
        for done in splits:
            if done is not None:
                done.counts = [rank_counts(plain_owners[(id(done), k)], self.world) for k in range(len(done.plain))]
        self._plans[key] = splits
        return splits

    def _sharded(
        self,
        backend: backends.Backend,
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor],
        second: list[Tensor] | None,
        steps: list[Tensor],
        split: _GroupSplit,
        opts: MatrixOptions,
        need_flags: bool,
        selects: bool,
        process_group: Any,
    ) -> list[torch_backend.Pending]:
        """Phase 1 for DTensor parameters gathered whole, grouped by matrix shape (see the module docstring). The
        pending state is flat (1-D) over this rank's blocks; ``split.blocks[i]`` is where every rank's block of
        parameter i lies (``split.row_blocks[i]``: of its NorMuon row statistics)."""
        owners, rank = split.owners, self.rank
        row_norm = opts.row_norm
        pieces: list[Tensor] = []
        item_owner: list[int] = []
        item_blocks: list[BlockLayout] = []
        staged = []
        for mb in split.sharded:
            idx = mb.indices
            p_loc, b_loc, g_loc = (local_shards([t[i] for i in idx]) for t in (params, bufs, grads))
            numels = tuple(t.numel() for t in p_loc)
            M, old, new = torch_backend.momentum_input(backend, b_loc, g_loc, opts, (sum(numels),), selects=selects)
            base = len(pieces)
            for i, part in zip(idx, M.split(numels), strict=True):
                pieces.append(part)
                item_owner.append(owners[i])
                item_blocks.append(split.blocks[i])
            s_loc, old_s, s_numels = None, None, None
            if row_norm:
                assert second is not None
                s_loc = local_shards([second[i] for i in idx])
                s_numels = tuple(t.numel() for t in s_loc)
                old_s = torch.cat([s.reshape(-1) for s in s_loc])
                for i, part in zip(idx, old_s.split(s_numels), strict=True):
                    pieces.append(part)
                    item_owner.append(owners[i])
                    item_blocks.append(split.row_blocks[i])
            staged.append((mb, base, p_loc, b_loc, g_loc, numels, M, old, new, s_loc, old_s, s_numels))
        # Pipelined per megabatch: megabatch t+1's blocks travel while megabatch t is orthogonalized, and t's
        # update travels back while t+1 is (asynchronous all_to_all; every rank issues them in the same order).
        spans = [(base, base + len(mb.indices) * (2 if row_norm else 1)) for mb, base, *_ in staged]

        def start_gather(t: int) -> Callable[[], list[Tensor | None]]:
            lo, hi = spans[t]
            return start_gather_to_owners(pieces[lo:hi], item_owner[lo:hi], item_blocks[lo:hi], rank, process_group)

        orth = torch_backend.orthogonalize_megabatch(backend, opts)
        flags: list[Tensor | None] = []
        returning: list[Callable[[], list[Tensor]]] = []
        arriving = start_gather(0) if staged else None
        for t, (mb, base, _, _, _, _, M, *_) in enumerate(staged):
            assert arriving is not None
            full = arriving()
            arriving = start_gather(t + 1) if t + 1 < len(staged) else None
            lo, hi = spans[t]
            m, n = mb.matrix_shape
            k = len(mb.indices)
            results: list[Tensor | None] = [None] * (hi - lo)
            dtypes = [M.dtype] * k + ([torch.float32] * k if row_norm else [])
            mine = [j for j, i in enumerate(mb.indices) if owners[i] == rank]
            out_sum = None
            if mine:
                # The owner's whole parameters, contiguous in their own shape: (count, m, n) is a view of each.
                counts = [mb.counts[j] for j in mine]
                M_full = torch.cat([_full(full, j).view(c, m, n) for j, c in zip(mine, counts, strict=True)])
                v_full = None
                if row_norm:
                    v_full = torch.cat([_full(full, k + j).view(c, m) for j, c in zip(mine, counts, strict=True)])
                O = orth(M_full)
                update, new_v, out_sum, _ = torch_backend.finish_update(backend, O, M_full, v_full, opts, need_flags)
                for j, u in zip(mine, update.split(counts), strict=True):  # sent in M's dtype (exact)
                    results[j] = u.reshape(item_blocks[base + j].shape).to(M.dtype)
                if new_v is not None:
                    for j, v in zip(mine, new_v.split(counts), strict=True):
                        results[k + j] = v.reshape(item_blocks[base + k + j].shape)
            flags.append(out_sum)
            returning.append(
                start_scatter_from_owners(
                    results, dtypes, item_owner[lo:hi], item_blocks[lo:hi], rank, M.device, process_group
                )
            )
        pending = []
        for (mb, _, p_loc, b_loc, g_loc, numels, _, old, new, s_loc, old_s, s_numels), out_sum, back_of in zip(
            staged, flags, returning, strict=True
        ):
            k = len(mb.indices)
            back = back_of()
            update = torch.cat([back[j].reshape(-1) for j in range(k)])
            alpha, decay = torch_backend.step_factors(opts, lr_scale(opts.scale_mode, *mb.matrix_shape))
            p = torch_backend.Pending(
                backend, p_loc, b_loc, g_loc, opts.momentum, update, alpha, numels, decay, out_sum
            )
            p.old_bufs, p.new_bufs = old, new
            if row_norm:
                p.second, p.old_second, p.second_counts = s_loc, old_s, s_numels
                p.new_second = torch.cat([back[k + j].reshape(-1) for j in range(k)])
            p.step_counters = [steps[i] for i in mb.indices]
            pending.append(p)
        return pending


def _split_starter(counts: list[tuple[int, ...]], rank: int, process_group: Any) -> torch_backend.StartFn:
    """Replicated megabatch k: this rank orthogonalizes its ``counts[k][rank]`` matrices, all ranks all-gather."""

    def start(k: int, M: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return orthogonalize_split(M, counts[k], rank, process_group, fn).wait

    return start


def _kind(i: int, blocks: dict[int, BlockLayout], local: set[int]) -> str:
    """Which of ``_GroupSplit``'s lists parameter i goes to."""
    return "plain" if i not in blocks else "local" if i in local else "sharded"


def _whole_matrices_everywhere(p: Tensor, blocks: BlockLayout, opts: MatrixOptions) -> bool:
    """Whether DTensor ``p``'s matrices are its last two dims (``matrix_layout``'s batch form) and every rank
    holds whole ones (``BlockLayout.local_matrices``: experts sharded over the expert dimension)."""
    shape = tuple(p.shape)
    count, m, n = matrix_layout(shape, opts.shape_policy, opts.weight_layout, 1)
    return count == math.prod(shape[:-2]) and (m, n) == shape[-2:] and blocks.local_matrices()


def _local_layout(shape: tuple[int, int, int], blocks: BlockLayout, rank: int) -> tuple[int, int, int]:
    """``(count, m, n)`` of this rank's part of a parameter made of whole matrices (its share of the count)."""
    count, m, n = shape
    return count * blocks.blocks[rank].numel // math.prod(blocks.shape), m, n


def _full(full: Sequence[Tensor | None], i: int) -> Tensor:
    """An owner's gathered whole piece (present for every piece this rank owns)."""
    piece = full[i]
    assert piece is not None
    return piece
