"""The ``torch`` backend: megabatches of same-shape matrices stacked, torch ops on any device (``triton``: the
same with two fused passes). One megabatch, read straight down:

1. **momentum** — the optimizer's input ``M = lerp(G, lerp(B, G, 1−μ), μ)`` (Nesterov; else the new momentum),
   computed without changing the buffer ``B`` (``momentum_input``);
2. **orthogonalize** — ``O = polar(M)``, one batched call of the polar engine (``orthogonalize_megabatch``);
3. **update** — NorMuon's per-row second moment and Frobenius rescale, PolarGrad's ``−lr·⟨O, M⟩``, and one
   number whose finiteness is every entry's (``finish_update``);
4. **commit**, once the step-wide finite flag is known — ``B ← lerp(B, G, 1−μ)`` (the very operation that built
   ``M``, so the same bits), ``θ ← θ·(1 − lr·wd) − lr·scale·U``, second moments; where the flag is false, the
   old state is kept bit for bit (``Pending.commit``).

Phases 1–3 write nothing (``prepare`` returns one ``Pending`` per megabatch), so a non-finite step anywhere can
be skipped whole. The choices that differ by device (``Backend.host_ways``) were measured
(benchmarks/RESULTS.md): on the CPU ``M`` is written per parameter into a buffer kept between steps (fresh large
blocks are page-faulted in on every step there) and the flag is read on the host before the commit (free
there); elsewhere foreach/stacked ops, and the commit selects on the device flag (no host sync).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from ...polar.orthogonalize import PolarPlan, polar_plan, run_plan
from ...polar.workspace import Workspace, scratch_like
from ..megabatch import Megabatch
from ..options import MatrixOptions, block_ranges, lr_scale
from . import Backend
from . import triton as fused

#: ``start(k, M, orthogonalize)`` begins orthogonalizing megabatch k's ``M`` and returns a thunk yielding O
#: (the replicated executor: each rank computes its share while the others' travel).
StartFn: TypeAlias = Callable[[int, Tensor, Callable[[Tensor], Tensor]], Callable[[], Tensor]]


def prepare(
    backend: Backend,
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    megabatches: Sequence[Megabatch],
    opts: MatrixOptions,
    *,
    need_flags: bool,
    selects: bool,
    held: Workspace | None = None,
    role: str = "",
    tables: fused.PointerTables | None = None,
    start: StartFn | None = None,
) -> list[Pending]:
    """Phases 1–3 for every megabatch of one group: each one's update computed, nothing written.

    ``need_flags``: compute each megabatch's finite check (``Pending.out_sum``). ``selects``: the commit will
    select on a device-side flag, so the new momentum is held (``momentum_input``). ``held`` (the CPU, one
    process): buffers kept between steps — ``M`` in role ``"input"``, megabatch k's ``O`` in ``f"{role}{k}"``.
    Why (CPU): every update is held until the commit, and freeing them all at the end of a step let glibc return
    the memory to the OS, to be page-faulted back in on the next step — ~40k faults and 0.1–0.5 s of system time
    on a 2.5 s GPT-2-small step (measured 2026-11-23, 2-core CPU; benchmarks/RESULTS.md). The price is that
    memory held between steps: the size of the updates (half the momentum's in bfloat16).
    ``tables``: address tables for the fused kernels (``backend.fused``). ``start`` (replicated ranks): every
    megabatch's orthogonalization is started first and the updates finished once all have started.
    """
    copies = float32_copies(backend, opts)
    # transformers' Conv1D stores each matrix (in, out): the momentum and commit work on the stored layout, the
    # orthogonalization and the update on the (out, in) view of it (``options.matrix_layout``).
    transposed, split = opts.weight_layout == "in_out", opts.split
    pending = []
    started = []
    for k, mb in enumerate(megabatches):
        m, n = mb.matrix_shape  # outputs × inputs (of one block, with ``split``)
        idx = mb.indices
        p_mb, b_mb, g_mb = [params[i] for i in idx], [bufs[i] for i in idx], [grads[i] for i in idx]
        # The stack as the parameters store it: (in, out) whole matrices, or (out, in) blocks (a view of them).
        shape = (mb.matrices // split, n, m * split) if transposed else (mb.matrices, m, n)
        device = b_mb[0].device
        plan, scale = _polar_plan(opts, m, n, device, copies)
        M_out = O_out = None
        if held is not None:  # M and O in buffers kept from step to step; O laid out as it is added (below)
            M_out = held.get("input", shape, b_mb[0].dtype, device)
            # Laid out as stored (in, out), added without a copy; else wide, the iteration's orientation.
            wide = (transposed and split == 1) or m > n
            O_out = held.get(f"{role}{k}", (mb.matrices, n, m) if wide else (mb.matrices, m, n), plan.dtype, device)
            O_out = O_out.mT if wide else O_out
        table = None
        if backend.fused and tables is not None and not transposed:
            table = fused.table(tables, p_mb, b_mb, g_mb, mb.counts, m * n)
        M, old, new = momentum_input(backend, b_mb, g_mb, opts, shape, M_out, selects, table)
        if transposed:  # the (out, in) view; cut into blocks of rows, a copy (the stored rows are the inputs)
            M = M.mT if split == 1 else M.mT.reshape(mb.matrices, m, n)
        if start is not None:
            orth = functools.partial(polar, plan=plan, opts=opts, copies=copies)
            started.append((mb, p_mb, b_mb, g_mb, M, old, new, table, scale, plan.dtype, start(k, M, orth)))
            continue
        O = polar(M, plan, opts, copies, out=O_out, workspace=held, compute_dtype_out=True)
        pending.append(
            _pending(backend, mb, p_mb, b_mb, g_mb, second, steps, M, O, old, new, table, opts, scale, need_flags, held)
        )
    for mb, p_mb, b_mb, g_mb, M, old, new, table, scale, dtype, wait in started:
        # O travels in M's dtype; in the compute dtype (an exact conversion: that is where its values were made)
        # the update is finished as on one process — NorMuon's row factor rounds into it the same way.
        O = wait().to(dtype)
        pending.append(
            _pending(backend, mb, p_mb, b_mb, g_mb, second, steps, M, O, old, new, table, opts, scale, need_flags)
        )
    return pending


def _pending(
    backend: Backend,
    mb: Megabatch,
    params: list[Tensor],
    bufs: list[Tensor],
    grads: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    M: Tensor,
    O: Tensor,
    old: Tensor | None,
    new: Tensor | None,
    table: fused.Table | None,
    opts: MatrixOptions,
    scale: float,
    need_flags: bool,
    work: Workspace | None = None,
) -> Pending:
    m = mb.matrix_shape[0]
    alpha, decay = step_factors(opts, scale)
    p = Pending(backend, params, bufs, grads, opts.momentum, O, alpha, mb.counts, decay, None)
    p.transposed, p.split = opts.weight_layout == "in_out", opts.split
    p.old_bufs, p.new_bufs, p.table = old, new, table
    if opts.row_norm:
        assert second is not None
        p.second = [second[i] for i in mb.indices]
        p.old_second = torch.cat([s.reshape(c, m) for s, c in zip(p.second, mb.counts, strict=True)])
    p.update, p.new_second, p.out_sum, p.update_factor = finish_update(
        backend, O, M, p.old_second, opts, need_flags, work, defer=True
    )
    p.step_counters = [steps[i] for i in mb.indices]
    return p


# ---------------------------------------------------------------------------------------------------------------
# 1. Momentum


def momentum_input(
    backend: Backend,
    bufs: list[Tensor],
    grads: list[Tensor],
    opts: MatrixOptions,
    shape: tuple[int, ...],
    out: Tensor | None = None,
    selects: bool = True,
    table: fused.Table | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(M, old, new)`` for parameters stacked to ``shape`` (matrices, m, n) or flat (numel,): the optimizer's
    input ``M`` — a temporary the normalization may overwrite — and the stacked old and new momentum for a commit
    that ``selects`` between them on a device-side flag (else None: the commit recomputes the new momentum in
    place, ``_commit_momentum``, with the same operation and so the same bits). ``out``: where the CPU's way
    writes ``M`` (the buffer the optimizer keeps; else a fresh tensor).

    Four ways, one value: the CPU's (``host_ways``) per parameter into the kept stack (``_momentum_per_param``);
    with a fused ``table``, one Triton launch; else, when the commit does not select, three foreach ops into the
    stack (``_momentum_foreach``); for a selecting commit, stacked copies of gradients and buffers, the new
    momentum held."""
    mu, nesterov = opts.momentum, opts.nesterov
    if backend.host_ways:
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device) if out is None else out
        return _momentum_per_param(bufs, grads, mu, nesterov, M), None, None
    if table is not None:
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        if fused.momentum_input(table, mu, nesterov, M):
            return M, None, None
    if not selects and (mu > 0.5 or not nesterov):
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        return _momentum_foreach(bufs, grads, mu, nesterov, M), None, None
    G = torch.cat([g.reshape(-1) for g in grads]).view(shape)
    old = torch.cat([b.reshape(-1) for b in bufs]).view(shape)
    new = torch.lerp(old, G, 1.0 - mu)
    M = G.lerp_(new, mu) if nesterov else new.clone()  # lerp(G, new, μ) in the stacked gradient (a temporary)
    return M, old, new


def _momentum_per_param(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """``M`` written per parameter into consecutive slices of ``out``: ``lerp(G, lerp(B, G, 1−μ), μ)`` with
    Nesterov, else ``lerp(B, G, 1−μ)``; the buffers are not changed.

    Why per parameter into one kept stack instead of stacking gradients and buffers first (CPU): nothing but
    ``M`` allocated. Each large allocation held across the step is returned to the OS when freed and
    page-faulted back in on the next step (glibc trims the heap top): with the old and new momentum stacked
    and held until the commit, that cost ~0.25 s of a 2.3 s GPT-2-small step (measured 2026-11-23, 2-core CPU).
    """
    flat = out.view(-1)
    start = 0
    for b, g in zip(bufs, grads, strict=True):
        dst = flat[start : start + b.numel()].view(b.shape)
        torch.lerp(b, g, 1.0 - mu, out=dst)
        if nesterov:
            torch.lerp(g, dst, mu, out=dst)
        start += b.numel()
    return out


def _momentum_foreach(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """``_momentum_per_param``'s values with three foreach ops over views of ``out`` (copy the buffers in, then
    lerp in place): no per-parameter launches, no stacked copies of gradients and buffers. The Nesterov input is
    ``lerp(new, G, w)`` with ``w = 1 − μ`` rounded as torch rounds it: for μ > 0.5 that is ``lerp(G, new, μ)``
    bit for bit (torch's lerp takes ``new + w·(G − new)`` for w < 0.5 and ``new − (new − G)·(1 − μ)`` for
    μ ≥ 0.5, the same operations up to exact negations); the caller takes another way for μ ≤ 0.5."""
    views = [v.view(b.shape) for v, b in zip(out.view(-1).split([b.numel() for b in bufs]), bufs, strict=True)]
    torch._foreach_copy_(views, bufs)
    torch._foreach_lerp_(views, grads, 1.0 - mu)
    if nesterov:
        # 1 − μ as torch computes it in the op's math dtype: μ rounded to float32 (float64 stays), then 1 − μ,
        # exact for μ ∈ [0.5, 2] (Sterbenz) and so the same in Python's double.
        w = 1.0 - (mu if out.dtype == torch.float64 else fused.float32(mu))
        torch._foreach_lerp_(views, grads, w)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Orthogonalize


def polar(
    M: Tensor,
    plan: PolarPlan,
    opts: MatrixOptions,
    copies: bool,
    *,
    out: Tensor | None = None,
    workspace: Workspace | None = None,
    compute_dtype_out: bool = False,
) -> Tensor:
    """``O``, the polar factor of each matrix of the stacked (B, m, n) batch ``M`` by the polar engine, with its
    options resolved once (``_polar_plan``). ``out``/``workspace``: the result's buffer and the temporaries'
    (kept between steps on the CPU). ``compute_dtype_out``: O in the compute dtype (e.g. bfloat16) rather than
    the parameters' — the final add takes mixed dtypes, so a conversion pass over every update is saved.
    ``M`` is the step's own temporary: it is normalized in place, except in the nuclear mode, which needs it
    afterwards for ``⟨O, M⟩`` — there only where the normalization reads ``M`` without writing it (the
    float64-factor way of a non-float64 ``M``, ``polar/devices.py``).

    With unequal row blocks (``opts.blocks``: ``split=(s₁, s₂, …)``) ``plan`` is not used: each block of every
    matrix is orthogonalized on its own, same-size blocks of the whole batch in one call (``_by_size``), and
    written into its rows of ``O``; ``M`` is not changed."""
    if opts.blocks is not None:
        O = out
        if O is None:
            O = torch.empty(M.shape, dtype=plan.dtype if compute_dtype_out else M.dtype, device=M.device)
        for size, ranges, stack in _by_size(M, opts.blocks):
            block_plan = _polar_plan(opts, size, M.shape[-1], M.device, copies)[0]
            _put_blocks(O, ranges, run_plan(stack, block_plan, out_dtype=O.dtype, overwrite_input=True))
        return O
    return run_plan(
        M,
        plan,
        out_dtype=plan.dtype if compute_dtype_out else None,
        overwrite_input=not opts.nuclear or not (copies or M.dtype == torch.float64),
        out=out,
        workspace=workspace,
    )


def _polar_plan(opts: MatrixOptions, m: int, n: int, device: torch.device, copies: bool) -> tuple[PolarPlan, float]:
    """The polar engine's options for m×n matrices, validated and resolved at the first megabatch of that shape,
    and the lr scale of the shape (``options.lr_scale``), kept in the options record (a record rebuilt after an
    option was edited plans afresh)."""
    key = (m, n, device, copies)
    planned = opts.polar_plans.get(key)
    if planned is None:
        plan = polar_plan(
            m,
            n,
            device,
            schedule=opts.schedule,
            steps=opts.ns_steps,
            normalization=opts.normalization,
            compute_dtype=opts.compute_dtype,
            iteration=opts.iteration,
            elementwise="float32_copies" if copies else "float64_factors",
        )
        planned = opts.polar_plans[key] = (plan, lr_scale(opts.scale_mode, m, n))
    return planned


def step_factors(opts: MatrixOptions, scale: float) -> tuple[float | Tensor, float | Tensor]:
    """``(alpha, decay)``: the final add's factor −lr·scale (1 in the nuclear mode, whose update carries
    −lr·‖M‖_*; −lr with unequal blocks, whose update carries each block's scale) and ``1 − lr·wd`` (exactly 1.0
    without weight decay: nothing to apply); 0-d tensors for a tensor lr, read live (schedulers fill it in
    place)."""
    lr, wd = opts.lr, opts.weight_decay
    if opts.blocks is not None:  # unequal blocks carry their own lr scales (``finish_update``)
        scale = 1.0
    if opts.nuclear:
        alpha: float | Tensor = 1.0
    elif isinstance(lr, Tensor):  # −lr·scale in float64, rounded once to lr's dtype: the float lr's bits
        alpha = (lr.to(torch.float64) * -scale).to(lr.dtype)
    else:
        alpha = -lr * scale
    if not isinstance(wd, Tensor) and wd == 0:
        decay: float | Tensor = 1.0
    elif isinstance(lr, Tensor) or isinstance(wd, Tensor):  # as alpha: in float64, rounded once
        dtype = lr.dtype if isinstance(lr, Tensor) else wd.dtype  # type: ignore[union-attr]
        lr64, wd64 = (v.to(torch.float64) if isinstance(v, Tensor) else v for v in (lr, wd))
        decay = torch.as_tensor(1.0 - lr64 * wd64).to(dtype)
    else:
        decay = 1.0 - lr * wd
    return alpha, decay


def orthogonalize_megabatch(backend: Backend, opts: MatrixOptions) -> Callable[[Tensor], Tensor]:
    """``polar`` as a function of ``M`` alone, for the executor's whole matrices (any shape): O in the compute
    dtype, as ``prepare`` makes it, so that the update is finished (NorMuon's row factor, PolarGrad's norm) with
    the same roundings as on one process."""
    copies = float32_copies(backend, opts)

    def orth(M: Tensor) -> Tensor:
        plan = _polar_plan(opts, M.shape[-2], M.shape[-1], M.device, copies)[0]
        return polar(M, plan, opts, copies, compute_dtype_out=True)

    return orth


def float32_copies(backend: Backend, opts: MatrixOptions) -> bool:
    """The elementwise arithmetic around the products (``polar/devices.py``): the group's ``elementwise`` option,
    else the backend's device choice (float32 copies with the CPU's choices, float64 factors elsewhere)."""
    if opts.elementwise == "auto":
        return backend.host_ways
    return opts.elementwise == "float32_copies"


# ---------------------------------------------------------------------------------------------------------------
# 3. Update


def finish_update(
    backend: Backend,
    O: Tensor,
    M: Tensor,
    old_second: Tensor | None,
    opts: MatrixOptions,
    need_flags: bool,
    work: Workspace | None = None,
    defer: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """From a megabatch's O (B, m, n) and its input M: ``(update, new second moment, check, factor)``. The check
    (if ``need_flags``) is finite iff every entry of the update is. ``O`` is the step's own tensor and becomes
    the update in place. ``defer``: the last multiply — NorMuon's row factor (where ``_row_normalize`` defers it;
    not before the nuclear scale, which needs the scaled update) or the nuclear scale's −lr·⟨O, M⟩ — is left
    for the commit: returned as ``factor``, ``O`` unscaled; the commit multiplies exactly as here.

    With unequal row blocks (``opts.blocks``) all of that is per block — NorMuon's Frobenius rescale, PolarGrad's
    ⟨O, M⟩ — and each block's lr scale is applied here (``step_factors`` then adds with −lr): nothing deferred."""
    if opts.blocks is not None:
        update, new_second, factor = _finish_blocks(backend, O, M, old_second, opts)
    else:
        update, new_second, factor = _finish_matrices(backend, O, M, old_second, opts, work, defer)
    if not need_flags:
        return update, new_second, None, factor
    # |O| ≲ 1.3 entrywise (a Newton–Schulz output), so the sum cannot overflow: it is non-finite iff some entry
    # is. With a deferred factor f the update is O·f: with |O| ≤ 2 an entry can overflow only where |f| exceeds
    # half the largest float, so O's sum plus 2‖f‖₁ is finite iff every entry of O·f is (a factor beyond 2⁻¹ of
    # the range skips the step even if O·f would just fit: never met at real learning rates).
    if factor is None:
        return update, new_second, update.sum(), None
    size = torch.linalg.vector_norm(factor, ord=1, dtype=torch.promote_types(factor.dtype, torch.float32))
    return update, new_second, torch.add(update.sum(), size, alpha=2.0), factor


def _finish_matrices(
    backend: Backend,
    O: Tensor,
    M: Tensor,
    old_second: Tensor | None,
    opts: MatrixOptions,
    work: Workspace | None,
    defer: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``finish_update``'s ``(update, new second moment, deferred factor)`` with each matrix of the batch whole."""
    new_second, factor = None, None
    if opts.row_norm:
        assert old_second is not None
        defer = defer and not opts.nuclear
        copies = float32_copies(backend, opts)
        O, new_second, factor = _row_normalize(O, old_second, opts.beta2, opts.row_eps, work, defer, copies)
    if opts.nuclear:
        # ⟨O, M⟩ = Σ gᵢσᵢ ≈ ‖M‖_* when the gains gᵢ ≈ 1 (PolarGrad runs enough steps for that).
        wide = _work_dtype(O)
        if float32_copies(backend, opts):  # CPU: a kept float32 copy (mixed-dtype products are slow loops there)
            Of = scratch_like(work, "nuclear", O, wide).copy_(O)
            nuc = Of.mul_(M.to(wide)).sum(dim=(-2, -1), keepdim=True)
        else:  # the same float32 products, O widened on the fly: 14 bytes per entry instead of 22
            nuc = torch.mul(O, M.to(wide)).sum(dim=(-2, -1), keepdim=True)
        scale = (nuc * -opts.lr).to(O.dtype)
        update, factor = (O, scale) if defer else (O.mul_(scale), None)
    else:
        update = O  # −lr·scale is applied by the final add (``step_factors``)
    return update, new_second, factor


def _finish_blocks(
    backend: Backend, O: Tensor, M: Tensor, old_second: Tensor | None, opts: MatrixOptions
) -> tuple[Tensor, Tensor | None, None]:
    """``finish_update`` for unequal row blocks: the same-size blocks of the batch stacked (``_by_size``), each
    stack finished as whole matrices (``_finish_matrices``) and scaled by its shape's lr scale, the results
    written back into ``O``'s rows and into a fresh second moment."""
    assert opts.blocks is not None
    n = O.shape[-1]
    new_second = None if old_second is None else torch.empty_like(old_second)
    inputs = {size: stack for size, _, stack in _by_size(M, opts.blocks)} if opts.nuclear else {}
    seconds = {size: stack for size, _, stack in _by_size(old_second, opts.blocks)} if old_second is not None else {}
    for size, ranges, stack in _by_size(O, opts.blocks):
        update, v, _ = _finish_matrices(backend, stack, inputs.get(size, M), seconds.get(size), opts, None, False)
        scale = 1.0 if opts.nuclear else lr_scale(opts.scale_mode, size, n)
        if scale != 1.0:
            update = update.mul_(scale)  # in float32 (a Python scalar), rounded once into the update's dtype
        _put_blocks(O, ranges, update)
        if new_second is not None and v is not None:
            _put_blocks(new_second, ranges, v)
    return O, new_second, None


def _by_size(X: Tensor, sizes: tuple[int, ...]) -> list[tuple[int, list[tuple[int, int]], Tensor]]:
    """The row blocks of ``sizes`` (dim 1 of a (B, m, …) batch) grouped by size: ``(size, row ranges, stack)``,
    the stack a copy of shape (B·blocks, size, …) — block by block, each block's B matrices in order — so
    same-size blocks (a grouped-query weight's k and v) go through the polar engine in one call."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for start, stop in block_ranges(sizes):
        ranges.setdefault(stop - start, []).append((start, stop))
    return [(size, r, torch.cat([X[:, a:b] for a, b in r])) for size, r in ranges.items()]


def _put_blocks(out: Tensor, ranges: list[tuple[int, int]], stack: Tensor) -> None:
    """Write ``_by_size``'s ``stack`` back into the rows ``ranges`` of ``out``."""
    count = out.shape[0]
    for j, (a, b) in enumerate(ranges):
        out[:, a:b].copy_(stack[j * count : (j + 1) * count])


def _row_normalize(
    O: Tensor, v: Tensor, beta2: float, eps: float, work: Workspace | None, defer: bool, float32_copies: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """NorMuon (arXiv 2510.05491; microsoft/dion normuon.py; modded-nanogpt): per-row second moment of the
    orthogonalized update, divide each row by its root, restore each matrix's Frobenius norm.

    Returns ``(update, new second moment, row factor)``, written back into ``O``; float32 temporaries in
    ``work`` if given. The row factor is None, except where ``defer`` asks for it and the row-sum way is taken:
    then ``O`` is returned unscaled with the (matrices, m, 1) float32 factor, and the commit applies it.

    Without ``float32_copies`` (the accelerators' choice), for updates narrower than float64, without the copy:
    one pass for the rows' sums of squares (in float32), from which the second moment, both Frobenius norms
    (‖O‖² = Σᵢ rowᵢ, ‖O/d‖² = Σᵢ rowᵢ/dᵢ²) and a per-row factor follow on m numbers per matrix, and one pass
    applying it — 6 bytes per bfloat16 entry instead of ~48 (``benchmarks/step_launches.py``). Equal to the
    float32-copy way up to the rounding of the row sums."""
    if O.dtype != torch.float64 and not float32_copies:  # the float64-factor way (polar/devices.py)
        rows = torch.linalg.vector_norm(O, dim=-1, dtype=torch.float32).square_()  # (B, m): Σⱼ Oᵢⱼ²
        v_new = torch.lerp(v, rows / O.shape[-1], 1.0 - beta2)
        d2 = v_new + eps
        before = rows.sum(dim=-1, keepdim=True).sqrt_()
        after = (rows / d2).sum(dim=-1, keepdim=True).sqrt_().clamp_min_(torch.finfo(torch.float32).tiny)
        factor = ((before / after) / d2.sqrt()).unsqueeze(-1)  # (B, m, 1): ratio / dᵢ
        if defer:
            return O, v_new, factor
        return O.mul_(factor), v_new, None  # float32 product, rounded once into O
    wide = _work_dtype(O)
    Of = scratch_like(work, "row_norm", O, wide).copy_(O)
    mean_square = torch.square(Of, out=scratch_like(work, "row_square", O, wide)).mean(dim=-1)
    v_new = torch.lerp(v, mean_square.to(v.dtype), 1.0 - beta2)
    before = torch.linalg.matrix_norm(Of)
    normed = Of.div_((v_new.to(wide) + eps).sqrt().unsqueeze(-1))
    ratio = before / torch.linalg.matrix_norm(normed).clamp_min(torch.finfo(wide).tiny)
    return O.copy_(normed.mul_(ratio.view(-1, 1, 1))), v_new, None


def _work_dtype(O: Tensor) -> torch.dtype:
    """The update's arithmetic beyond the iteration: float32, or float64 for a float64 update (a float64 run keeps
    its digits; the second moments stay float32 state)."""
    return torch.float64 if O.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 4. Commit


@dataclass
class Pending:
    """A megabatch's update, computed by ``prepare``, and what its commit needs (the step-wide flag aside).

    The new momentum is not held unless the commit selects on a device-side flag (``old_bufs``/``new_bufs``):
    the commit recomputes it in place with the operation that produced phase 1's copy inside ``M``.
    """

    backend: Backend
    params: list[Tensor]
    bufs: list[Tensor]
    grads: list[Tensor]
    momentum: float
    update: Tensor  # (matrices, m, n): O, or O·(−lr·‖M‖_*) in the nuclear mode
    alpha: float | Tensor  # the update is added with this factor (−lr·scale; 1 in the nuclear mode)
    counts: tuple[int, ...]
    decay: float | Tensor  # 1 − lr·wd; the float 1.0 when there is no weight decay
    out_sum: Tensor | None  # 0-d: finite iff every entry of the megabatch's update is
    second: list[Tensor] | None = None
    old_second: Tensor | None = None
    new_second: Tensor | None = None
    step_counters: list[Tensor] | None = None  # int64, advanced by the step for all megabatches at once
    second_counts: tuple[int, ...] | None = None  # splits of the second moments, when not ``counts`` (sharded)
    old_bufs: Tensor | None = None  # stacked old and new momentum, held for a commit that selects
    new_bufs: Tensor | None = None
    # Left for the commit to multiply the update by (``finish_update``'s ``defer``): NorMuon's (matrices, m, 1)
    # float32 row factor, or PolarGrad's (matrices, 1, 1) −lr·⟨O, M⟩ in the update's dtype.
    update_factor: Tensor | None = None
    table: fused.Table | None = None  # the fused kernels' address table (``backend.fused``)
    transposed: bool = False  # the parameters store each matrix (in, out): the update is added transposed
    split: int = 1  # blocks of output rows per matrix (``options.matrix_layout``)

    def commit(self, flag: StepFlag, scratch: Workspace) -> None:
        """Write the megabatch's new state (or, where ``flag.ok`` is false, keep the old one bit for bit). With a
        fused table and no held momentum: momentum, weight decay and update in one launch (the same bits)."""
        ok, update = flag.ok, self.update
        fused_done = False
        if self.table is not None and self.new_bufs is None:
            no_decay = not isinstance(self.decay, Tensor) and self.decay == 1.0
            decay = None if no_decay else flag.decay_factor(self.decay, self.params[0])
            fused_done = fused.commit(self.table, self.momentum, update, self.alpha, decay, ok, self.update_factor)
        if not fused_done and self.update_factor is not None:
            update = update.mul_(self.update_factor)  # finish_update's deferred product: float32, rounded once
        if self.second is not None and self.new_second is not None and self.old_second is not None:
            new_second = self.new_second if ok is None else torch.where(ok, self.new_second, self.old_second)
            counts = self.counts if self.second_counts is None else self.second_counts
            views = [s.view_as(t) for s, t in zip(new_second.split(counts), self.second, strict=True)]
            torch._foreach_copy_(self.second, views)
        if fused_done:
            return
        if flag.skipped is not None:
            update = update.masked_fill_(flag.skipped, 0.0)  # in place: no fresh allocation
        if self.new_bufs is None:
            _commit_momentum(self.bufs, self.grads, self.momentum, ok, scratch)
        else:
            assert self.old_bufs is not None
            new = self.new_bufs if ok is None else torch.where(ok, self.new_bufs, self.old_bufs, out=self.new_bufs)
            sizes = [t.numel() for t in self.bufs]  # the stack is flat in the buffers' stored order
            parts = [b.view_as(t) for b, t in zip(new.reshape(-1).split(sizes), self.bufs, strict=True)]
            torch._foreach_copy_(self.bufs, parts)
        if isinstance(self.decay, Tensor) or self.decay != 1.0:
            _decay_params(self.params, self.decay, flag, scratch)
        if self.transposed:  # (out, in) blocks → whole matrices → the stored (in, out); a view where laid out so
            rows, cols = update.shape[-2] * self.split, update.shape[-1]
            whole = [u.reshape(-1, rows, cols) for u in update.split(self.counts)]
            parts = [u.mT.reshape(t.shape) for u, t in zip(whole, self.params, strict=True)]
        elif self.split > 1:  # row blocks of a tall shape are laid out wide (the iteration's): a copy each
            parts = [u.reshape(t.shape) for u, t in zip(update.split(self.counts), self.params, strict=True)]
        else:
            parts = [u.view_as(t) for u, t in zip(update.split(self.counts), self.params, strict=True)]
        _add_update(self.backend, self.params, parts, self.alpha, scratch)


def _commit_momentum(bufs: list[Tensor], grads: list[Tensor], mu: float, ok: Tensor | None, work: Workspace) -> None:
    """``B ← lerp(B, G, 1−μ)`` in place where ``ok`` (always when None): the bits ``momentum_input`` computed. A
    non-finite G under a false ``ok`` is selected away."""
    if ok is None:
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        return
    for b, g in zip(bufs, grads, strict=True):
        torch.where(ok, torch.lerp(b, g, 1.0 - mu, out=work.like("momentum", b)), b, out=b)


#: 16-bit parameter dtypes: on CUDA a 0-d float32 CUDA tensor operand is cast to theirs before the arithmetic.
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _widened(t: Tensor, work: Workspace) -> Tensor:
    """A float32 copy of ``t`` in ``work`` (role ``"widened"``), to compute in and copy back."""
    return work.like("widened", t, torch.float32).copy_(t)


def _decay_params(params: list[Tensor], decay: float | Tensor, flag: StepFlag, work: Workspace) -> None:
    """``θ ← θ·(1 − lr·wd)`` (a factor of 1 where ``flag.ok`` is false), in float32.

    ``_foreach_mul_`` by the 0-d float32 factor (``decay_factor``) does that on the CPU, which reads a 0-d CPU
    tensor as a float32 scalar. On CUDA, TensorIterator casts a 0-d CUDA tensor to a 16-bit parameter's dtype
    first (0.999 → 1.0 in bfloat16: no decay at all), so 16-bit parameters there take a host float where the
    factor is one and no flag selects (CUDA's foreach kernels use it in float32), else a float32 copy per
    parameter."""
    like = params[0]
    if like.is_cuda and like.dtype in _HALF_DTYPES:
        if flag.ok is None and not isinstance(decay, Tensor):
            torch._foreach_mul_(params, decay)
            return
        factor = flag.decay_factor(decay, like)
        for t in params:
            t.copy_(_widened(t, work).mul_(factor))
        return
    torch._foreach_mul_(params, flag.decay_factor(decay, like))


def _add_update(
    backend: Backend, params: list[Tensor], parts: list[Tensor], alpha: float | Tensor, work: Workspace
) -> None:
    """``θ ← θ + alpha·U`` for every parameter. A CPU update in another dtype goes through the scratch buffer
    (torch's CPU kernels would convert into a fresh tensor per parameter). Same values as ``θ.add_(U, alpha)``:
    the sum is taken in the wider of the two dtypes and rounded once into θ's.

    A tensor ``alpha`` (a tensor learning rate) is read on the host with ``host_ways`` (free on the CPU);
    elsewhere each parameter gets ``addcmul_(U, alpha)`` — one launch per parameter, which a captured CUDA graph
    makes free, and no host read (torch's foreach add takes its alpha only as a host number)."""
    if isinstance(alpha, Tensor):
        if not parts or backend.host_ways:
            alpha = float(alpha)
        elif params[0].is_cuda and params[0].dtype in _HALF_DTYPES:  # α would be cast to 16 bits (_decay_params)
            for t, u in zip(params, parts, strict=True):
                t.copy_(_widened(t, work).addcmul_(u, alpha))
            return
        else:
            for t, u in zip(params, parts, strict=True):
                t.addcmul_(u, alpha)
            return
    if parts and parts[0].device.type == "cpu" and parts[0].dtype != params[0].dtype:
        wide = torch.promote_types(parts[0].dtype, params[0].dtype)
        for t, u in zip(params, parts, strict=True):
            if wide == t.dtype:  # a narrower update (bfloat16 into float32): its conversion is exact
                t.add_(work.like("update", u, t.dtype).copy_(u), alpha=alpha)
            else:  # a wider one: summed in the wider dtype, then rounded once into θ's, as torch's add computes it
                t.copy_(work.like("widened", t, wide).copy_(t).add_(u, alpha=alpha))
        return
    torch._foreach_add_(params, parts, alpha=alpha)


def decay_factor(decay: float | Tensor, like: Tensor, ok: Tensor | None = None) -> Tensor:
    """The weight-decay factor for ``torch._foreach_mul_`` over parameters like ``like`` (1 where ``ok`` is false):
    a 0-d tensor in the parameters' dtype, or float32 for 16-bit ones — what ``param.mul_(decay)`` computes in
    (torch.optim.Muon's decay). Not the Python float: torch's CPU ``_foreach_mul_`` rounds a scalar to a
    bfloat16 tensor's dtype first (0.998 → 0.99609: 2.8× the decay), and ``torch.where`` on Python floats builds
    float32 (0.999 → 0.99900001 for float64 parameters). Measured, torch 2.13."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(decay, Tensor):  # a tensor lr's decay: computed on the device, from the live value
        factor = decay.reshape(()).to(dtype=dtype, device=like.device)
    else:
        factor = torch.full((), decay, dtype=dtype, device=like.device)
    return factor if ok is None else torch.where(ok, factor, 1.0)


class StepFlag:
    """The step-wide flag ``ok`` (None: commit unconditionally) in the forms the commits use, each built once per
    step rather than once per megabatch: every tensor op outside the CPU is a kernel launch."""

    def __init__(self, ok: Tensor | None) -> None:
        self.ok = ok
        self.skipped = None if ok is None else ~ok
        self._decay: dict[tuple[float | int, torch.dtype, torch.device], Tensor] = {}

    def decay_factor(self, decay: float | Tensor, like: Tensor) -> Tensor:
        """``decay_factor(decay, like, ok)``, shared by the megabatches with the same decay and dtype (a tensor
        decay by identity: comparing tensors would read them on the host)."""
        key = (id(decay) if isinstance(decay, Tensor) else decay, like.dtype, like.device)
        if key not in self._decay:
            self._decay[key] = decay_factor(decay, like, self.ok)
        return self._decay[key]
