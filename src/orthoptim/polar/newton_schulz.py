"""The Newton–Schulz iteration on a batch of normalized wide matrices.

One quintic step ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` is three batched products:
``A = XXᵀ``, ``B = bA + cA²`` (one ``baddbmm``), ``X ← aX + BX`` (one ``baddbmm``). A cubic step (c = 0)
skips ``A²``: ``X ← aX + bAX``, two products. Working on the wide orientation (m ≤ n) keeps the Gram
matrix ``A`` at m×m, the smaller side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedules import Triple


def newton_schulz(X: torch.Tensor, coefficients: Sequence[Triple]) -> torch.Tensor:
    """Apply the steps ``coefficients`` to ``X`` of shape (B, m, n), m ≤ n, already normalized.

    Runs in ``X``'s dtype (the compute dtype); returns a new tensor of the same shape and dtype.
    """
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        if c == 0.0:
            X = torch.baddbmm(X, A, X, beta=a, alpha=b)
        else:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X
