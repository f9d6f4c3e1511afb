"""Up-front validation of the optimizers' options: every bad value raises ``ValueError``/``TypeError`` naming it,
before any state exists."""

from __future__ import annotations

import math
from typing import Any, Literal, TypeAlias

from torch import Tensor

from ..polar import as_schedule
from ..polar.normalize import NORMALIZATIONS
from ..polar.orthogonalize import ITERATIONS, resolve_compute_dtype
from ..polar.schedules import check_precision
from .shapes import SCALE_MODES, SHAPE_POLICIES, matrix_layout

NonFiniteMode: TypeAlias = Literal["skip", "raise", "propagate"]


NONFINITE_MODES: tuple[str, ...] = ("skip", "raise", "propagate")


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number in the stated range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok or not math.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}{']' if hi is not None else ')'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")


def check_param_dtypes(params: list[Tensor]) -> None:
    """Raise ``TypeError`` for a parameter that is not real floating point (integer, bool, complex)."""
    for p in params:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"orthoptim optimizers take real floating-point parameters; the parameter of shape {tuple(p.shape)} "
                f"is {p.dtype}"
            )


def validate_orthogonalized_group(group: dict[str, Any]) -> None:
    """Validate the options of one orthogonalized param group up front (raises ``ValueError``/``TypeError``)."""
    check_number("lr", group["lr"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    check_number("momentum", group["momentum"], 0.0, 1.0)
    if not isinstance(group["nesterov"], bool):
        raise TypeError("nesterov must be a bool")
    if group["scale_mode"] not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {group['scale_mode']!r}; choose one of {SCALE_MODES}")
    if group["normalization"] not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {group['normalization']!r}; choose one of {NORMALIZATIONS}")
    if group.get("iteration", "auto") not in ITERATIONS:
        raise ValueError(f"unknown iteration {group['iteration']!r}; choose one of {ITERATIONS}")
    if group["shape_policy"] not in SHAPE_POLICIES:
        raise ValueError(f"unknown shape_policy {group['shape_policy']!r}; choose one of {SHAPE_POLICIES}")
    sched = as_schedule(group["schedule"])
    if group["ns_steps"] is not None:
        sched.steps_coefficients(group["ns_steps"])  # validates the step count
    if group["row_norm"]:
        check_number("beta2", group["beta2"], 0.0, 1.0)
        check_number("row_eps", group["row_eps"], 0.0, lo_open=True)
    check_param_dtypes(group["params"])
    for p in group["params"]:
        matrix_layout(tuple(p.shape), group["shape_policy"])
    # The schedule's safety in the compute dtype of each device, checked here so that a compiled step (which
    # cannot run this host-side check, see polar/orthogonalize.py) never runs an unvalidated configuration.
    for device in {p.device for p in group["params"]}:
        dtype = resolve_compute_dtype(group["compute_dtype"], device)
        check_precision(sched, group["ns_steps"], str(dtype).replace("torch.", ""))
