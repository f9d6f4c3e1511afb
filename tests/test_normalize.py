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


def test_prescale_puts_max_in_half_open_unit_interval() -> None:
    X = torch.tensor([[[3e-45, -1e-45]], [[-3.0e38, 1.0]], [[0.0, 0.0]]], dtype=torch.float32)
    scaled, amax = pow2_prescale(X)
    top = scaled.abs().amax(dim=(-2, -1))
    assert torch.all((top[:2] >= 0.5) & (top[:2] < 1.0)) and top[2] == 0
    assert torch.equal(amax.reshape(-1), X.abs().amax(dim=(-2, -1)))


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
