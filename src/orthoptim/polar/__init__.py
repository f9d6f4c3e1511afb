"""The polar-factor engine: pure functions on tensors, no optimizer state."""

from .errors import NonFiniteError
from .exact import nuclear_norm, polar, singular_values
from .normalize import NONFINITE_POLICIES, NORMALIZATIONS, normalize
from .orthogonalize import DEFAULT_SCHEDULE, orthogonalize, resolve_compute_dtype
from .schedules import (
    Schedule,
    ScheduleReport,
    as_schedule,
    composite,
    get_schedule,
    list_schedules,
    validate_schedule,
)

__all__ = [
    "DEFAULT_SCHEDULE",
    "NONFINITE_POLICIES",
    "NORMALIZATIONS",
    "NonFiniteError",
    "Schedule",
    "ScheduleReport",
    "as_schedule",
    "composite",
    "get_schedule",
    "list_schedules",
    "normalize",
    "nuclear_norm",
    "orthogonalize",
    "polar",
    "resolve_compute_dtype",
    "singular_values",
    "validate_schedule",
]
