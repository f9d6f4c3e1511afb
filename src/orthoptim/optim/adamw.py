"""AdamW for the non-matrix parameters of ``Hybrid`` — same math as torch.optim.AdamW (decoupled weight decay,
bias-corrected moments, ``eps`` added after the square root), in two phases so the non-finite policy can drop a
step bit for bit.

Two ways, the same bits (tested): on CUDA (and in the distributed step) phase 1 computes the new moments and the
update out of place and the commit selects them on the device-side flag. On the CPU, where the step reads that
flag on the host and commits only a kept step (``optim/base.py``), nothing needs computing before the commit: it
updates the moments in place and builds each parameter's update in one kept scratch buffer, as torch.optim.AdamW
updates in place — no out-of-place copies of the state (for GPT-2 small's embedding and head, 4 × 154 MB per step
of fresh memory, page-faulted in on every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..polar.workspace import Workspace


def validate_adamw_group(group: dict[str, Any]) -> None:
    from .base import check_number

    check_number("lr", group["lr"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_number("betas[0]", betas[0], 0.0, 1.0)
    check_number("betas[1]", betas[1], 0.0, 1.0)
    check_number("eps", group["eps"], 0.0)


def decay_factor(decay: float, like: Tensor, ok: Tensor | None = None) -> Tensor:
    """The weight-decay factor for ``torch._foreach_mul_`` over parameters like ``like`` (1 where ``ok`` is false):
    a 0-d tensor in the parameters' dtype, or float32 for 16-bit ones — what ``param.mul_(decay)`` computes in
    (torch.optim.Muon's decay). Why not the Python float: torch's CPU ``_foreach_mul_`` rounds a scalar to a
    bfloat16 tensor's dtype first (0.998 → 0.99609: 2.8× the decay), and ``torch.where`` on Python floats builds
    float32 (0.999 → 0.99900001 for float64 parameters). Measured, torch 2.13."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    factor = torch.full((), decay, dtype=dtype, device=like.device)
    return factor if ok is None else torch.where(ok, factor, 1.0)


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float) -> tuple[list[Tensor], list[Tensor]]:
    """``1 − β₁ᵗ`` and ``1 − β₂ᵗ`` for the coming step ``t`` of each float32 step counter (as torch.optim.AdamW)."""
    t = torch._foreach_add(steps, 1.0)
    bias1 = torch._foreach_neg(torch._foreach_pow(beta1, t))
    torch._foreach_add_(bias1, 1.0)
    bias2 = torch._foreach_neg(torch._foreach_pow(beta2, t))
    torch._foreach_add_(bias2, 1.0)
    return list(bias1), list(bias2)


@dataclass
class AdamWPending:
    """New AdamW state for one group, computed out of place, committed once the step-wide flag is known."""

    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    steps: list[Tensor]
    new_avg: list[Tensor] | tuple[Tensor, ...]
    new_avg_sq: list[Tensor] | tuple[Tensor, ...]
    update: list[Tensor] | tuple[Tensor, ...]  # already multiplied by −lr/bias1
    decay: float

    def commit(self, ok: Tensor | None) -> None:
        """Write the new state; where ``ok`` is false keep every tensor bit for bit (per-tensor select)."""
        if ok is None:
            torch._foreach_copy_(self.exp_avg, self.new_avg)
            torch._foreach_copy_(self.exp_avg_sq, self.new_avg_sq)
            if self.decay != 1.0:
                torch._foreach_mul_(self.params, decay_factor(self.decay, self.params[0]))
            torch._foreach_add_(self.params, self.update)
            torch._foreach_add_(self.steps, 1.0)
            return
        # The skip policy: a per-tensor select (torch has no foreach ``where``); documented in base.py.
        torch._foreach_copy_(
            self.exp_avg, [torch.where(ok, n, o) for n, o in zip(self.new_avg, self.exp_avg, strict=True)]
        )
        torch._foreach_copy_(
            self.exp_avg_sq, [torch.where(ok, n, o) for n, o in zip(self.new_avg_sq, self.exp_avg_sq, strict=True)]
        )
        okf = ok.to(self.params[0].dtype)
        if self.decay != 1.0:
            torch._foreach_mul_(self.params, decay_factor(self.decay, self.params[0], ok))
        torch._foreach_mul_(self.update, okf)  # finite (inputs were sanitized): ×0 gives exact zeros
        torch._foreach_add_(self.params, self.update)
        torch._foreach_add_(self.steps, okf.to(torch.float32))


@dataclass
class AdamWInPlace:
    """One group's AdamW step on the CPU, computed by the commit itself (which runs there only for a kept step):
    ``adamw_prepare``'s operations, in the same order, on the state in place; each parameter's update is built in
    one scratch buffer (role ``"adamw"``) and added."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    steps: list[Tensor]
    group: dict[str, Any]
    scratch: Workspace

    def commit(self, ok: Tensor | None) -> None:
        if ok is not None:
            raise RuntimeError("an in-place AdamW step commits only unconditionally (the CPU's kept steps)")
        grads, group, scratch = self.grads, self.group, self.scratch
        lr, eps = group["lr"], group["eps"]
        decay = 1.0 - lr * group["weight_decay"]
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(self.exp_avg, grads, 1.0 - beta1)
        bias1, bias2 = _bias_corrections(self.steps, beta1, beta2)
        root2 = torch._foreach_sqrt(bias2)
        step_size = torch._foreach_div(bias1, -lr) if lr != 0 else [None] * len(bias1)
        for p, g, avg, avg_sq, r2, size in zip(
            self.params, grads, self.exp_avg, self.exp_avg_sq, root2, step_size, strict=True
        ):
            # Per tensor, not ``_foreach_mul_``: on the CPU that one rounds the scalar to a bfloat16 state's dtype
            # first (β₂ = 0.95 → 0.9492), unlike ``_foreach_mul`` and ``mul_`` (measured, torch 2.13).
            avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            update = torch.sqrt(avg_sq, out=scratch.like("adamw", avg_sq)).div_(r2).add_(eps)
            torch.div(avg, update, out=update)
            if size is None:
                update.mul_(0.0)
            else:
                update.div_(size)  # update · (−lr / bias1)
            if decay != 1.0:
                p.mul_(decay)
            p.add_(update)
        torch._foreach_add_(self.steps, 1.0)


def adamw_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    lists: dict[str, list[Tensor]],
    group: dict[str, Any],
    *,
    sanitize: Tensor | None,
    defer: Workspace | None = None,
) -> AdamWPending | AdamWInPlace:
    """Phase 1: the AdamW update of ``params`` from ``grads`` (state in ``lists``), nothing written yet.

    ``defer`` (the CPU, where the commit runs only for a kept step): compute nothing now; the commit updates the
    state in place, with its scratch buffer in ``defer``. ``sanitize`` is then not needed: a step whose gradients
    are not all finite is not committed at all."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    if defer is not None:
        return AdamWInPlace(params, grads, lists["exp_avg"], lists["exp_avg_sq"], lists["step"], group, defer)
    if sanitize is not None:
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        grads = [torch.where(sanitize, g, zero) for g in grads]
    steps = lists["step"]
    new_avg = torch._foreach_lerp(lists["exp_avg"], grads, 1.0 - beta1)
    new_avg_sq = torch._foreach_mul(lists["exp_avg_sq"], beta2)
    torch._foreach_addcmul_(new_avg_sq, grads, grads, 1.0 - beta2)
    bias1, bias2 = _bias_corrections(steps, beta1, beta2)  # float32 step counters, as torch.optim.AdamW keeps them
    denom = torch._foreach_sqrt(new_avg_sq)
    torch._foreach_div_(denom, torch._foreach_sqrt(bias2))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(new_avg, denom)
    step_size = torch._foreach_div(bias1, -lr) if lr != 0 else None
    if step_size is None:
        torch._foreach_mul_(update, 0.0)
    else:
        torch._foreach_div_(update, step_size)  # update · (−lr / bias1)
    return AdamWPending(
        params, lists["exp_avg"], lists["exp_avg_sq"], steps, new_avg, new_avg_sq, update, 1.0 - lr * wd
    )
