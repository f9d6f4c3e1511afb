"""Phase 2 of the step: a megabatch's new state written — momentum, second moments, weight decay, update — or,
where the step-wide finite flag is false, the old state kept bit for bit."""

from __future__ import annotations

import torch
from torch import Tensor

from ..polar.workspace import Workspace
from . import fused, paths
from .momentum import commit_momentum
from .prepare import Pending

#: 16-bit parameter dtypes: on CUDA a 0-d float32 CUDA tensor operand is cast to theirs before the arithmetic.
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _widened(t: Tensor, scratch: Workspace) -> Tensor:
    """A float32 copy of ``t`` in ``scratch`` (role ``"widened"``), to compute in and copy back."""
    return scratch.like("widened", t, torch.float32).copy_(t)


def _decay_params(params: list[Tensor], decay: float | Tensor, flag: StepFlag, scratch: Workspace) -> None:
    """``θ ← θ·(1 − lr·wd)`` (a factor of 1 where ``flag.ok`` is false) for the torch commit, in float32.

    ``_foreach_mul_`` by the 0-d float32 factor (``decay_factor``) does that on the CPU, which reads a 0-d CPU
    tensor as a float32 scalar. On CUDA, TensorIterator casts a 0-d CUDA tensor to a 16-bit parameter's dtype
    first (0.999 → 1.0 in bfloat16: no decay at all), so 16-bit parameters there take a host float where the
    factor is one and no flag selects (CUDA's foreach kernels use it in float32), else a float32 copy per
    parameter (three launches each: the fused commit, which reads the float32 factor, is the usual CUDA path)."""
    like = params[0]
    if like.is_cuda and like.dtype in _HALF_DTYPES:
        if flag.ok is None and not isinstance(decay, Tensor):
            torch._foreach_mul_(params, decay)
            return
        factor = flag.decay_factor(decay, like)
        for t in params:
            t.copy_(_widened(t, scratch).mul_(factor))
        return
    torch._foreach_mul_(params, flag.decay_factor(decay, like))


def _add_update(params: list[Tensor], parts: list[Tensor], alpha: float | Tensor, scratch: Workspace) -> None:
    """``θ ← θ + alpha·U`` for every parameter. A CPU update in another dtype goes through the scratch buffer: torch's
    CPU kernels would convert into a fresh tensor per parameter (the GPU ones cast on the fly). Same values as
    ``θ.add_(U, alpha)`` either way: the sum is taken in the wider of the two dtypes and rounded once into θ's.

    A tensor ``alpha`` (a tensor learning rate) is read on the device: on the CPU it is read on the host (free
    there); elsewhere each parameter gets ``addcmul_(U, alpha)`` — one launch per parameter, which a captured
    CUDA graph makes free, and no host read (torch's foreach add takes its alpha only as a host number)."""
    if isinstance(alpha, Tensor):
        if not parts or paths.cpu_path(parts[0].device):
            alpha = float(alpha)
        elif params[0].is_cuda and params[0].dtype in _HALF_DTYPES:  # α would be cast to 16 bits (_decay_params)
            for t, u in zip(params, parts, strict=True):
                t.copy_(_widened(t, scratch).addcmul_(u, alpha))
            return
        else:
            for t, u in zip(params, parts, strict=True):
                t.addcmul_(u, alpha)
            return
    if parts and parts[0].device.type == "cpu" and parts[0].dtype != params[0].dtype:
        wide = torch.promote_types(parts[0].dtype, params[0].dtype)
        for t, u in zip(params, parts, strict=True):
            if wide == t.dtype:  # a narrower update (bfloat16 into float32): its conversion is exact
                t.add_(scratch.like("update", u, t.dtype).copy_(u), alpha=alpha)
            else:  # a wider one (float32 into bfloat16): summed in the wider dtype, then rounded into θ's, as
                # torch's add and the fused commit compute it; rounding U to θ's dtype first would round twice
                t.copy_(scratch.like("widened", t, wide).copy_(t).add_(u, alpha=alpha))
        return
    torch._foreach_add_(params, parts, alpha=alpha)


def decay_factor(decay: float | Tensor, like: Tensor, ok: Tensor | None = None) -> Tensor:
    """The weight-decay factor for ``torch._foreach_mul_`` over parameters like ``like`` (1 where ``ok`` is false; on
    CUDA 16-bit parameters take it through ``_decay_params``):
    a 0-d tensor in the parameters' dtype, or float32 for 16-bit ones — what ``param.mul_(decay)`` computes in
    (torch.optim.Muon's decay). Why not the Python float: torch's CPU ``_foreach_mul_`` rounds a scalar to a
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


def commit_megabatch(p: Pending, flag: StepFlag, scratch: Workspace) -> None:
    """Phase 2: write the megabatch's new state (or, where ``flag.ok`` is false, keep the old one bit for bit).
    The step counters are advanced by the step, all at once. Where the fused kernels apply (``p.table``) and the
    new momentum is not held, the momentum, weight decay and update (with a deferred factor: NorMuon's rows',
    PolarGrad's) go through one fused launch (``fused.commit``; the same bits)."""
    ok, update = flag.ok, p.update
    fused_done = False
    if p.table is not None and p.new_bufs is None:
        decay = None if not isinstance(p.decay, Tensor) and p.decay == 1.0 else flag.decay_factor(p.decay, p.params[0])
        fused_done = fused.commit(p.table, p.momentum, update, p.alpha, decay, ok, p.update_factor)
    if not fused_done and p.update_factor is not None:
        update = update.mul_(p.update_factor)  # what finish_update would have done: the float32 product, rounded once
    if p.second is not None and p.new_second is not None and p.old_second is not None:
        new_second = p.new_second if ok is None else torch.where(ok, p.new_second, p.old_second)
        counts = p.counts if p.second_counts is None else p.second_counts
        torch._foreach_copy_(p.second, [s.view_as(t) for s, t in zip(new_second.split(counts), p.second, strict=True)])
    if fused_done:
        return
    if flag.skipped is not None:
        # In place into the step's own temporary: no fresh allocation (on the CPU: no pass of page faults).
        update = update.masked_fill_(flag.skipped, 0.0)
    if p.new_bufs is None:
        commit_momentum(p.bufs, p.grads, p.momentum, ok, scratch)
    else:
        assert p.old_bufs is not None
        new = p.new_bufs if ok is None else torch.where(ok, p.new_bufs, p.old_bufs, out=p.new_bufs)
        torch._foreach_copy_(p.bufs, [b.view_as(t) for b, t in zip(new.split(p.counts), p.bufs, strict=True)])
    if isinstance(p.decay, Tensor) or p.decay != 1.0:
        _decay_params(p.params, p.decay, flag, scratch)
    parts = [u.view_as(t) for u, t in zip(update.split(p.counts), p.params, strict=True)]
    _add_update(p.params, parts, p.alpha, scratch)
