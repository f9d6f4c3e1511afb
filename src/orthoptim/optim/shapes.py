"""How a parameter becomes matrices, and how the learning rate scales with their shape."""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

ShapePolicy: TypeAlias = Literal["auto", "flatten", "batch"]
ScaleMode: TypeAlias = Literal["original", "match_rms_adamw", "unit_rms", "nuclear"]

SHAPE_POLICIES: tuple[str, ...] = ("auto", "flatten", "batch")
SCALE_MODES: tuple[str, ...] = ("original", "match_rms_adamw", "unit_rms", "nuclear")


def matrix_layout(shape: tuple[int, ...], policy: ShapePolicy = "auto") -> tuple[int, int, int]:
    """``(count, m, n)``: the parameter is ``count`` matrices of shape m×n.

    * 2-D: one matrix.
    * ``"flatten"`` (``"auto"`` for ≥ 4-D, i.e. conv2d/conv3d weights ``(out, in, *kernel)``): one ``out × rest``
      matrix — each output channel's filter is a row.
    * ``"batch"`` (``"auto"`` for 3-D: stacked experts or per-head weights ``(..., m, n)``): the leading dims index
      independent matrices. A Conv1d weight ``(out, in, k)`` is 3-D: give its group ``shape_policy="flatten"``.
    """
    if len(shape) < 2:
        raise ValueError(
            f"parameter of shape {tuple(shape)} has {len(shape)} dim(s): orthogonalized optimizers need matrices "
            "(≥ 2-D). Optimize biases, gains and other vectors with AdamW — orthoptim.Hybrid does both in one "
            "optimizer, and orthoptim.split_params(model) sorts a model's parameters for it."
        )
    if policy not in SHAPE_POLICIES:
        raise ValueError(f"unknown shape_policy {policy!r}; choose one of {SHAPE_POLICIES}")
    if any(d == 0 for d in shape):
        raise ValueError(f"parameter of shape {tuple(shape)} is empty")
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if policy == "flatten" or (policy == "auto" and len(shape) >= 4):
        return 1, shape[0], math.prod(shape[1:])
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def lr_scale(mode: ScaleMode, m: int, n: int) -> float:
    """Factor applied to the learning rate for an m×n matrix (rows = outputs).

    ============== ==================== =====================================================================
    mode           factor               meaning
    ============== ==================== =====================================================================
    original       √max(1, m/n)         KellerJordan/Muon; torch.optim.Muon ``adjust_lr_fn=None/"original"``
    match_rms_adamw 0.2·√max(m, n)      Moonlight (arXiv 2502.16982): update RMS ≈ AdamW's, so AdamW's lr and
                                        weight decay carry over; torch.optim.Muon ``"match_rms_adamw"``
    unit_rms       √max(m, n)           update RMS = 1 (an orthogonal m×n matrix has RMS 1/√max(m, n))
    nuclear        1                    PolarGrad (arXiv 2505.21799): the update is ‖M‖_*·polar(M) instead
    ============== ==================== =====================================================================
    """
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "unit_rms":
        return math.sqrt(max(m, n))
    if mode == "nuclear":
        return 1.0
    raise ValueError(f"unknown scale mode {mode!r}; choose one of {SCALE_MODES}")
