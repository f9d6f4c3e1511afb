"""``orthoptim.create(name, params, **kw)`` and ``orthoptim.available()``."""

from __future__ import annotations

from typing import Any

import torch

from .hybrid import Hybrid
from .muon import Muon
from .normuon import NorMuon
from .polargrad import PolarGrad

_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {
    "muon": Muon,
    "normuon": NorMuon,
    "polargrad": PolarGrad,
    "hybrid": Hybrid,
}


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def create(name: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    """Build an optimizer by name (case-insensitive), e.g. ``create("normuon", model.parameters(), lr=0.02)``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key](params, **kw)
