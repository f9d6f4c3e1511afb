"""Up-front validation of matrix inputs, shared by the iteration and the exact reference."""

from __future__ import annotations

import torch


def check_matrix_input(G: object, who: str) -> torch.Tensor:
    """Return ``G`` if it is a real floating tensor of shape (..., m, n) with m, n ≥ 1; raise otherwise."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(G).__name__}")
    if G.is_complex():
        raise TypeError(
            f"{who}: complex tensors are not supported (dtype {G.dtype}); orthogonalize the real and "
            "imaginary parts' real embedding [[Re, -Im], [Im, Re]] instead"
        )
    if not G.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point tensor, got dtype {G.dtype}")
    if G.ndim < 2:
        raise ValueError(
            f"{who}: expected a matrix or a batch of matrices (..., m, n), got shape {tuple(G.shape)} "
            f"with {G.ndim} dim(s)"
        )
    if G.numel() == 0:
        raise ValueError(f"{who}: got an empty tensor of shape {tuple(G.shape)}")
    return G
