"""Shared helpers: matrices with a prescribed spectrum, built in float64 from random orthogonal factors."""

from __future__ import annotations

import torch


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A rows×cols float64 matrix with orthonormal columns (rows ≥ cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return (G, U, V) with G = U diag(s) Vᵀ in float64, U m×k and V n×k orthonormal, k = len(s)."""
    gen = torch.Generator().manual_seed(seed)
    k = s.numel()
    U = orthonormal(m, k, gen)
    V = orthonormal(n, k, gen)
    return (U * s.to(torch.float64)) @ V.T, U, V


def gains(O: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """UᵀOV in float64: its diagonal is the gain along each input singular direction."""
    return U.T @ O.to(torch.float64) @ V
