"""Group-aware gradient clipping: only groups whose update depends on the gradient's scale are clipped.

One optimizer or several (a chained setup: Muon for the matrices, AdamW for the rest, as Megatron-core's
``ChainedOptimizer`` steps them one after another) or their param groups: one norm is computed over every clipped
group of all of them, and one coefficient applied, as a global clip over the chain would — minus the groups whose
update ignores the gradient's scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch


@runtime_checkable
class HasParamGroups(Protocol):
    """Anything that exposes ``param_groups`` as torch optimizers do (Megatron-core's ``ChainedOptimizer``,
    accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` wrappers)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...


#: What :func:`clip_grad_norm_` accepts: one optimizer, or an iterable of optimizers and/or param groups.
ClipTarget: TypeAlias = (
    torch.optim.Optimizer | HasParamGroups | Iterable[torch.optim.Optimizer | HasParamGroups | dict[str, Any]]
)


def is_scale_invariant(group: dict[str, Any]) -> bool:
    """Whether a group's update ignores the gradient's scale, so clipping it means nothing.

    True for orthoptim's orthogonalized groups (Muon, NorMuon: not ``"adamw"``, not ``scale_mode="nuclear"``) and
    for ``torch.optim.Muon``'s groups (recognized by its ``ns_coefficients`` and ``adjust_lr_fn`` keys): for those a
    clip only pushes the matrix toward torch's ``max(‖X‖, eps)`` floor, the Megatron-LM report's stall.
    False for everything else (AdamW, PolarGrad, any other optimizer).
    """
    if group.get("algorithm") == "adamw":
        return False
    if "schedule" in group:  # orthoptim's orthogonalized groups carry their schedule
        return group.get("scale_mode") != "nuclear"
    return "ns_coefficients" in group and "adjust_lr_fn" in group


def param_groups_of(optimizer: ClipTarget) -> list[dict[str, Any]]:
    """The param groups of one optimizer, or of every optimizer and group in an iterable of them, in order."""
    if isinstance(optimizer, dict):
        raise TypeError("clip_grad_norm_: pass a list of param groups, not one group dict")
    if isinstance(optimizer, torch.optim.Optimizer | HasParamGroups):
        return list(optimizer.param_groups)
    if isinstance(optimizer, torch.Tensor) or not isinstance(optimizer, Iterable):
        raise TypeError(
            "clip_grad_norm_: expected an optimizer, or a list/tuple of optimizers or param groups, "
            f"got {type(optimizer).__name__}"
        )
    groups: list[dict[str, Any]] = []
    for item in optimizer:
        if isinstance(item, dict):
            if "params" not in item:
                raise TypeError("clip_grad_norm_: a param group must be a dict with a 'params' entry")
            groups.append(item)
        elif isinstance(item, torch.optim.Optimizer | HasParamGroups):
            groups.extend(item.param_groups)
        else:
            raise TypeError(
                f"clip_grad_norm_: each item must be an optimizer or a param group (dict), got {type(item).__name__}"
            )
    return groups


@torch.no_grad()
def clip_grad_norm_(
    optimizer: ClipTarget, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """Clip gradients of the groups whose update depends on the gradient's scale; return their total norm.

    ``optimizer`` is one optimizer, or a list/tuple of optimizers and/or param groups (a chained setup, e.g.
    ``[orthoptim.Muon(matrices), torch.optim.AdamW(rest)]``, or ``chained.param_groups``): one norm is taken over
    all the clipped groups together and one coefficient applied to them, as a global clip over the chain does.

    Orthogonalized updates (orthoptim's Muon and NorMuon, ``torch.optim.Muon``) are scale-invariant: clipping them
    does nothing useful, and including their gradients in a global norm lets one huge layer shrink the clip
    coefficient for everything. So the norm is computed over, and the clip applied to, AdamW groups and
    ``scale_mode="nuclear"`` groups (PolarGrad) only, and every group of any other optimizer. A parameter listed in
    several groups or optimizers counts once. With nothing to clip, returns a zero norm (on the first parameter's
    device) and changes nothing. The norm is ``torch.nn.utils.clip_grad_norm_``'s, with its ``norm_type`` and
    ``error_if_nonfinite``; sharded (DTensor) gradients are reduced as it reduces them.
    """
    groups = param_groups_of(optimizer)
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for group in groups:
        if is_scale_invariant(group):
            continue
        for p in group["params"]:
            # A parameter shared by two optimizers (or groups) must be scaled once and counted once in the norm.
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
