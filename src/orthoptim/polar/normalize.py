"""Scale-safe normalization: a matrix is brought to spectral norm ≤ 1 whatever its scale.

Two steps, both per matrix of a batch:

1. **Exact power-of-two prescale.** Each matrix is multiplied by ``2^-e`` where ``e`` is the binary exponent
   of its max-abs entry, so the largest entry lands in ``[0.5, 1)``. Multiplying by a power of two is
   exact in binary floating point (barring entries so far below the maximum that they underflow, which
   are below the working precision relative to it anyway), so it changes no rounding: ``G`` and ``2^k·G``
   give bit-identical results. It is done in float32 (float64 for float64 input), whose range covers every
   float16/bfloat16/float32 value, subnormals included; the factor is applied as two halves so that even
   ``2^149`` (for the smallest float32 subnormal) never has to be represented.
2. **Norm in float32 on the prescaled matrix.** With entries in ``[-1, 1]`` and at least one ≥ 0.5 in
   magnitude, ``‖X‖_F ∈ [0.5, √(mn)]``: no overflow, no underflow, no ``eps`` floor. The zero matrix has
   norm 0 and is divided by the floor 0.5, which every nonzero matrix already exceeds, giving exact zeros.

Why ``σmax ≤ 1`` after dividing by ``margin·‖X‖_F``: ``‖X‖_F² = Σσᵢ² ≥ σmax²`` and ``margin ≥ 1``.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

from .errors import NonFiniteError

Normalization: TypeAlias = Literal["frobenius"]
NonFinitePolicy: TypeAlias = Literal["raise", "propagate"]

NORMALIZATIONS: tuple[str, ...] = ("frobenius",)
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "propagate")

# After the prescale every nonzero matrix has max-abs entry ≥ 0.5, hence norm ≥ 0.5.
_NORM_FLOOR = 0.5


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which prescale and norm are computed: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0**k`` for an integer tensor ``k`` in the normal range of ``dtype``, built from its bits (exact)."""
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    if dtype == torch.float32:
        return ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    raise TypeError(f"exact_pow2 supports float32 and float64, got {dtype}")


def pow2_prescale(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each matrix of ``X`` (..., m, n) by an exact power of two so its max-abs entry is in [0.5, 1).

    ``X`` must be float32 or float64. Returns the scaled tensor (a new one) and the per-matrix max-abs of
    the *input* (shape (..., 1, 1)), which is NaN/Inf exactly when the matrix holds a NaN/Inf.
    """
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    # amax = mantissa · 2^exp with mantissa ∈ [0.5, 1); exp = 0 for zero (and for inf/nan, which the
    # non-finite policy handles).
    _, exp = torch.frexp(amax)
    neg = -exp
    half = torch.div(neg, 2, rounding_mode="floor")
    # Two halves: the full factor can be 2^149 (float32 subnormals) or 2^1074 (float64), beyond range.
    scaled = X * exact_pow2(half, X.dtype) * exact_pow2(neg - half, X.dtype)
    return scaled, amax


def raise_if_nonfinite(amax: torch.Tensor, shape: torch.Size, who: str) -> None:
    """Raise :class:`NonFiniteError` if any per-matrix max-abs is NaN/Inf. One host sync (documented policy)."""
    bad = ~torch.isfinite(amax.reshape(-1))
    if bool(bad.any()):
        idx = torch.nonzero(bad).reshape(-1)
        total = bad.numel()
        where = "" if total == 1 else f" ({idx.numel()} of {total} matrices, first at flat batch index {int(idx[0])})"
        raise NonFiniteError(
            f"{who}: input of shape {tuple(shape)} contains NaN or Inf{where}; "
            "pass nonfinite='propagate' to let it through"
        )


def normalize(
    X: torch.Tensor,
    *,
    normalization: Normalization = "frobenius",
    margin: float = 1.0,
    nonfinite: NonFinitePolicy = "raise",
    who: str = "orthogonalize",
    shape: torch.Size | None = None,
) -> torch.Tensor:
    """Return ``X`` (..., m, n) scaled per matrix so that its spectral norm is ≤ 1/margin (exact arithmetic).

    Computed in float32 (float64 for float64 input) whatever ``X``'s dtype; the result has that work dtype.
    Zero matrices stay exactly zero. With ``nonfinite="raise"``, a NaN/Inf anywhere raises
    :class:`NonFiniteError` naming ``shape`` (default ``X.shape``; one host sync); with ``"propagate"`` it
    flows through.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    # Contiguous work copy (no copy if X already is one): the products then see one layout whatever the
    # caller's strides, so a tall matrix and the transpose of its wide twin give bit-identical results.
    Xw = X.to(work_dtype(X.dtype), memory_format=torch.contiguous_format)
    if not Xw.is_contiguous():  # .to() returns X itself when the dtype already matches
        Xw = Xw.contiguous()
    scaled, amax = pow2_prescale(Xw)
    if nonfinite == "raise":
        raise_if_nonfinite(amax, X.shape if shape is None else shape, who)
    norm = torch.linalg.vector_norm(scaled, dim=(-2, -1), keepdim=True)
    return scaled / (norm.clamp_min(_NORM_FLOOR) * margin)
