"""Scale-safe normalization: a matrix is brought to spectral norm ≤ 1 whatever its scale.

Two steps, both per matrix of a batch:

1. **Exact power-of-two prescale.** Each matrix is multiplied by ``2^(2-e)`` where ``e`` is the binary exponent
   of its max-abs entry (``amax = f·2^e``, f ∈ [0.5, 1)), so the largest entry lands in ``[2, 4)``. Multiplying
   by a power of two is exact in binary floating point unless the product under- or overflows, and an
   underflowing product of ``2^k·G`` and of ``G`` is the same real number, rounded the same way: ``G`` and
   ``2^k·G`` give bit-identical results for every ``k`` that keeps ``2^k·G`` exact, over the input dtype's whole
   range. It is done in float32 (float64 for float64 input), whose range covers every float16/bfloat16/float32
   value, subnormals included. Why ``[2, 4)`` and not ``[0.5, 1)``: the top binade (``e = 128`` in float32,
   1024 in float64) then needs ``2^-126`` (``2^-1022``), still a normal number, so every matrix but those of
   the tiniest scale gets its whole prescale as one factor; ``[0.5, 1)`` needed ``2^-128``, which was applied
   as ``2^-126`` and ``2^-2`` and rounded the entries that underflow twice — not bit-exact once
   ``amax ≥ 2^126`` (``2^1022``). At the bottom the factor can exceed the range (``2^150`` for the smallest
   float32 subnormal); there the remainder is folded into the norm and the final factor, exactly
   (:func:`normalize`).
2. **Norm in float32 on the prescaled matrix.** With entries in ``[-4, 4]`` and at least one ≥ 2 in
   magnitude, ``‖X‖_F ∈ [2, 4√(mn)]``: no overflow, no underflow, no ``eps`` floor. The zero matrix has
   norm 0 and is divided by the floor 2, which every nonzero matrix already reaches, giving exact zeros.

Why ``σmax ≤ 1`` after dividing by ``margin·‖X‖_F``: ``‖X‖_F² = Σσᵢ² ≥ σmax²`` and ``margin ≥ 1``.

Two tighter normalizations work on the Gram matrix ``A = XXᵀ`` (m×m, the small side) of the Frobenius-normalized
matrix, which the first Newton–Schulz step needs anyway, so they cost O(m²) extra, not another product:

* ``"schatten4"`` (Gram iteration, arXiv 2305.16173; KellerJordan/Muon PR 14): divide ``X`` by ``‖A‖_F^{1/2}``.
  ``‖A‖_F² = Σσᵢ⁴ ≥ σmax⁴``, so the bound holds; it is much tighter than Frobenius for spread spectra
  (for σᵢ = 1/i it is within 1.04 of σmax, Frobenius 1.28).
* ``"aol"`` (Turbo-Muon, arXiv 2512.04632): scale the rows of ``X`` by ``dᵢ = (Σⱼ|Aᵢⱼ|)^{-1/2}``. Schur test with
  weights ``pᵢ = 1/dᵢ``: ``Σⱼ dᵢ|Aᵢⱼ|dⱼ·pⱼ = dᵢ Σⱼ|Aᵢⱼ| = pᵢ``, so ``‖DAD‖₂ ≤ 1`` and ``σmax(DX)² = ‖DAD‖₂ ≤ 1``.
  Unlike the others this is a *preconditioner*, not a scalar: the iteration converges to the polar factor of
  ``DX``, which differs from that of ``X`` unless the rows are balanced. Measure before you rely on it.

Rounding (bfloat16 compute): ``A`` is computed from the rounded ``X_b`` and stored rounded, each entry off by at
most 2⁻⁹ of itself, so the exact Gram of ``X_b`` is bounded by ``(1 + 2⁻⁹)`` times what the bound used and
``σmax ≤ (1 + 2⁻⁹)^{1/2} < 1 + 2⁻¹⁰`` — inside the ``1 + 2⁻⁸`` every shipped schedule is validated for. The scale
is never applied to ``X_b`` itself (which would round again): it is folded into the first step's m×m factor.
In float16 Gram entries below its normal range (2⁻¹⁴) are rounded in absolute terms instead, by up to half its
smallest subnormal; AOL's row sums add a term that covers it, and its factors are capped so that the float16
first-step factor stays finite (:func:`aol_row_scale`): zero rows give zero output rows there too.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

import torch

from . import devices
from .errors import NonFiniteError
from .workspace import Workspace, scratch

Normalization: TypeAlias = Literal["frobenius", "schatten4", "aol"]
NonFinitePolicy: TypeAlias = Literal["raise", "propagate"]

NORMALIZATIONS: tuple[str, ...] = ("frobenius", "schatten4", "aol")
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "propagate")

#: The prescale puts each nonzero matrix's max-abs entry in [2^(PRESCALE_TOP - 1), 2^PRESCALE_TOP) = [2, 4): the
#: smallest target the largest finite binade reaches with a normal power of two (module docstring).
PRESCALE_TOP = 2
# After the prescale every nonzero matrix has max-abs entry ≥ 2, hence norm ≥ 2.
_NORM_FLOOR = 2.0


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


def max_abs(X: torch.Tensor) -> torch.Tensor:
    """Per-matrix max-abs entry of ``X`` (..., m, n), shape (..., 1, 1); NaN/Inf exactly when the matrix holds one.

    The same value either way (a max is exact): on the CPU two plain reductions (``amax`` and ``amin``), no
    temporary and ~5× faster there than the max-abs norm; elsewhere that norm, one pass over ``X`` and one launch
    instead of four (torch's CUDA reduction propagates NaN, ``max_propagate_nan``).
    """
    return max_abs_by_norm(X) if X.device.type != "cpu" else max_abs_by_extremes(X)


def max_abs_by_norm(X: torch.Tensor) -> torch.Tensor:
    """``max_abs`` as the max-abs norm (one reduction)."""
    return torch.linalg.vector_norm(X, math.inf, dim=(-2, -1), keepdim=True)


def max_abs_by_extremes(X: torch.Tensor) -> torch.Tensor:
    """``max_abs`` as ``max(amax, −amin)`` (two reductions, no temporary)."""
    dims = (-2, -1)
    return torch.maximum(X.amax(dim=dims, keepdim=True), -X.amin(dim=dims, keepdim=True))


def _prescale_exponents(amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the prescale exponent ``PRESCALE_TOP - e`` (``amax = f·2^e``, f ∈ [0.5, 1)) into a part whose power of
    two is a normal number of ``dtype`` and the rest, which is 0 but for matrices of the tiniest scale (max-abs
    below 2^-126 in float32, 2^-1022 in float64) and then in [1, 23] (float32; [1, 52] float64). Never negative:
    the top binade (e = 128; 1024) needs 2^-126 (2^-1022), a normal number."""
    _, exp = torch.frexp(amax)  # exp = 0 for zero (and for inf/nan, which the non-finite policy handles)
    total = PRESCALE_TOP - exp
    emin, emax = (-1022, 1023) if dtype == torch.float64 else (-126, 127)
    first = total.clamp(min=emin, max=emax)
    return first, total - first


def pow2_prescale(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each matrix of ``X`` (..., m, n) by an exact power of two so its max-abs entry is in [2, 4).

    ``X`` must be float32 or float64. Returns the scaled tensor (a new one) and the per-matrix max-abs of
    the *input* (shape (..., 1, 1)), which is NaN/Inf exactly when the matrix holds a NaN/Inf.
    """
    amax = max_abs(X)
    # Two factors: the full one can be 2^150 (float32 subnormals) or 2^1075 (float64), beyond range. Both scale up
    # there, exactly; elsewhere the second is 1.
    first, rest = _prescale_exponents(amax, X.dtype)
    return X * exact_pow2(first, X.dtype) * exact_pow2(rest, X.dtype), amax


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
    out_dtype: torch.dtype | None = None,
    overwrite_input: bool = False,
    workspace: Workspace | None = None,
    float32_copies: bool | None = None,
) -> torch.Tensor:
    """Return ``X`` (..., m, n) divided per matrix by ``margin·‖X‖_F`` (spectral norm ≤ 1/margin, exact arithmetic).

    This is the Frobenius normalization; ``"schatten4"`` and ``"aol"`` start from its result and continue with
    :func:`gram_scale` on the Gram matrix. ``normalization`` is only validated here.

    Computed in float32 (float64 for float64 input) whatever ``X``'s dtype; the result has that work dtype, or
    ``out_dtype`` (the compute dtype of the iteration; the cast is fused into the last pass).
    Zero matrices stay exactly zero. With ``nonfinite="raise"``, a NaN/Inf anywhere raises
    :class:`NonFiniteError` naming ``shape`` (default ``X.shape``; one host sync); with ``"propagate"`` it
    flows through.

    ``overwrite_input``: ``X`` is a temporary of the caller and may be scaled in place when it is in the work
    dtype (the optimizers' stacked momentum input): no float32 copy is allocated. The norm is then summed in
    ``X``'s memory order, so a tall view and its wide contiguous twin may differ in the last bit; without it
    they are bit-identical.

    ``workspace``: the result (and the float32 copy, if one is made) are views of its buffers (roles
    ``"prescaled"``, ``"normalized"``), valid until their next use, instead of fresh tensors.

    Without ``float32_copies`` (None: on the CPU, ``polar/devices.py``), with ``overwrite_input`` and input narrower
    than float64, the same quotient is computed in two passes instead of five (:func:`normalize_by_float64_norm`);
    the result can differ from the prescaled path's in the last bit (it is rounded once, from float64).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    work = work_dtype(X.dtype)
    copies = devices.float32_copies(X.device) if float32_copies is None else float32_copies
    # The float64-factor way reads X without writing it; a float64 X keeps the copy way (``polar/devices.py``).
    if overwrite_input and not (copies or X.dtype == torch.float64):
        return normalize_by_float64_norm(
            X, margin=margin, nonfinite=nonfinite, who=who, shape=shape, out_dtype=out_dtype, workspace=workspace
        )
    amax = max_abs(X).to(work)  # the max of X's own values: exact in any dtype, and exactly representable in work
    if nonfinite == "raise":
        raise_if_nonfinite(amax, X.shape if shape is None else shape, who)
    # Two passes over the matrix (prescale, then the factor with the cast to the compute dtype fused in) instead of
    # four. The prescale writes a contiguous float32 (float64) copy whatever X's dtype and strides — the cast and, for
    # a transposed view, the transposition ride along with the multiply — so the norm is summed in one memory order
    # and a tall matrix and the transpose of its wide twin give bit-identical results. The prescale 2^first is the
    # exact one of ``pow2_prescale`` except for matrices of the tiniest scale, where the remaining 2^rest (≤ 2^23 in
    # float32, ≤ 2^52 in float64) is folded into the final factor instead. Every nonzero entry is then ≥ the
    # smallest subnormal (2^-149) times 2^first = 2^127, ≥ 2^-22 (2^-51 in float64), and its square cannot
    # underflow: the norm of the partly scaled matrix is exactly 2^-rest times the fully scaled one's, the factor
    # exactly 2^rest times its factor, and every power-of-two scale of a matrix meets the same roundings and gives
    # the same bits.
    first, rest = _prescale_exponents(amax, work)
    if overwrite_input and X.dtype == work:
        scaled = X.mul_(exact_pow2(first, work))
    else:
        scaled = torch.mul(X, exact_pow2(first, work), out=scratch(workspace, "prescaled", X.shape, work, X.device))
    up = exact_pow2(rest, work)
    norm = torch.linalg.vector_norm(scaled, dim=(-2, -1), keepdim=True) * up
    floor = norm.clamp_min(_NORM_FLOOR)
    factor = up / (floor if margin == 1.0 else floor * margin)  # ·1.0 is exact: one launch fewer, same bits
    # Rounds once to ``work``, then once to ``out_dtype`` (as ``.to()``). In place then a plain cast rather than
    # one mixed-dtype multiply: torch runs the latter through its unvectorized casting loop (2× slower, CPU).
    scaled.mul_(factor)
    if out_dtype is None or out_dtype == work:
        return (
            scaled
            if scaled.is_contiguous()
            else scratch(workspace, "normalized", X.shape, work, X.device).copy_(scaled)
        )
    return scratch(workspace, "normalized", X.shape, out_dtype, X.device).copy_(scaled)


def normalize_by_float64_norm(
    X: torch.Tensor,
    *,
    margin: float = 1.0,
    nonfinite: NonFinitePolicy = "raise",
    who: str = "orthogonalize",
    shape: torch.Size | None = None,
    out_dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """:func:`normalize` (Frobenius, per matrix) for float32/bfloat16/float16 ``X`` in two passes over it: the norm
    accumulated in float64, then one multiply in float64 rounded once into the result (``out_dtype``, default
    float32; contiguous, in the role ``"normalized"`` of ``workspace`` if given). ``X`` is not written.

    Why it needs no prescale: a float32 value's square is exact in float64 and cannot overflow or underflow there
    (≥ 2⁻²⁹⁸, ≤ 2²⁵⁶), nor can the factor 1/‖X‖ (float32 norms lie in [2⁻¹⁴⁹, 2¹⁴⁰]). The sum therefore scales
    exactly with a power-of-two scale of X, and so does every step after it: the result is exactly invariant
    under powers of two over float32's whole range, subnormals included, as the prescaled path is. Zero matrices
    stay zero; NaN/Inf give NaN (``"propagate"``) or raise (``"raise"``, one host sync).

    Why (GPUs, the optimizers' path): five passes over the input — max-abs, prescale, norm, scale, cast — become
    two, ~3× fewer bytes (30 → 10 per float32 entry) and ~12 fewer kernel launches per batch
    (``benchmarks/step_launches.py``). Not on the CPU, where torch's mixed-dtype multiply is an unvectorized loop:
    131–483 ms vs 68–129 ms for 12 × 768×3072 there (measured 2026-11-23).
    """
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    if nonfinite == "raise":
        raise_if_nonfinite(norm, X.shape if shape is None else shape, who)
    floor = norm.clamp_min(torch.finfo(torch.float64).tiny)  # zero matrices: 0 × finite factor = 0
    factor = (floor if margin == 1.0 else floor * margin).reciprocal_()
    dst = scratch(workspace, "normalized", X.shape, torch.float32 if out_dtype is None else out_dtype, X.device)
    return torch.mul(X, factor, out=dst)


def _schatten4_scale_in_place(A: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram_scale(A, "schatten4", margin, overwrite_input=True)`` with float64 arithmetic on the few per-matrix
    numbers and a single rounding of each entry of ``A``; ``scale`` is returned in float32, as there."""
    k = A.shape[-1]
    # ‖X‖_F = 1 ⇒ ‖A‖_F ≥ 1/√k (see gram_scale): the floor only ever catches the zero matrix.
    fro = torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True, dtype=torch.float64).clamp_min(0.25 / k**0.5)
    s = fro.rsqrt_() if margin == 1.0 else fro.rsqrt_().div_(margin)
    A.mul_(s * s)  # float64 product (the factor's dtype wins), rounded once into A's dtype
    return A, s.to(torch.float32).expand(*A.shape[:-1], 1)


#: Largest AOL row factor dᵢ, as a fraction of the largest value of the dtype it is applied in (see
#: :func:`aol_row_scale`).
AOL_SCALE_HEADROOM = 2.0**-6


def aol_row_scale(Af: torch.Tensor, dtype: torch.dtype, margin: float = 1.0) -> torch.Tensor:
    """AOL's row factors ``dᵢ = min((Σⱼ|Aᵢⱼ| + m·s)^{-1/2}, AOL_SCALE_HEADROOM·max) / margin`` (B, m, 1), from
    ``Af`` (B, m, m, work dtype), a copy of the Gram matrix ``A`` as stored in ``dtype`` (the compute dtype);
    ``s`` and ``max`` are ``dtype``'s smallest subnormal (2⁻²⁴ in float16) and largest value.

    Any ``dᵢ ≤ (Σⱼ|Aᵢⱼ|)^{-1/2}`` passes the Schur test (module docstring), so both changes are safe; they matter in
    float16, whose range is narrow, and change no bit in bfloat16/float32/float64 unless a row sum is below
    ``2²⁴·m·s`` (2⁻¹⁰⁹·m in bfloat16).

    Why ``m·s``: a Gram entry below ``dtype``'s normal range is rounded by up to ``s/2`` in absolute terms, not by
    a fraction of itself — in float16 every entry below 2⁻¹⁴, e.g. those of a row whose norm is under ~10⁻² of
    ``‖X‖_F``. The row sums of the exact Gram matrix of the stored ``X`` are then at most
    ``(1 + ε)·Σⱼ|Aᵢⱼ| + m·s/2``, and with ``m·s`` added the bound holds for it up to the ``(1 + ε)`` the schedules
    are validated for. Without it, a row whose only Gram entry (16.47·2⁻²⁴) is stored as 16·2⁻²⁴ had σmax 1.015.

    Why the cap: ``dᵢ`` is folded into the first step's m×m factor ``h(A_s)·D`` (``newton_schulz``), stored in
    ``dtype``: its entries reach ``max|h|·dᵢ``, and in the Gram form ``dᵢ`` times the product of the steps before
    the first restart. A zero row used to get ``dᵢ = 2⁶³`` (the float32 floor); in float16 its ``a·dᵢ`` was
    ``inf``, ``inf·0 = NaN`` in the product, and the NaN spread to every entry. ``m·s`` alone bounds ``dᵢ`` by
    ``2¹²/√m`` in float16; the cap (1023.5 there) keeps products of gains up to 64 finite: the shipped
    schedules' first ``a`` is ≤ 8.4, their largest float16 product before a Gram restart 21.9 (``aol``:
    4.6051·4.7505). It binds only on rows whose Gram entries sum to under 16 float16 subnormals (4 bits at most).

    A zero row's finite factor multiplies zeros: its output row is exactly zero, and the other rows' factors and
    Gram entries are those of the matrix without it.
    """
    finfo = torch.finfo(dtype)
    rowsum = Af.abs().sum(dim=-1, keepdim=True).add_(Af.shape[-1] * finfo.tiny * finfo.eps)
    return rowsum.rsqrt_().clamp_max_(finfo.max * AOL_SCALE_HEADROOM) / margin


def gram_scale(
    A: torch.Tensor,
    normalization: Normalization,
    margin: float = 1.0,
    *,
    overwrite_input: bool = False,
    workspace: Workspace | None = None,
    float32_copies: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale for a Gram-based normalization, from ``A = XXᵀ`` (B, m, m) of a Frobenius-normalized ``X``.

    Returns ``(A_s, scale)``: ``scale`` (B, m, 1), in float32 (float64 for float64 ``A``), holds the factor
    for each row of ``X`` (the same for every row under ``"schatten4"``), so that ``X_s = scale·X`` has
    ``σmax ≤ 1/margin``; ``A_s = X_s X_sᵀ`` (in ``A``'s dtype) is its Gram matrix, ready for the first
    Newton–Schulz step. Zero matrices give zeros. ``overwrite_input``: ``A_s`` is written into ``A`` (the
    caller's temporary); ``workspace``: the float32 copy of ``A`` is a view of its role ``"gram_work"``.

    Without ``float32_copies`` (None: on the CPU), for ``"schatten4"`` into ``A`` (narrower than float64): the norm
    accumulated in float64 from ``A`` itself and ``A·s²`` in one float64 multiply rounded once into ``A`` — no
    float32 copy, two passes instead of five (6 bytes per bfloat16 entry instead of 32); the result can differ
    from the float32 path's in the last bit.
    """
    copies = devices.float32_copies(A.device) if float32_copies is None else float32_copies
    if normalization == "schatten4" and overwrite_input and not copies and A.dtype != torch.float64:
        return _schatten4_scale_in_place(A, margin)
    Af = scratch(workspace, "gram_work", A.shape, work_dtype(A.dtype), A.device).copy_(A)
    if normalization == "schatten4":
        k = A.shape[-1]
        # ‖X‖_F = 1 ⇒ ‖A‖_F² = Σσ⁴ ≥ (Σσ²)²/k = 1/k: the floor only ever catches the zero matrix.
        fro = torch.linalg.vector_norm(Af, dim=(-2, -1), keepdim=True).clamp_min(0.25 / k**0.5)
        scale = (fro.rsqrt() / margin).expand(*A.shape[:-1], 1)
    elif normalization == "aol":
        scale = aol_row_scale(Af, A.dtype, margin)
    else:
        raise ValueError(f"gram_scale: {normalization!r} is not a Gram-based normalization")
    Af.mul_(scale).mul_(scale.mT)  # (Af·scale)·scaleᵀ
    A_s = A.copy_(Af) if overwrite_input else Af.to(A.dtype, copy=True)
    return A_s, scale
