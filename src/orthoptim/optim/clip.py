"""Group-aware gradient clipping: only groups whose update depends on the gradient's scale are clipped."""

from __future__ import annotations

from typing import Any

import torch


def is_scale_invariant(group: dict[str, Any]) -> bool:
    """Whether a group's update ignores the gradient's scale (orthogonalized, not ``"nuclear"``)."""
    return group.get("algorithm", "muon") != "adamw" and "schedule" in group and group.get("scale_mode") != "nuclear"


@torch.no_grad()
def clip_grad_norm_(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """Clip gradients of the groups whose update depends on the gradient's scale; return their total norm.

    Orthogonalized updates (Muon, NorMuon) are scale-invariant: clipping them does nothing useful, and
    including their gradients in a global norm lets one huge layer shrink the clip coefficient for everything.
    So the norm is computed over, and the clip applied to, AdamW groups and ``scale_mode="nuclear"`` groups only
    (every group of an optimizer that is not orthoptim's). With none of those, returns a zero norm.
    """
    params = [p for g in optimizer.param_groups if not is_scale_invariant(g) for p in g["params"] if p.grad is not None]
    if not params:
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
