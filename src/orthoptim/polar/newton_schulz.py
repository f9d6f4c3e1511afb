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


def newton_schulz(
    X: torch.Tensor,
    coefficients: Sequence[Triple],
    *,
    first_gram: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the steps ``coefficients`` to ``X`` of shape (B, m, n), m ≤ n, already normalized.

    With ``first_gram``/``row_scale`` (from ``normalize.gram_scale``) the iteration runs on ``X_s = row_scale·X``
    without ever forming it: the first step is ``X₁ = (aI + bA_s + cA_s²)·diag(row_scale)·X`` — the m×m factor
    absorbs the scale, so ``X`` is not rounded a second time — and ``A_s`` replaces the first Gram product.

    Runs in ``X``'s dtype (the compute dtype); returns a new tensor of the same shape and dtype.
    """
    if first_gram is not None:
        if row_scale is None:
            raise ValueError("newton_schulz: first_gram needs its row_scale")
        (a, b, c), coefficients = coefficients[0], coefficients[1:]
        A = first_gram
        P = A * b if c == 0.0 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        P = P.to(row_scale.dtype)  # add aI and the scale at float32 (float64) precision, round once
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        X = torch.bmm((P * row_scale.mT).to(X.dtype), X)
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        if c == 0.0:
            X = torch.baddbmm(X, A, X, beta=a, alpha=b)
        else:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X
