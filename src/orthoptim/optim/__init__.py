"""Thin torch.optim.Optimizer shells over one functional update (``base.py``: the shell; ``prepare.py`` and
``commit.py``: its two phases)."""

from .base import OrthogonalizedOptimizer
from .clip import clip_grad_norm_
from .hybrid import Hybrid, split_params
from .muon import Muon
from .normuon import NorMuon
from .polargrad import PolarGrad
from .registry import available, create
from .shapes import SCALE_MODES, lr_scale, matrix_layout
from .validation import NONFINITE_MODES

__all__ = [
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
    "lr_scale",
    "matrix_layout",
    "split_params",
]
