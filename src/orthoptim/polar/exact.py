"""Exact references by float64 SVD: the polar factor and the nuclear norm."""

from __future__ import annotations

import torch

from .checks import check_matrix_input
from .errors import NonFiniteError


def _svd64(G: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_matrix_input(G, who)
    G64 = G.detach().to(torch.float64)
    if not bool(torch.isfinite(G64).all()):
        raise NonFiniteError(f"{who}: input of shape {tuple(G.shape)} contains NaN or Inf")
    return torch.linalg.svd(G64, full_matrices=False)


def polar(G: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The polar factor ``U Vᵀ`` of each matrix in ``G`` (..., m, n), from a float64 SVD.

    For rank-deficient input the factor is taken on the range only: singular values below
    ``max(m, n)·eps₆₄·σmax`` count as zero and contribute nothing, so the zero matrix maps to zeros. This is
    the limit Newton–Schulz converges to (its polynomials fix 0), which makes it the right reference.
    Returned in ``dtype`` (``G``'s dtype if None).
    """
    U, S, Vh = _svd64(G, "polar")
    tol = S[..., :1] * (max(G.shape[-2], G.shape[-1]) * torch.finfo(torch.float64).eps)
    keep = (S > tol).to(torch.float64)
    P = (U * keep.unsqueeze(-2)) @ Vh
    return P.to(G.dtype if dtype is None else dtype)


def nuclear_norm(G: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``‖G‖_* = Σσᵢ`` of each matrix in ``G`` (..., m, n) from a float64 SVD; shape ``G.shape[:-2]``."""
    S = _svd64(G, "nuclear_norm")[1]
    return S.sum(-1).to(G.dtype if dtype is None else dtype)


def singular_values(G: torch.Tensor) -> torch.Tensor:
    """Float64 singular values of each matrix in ``G``, descending (a test and doctor helper)."""
    return _svd64(G, "singular_values")[1]
