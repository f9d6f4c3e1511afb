"""Normalizations: each bounds σmax by 1 (checked by float64 SVD) and drives the iteration as the closed form says."""

from __future__ import annotations

import pytest
import torch

import orthoptim
from orthoptim.polar import composite, get_schedule
from orthoptim.polar.normalize import (
    _schatten4_scale_in_place,
    exact_pow2,
    gram_scale,
    max_abs_by_extremes,
    max_abs_by_norm,
    normalize,
    normalize_by_float64_norm,
    pow2_prescale,
)

from .conftest import gains, with_spectrum


def adversarial_spectra(k: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, k + 1, dtype=torch.float64)
    return {
        "flat": torch.ones(k, dtype=torch.float64),
        "rank1": torch.cat([torch.ones(1, dtype=torch.float64), torch.zeros(k - 1, dtype=torch.float64)]),
        "cluster_at_max": torch.where(i <= k // 2, 1.0, 1e-3).to(torch.float64),
        "one_dominant": torch.cat([torch.tensor([1e4], dtype=torch.float64), torch.ones(k - 1, dtype=torch.float64)]),
        "harmonic": 1.0 / i,
        "exponential": torch.exp(-i / 3.0),
    }


def test_exact_pow2_matches_python() -> None:
    for dtype, lo, hi in ((torch.float32, -126, 127), (torch.float64, -1022, 1023)):
        k = torch.arange(lo, hi + 1)
        assert torch.equal(exact_pow2(k, dtype), torch.tensor([2.0 ** int(v) for v in k], dtype=dtype))


def test_prescale_puts_max_in_two_to_four_exactly() -> None:
    """From float32's smallest subnormal to its largest value the max-abs entry lands in [2, 4), each entry scaled
    by exactly the power of two that does so for the max (checked in float64), underflow aside."""
    X = torch.tensor([[[3e-45, -1e-45]], [[-3.0e38, 1.0]], [[1.7e38, 2.0**-140]], [[0.0, 0.0]]], dtype=torch.float32)
    scaled, amax = pow2_prescale(X)
    top = scaled.abs().amax(dim=(-2, -1))
    assert torch.all((top[:3] >= 2.0) & (top[:3] < 4.0)) and top[3] == 0
    assert torch.equal(amax.reshape(-1), X.abs().amax(dim=(-2, -1)))
    X64 = X.double()
    power = 2.0 ** (2 - torch.frexp(X64.abs().amax(dim=(-2, -1), keepdim=True))[1].double())
    # One rounding of the exact product (2^-140·2^-126 underflows to 0 at the top binade, as it must).
    assert torch.equal(scaled[:3], (X64[:3] * power[:3]).float())


@pytest.mark.parametrize("normalization", ["schatten4", "aol"])
@pytest.mark.parametrize("kind", list(adversarial_spectra(12)))
def test_gram_normalizations_bound_sigma_max(normalization: str, kind: str) -> None:
    s = adversarial_spectra(12)[kind]
    G, _, _ = with_spectrum(12, 30, s, seed=3)
    X = normalize(G.unsqueeze(0))  # Frobenius-normalized, float64
    A_s, scale = gram_scale(X @ X.mT, normalization, margin=1.0)  # type: ignore[arg-type]
    Xs = scale * X
    smax = torch.linalg.matrix_norm(Xs, ord=2)
    assert smax <= 1.0 + 1e-12, (kind, float(smax))
    assert torch.allclose(A_s, Xs @ Xs.mT, atol=1e-12)
    if normalization == "schatten4":  # divided by (Σσ⁴)^{1/4} exactly
        assert torch.allclose(smax, s.max() / s.pow(4).sum().pow(0.25), rtol=1e-10)


def test_schatten4_float64_iteration_matches_closed_form() -> None:
    sched = get_schedule("polar_express")
    s = torch.logspace(0, -3, 30, dtype=torch.float64)
    G, U, V = with_spectrum(30, 70, s, seed=4)
    O = orthoptim.orthogonalize(G, schedule="polar_express", normalization="schatten4", compute_dtype=torch.float64)
    x = (s / (sched.margin * s.pow(4).sum().pow(0.25))).numpy()
    M = gains(O, U, V)
    assert torch.allclose(torch.diagonal(M), torch.from_numpy(composite(sched.steps_coefficients(), x)), atol=1e-9)
    assert (M - torch.diag(torch.diagonal(M))).abs().max() < 1e-9


def test_aol_float64_iteration_is_newton_schulz_on_row_scaled_matrix() -> None:
    """Reference built from scratch: D from the float64 Gram, SVD of D·X/‖X‖_F, closed-form gains on it."""
    sched = get_schedule("polar_express")
    G = torch.randn(10, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    G[3] *= 40.0  # unbalanced rows: AOL's scaling matters
    Xf = G / G.norm()
    d = (Xf @ Xf.T).abs().sum(-1).rsqrt() / sched.margin
    U, S, Vh = torch.linalg.svd(d[:, None] * Xf, full_matrices=False)
    expected = U @ torch.diag(torch.from_numpy(composite(sched.steps_coefficients(), S.numpy()))) @ Vh
    O = orthoptim.orthogonalize(G, schedule="polar_express", normalization="aol", compute_dtype=torch.float64)
    assert torch.allclose(O, expected, atol=1e-10)


@pytest.mark.parametrize("normalization", ["schatten4", "aol"])
def test_gram_normalizations_are_scale_invariant_and_safe(normalization: str) -> None:
    G = torch.randn(9, 21, generator=torch.Generator().manual_seed(6))
    G = G / G.abs().max()
    ref = orthoptim.orthogonalize(G, normalization=normalization)  # type: ignore[arg-type]
    for k in (-100, -50, 0, 50, 127):  # every entry stays a normal float32: the scaling is exact
        out = orthoptim.orthogonalize(G * 2.0**k, normalization=normalization)  # type: ignore[arg-type]
        assert torch.equal(out, ref), k
    zero = orthoptim.orthogonalize(torch.zeros(2, 4, 6), normalization=normalization)  # type: ignore[arg-type]
    assert torch.equal(zero, torch.zeros(2, 4, 6))
    G[0, 0] = float("nan")
    with pytest.raises(orthoptim.NonFiniteError):
        orthoptim.orthogonalize(G, normalization=normalization)  # type: ignore[arg-type]
    tall = torch.randn(40, 7)
    assert torch.equal(
        orthoptim.orthogonalize(tall, normalization=normalization),  # type: ignore[arg-type]
        orthoptim.orthogonalize(tall.T.contiguous(), normalization=normalization).T,  # type: ignore[arg-type]
    )


def test_schatten4_is_tighter_than_frobenius_on_spread_spectra() -> None:
    """The point of it: with many small singular values ‖X‖_F ≫ σmax, so Frobenius starts them lower."""
    s = torch.logspace(0, -3, 256, dtype=torch.float64)  # ‖s‖₂ ≈ 4.4 σmax, (Σs⁴)^{1/4} ≈ 1.8 σmax
    G, U, V = with_spectrum(256, 300, s, seed=7)
    worst = {}
    for norm in ("frobenius", "schatten4"):
        O = orthoptim.orthogonalize(G.float(), normalization=norm)  # type: ignore[arg-type]
        worst[norm] = float(torch.diagonal(gains(O, U, V)).min())
    assert worst["schatten4"] > worst["frobenius"] + 0.1, worst


@pytest.mark.parametrize("tall", [False, True])
def test_overwrite_input_gives_the_same_result_and_keeps_scale_invariance(tall: bool) -> None:
    """``overwrite_input`` (the optimizers' in-place normalization of their own temporary) gives the copy path's
    bits for wide inputs, the same values up to the last bit of the norm for tall views, and stays exactly
    scale-invariant under powers of two, including at the ends of float32's range."""
    G = torch.randn(3, 600, 200, generator=torch.Generator().manual_seed(3))
    view = (lambda t: t.mT) if tall else (lambda t: t)
    ref = normalize(view(G.clone()), nonfinite="propagate", out_dtype=torch.bfloat16)
    got = normalize(view(G.clone()), nonfinite="propagate", out_dtype=torch.bfloat16, overwrite_input=True)
    if tall:
        assert (got.float() - ref.float()).abs().max() <= 2**-8 * ref.float().abs().max()
    else:
        assert torch.equal(got, ref)
    # Independent reference: X/‖X‖_F in float64, to which the bfloat16 result is one rounding away (≤ 2⁻⁸ relative).
    G64 = view(G.double())
    exact = G64 / torch.linalg.vector_norm(G64, dim=(-2, -1), keepdim=True)
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-30).all()
    for k in (-100, -60, 0, 60, 120):
        assert torch.equal(G * 2.0**k * 2.0**-k, G)  # the scaled input is exact (no subnormals, no overflow)
        scaled = normalize(view(G * 2.0**k), nonfinite="propagate", out_dtype=torch.bfloat16, overwrite_input=True)
        assert torch.equal(scaled, got), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_both_max_abs_reductions_give_the_exact_max_and_keep_nan_and_inf(dtype: torch.dtype) -> None:
    """``max_abs`` is the max-abs norm off the CPU and max(amax, −amin) on it: both must be the exact max |x| of
    each matrix (reference: float64 abs().amax per matrix), NaN where a matrix holds a NaN, Inf where it holds
    ±Inf and no NaN, 0 for a zero matrix, and keep subnormal and huge entries exact."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(8, 6, 10, generator=gen, dtype=torch.float64).to(dtype)
    tiny, huge = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    X[1].zero_()
    X[2, 3, 4] = float("nan")
    X[3, 0, 0] = float("inf")
    X[4, 5, 9] = float("-inf")
    X[5, 2, 2], X[5, 4, 1] = float("-inf"), float("nan")
    X[6] = X[6] * tiny / 2  # subnormal scale (bfloat16: flushed values still compare exactly)
    X[7, 1, 1] = -huge
    ref = X.to(torch.float64).abs().amax(dim=(-2, -1), keepdim=True)
    ref[2] = ref[5] = float("nan")
    for reduce in (max_abs_by_norm, max_abs_by_extremes):
        got = reduce(X)
        assert got.shape == (8, 1, 1) and got.dtype == dtype
        torch.testing.assert_close(got.to(torch.float64), ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("out_dtype", "bits"), [(torch.bfloat16, 8), (torch.float32, 24), (None, 24)], ids=str)
@pytest.mark.parametrize("tall", [False, True])
def test_float64_norm_normalization_is_one_rounding_from_the_exact_quotient(
    in_dtype: torch.dtype, out_dtype: torch.dtype | None, bits: int, tall: bool
) -> None:
    """The accelerators' normalization (two passes, norm accumulated in float64) against X/(margin·‖X‖_F) in float64:
    every entry within one rounding of the result dtype; contiguous output; the input left unchanged."""
    G = torch.randn(4, 50, 30, generator=torch.Generator().manual_seed(5)).to(in_dtype)
    X = G.mT if tall else G
    before = X.clone()
    for margin in (1.0, 1.01):
        got = normalize_by_float64_norm(X, margin=margin, nonfinite="propagate", out_dtype=out_dtype)
        assert got.dtype == (out_dtype or torch.float32) and got.is_contiguous() and got.shape == X.shape
        X64 = X.double()
        exact = X64 / (margin * torch.linalg.vector_norm(X64, dim=(-2, -1), keepdim=True))
        assert ((got.double() - exact).abs() <= 2.0**-bits * exact.abs()).all()
    assert torch.equal(X, before)


def test_float64_norm_normalization_is_exactly_scale_invariant_over_float32s_range() -> None:
    """Powers of two from the subnormal end (entries down to 2⁻¹⁴⁹) to the top of float32's range give the very same
    bits (the inputs are exact at every scale: 8-bit mantissas); a zero matrix stays zero."""
    gen = torch.Generator().manual_seed(11)
    sign = torch.randint(0, 2, (3, 17, 23), generator=gen).float() * 2 - 1
    X = sign * torch.randint(1, 256, (3, 17, 23), generator=gen).float() / 256  # ±j/256: 8 significant bits
    X[2] = 0.0
    ref = normalize_by_float64_norm(X, nonfinite="propagate", out_dtype=torch.bfloat16)
    assert torch.equal(ref[2], torch.zeros_like(ref[2])) and bool((ref[0] != 0).any())
    for e in [*range(-141, 128, 9), -141, 127]:
        scaled = X * 2.0**e
        assert torch.equal(scaled.double() * 2.0**-e, X.double()), e  # exact input at this scale
        for out_dtype in (torch.bfloat16, torch.float32):
            got = normalize_by_float64_norm(scaled, nonfinite="propagate", out_dtype=out_dtype)
            want = normalize_by_float64_norm(X, nonfinite="propagate", out_dtype=out_dtype)
            assert torch.equal(got, want), (e, out_dtype)


def test_float64_norm_normalization_propagates_or_raises_on_non_finite_input() -> None:
    X = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(2))
    clean = normalize_by_float64_norm(X[:1], nonfinite="propagate")
    X[1, 2, 3] = float("nan")
    X[2, 0, 0] = float("-inf")
    out = normalize_by_float64_norm(X, nonfinite="propagate")
    assert torch.equal(out[:1], clean)  # the other matrices are unaffected
    assert torch.isnan(out[1]).all()  # NaN norm
    assert torch.isnan(out[2, 0, 0]) and not bool(torch.isfinite(out[2]).all())  # Inf·0
    with pytest.raises(orthoptim.NonFiniteError, match=r"\(3, 6, 9\)"):
        normalize_by_float64_norm(X, nonfinite="raise")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_schatten4_gram_scale_in_place_is_one_rounding_from_float64(dtype: torch.dtype) -> None:
    """The accelerators' Schatten-4 Gram scale (norm accumulated in float64, A·s² rounded once into A) against float64:
    s = 1/(margin·‖A‖_F^½) per matrix, A_s within one rounding of the result dtype of A·s², the floor only on the
    zero matrix; and the same as the float32 path up to that rounding."""
    X = torch.randn(3, 20, 50, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X[2] = 0.0
    A = (X @ X.mT).to(dtype)
    for margin in (1.0, 1.01):
        A_s, scale = _schatten4_scale_in_place(A.clone(), margin)
        A64 = A.double()
        s = 1 / (margin * torch.linalg.vector_norm(A64, dim=(-2, -1), keepdim=True).clamp_min(0.25 / 20**0.5).sqrt())
        exact = A64 * s * s
        bits = 8 if dtype == torch.bfloat16 else 24
        assert A_s.dtype == dtype and ((A_s.double() - exact).abs() <= 2.0**-bits * exact.abs()).all()
        assert scale.shape == (3, 20, 1) and scale.dtype == torch.float32
        torch.testing.assert_close(scale.double(), s.expand(3, 20, 1), rtol=2**-23, atol=0)
        assert torch.equal(A_s[2], torch.zeros_like(A_s[2]))
        ref, ref_scale = gram_scale(A.clone(), "schatten4", margin)  # the CPU's float32 path
        torch.testing.assert_close(scale, ref_scale, rtol=2**-22, atol=0)
        assert ((A_s.double() - ref.double()).abs() <= 2.0 ** (2 - bits) * exact.abs()).all()  # ≤ 3 roundings


# --- AOL with zero and tiny rows ----------------------------------------------------------------------------------


def aol_closed_form(G: torch.Tensor, name: str) -> torch.Tensor:
    """float64 reference for ``orthogonalize(G, normalization="aol")``, built from scratch per matrix: drop the zero
    rows and columns of the wide orientation, Frobenius-normalize the rest, scale its rows by AOL's
    dᵢ = (Σⱼ|(XXᵀ)ᵢⱼ|)^{-1/2}/margin (arXiv 2512.04632), take the float64 SVD U S Vᵀ of that and apply the schedule's
    scalar composite p to S; the dropped rows and columns are zero. U Vᵀ is the polar factor of the row-scaled
    non-zero part; p(S) in place of 1 is the schedule's gain, which the iteration really applies, so that only
    rounding is left between this and the engine's result."""
    sched = get_schedule(name)
    tall = G.shape[-2] > G.shape[-1]
    W = (G.mT if tall else G).double()
    out = torch.zeros_like(W)
    for w, o in zip(W.reshape(-1, *W.shape[-2:]), out.view(-1, *W.shape[-2:]), strict=True):
        rows, cols = w.abs().sum(1) > 0, w.abs().sum(0) > 0
        if not rows.any():
            continue
        x = w[rows][:, cols]
        x = x / x.norm()
        d = (x @ x.T).abs().sum(-1).rsqrt() / sched.margin
        U, S, Vh = torch.linalg.svd(d[:, None] * x, full_matrices=False)
        p = torch.from_numpy(composite(sched.steps_coefficients(), S.numpy()))
        o[rows.nonzero()[:, :1], cols.nonzero()[:, 0]] = (U * p) @ Vh
    return out.mT if tall else out


# Max-abs error of the AOL result against ``aol_closed_form``, per compute dtype. Measured worst cases on the matrices
# below (CPU, standard and Gram forms, schedules orthoptim / polar_express / jordan): float32 4.5e-6, bfloat16 0.064,
# float16 0.012 — some 25–75 units of each dtype's roundoff (2⁻²⁴, 2⁻⁸, 2⁻¹¹): the early steps' slope (8.3 for the
# first step, up to ~590 for the composite at small σ) amplifies each product's rounding. float16 has 3 bits more
# than bfloat16, hence ~1/8 of its error. The bounds leave 2–20× room for other BLAS summation orders.
AOL_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.03}


def _with_zero_lines(shape: tuple[int, ...], rows: list[int], cols: list[int], seed: int) -> torch.Tensor:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    G[..., rows, :] = 0.0  # dead units: zero rows (and, below, zero columns)
    G[..., :, cols] = 0.0
    return G


@pytest.mark.parametrize("iteration", ["standard", "gram"])
@pytest.mark.parametrize("compute_dtype", list(AOL_TOL), ids=str)
def test_aol_zero_rows_and_columns_give_zeros_and_the_float64_result_of_the_rest(
    compute_dtype: torch.dtype, iteration: str
) -> None:
    """Zero rows and columns (wide, tall, batched with an all-zero matrix): the output is finite, exactly zero on
    them, and elsewhere the float64 closed form of the matrix without them. In float16 a zero row used to turn the
    whole matrix into NaN (its AOL factor was 2⁶³, ``inf`` once folded into the float16 first-step factor)."""
    cases = [
        _with_zero_lines((12, 30), [2, 7], [5], seed=20),
        _with_zero_lines((30, 12), [0, 17], [4], seed=21),  # tall: its zero column is a zero row of Gᵀ
        _with_zero_lines((3, 12, 30), [1], [3, 29], seed=22),
    ]
    cases[2][2] = 0.0  # an all-zero matrix in the batch
    for name in ("orthoptim", "jordan"):
        for G in cases:
            out = orthoptim.orthogonalize(
                G.float(),
                schedule=name,
                normalization="aol",
                compute_dtype=compute_dtype,
                iteration=iteration,  # type: ignore[arg-type]
            )
            assert bool(torch.isfinite(out).all()), (name, tuple(G.shape))
            dead = (G == 0).all(dim=-1, keepdim=True) | (G == 0).all(dim=-2, keepdim=True)
            assert torch.equal(out[dead.expand_as(out)], torch.zeros(int(dead.expand_as(out).sum())))
            err = (out.double() - aol_closed_form(G, name)).abs().max()
            assert err < AOL_TOL[compute_dtype], (name, tuple(G.shape), float(err))


@pytest.mark.parametrize("elementwise", ["float32_copies", "float64_factors"])
def test_zero_matrix_maps_to_exact_zeros_in_every_compute_dtype(elementwise: str) -> None:
    """DESIGN.md: "Zero matrix → zero", for every normalization, compute dtype, form and shape (a single row or
    column included), on the CPU's way and the accelerators' way (``elementwise=``, ``polar/devices.py``)."""
    for shape in ((1, 7), (7, 1), (1, 1), (4, 6), (2, 5, 3)):
        for dtype in (torch.float16, torch.float32):
            zero = torch.zeros(shape, dtype=dtype)
            for normalization in ("aol", "schatten4", "frobenius"):
                for compute_dtype in (torch.float16, torch.bfloat16, torch.float32):
                    for schedule, iteration in (("orthoptim", "standard"), ("aol", "gram"), ("jordan", "gram")):
                        out = orthoptim.orthogonalize(
                            zero,
                            schedule=schedule,
                            normalization=normalization,  # type: ignore[arg-type]
                            compute_dtype=compute_dtype,
                            iteration=iteration,  # type: ignore[arg-type]
                            elementwise=elementwise,  # type: ignore[arg-type]
                        )
                        assert torch.equal(out, zero), (shape, dtype, normalization, compute_dtype, schedule)


def test_float16_aol_tiny_rows_and_extreme_scales_stay_finite_and_bounded() -> None:
    """float16 inputs at the bottom, middle and top of float16's range, with one row 10⁻²…10⁻¹⁰ times the others
    (its Gram entries underflow float16 from ~10⁻⁴ on). Against the float64 closed form of the values passed: the
    other rows within ``AOL_TOL``; the tiny row too while float16 holds it in normal numbers (≥ 10⁻³ here), and
    below that bounded (float16 cannot represent it: the iteration sees a few subnormals of it); the spectral norm
    never above the schedule's largest gain on [0, 1] (no singular value pushed over 1 by an underflowed Gram)."""
    sched = get_schedule("orthoptim")
    grid = torch.linspace(0, 1, 4097, dtype=torch.float64).numpy()
    top_gain = float(composite(sched.steps_coefficients(), grid).max())  # 1.128
    base = torch.randn(12, 30, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    others = torch.arange(12) != 4
    for shrink in (1e-2, 1e-3, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10):
        for top in (2.0**-14, 1.0, 65504.0):  # max-abs: float16's smallest normal, 1, its largest value
            G = base.clone()
            G[4] *= shrink
            X = (G / G.abs().max() * top).half()
            ref = aol_closed_form(X.double(), "orthoptim")
            for iteration in ("standard", "gram"):
                out = orthoptim.orthogonalize(
                    X,
                    normalization="aol",
                    compute_dtype="float16",
                    iteration=iteration,  # type: ignore[arg-type]
                ).double()
                what = (shrink, top, iteration)
                assert bool(torch.isfinite(out).all()), what
                assert torch.linalg.matrix_norm(out, ord=2) <= top_gain + AOL_TOL[torch.float16], what
                assert (out[others] - ref[others]).abs().max() < AOL_TOL[torch.float16], what
                if shrink >= 1e-3:
                    assert (out[4] - ref[4]).abs().max() < AOL_TOL[torch.float16], what


def test_aol_scale_keeps_the_schur_bound_where_the_float16_gram_underflows() -> None:
    """The AOL factor from a float16 Gram matrix whose entries for one row are subnormals (or zero): D is finite and
    σmax(D·X), by float64 SVD of the float16 X actually used, stays within the 1 + 2⁻¹⁰ the rounding analysis allows
    (module docstring). Subnormal Gram entries are rounded in absolute terms (up to 2⁻²⁵), not relatively: a row
    supported on a column no other row uses, with ‖xᵢ‖² = 16.47 subnormals (2⁻²⁴ each) stored as 16, got
    dᵢ·‖xᵢ‖ = √(16.47/16) ≈ 1.015 without the m·s term; a zero Gram row got the float32 floor's 2⁶³."""
    base = torch.randn(16, 40, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    isolated = base.clone()
    isolated[:, 39] = 0.0
    isolated[3] = 0.0
    isolated[3, 39] = 1039 * 2.0**-20 * isolated.norm()  # x = 1039·2⁻²⁰ after normalization: x² = 16.47·2⁻²⁴
    cases = {"isolated": isolated}
    for shrink in (1e-3, 1e-4, 1e-5, 1e-6, 0.0):
        cases[f"row·{shrink:g}"] = base.clone()
        cases[f"row·{shrink:g}"][3] *= shrink
    for what, G in cases.items():
        X = normalize(G.unsqueeze(0), out_dtype=torch.float16)  # Frobenius-normalized, float16
        A = X @ X.mT
        if what == "isolated":  # the case as built: the row's only Gram entry is a subnormal rounded down
            assert X[0, 3, 39] == 1039 * 2.0**-20 and A[0, 3, 3] == 16 * 2.0**-24
        A_s, scale = gram_scale(A, "aol")
        assert bool(torch.isfinite(scale).all()) and bool(torch.isfinite(A_s).all()), what
        sigma = torch.linalg.matrix_norm(scale.double() * X.double(), ord=2)
        assert sigma <= 1 + 2.0**-10, (what, float(sigma))


def test_muon_float16_aol_steps_with_a_dead_unit() -> None:
    """An optimizer with ``normalization="aol", compute_dtype="float16"`` and a zero gradient row (a dead unit) takes
    its steps: none is skipped as non-finite, the other rows move, the dead unit's row does not (its update is 0)."""
    W = torch.nn.Parameter(torch.randn(16, 24, generator=torch.Generator().manual_seed(25)))
    opt = orthoptim.Muon([W], lr=0.02, weight_decay=0.0, normalization="aol", compute_dtype="float16")
    start = W.detach().clone()
    for seed in range(3):
        grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(100 + seed))
        grad[5] = 0.0
        W.grad = grad
        opt.step()
    assert opt.nonfinite_skips == 0
    moved = (W.detach() - start).abs().amax(dim=1)
    assert torch.isfinite(W).all() and bool((moved[torch.arange(16) != 5] > 0).all())
    assert moved[5] == 0
