"""The momentum ``B ← lerp(B, G, 1−μ)`` and the optimizer's input ``M`` (Nesterov: ``lerp(G, B_new, μ)``), for a
megabatch of parameters: phase 1 computes ``M`` without changing the buffers, the commit updates them in place with
the same operation, so both have the same bits."""

from __future__ import annotations

import torch
from torch import Tensor

from ..polar.workspace import Workspace, scratch
from . import fused, paths


def momentum_stacks(
    bufs: list[Tensor],
    grads: list[Tensor],
    mu: float,
    nesterov: bool,
    shape: tuple[int, ...],
    held: Workspace | None = None,
    selects: bool = True,
    table: fused.Table | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(M, old, new)`` for parameters stacked to ``shape`` (matrices, m, n) or flat (numel,): the optimizer's
    input ``M`` — a temporary the normalization may overwrite — and the stacked old and new momentum for a commit
    that ``selects`` between them on a device-side flag (else None: the commit recomputes the new momentum in
    place, ``commit_momentum``). ``held``: ``M`` is written into its role ``"input"`` (one megabatch at a time
    uses it: the one-process CPU path).

    Four ways, one value: on ``paths.CPU_PATH_DEVICES`` per parameter into the stack (``momentum_input``); elsewhere,
    given the megabatch's address ``table`` (``fused.table``: the fused kernels apply), one Triton launch
    (``fused.momentum_input``: 12 bytes per float32 entry, and the fused commit needs nothing held, select or
    not); else, when the commit does not select, three foreach ops into the stack
    (``momentum_foreach``); for a selecting commit, stacked copies of the gradients and buffers, the new momentum
    held."""
    if paths.cpu_path(grads[0].device):
        M = scratch(held, "input", shape, bufs[0].dtype, bufs[0].device)
        return momentum_input(bufs, grads, mu, nesterov, M), None, None
    if table is not None:
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        if fused.momentum_input(table, mu, nesterov, M):
            return M, None, None
    if not selects and (mu > 0.5 or not nesterov):
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        return momentum_foreach(bufs, grads, mu, nesterov, M), None, None
    G = torch.cat([g.reshape(-1) for g in grads]).view(shape)
    old = torch.cat([b.reshape(-1) for b in bufs]).view(shape)
    new = torch.lerp(old, G, 1.0 - mu)
    M = G.lerp_(new, mu) if nesterov else new.clone()  # lerp(G, new, μ) in the stacked gradient (a temporary)
    return M, old, new


def momentum_input(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """The optimizer's input ``M`` written per parameter into consecutive slices of ``out`` (stacked or flat):
    ``lerp(G, lerp(B, G, 1−μ), μ)`` with Nesterov, else ``lerp(B, G, 1−μ)``; the buffers are not changed.

    Why per parameter into one preallocated stack instead of stacking the gradients and buffers first: no
    stacked copies of either, and nothing but ``M`` allocated. On the CPU each large allocation held across
    the step is returned to the OS when freed and page-faulted back in on the next step (glibc trims the heap
    top): with the old and new momentum stacked and held until the commit, that cost ~0.25 s of a 2.3 s
    GPT-2-small step (measured 2026-11-23, 2-core CPU, with and without ``GLIBC_TUNABLES`` disabling trimming).
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


def momentum_foreach(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """``momentum_input``'s values with three foreach ops over views of ``out`` (copy the buffers in, then lerp
    in place) instead of two ops per parameter: no per-parameter launches, and no stacked copies of the gradients
    and buffers (32 bytes per float32 entry instead of 40, and 2× the momentum's size less memory held than the
    selecting path). The Nesterov input is ``lerp(new, G, w)`` with ``w = 1 − μ`` rounded as torch rounds it:
    for μ > 0.5 that is ``lerp(G, new, μ)`` bit for bit (torch's lerp takes ``new + w·(G − new)`` for w < 0.5 and
    ``new − (new − G)·(1 − μ)`` for μ ≥ 0.5, the same operations up to exact negations, with or without FMA);
    the caller takes the other paths for μ ≤ 0.5."""
    views = list(out.view(-1).split([b.numel() for b in bufs]))
    views = [v.view(b.shape) for v, b in zip(views, bufs, strict=True)]
    torch._foreach_copy_(views, bufs)
    torch._foreach_lerp_(views, grads, 1.0 - mu)
    if nesterov:
        # 1 − μ as torch computes it in the op's math dtype: μ rounded to float32 (float64 stays), then 1 − μ,
        # exact for μ ∈ [0.5, 2] (Sterbenz) and so the same in Python's double.
        w = 1.0 - (mu if out.dtype == torch.float64 else fused.float32(mu))
        torch._foreach_lerp_(views, grads, w)
    return out


def commit_momentum(bufs: list[Tensor], grads: list[Tensor], mu: float, ok: Tensor | None, scratch: Workspace) -> None:
    """``B ← lerp(B, G, 1−μ)`` in place where ``ok`` (or always when None); the same bits ``momentum_input``
    computed (same operation on the same tensors). A non-finite G under a false ``ok`` is selected away."""
    if ok is None:
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        return
    for b, g in zip(bufs, grads, strict=True):
        torch.where(ok, torch.lerp(b, g, 1.0 - mu, out=scratch.like("momentum", b)), b, out=b)
