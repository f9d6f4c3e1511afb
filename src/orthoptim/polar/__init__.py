"""The polar-factor engine: pure functions on tensors, no optimizer state."""

from .design import PAPER_CUSHION, design_schedule, optimal_odd_polynomial
from .errors import NonFiniteError
from .exact import nuclear_norm, polar, singular_values
from .normalize import NONFINITE_POLICIES, NORMALIZATIONS, normalize
from .orthogonalize import DEFAULT_NORMALIZATION, DEFAULT_SCHEDULE, orthogonalize, resolve_compute_dtype
from .schedules import (
    Schedule,
    ScheduleReport,
    as_schedule,
    composite,
    get_schedule,
    list_schedules,
    validate_schedule,
)
from .workspace import Workspace

__all__ = [
    "DEFAULT_NORMALIZATION",
    "DEFAULT_SCHEDULE",
    "NONFINITE_POLICIES",
    "NORMALIZATIONS",
    "PAPER_CUSHION",
    "NonFiniteError",
    "Schedule",
    "ScheduleReport",
    "Workspace",
    "as_schedule",
    "composite",
    "design_schedule",
    "get_schedule",
    "list_schedules",
    "normalize",
    "nuclear_norm",
    "optimal_odd_polynomial",
    "orthogonalize",
    "polar",
    "resolve_compute_dtype",
    "singular_values",
    "validate_schedule",
]
