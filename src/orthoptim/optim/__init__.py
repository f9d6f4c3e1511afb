"""Thin torch.optim.Optimizer shells over one step path (``base.py``: the shell; ``options.py``: the typed
options; ``backends/``: the ways of executing the update; ``executor.py``: the same over a process group)."""

from .base import OrthogonalizedOptimizer
from .clip import clip_grad_norm_
from .hybrid import Hybrid
from .muon import Muon
from .normuon import NorMuon
from .options import BACKENDS, NONFINITE_MODES, SCALE_MODES, lr_scale, matrix_layout
from .polargrad import PolarGrad
from .registry import available, create
from .split import explain, split_params

__all__ = [
    "BACKENDS",
    "NONFINITE_MODES",
    "SCALE_MODES",
    "Hybrid",
    "Muon",
    "NorMuon",
    "OrthogonalizedOptimizer",
    "PolarGrad",
    "available",
    "clip_grad_norm_",
    "create",
    "explain",
    "lr_scale",
    "matrix_layout",
    "split_params",
]
