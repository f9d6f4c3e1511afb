"""orthoptim: orthogonalized optimizers on a scale-invariant polar-factor engine."""

from .polar import (
    NonFiniteError,
    Schedule,
    ScheduleReport,
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
    "NonFiniteError",
    "Schedule",
    "ScheduleReport",
    "__version__",
    "get_schedule",
    "list_schedules",
    "nuclear_norm",
    "orthogonalize",
    "polar",
    "resolve_compute_dtype",
    "validate_schedule",
]
