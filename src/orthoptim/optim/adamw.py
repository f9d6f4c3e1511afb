"""AdamW for the non-matrix parameters of ``Hybrid`` — same math as torch.optim.AdamW (decoupled weight decay,
bias-corrected moments, ``eps`` added after the square root), in two phases so the non-finite policy can drop a
step bit for bit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
                torch._foreach_mul_(self.params, self.decay)
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
            torch._foreach_mul_(self.params, torch.where(ok, self.decay, 1.0).to(self.params[0].dtype))
        torch._foreach_mul_(self.update, okf)  # finite (inputs were sanitized): ×0 gives exact zeros
        torch._foreach_add_(self.params, self.update)
        torch._foreach_add_(self.steps, okf.to(torch.float32))


def adamw_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    lists: dict[str, list[Tensor]],
    group: dict[str, Any],
    *,
    sanitize: Tensor | None,
) -> AdamWPending:
    """Phase 1: the AdamW update of ``params`` from ``grads`` (state in ``lists``), nothing written yet."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    if sanitize is not None:
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        grads = [torch.where(sanitize, g, zero) for g in grads]
    steps = lists["step"]
    new_avg = torch._foreach_lerp(lists["exp_avg"], grads, 1.0 - beta1)
    new_avg_sq = torch._foreach_mul(lists["exp_avg_sq"], beta2)
    torch._foreach_addcmul_(new_avg_sq, grads, grads, 1.0 - beta2)
    t = torch._foreach_add(steps, 1.0)  # float32 step counters, as torch.optim.AdamW keeps them
    bias1 = torch._foreach_neg(torch._foreach_pow(beta1, t))
    torch._foreach_add_(bias1, 1.0)
    bias2 = torch._foreach_neg(torch._foreach_pow(beta2, t))
    torch._foreach_add_(bias2, 1.0)
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
