"""The Newton–Schulz iteration on a batch of normalized wide matrices, in two equivalent forms.

**Standard.** One quintic step ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X`` is three batched products:
``A = XXᵀ``, ``B = bA + cA²`` (one ``baddbmm``), ``X ← aX + BX`` (one ``baddbmm``). A cubic step (c = 0)
skips ``A²``: ``X ← aX + bAX``, two products. Working on the wide orientation (m ≤ n) keeps the Gram
matrix ``A`` at m×m, the smaller side. Per quintic step: 4m²n + 2m³ multiply-adds.

**Gram** (Polar Express, arXiv 2505.16932, Appendix F; Dao-AILab/gram-newton-schulz). Every step multiplies ``X``
on the left by a polynomial ``Pₖ = aI + bRₖ + cRₖ²`` of its own Gram matrix ``Rₖ = XₖXₖᵀ``, so
``Xₖ = Qₖ X₀`` with ``Qₖ = Pₖ₋₁···P₀`` and ``Rₖ₊₁ = PₖRₖPₖ`` (all are polynomials in ``R₀``, hence symmetric and
commuting). The iteration can therefore run entirely on m×m matrices — ``R²``, ``QP``, ``RP``, ``PRP``: 8m³
per step — touching the long side n only to form ``R₀`` and to apply ``Q`` once at the end (4m²n in all).
For 5 steps that is 4m²n + ~34m³ instead of 20m²n + 10m³: fewer operations once n ≳ 1.5m, about half at n = 4m.

Rounding: the standard form is self-correcting (each step re-derives ``A`` from the current ``X``, positive
semidefinite up to one rounding); the Gram form is not — ``R`` is carried from step to step, and a rounding-induced
negative eigenvalue of it grows by ~a² per step (:func:`gram_restarts`). The Gram form therefore *restarts* —
forms ``X = QX₀`` and ``R = XXᵀ`` afresh, resets ``Q = I`` — before such an eigenvalue can matter; the restart
points follow from the coefficients and the dtype's rounding alone (Dao-AILab/gram-newton-schulz restarts
before step 2 by default, with a host-side divergence check we do not need). In float32 the shipped 5-step
schedules need no restart; in bfloat16 every step would restart, so ``iteration="auto"`` picks the form with
fewer operations (:func:`iteration_cost`) and in bfloat16 that is always the standard form. The stress test
(``orthoptim.stress``) runs both forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import devices, kernels
from .normalize import work_dtype
from .schedules import Triple
from .workspace import Workspace

#: Unit roundoff of a product's result per compute dtype (the rounding of the stored m×m matrices).
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
#: Largest spurious negative eigenvalue of ``R`` (σmax ≤ 1, so ``‖R‖ ≤ 1``) a step may see before a restart.
GRAM_NEGATIVE_LIMIT = 2.0**-5


def gram_restarts(coefficients: tuple[Triple, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """Steps before which the Gram form must restart, from the coefficients and the rounding of ``dtype``.

    Why restarts: ``R = XXᵀ`` is positive semidefinite, but its rounding leaves eigenvalues ``-δ`` (δ up to the
    unit roundoff ε) where the input has none or tiny singular values — rank-deficient updates are common. The
    Gram update ``R ← P R P`` multiplies such an eigenvalue by ``p(-δ)² ≥ a²`` each step (``p(r) = a + br + cr²``
    grows for r < 0 since b < 0), and once it reaches O(0.1) the polynomials evaluated there explode, taking
    ``Q`` with them (the stress test finds this: gains ~1e30 for ``deepseekv4``'s 10 steps in float32, ~1e10 for
    the default schedule in bfloat16 with a restart every 2 steps). The standard form cannot drift this way: it
    recomputes ``R`` from ``X`` each step, so ``R`` is PSD up to one rounding.

    Rule: along a segment that starts from a fresh ``R`` (spurious eigenvalue -ε), track the worst case
    ``δ ← δ·p(-δ)²``; restart before the step that would see ``δ > GRAM_NEGATIVE_LIMIT``. Data-independent (no
    host sync). In float32 the shipped 5-step schedules need no restart, 10-step ones one or two; in bfloat16
    the first step's ``a ≈ 8`` already takes ε = 2⁻⁸ to 0.28, so every step restarts (= the standard form).
    """
    eps = UNIT_ROUNDOFF.get(dtype, 2.0**-8)
    restarts: list[int] = []
    delta = eps
    for k, (a, b, c) in enumerate(coefficients):
        if k > 0 and delta > GRAM_NEGATIVE_LIMIT:
            restarts.append(k)
            delta = eps
        delta *= (a - b * delta + c * delta * delta) ** 2
    return tuple(restarts)


def iteration_cost(m: int, n: int, coefficients: Sequence[Triple], restarts: Sequence[int] | None) -> int:
    """Multiply-adds of one m×n matrix (m ≤ n) through the standard form (``restarts=None``) or the Gram form."""
    if restarts is None:
        return sum(2 * m * m * n + (m**3 if c != 0.0 else 0) for (_, _, c) in coefficients)
    restart_at, last = set(restarts), len(coefficients) - 1
    cost = 2 * m * m * n  # R₀ and the final Q·X
    fresh = True
    for k, (_, _, c) in enumerate(coefficients):
        if k in restart_at:
            cost += 2 * m * m * n
            fresh = True
        cost += m**3 if c != 0.0 else 0  # R²
        cost += 0 if fresh else m**3  # P·Q
        cost += 2 * m**3 if k < last and (k + 1) not in restart_at else 0  # P·R·P
        fresh = False
    return cost


def _plus_identity(
    Z: torch.Tensor,
    a: float,
    row_scale: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    float32_copies: bool | None = None,
) -> torch.Tensor:
    """``(aI + Z)·diag(row_scale)`` in ``Z``'s dtype, with ``aI`` and the scale applied at float32 (float64)
    precision so the factor is rounded once; into ``out`` if given (may be ``Z`` itself), the float32 copy in
    ``work``'s role ``"factor"`` if given.

    Without ``float32_copies`` (None: on the CPU, ``polar/devices.py``) the same values without the float32 copy:
    the diagonal (m entries per matrix) is computed first at float32 precision, then the whole factor scaled in
    one mixed-precision pass into ``out`` (else a fresh tensor: ``Z`` is read again by the Gram form) and the
    diagonal written back — 4 bytes per bfloat16 entry instead of ~21, every entry still rounded once."""
    copies = devices.float32_copies(Z.device) if float32_copies is None else float32_copies
    if Z.dtype != torch.float64 and not copies:  # the float64-factor way (polar/devices.py)
        target = torch.empty_like(Z) if out is None else out
        # A float32 copy of the diagonal (``copy=True``: never a view of Z), the scalar added in float32 (an in-place
        # add on a 16-bit tensor may round the scalar to that dtype first).
        diag = Z.diagonal(dim1=-2, dim2=-1).to(torch.float32, copy=True).add_(a)
        if row_scale is None:
            target.copy_(Z)
        else:
            diag.mul_(row_scale.squeeze(-1))
            torch.mul(Z, row_scale.mT, out=target)  # elementwise: Z is read before target (maybe Z) is written
        target.diagonal(dim1=-2, dim2=-1).copy_(diag)
        return target
    dtype = row_scale.dtype if row_scale is not None else work_dtype(Z.dtype)
    P = Z.to(dtype, copy=True) if work is None else work.like("factor", Z, dtype).copy_(Z)
    P.diagonal(dim1=-2, dim2=-1).add_(a)
    if row_scale is not None:
        P.mul_(row_scale.mT)
    return P.to(Z.dtype) if out is None else out.copy_(P)


def _kernels_for(X: torch.Tensor) -> bool:
    """Symmetric Triton kernels for 16-bit CUDA tensors (``kernels.use_triton``, asked only for those). float32
    stays on cuBLAS: the kernels run float32 without TF32 (no tensor cores), where half the FLOPs need not beat
    cuBLAS — unmeasured, so not taken."""
    return X.is_cuda and X.dtype in (torch.bfloat16, torch.float16) and kernels.use_triton(X)


def _mm(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A·B`` for one matrix (2-D) or a batch (3-D), into ``out`` if given."""
    return torch.mm(A, B, out=out) if A.dim() == 2 else torch.bmm(A, B, out=out)


def _addmm(
    C: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    beta: float = 1.0,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``beta·C + alpha·A·B`` for one matrix (2-D) or a batch (3-D), into ``out`` if given."""
    if A.dim() == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha, out=out)
    return torch.baddbmm(C, A, B, beta=beta, alpha=alpha, out=out)


#: On the CPU a symmetric m×m product with m ≥ this is computed as ``SYMMETRIC_BLOCKS`` row blocks of its lower
#: triangle, mirrored: (k+1)/2k of the multiply-adds for k blocks. Measured 2026-11-23 (2-core AMD EPYC, AVX-512
#: BF16, torch 2.13, ``benchmarks/symmetric_cpu.py``, two runs, full product → 4 blocks): XXᵀ for 768×3072 0.73–0.88×
#: the time in bfloat16, 0.70–0.82× in float32; A² for 768×768 0.82–1.02× (bfloat16), 0.74–0.85× (float32); the
#: same values as the full product up to its own rounding (identical bits in those runs). 6 or 8 blocks were
#: faster in one run and slower in the other. Whole orthogonalizations of 4 matrices, bfloat16, 5 steps, CPU time,
#: no blocks → blocks: 256×512 17 → 26 ms, 384×1536 72 → 80, 512×2048 151 → 145, 768×3072 581 → 535: the smaller
#: calls cost more than they save below 512 rows.
SYMMETRIC_MIN_ROWS = 512
SYMMETRIC_BLOCKS = 4


def _blocked_symmetric(X: torch.Tensor) -> bool:
    """Whether a symmetric product with ``X``'s rows takes the CPU row blocks. Not while torch.compile traces: the
    blocks write into strided views (``out=``), which Dynamo refuses; the compiler gets the full product."""
    return (
        X.dim() in (2, 3)
        and X.device.type == "cpu"
        and X.shape[-2] >= SYMMETRIC_MIN_ROWS
        and not torch.compiler.is_compiling()
    )


def _symmetric_addmm(
    C: torch.Tensor | None,
    L: torch.Tensor,
    R: torch.Tensor,
    beta: float = 1.0,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``beta·C + alpha·L·R`` (m×m) for a product known to be symmetric: row blocks of the lower triangle, then
    the blocks above the diagonal blocks mirrored from it (``SYMMETRIC_BLOCKS``). Within a diagonal block BLAS may
    round (i, j) and (j, i) differently, as in a full product. A batch (3-D) goes matrix by matrix."""
    m = L.shape[-2]
    if out is None:
        out = torch.empty((*L.shape[:-1], m), dtype=L.dtype, device=L.device)
    if L.dim() == 3:
        for i in range(L.shape[0]):
            _symmetric_addmm(None if C is None else C[i], L[i], R[i], beta, alpha, out=out[i])
        return out
    rows = -(-m // SYMMETRIC_BLOCKS)
    # Row blocks by one ``split`` each (fewer Python-level ops than slicing every block: this runs thousands of
    # times per optimizer step).
    out_rows, l_rows = out.split(rows), L.split(rows)
    c_rows = (None,) * len(l_rows) if C is None else C.split(rows)
    for o, left, c, start in zip(out_rows, l_rows, c_rows, range(0, m, rows), strict=True):
        end = start + o.shape[0]
        if c is None:
            torch.mm(left, R[:, :end], out=o[:, :end])
        else:
            torch.addmm(c[:, :end], left, R[:, :end], beta=beta, alpha=alpha, out=o[:, :end])
    for o, start in zip(out_rows[:-1], range(0, m, rows), strict=False):
        end = start + rows
        o[:, end:].copy_(out[end:, start:end].mT)
    return out


def gram_product(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X Xᵀ`` for one matrix or a batch: the symmetric Triton kernel (lower tiles, mirrored) where
    ``_kernels_for(X)``, lower row blocks on the CPU (``SYMMETRIC_MIN_ROWS``), else ``mm``/``bmm``; into ``out``
    if given (not on the kernel path)."""
    if _kernels_for(X):
        return kernels.sym_gram(X)
    if _blocked_symmetric(X):
        return _symmetric_addmm(None, X, X.mT, out=out)
    return _mm(X, X.mT, out=out)


def _poly_part(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``bA + cA²`` for symmetric ``A`` (one product, or none for a cubic step), into ``out`` if given (not on the
    kernel path). The kernel reads only A's lower triangle; our ``A`` is symmetric up to the last bit of rounding
    (``gram_scale``, ``P·R·P``)."""
    if c == 0.0:
        return torch.mul(A, b, out=out)
    if _kernels_for(A):
        return kernels.sym_poly(A, b, c)
    if _blocked_symmetric(A):
        return _symmetric_addmm(A, A, A, beta=b, alpha=c, out=out)
    return _addmm(A, A, A, beta=b, alpha=c, out=out)


#: On the CPU, matrices with at least this many rows (the short side) and entries are iterated one by one; smaller
#: ones as one batch, as on accelerators. Measured 2026-11-23 (2-core CPU, bfloat16, defaults, batches of 8, time
#: matrix by matrix ÷ batched, two runs): 128×512 1.44/1.46, 128×2048 1.28, 128×4096 1.02, 256×256 1.40,
#: 384×384 1.10/1.15, 448×448 0.97, 256×1024 1.12/0.96, 512×512 0.93/0.97, 384×1536 0.79/0.93, 256×2048 0.83,
#: 512×2048 0.92, 4 × 768×768 1.01 (an earlier measurement: 12 × 768×{768, 2304, 3072} 10–17% faster one by one).
#: The old rule (≥ 65536 entries) sent the demo's 128×512 matrices one by one: its optimizer step was 1.2× slower.
PER_MATRIX_MIN_ROWS = 256
PER_MATRIX_MIN_ENTRIES = 2**18


def iterates_matrix_by_matrix(shape: Sequence[int], device: torch.device) -> bool:
    """Whether a batch of matrices of ``shape`` (either orientation) on ``device`` is iterated one matrix at a
    time (the CPU, large matrices: ``PER_MATRIX_MIN_ROWS``, ``PER_MATRIX_MIN_ENTRIES``) rather than batched."""
    rows, cols = shape[-2], shape[-1]
    return device.type == "cpu" and min(rows, cols) >= PER_MATRIX_MIN_ROWS and rows * cols >= PER_MATRIX_MIN_ENTRIES


def _per_matrix_on_cpu(
    iterate: Callable[..., torch.Tensor],
    X: torch.Tensor,
    first_gram: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    out: torch.Tensor | None,
    work: Workspace | None,
    **kw: Any,
) -> torch.Tensor:
    """Run ``iterate`` matrix by matrix on the CPU, batched elsewhere.

    Why: on the CPU a loop of ``mm`` beats one ``bmm`` over the same matrices (measured 2026-11-23, 2 cores,
    bfloat16, 12 × 768×{768, 2304, 3072}, 5 steps: 10–17% faster; float32 equal), the Python loop costs
    microseconds against milliseconds per product, and each matrix then meets exactly the same kernels whatever
    batch it arrives in. Small matrices stay batched (:func:`iterates_matrix_by_matrix`): there the per-call
    overhead dominates. On accelerators one batched launch is what matters.
    """
    if not iterates_matrix_by_matrix(X.shape, X.device):
        return iterate(X, first_gram=first_gram, row_scale=row_scale, out=out, **kw)
    result = torch.empty_like(X) if out is None else out
    work = Workspace() if work is None else work
    for i in range(X.shape[0]):
        first = None if first_gram is None else first_gram[i]
        scale = None if row_scale is None else row_scale[i]
        # The last product writes into ``result`` in place; the others into the shared workspace.
        iterate(X[i], first_gram=first, row_scale=scale, out=result[i], work=work, **kw)
    return result


def newton_schulz(
    X: torch.Tensor,
    coefficients: Sequence[Triple],
    *,
    first_gram: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    float32_copies: bool | None = None,
) -> torch.Tensor:
    """Apply the steps ``coefficients`` to ``X`` of shape (B, m, n), m ≤ n, already normalized (standard form).

    With ``first_gram``/``row_scale`` (from ``normalize.gram_scale``) the iteration runs on ``X_s = row_scale·X``
    without ever forming it: the first step is ``X₁ = (aI + bA_s + cA_s²)·diag(row_scale)·X`` — the m×m factor
    absorbs the scale, so ``X`` is not rounded a second time — and ``A_s`` replaces the first Gram product.

    Runs in ``X``'s dtype (the compute dtype); returns a new tensor of the same shape and dtype, or ``out``
    (contiguous, ``X``'s shape and dtype, not overlapping ``X``) with the result written into it. ``work``: a
    :class:`Workspace` for the CPU loop's temporaries (roles ``"x0"``, ``"x1"``, ``"gram"``, ``"poly"``,
    ``"factor"``), kept by the caller across calls; a fresh one per call if None. ``float32_copies``: the first
    step's factor through a float32 copy, or (False) a float32 diagonal and one mixed pass (``polar/devices.py``;
    None: by ``X``'s device).
    """
    if first_gram is not None and row_scale is None:
        raise ValueError("newton_schulz: first_gram needs its row_scale")
    _check_out(out, X, "newton_schulz")
    return _per_matrix_on_cpu(
        _standard, X, first_gram, row_scale, out, work, coefficients=tuple(coefficients), copies=float32_copies
    )


def _check_out(out: torch.Tensor | None, X: torch.Tensor, who: str) -> None:
    if out is not None and (out.shape != X.shape or out.dtype != X.dtype or not out.is_contiguous()):
        raise ValueError(
            f"{who}: out must be a contiguous {X.dtype} tensor of shape {tuple(X.shape)}, got "
            f"{out.dtype} of shape {tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )


def _standard(
    X: torch.Tensor,
    *,
    coefficients: tuple[Triple, ...],
    first_gram: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    copies: bool | None = None,
) -> torch.Tensor:
    """The standard form on one matrix (2-D) or a batch (3-D); the last product is written into ``out`` if given,
    the intermediate ones into ``work`` (alternating between two m×n buffers) if given."""
    last = len(coefficients) - 1
    m = X.shape[-2]
    gram = poly = None
    if work is not None:
        gram, poly = work.get("gram", (m, m), X.dtype, X.device), work.get("poly", (m, m), X.dtype, X.device)
    for k, (a, b, c) in enumerate(coefficients):
        target = out if k == last else None
        if target is None and work is not None:
            target = work.like(f"x{k % 2}", X)  # never X itself: step k reads buffer k−1
        if k == 0 and first_gram is not None:
            Z = _poly_part(first_gram, b, c, out=poly)
            X = _mm(_plus_identity(Z, a, row_scale, out=poly, work=work, float32_copies=copies), X, out=target)
        elif c == 0.0:
            X = _addmm(X, gram_product(X, out=gram), X, beta=a, alpha=b, out=target)
        else:
            X = _addmm(X, _poly_part(gram_product(X, out=gram), b, c, out=poly), X, beta=a, out=target)
    return X


def gram_newton_schulz(
    X: torch.Tensor,
    coefficients: Sequence[Triple],
    *,
    first_gram: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    restarts: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    float32_copies: bool | None = None,
) -> torch.Tensor:
    """The same iteration as :func:`newton_schulz`, in the Gram form (module docstring); same arguments.

    ``restarts``: step indices before which ``X`` and its Gram matrix are formed afresh (default:
    :func:`gram_restarts` for ``X``'s dtype). Equal to the standard form in exact arithmetic.
    """
    if first_gram is not None and row_scale is None:
        raise ValueError("gram_newton_schulz: first_gram needs its row_scale")
    _check_out(out, X, "gram_newton_schulz")
    coefficients = tuple(coefficients)
    restart_at = frozenset(gram_restarts(coefficients, X.dtype) if restarts is None else restarts)
    return _per_matrix_on_cpu(
        _gram_form,
        X,
        first_gram,
        row_scale,
        out,
        work,
        coefficients=coefficients,
        restart_at=restart_at,
        copies=float32_copies,
    )


def _gram_form(
    X: torch.Tensor,
    *,
    coefficients: tuple[Triple, ...],
    first_gram: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    restart_at: frozenset[int],
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    copies: bool | None = None,
) -> torch.Tensor:
    """The Gram form on one matrix (2-D) or a batch (3-D); the last product is written into ``out`` if given, the
    m×m chain (roles ``"gram"``, ``"poly"``, ``"rp"``, ``"q0"``/``"q1"``, ``"factor"``) and ``X`` formed at a restart
    (``"x0"``/``"x1"``) into ``work`` if given: the CPU loop runs this for every matrix of every step, and fresh
    m×m and m×n temporaries there are page-faulted in again each time (``workspace``)."""
    square = (*X.shape[:-1], X.shape[-2])

    def buffer(role: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return None if work is None else work.get(role, shape, X.dtype, X.device)

    if first_gram is None:
        R = gram_product(X, out=buffer("gram", square))
    elif first_gram.dtype == X.dtype or work is None:
        R = first_gram.to(X.dtype)  # never written into: the caller's
    else:
        R = work.get("gram", square, X.dtype, X.device).copy_(first_gram)
    scale = row_scale
    Q: torch.Tensor | None = None  # None stands for the identity (times diag(scale) while that is pending)
    q_next = x_next = 0  # which of two buffers the next Q (X) goes to: a product never writes into its own input
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i in restart_at and Q is not None:
            X = _mm(Q, X, out=buffer(f"x{x_next}", tuple(X.shape)))
            R = gram_product(X, out=buffer("gram", square))  # the old R is spent: Q has absorbed it
            Q, x_next = None, 1 - x_next
        Z = _poly_part(R, b, c, out=buffer("poly", square))  # P = aI + Z
        target = buffer(f"q{q_next}", square)
        if Q is None:
            Q, scale = _plus_identity(Z, a, scale, out=target, work=work, float32_copies=copies), None
        else:
            # P·Q = aQ + ZQ, multiplied on the left: Q may hold diag(row_scale), which does not commute with P.
            Q = _addmm(Q, Z, Q, beta=a, out=target)
        q_next = 1 - q_next
        if i < last and (i + 1) not in restart_at:
            # R·P and P·R·P are symmetric (polynomials in R₀ commute): half-products where that pays.
            sym = _symmetric_addmm if _blocked_symmetric(R) else _addmm
            RP = sym(R, R, Z, beta=a, out=buffer("rp", square))  # R·P
            R = sym(RP, Z, RP, beta=a, out=buffer("gram", square))  # P·R·P (reads RP and Z only)
    assert Q is not None  # at least one step always runs
    return _mm(Q, X, out=out)
