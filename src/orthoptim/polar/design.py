"""Coefficient designer: per-step minimax odd polynomials composed greedily (Polar Express style).

Polar Express (Amsel, Persson, Musco, Gower; arXiv 2505.16932, Algorithm 1) picks each Newton–Schulz step
``p(x) = a·x + b·x³ + c·x⁵`` as the odd polynomial of the given degree that minimizes ``max |1 − p(x)|`` on
the interval ``[l, u]`` the singular values are known to lie in, then continues on the image of that
interval. The paper proves the greedy choice optimal for the composition. At the optimum ``1 − p``
equioscillates: ``p(l) = 1 − E`` is the minimum and ``2 − p(l) = 1 + E`` the maximum over ``[l, u]``, so the
next interval is ``[p(l), 2 − p(l)]``.

The two practical refinements of the reference implementation (NoahAmsel/PolarExpress ``polar_express.py``
and ``polar_express/_core.py``, ``optimal_composition(l, num_iters, degree, safety_factor_eps, cushion)``;
modded-nanogpt's 5-step list is that function's output for ``l=1e-3, safety_factor_eps=0.02, cushion=0.02``)
are reproduced with the same semantics:

* **cushion** — the step is designed on ``[max(l, cushion·u), u]`` instead of ``[l, u]`` (a polynomial
  optimized down to a tiny ``l`` has a huge slope and little room for rounding), then rescaled so that its
  min + max over the *true* interval ``[l, u]`` is 2, i.e. it is centred on 1 again. For a quintic that is the
  reference's ``p(l) + p(u) = 2``; for a cubic the max is interior (``p(u)`` is a minimum), see the loop.
* **safety** — every step but the last is replaced by ``p(x / (1 + safety))``, i.e. ``(a, b, c)`` is divided by
  ``(s, s³, s⁵)``, ``s = 1 + safety``; the next interval is computed from the *scaled* step,
  ``[p_s(l), 2 − p_s(l)]`` (which encloses its true image). The reference divides the input by ``s·‖X‖`` too
  (``X.norm() * 1.01`` with ``safety_factor_eps=1e-2``; modded-nanogpt ``1.02`` with ``0.02``), so the returned
  schedule carries ``margin = 1 + safety``.

The paper's printed Algorithm 1 applies the safety factor *after* the loop instead (the intervals are those of
the unscaled steps); for safety 0 the two agree, and the raw 8-step list of REFERENCES.md is this module's
output with the paper's cushion :data:`PAPER_CUSHION`.

The per-step minimax problem is solved by the Remez exchange in a basis adapted to the interval (see
:func:`optimal_odd_polynomial`), which stays accurate to float64 rounding even when the interval has shrunk
to a few ulps around 1, where the monomial basis ``x, x³, x⁵`` is nearly collinear.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

from .schedules import Schedule, Triple

__all__ = ["PAPER_CUSHION", "design_schedule", "optimal_odd_polynomial"]

#: The cushion of the Polar Express paper's Algorithm 1 (arXiv 2505.16932; default of ``optimal_composition``
#: there). The published raw 8-step list for ℓ = 1e-3 is the greedy composition with this cushion.
PAPER_CUSHION = 0.02407327424182761

_DEGREES = (3, 5)
_MAX_EXCHANGES = 100


@functools.cache
def _taylor_maps(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact linear maps between an odd polynomial's coefficients and its Taylor coefficients at ``x = m``.

    Write ``p(m(1 + t)) = Σ_j g_j (1 + t)^(2j+1)`` with ``g_j = coef_j · m^(2j+1)`` and expand it as
    ``Σ_i d_i t^i`` (``i = 0..degree``). The first ``k + 1`` Taylor coefficients (``k = (degree − 1)/2``)
    determine ``g`` (the map is invertible; its determinant is 2 for cubics, 8 for quintics). Returns
    ``R`` ((degree+1)×(k+1)), with ``d = R @ d[:k+1]`` and ``R[:k+1] = I``, and ``G`` ((k+1)×(k+1)) with
    ``g = G @ d[:k+1]``. Built in exact rationals, so both are correctly rounded.
    """
    k = (degree - 1) // 2
    # T[i][j] = binom(2j+1, i): coefficient of t^i in (1 + t)^(2j+1).
    T = [[Fraction(math.comb(2 * j + 1, i)) for j in range(k + 1)] for i in range(degree + 1)]
    G = _inverse([row[:] for row in T[: k + 1]])
    R = [[sum((T[i][l] * G[l][j] for l in range(k + 1)), Fraction(0)) for j in range(k + 1)] for i in range(degree + 1)]
    r, g = np.array(R, dtype=np.float64), np.array(G, dtype=np.float64)
    r.flags.writeable = g.flags.writeable = False  # cached and shared: keep them immutable
    return r, g


def _inverse(a: list[list[Fraction]]) -> list[list[Fraction]]:
    """Inverse of a small nonsingular rational matrix by Gauss–Jordan elimination (exact)."""
    n = len(a)
    aug = [row + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        inv = 1 / aug[col][col]
        aug[col] = [v * inv for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [v - f * p for v, p in zip(aug[r], aug[col], strict=True)]
    return [row[n:] for row in aug]


def optimal_odd_polynomial(lower: float, upper: float, degree: int = 5) -> tuple[Triple, float]:
    """The odd polynomial of ``degree`` (3 or 5) that minimizes ``max_{x ∈ [lower, upper]} |1 − p(x)|``.

    Returns ``((a, b, c), E)`` with ``p(x) = a·x + b·x³ + c·x⁵`` (``c = 0`` for degree 3) and the minimax
    error ``E``: ``1 − p`` equioscillates with amplitude ``E`` at ``lower``, at the ``k = (degree − 1)/2``
    interior extrema of ``p`` and at ``upper`` (``x, x³, x⁵`` is a Chebyshev system on ``(0, ∞)``, so that
    alternation characterizes the unique optimum).

    Remez exchange in the variable ``τ ∈ [−1, 1]``, ``x = m(1 + wτ)`` (``m`` the midpoint, ``w`` the relative
    half-width). The unknowns are the scaled Taylor coefficients ``D_i = (d_i − δ_i0)·w^i`` of ``p`` at ``m``
    (``i ≤ k``): ``p − 1 = Σ D_i τ^i + O(w^(k+1))``, so the linear system is well conditioned for every width
    and ``(a, b, c)`` come out with float64 accuracy even as ``w → 0``, where the solution tends to the
    classical Padé step ``p(x/m)`` (Taylor coefficients ``1, 0, 0`` at ``m``). The monomial form used by the
    reference code loses ``~1/w²`` of accuracy there; it switches to Padé at ``l/u ≥ 1 − 5e-6``.
    """
    if degree not in _DEGREES:
        raise ValueError(f"degree must be 3 or 5, got {degree!r}")
    lower, upper = float(lower), float(upper)
    if not (math.isfinite(upper) and 0.0 < lower <= upper):
        raise ValueError(f"need 0 < lower ≤ upper < inf, got lower={lower!r}, upper={upper!r}")
    k = (degree - 1) // 2
    R, G = _taylor_maps(degree)
    m = 0.5 * (lower + upper)
    w = (upper - lower) / (upper + lower)
    D = np.zeros(k + 1)
    E = 0.0
    if w > 0.0:
        i = np.arange(degree + 1)[:, None]
        j = np.arange(k + 1)[None, :]
        # τ-monomial coefficients of p − 1 are base + Rw @ D; R vanishes where i < j, so w^(i−j) never blows up.
        Rw = np.where(R != 0.0, R * w ** np.maximum(i - j, 0), 0.0)
        base = R[:, 0] * w ** np.arange(degree + 1)
        base[0] = 0.0
        signs = (-1.0) ** np.arange(k + 2)
        # Start from the extrema of the Chebyshev polynomial T_(k+1): exact in the limit w → 0, where the
        # error is a multiple of τ^(k+1) minus its best lower-degree approximation (the reference's q, r
        # = (3l+u)/4, (l+3u)/4 is the same start for quintics).
        taus = -np.cos(np.pi * np.arange(k + 2) / (k + 1))
        for _ in range(_MAX_EXCHANGES):
            V = taus[:, None] ** np.arange(degree + 1)[None, :]
            # Error 1 − p(τ_r) = (−1)^r E at the k + 2 reference points.
            sol = np.linalg.solve(np.column_stack([V @ Rw, signs]), -(V @ base))
            D, E = sol[: k + 1], float(sol[k + 1])
            coef = base + Rw @ D
            new = np.concatenate([[-1.0], _interior_extrema(coef, k), [1.0]])
            moved = float(np.max(np.abs(new - taus)))
            taus = new
            # The levelled error is stationary at the true extrema, so points off by δ perturb the step by
            # O(δ²): 1e-13 is far below float64 resolution of (a, b, c) and cannot stall on rounding noise.
            if moved <= 1e-13:
                break
        else:
            raise RuntimeError(f"Remez exchange did not converge on [{lower!r}, {upper!r}] (degree {degree})")
    d = D / w ** np.arange(k + 1) if w > 0.0 else D
    d[0] += 1.0
    g = G @ d
    with np.errstate(all="ignore"):
        scaled = g / np.float64(m) ** np.arange(1, degree + 1, 2)
    if not (np.all(np.isfinite(scaled)) and np.all((scaled != 0.0) == (g != 0.0))):
        raise ValueError(f"[{lower!r}, {upper!r}] is out of float64 range for degree-{degree} coefficients")
    coeffs = [float(v) for v in scaled] + [0.0] * (2 - k)
    return (coeffs[0], coeffs[1], coeffs[2]), abs(E)


def _interior_extrema(coef: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` critical points in ``(−1, 1)`` of the polynomial with τ-monomial coefficients ``coef``."""
    deriv = np.polynomial.polynomial.polyder(coef)
    roots = np.polynomial.polynomial.polyroots(deriv)
    real = np.sort(roots[np.abs(roots.imag) <= 1e-9].real)
    inside = real[(real > -1.0) & (real < 1.0)]
    if inside.size != k:
        # An odd polynomial has at most k positive critical points, and a levelled error on k + 2 alternating
        # points has at least k interior extrema; anything else means the iteration left the valid regime.
        raise RuntimeError(f"Remez exchange found {inside.size} interior extrema, expected {k}")
    # Two Newton steps polish the companion-matrix roots to full precision (they are simple roots).
    second = np.polynomial.polynomial.polyder(deriv)
    for _ in range(2):
        inside = inside - np.polynomial.polynomial.polyval(inside, deriv) / np.polynomial.polynomial.polyval(
            inside, second
        )
    return np.clip(inside, -1.0, 1.0)


def _evaluate(t: Triple, x: float) -> float:
    """``a·x + b·x³ + c·x⁵`` in float64 (Horner in x²)."""
    a, b, c = t
    x2 = x * x
    return x * (a + x2 * (b + x2 * c))


def design_schedule(
    steps: int,
    lower: float = 1e-3,
    *,
    degree: int = 5,
    upper: float = 1.0,
    safety: float = 0.0,
    cushion: float = 0.0,
    name: str = "designed",
) -> Schedule:
    """Design a ``steps``-step schedule of optimal odd polynomials for singular values in ``[lower, upper]``.

    Greedy minimax composition (arXiv 2505.16932, Alg. 1): step ``t`` is :func:`optimal_odd_polynomial` on the
    current interval ``[l, u]`` (designed on ``[max(l, cushion·u), u]`` and recentred so that its min + max over
    ``[l, u]`` is 2 when the cushion binds), every step but the last is divided by the safety factor ``s = 1 + safety``
    (``p(x) → p(x/s)``), and the next interval is ``[p(l), 2 − p(l)]`` — the semantics of
    NoahAmsel/PolarExpress ``optimal_composition(l, num_iters, degree, safety_factor_eps, cushion)``; see the
    module docstring. ``design_schedule(5, 1e-3, safety=0.02, cushion=0.02)`` is modded-nanogpt's list and
    ``design_schedule(8, 1e-3, cushion=PAPER_CUSHION)`` the paper's raw list.

    Returns a ``"repeat_last"`` :class:`Schedule` (steps past the end repeat the last, most converged
    polynomial, as in the reference) with ``margin = 1 + safety`` (the reference divides the input by
    ``(1 + safety)·‖X‖``), ``default_steps = steps`` and ``lower = lower``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree not in _DEGREES:
        raise ValueError(f"degree must be 3 or 5, got {degree!r}")
    lower, upper = float(lower), float(upper)
    if not (math.isfinite(upper) and upper > 0.0):
        raise ValueError(f"upper must be a positive finite number, got {upper!r}")
    if not (0.0 < lower < upper):
        raise ValueError(f"lower must lie in (0, upper) = (0, {upper!r}), got {lower!r}")
    if not lower < 1.0:
        # Schedules are validated on normalized singular values σ ≤ 1 (see schedules.py): lower must be below 1.
        raise ValueError(f"lower must be below 1 (σ is normalized to ≤ 1), got {lower!r}")
    if not (math.isfinite(safety) and safety >= 0.0):
        raise ValueError(f"safety must be a finite number ≥ 0, got {safety!r}")
    if not (math.isfinite(cushion) and 0.0 <= cushion < 1.0):
        raise ValueError(f"cushion must lie in [0, 1), got {cushion!r}")
    s = 1.0 + safety
    l, u = lower, upper
    triples: list[Triple] = []
    for step in range(steps):
        p, err = optimal_odd_polynomial(max(l, cushion * u), u, degree)
        if cushion * u > l:
            # Optimal on [cushion·u, u], so centred on 1 there; recentre for the true interval [l, u] so that
            # min + max = 2 over it (NoahAmsel/PolarExpress polar_express.py). p rises on (0, cushion·u], so the
            # min is p(l); the max is 1 + err, attained at u for a quintic (the reference's 2 / (p(l) + p(u)))
            # but at the interior extremum for a cubic, whose p(u) = 1 − err is a minimum: dividing by
            # p(l) + p(u) there would scale the step by ~1/p(l) and blow it up.
            r = 2.0 / (_evaluate(p, l) + 1.0 + err)
            p = (p[0] * r, p[1] * r, p[2] * r)
        if step < steps - 1:
            # Safety on all but the last step, inside the loop (same file: `if iter < num_iters - 1`).
            p = (p[0] / s, p[1] / s**3, p[2] / s**5)
        triples.append(p)
        # Once converged, rounding can put p(l) one ulp above 1 (then u = 2 − l < l): the interval is [1, 1].
        l = min(_evaluate(p, l), 1.0)
        u = 2.0 - l
    source = (
        f"orthoptim.polar.design: greedy minimax composition (arXiv 2505.16932 Alg. 1; NoahAmsel/PolarExpress "
        f"optimal_composition semantics), degree={degree}, lower={lower:g}, upper={upper:g}, steps={steps}, "
        f"safety={safety:g}, cushion={cushion:g}"
    )
    return Schedule(name, tuple(triples), "repeat_last", s, steps, lower, source=source)
