"""orthoptim: orthogonalized optimizers on a scale-invariant polar-factor engine."""

from .optim import Hybrid, Muon, NorMuon, PolarGrad, available, clip_grad_norm_, create, explain, split_params
from .polar import (
    NonFiniteError,
    Schedule,
    ScheduleReport,
    design_schedule,
    get_schedule,
    list_schedules,
    nuclear_norm,
    orthogonalize,
    polar,
    resolve_compute_dtype,
    validate_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "Hybrid",
    "Muon",
    "NonFiniteError",
    "NorMuon",
    "PolarGrad",
    "Schedule",
    "ScheduleReport",
    "__version__",
    "available",
    "clip_grad_norm_",
    "create",
    "design_schedule",
    "explain",
    "get_schedule",
    "list_schedules",
    "nuclear_norm",
    "orthogonalize",
    "polar",
    "resolve_compute_dtype",
    "split_params",
    "validate_schedule",
]
