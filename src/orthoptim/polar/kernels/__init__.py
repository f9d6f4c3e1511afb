"""Triton kernels for the Newton–Schulz step's symmetric products, behind a small dispatch surface.

``sym_gram(X)`` = ``X @ X.mT`` and ``sym_poly(A, b, c)`` = ``b·A + c·(A @ A)`` for symmetric ``A``, each computing
only the lower-triangle tiles and mirroring them (about half the FLOPs of the full product; see
``symmetric.py``). ``use_triton(X)`` says whether the caller should take this path; the torch path
(``bmm``/``baddbmm``) is always there beside it.

This module imports without triton: triton is imported lazily, once, by ``triton_available()``.
Set ``ORTHOPTIM_TRITON=0`` to force the torch path on CUDA.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

__all__ = ["sym_gram", "sym_poly", "triton_available", "triton_enabled", "use_triton"]

#: Dtypes the kernels compute in. float64 is accepted by sym_gram/sym_poly and computed by torch (no tensor-core
#: path that a kernel would beat); other dtypes are refused.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """True iff ``import triton`` works here (cached; never raises)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything at import time
        return False
    return True


def triton_enabled() -> bool:
    """Whether orthoptim's Triton kernels may run: triton importable and the environment variable
    ``ORTHOPTIM_TRITON`` not set to ``"0"`` (read at every call). Also the switch of the optimizers' fused step
    kernels (``orthoptim.optim.backends.triton``)."""
    return os.environ.get("ORTHOPTIM_TRITON", "1") != "0" and triton_available()


def use_triton(X: torch.Tensor) -> bool:
    """Whether ``X``'s products should go through the Triton kernels: a CUDA tensor and ``triton_enabled()``."""
    return X.is_cuda and triton_enabled()


def _as_batch(X: torch.Tensor, name: str, square: bool) -> tuple[torch.Tensor, bool]:
    """Validate ``X`` and view it as (B, m, k); the bool says whether it was 2-D (and the result is squeezed)."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
    if X.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D (m, k) or 3-D (B, m, k) tensor, got shape {tuple(X.shape)}")
    if not X.dtype.is_floating_point or X.dtype not in (*KERNEL_DTYPES, torch.float64):
        raise ValueError(f"{name}: expected float32, bfloat16, float16 or float64, got {X.dtype}")
    if square and X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{name}: A must be square (B, m, m), got shape {tuple(X.shape)}")
    two_d = X.dim() == 2
    return (X.unsqueeze(0) if two_d else X), two_d


def _kernels_module() -> ModuleType:
    if not triton_available():
        raise RuntimeError(
            "orthoptim's Triton kernels need triton, which is not installed (pip install triton); "
            "the torch path (use_triton(X) is False) needs nothing"
        )
    from . import symmetric

    return symmetric


def sym_gram(X: torch.Tensor) -> torch.Tensor:
    """``X @ X.mT`` for ``X`` of shape (B, m, k) or (m, k), in ``X``'s dtype, symmetric bit for bit.

    float32/bfloat16/float16: the Triton kernel (float32 accumulation; float32 without TF32). float64: torch.
    Raises ValueError for other ranks or dtypes, RuntimeError if triton is not installed.
    """
    X3, two_d = _as_batch(X, "sym_gram", square=False)
    batch, m, k = X3.shape
    if X3.dtype == torch.float64 or batch == 0 or m == 0 or k == 0:
        out = torch.bmm(X3, X3.mT)  # empty products are zeros; float64 has no kernel
    else:
        out = _kernels_module().gram(X3)
    return out[0] if two_d else out


def sym_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``b·A + c·(A @ A)`` for symmetric ``A`` of shape (B, m, m) or (m, m), in ``A``'s dtype.

    Only ``A``'s symmetry is assumed, not checked: the kernel reads ``A @ A`` as ``A @ A.mT`` and the epilogue's
    ``A`` from its lower triangle; the result is symmetric bit for bit. Same dtype rules as :func:`sym_gram`.
    """
    A3, two_d = _as_batch(A, "sym_poly", square=True)
    batch, m, _ = A3.shape
    if A3.dtype == torch.float64 or batch == 0 or m == 0:
        out = torch.baddbmm(A3, A3, A3, beta=b, alpha=c)
    else:
        out = _kernels_module().poly(A3, float(b), float(c))
    return out[0] if two_d else out
