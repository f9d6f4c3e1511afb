"""Scale invariance of orthogonalize over each dtype's whole range, subnormals included.

References: for power-of-two scales the result must be bit-identical to scale 1 (the prescale is exact);
for other scales it must agree with the result for the same values rescaled exactly in float64; and at
every scale the output must match the float64-SVD picture (gains from the closed-form scalar composite).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import orthoptim
from orthoptim.polar import composite, get_schedule, polar

# The matrix has max-abs entry exactly 1, so t·G stays finite for t up to the dtype's max.
DTYPE_EXPONENTS = {
    # dtype: (smallest k with 2^k·G nonzero and all entries at most subnormal-rounded, largest k finite)
    torch.float32: (-140, 127),
    torch.bfloat16: (-126, 127),
    torch.float16: (-20, 15),
}


def unit_max(m: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = (g / g.abs().max()).to(dtype)
    return g / g.abs().max()  # exactly 1 after rounding


@pytest.mark.parametrize("dtype", list(DTYPE_EXPONENTS))
def test_power_of_two_scales_are_bit_identical(dtype: torch.dtype) -> None:
    G = unit_max(24, 40, dtype)
    ref = orthoptim.orthogonalize(G)
    lo, hi = DTYPE_EXPONENTS[dtype]
    for k in range(lo, hi + 1, 7):
        scaled = G * (2.0**k)  # exact unless entries fall into the subnormal range
        if not bool((scaled.abs() >= torch.finfo(dtype).tiny).all() | (scaled == 0).all()):
            continue  # lost bits to subnormal rounding: covered by the next test
        out = orthoptim.orthogonalize(scaled)
        assert torch.equal(out, ref), f"2^{k}: max diff {(out - ref).abs().max().item()}"


@pytest.mark.parametrize("dtype", list(DTYPE_EXPONENTS))
def test_whole_range_matches_exact_rescaling(dtype: torch.dtype) -> None:
    """Every scale, subnormals included: t·G is rounded in the input dtype (t is not a power of two), and
    the result must be bit-identical to that of the very same values moved to scale ~1 by an exact power of
    two in float64 and passed as float32 (which represents every such value exactly)."""
    G = unit_max(16, 30, dtype, seed=1)
    lo, hi = DTYPE_EXPONENTS[dtype]
    for k in [*range(lo, hi + 1, 5), lo, hi]:
        X = (G.to(torch.float64) * (2.0**k * 0.7371)).to(dtype)
        assert bool((X != 0).any()) and bool(torch.isfinite(X).all())
        out = orthoptim.orthogonalize(X)
        ref = orthoptim.orthogonalize((X.to(torch.float64) * 2.0**-k).to(torch.float32)).to(dtype)
        assert torch.isfinite(out).all()
        assert torch.equal(out, ref), f"scale 2^{k}·0.74: max diff {(out.double() - ref.double()).abs().max()}"


def test_subnormal_input_is_orthogonalized_correctly() -> None:
    """A float32 matrix living entirely in the subnormal range: gains match the float64 composite."""
    sched = get_schedule("polar_express")
    G = unit_max(12, 20, torch.float32, seed=2).to(torch.float64)
    X = (G * 2.0**-135).to(torch.float32)  # every entry subnormal (< 2^-126), ~9–14 bits kept
    assert bool((X.abs() < torch.finfo(torch.float32).tiny).all())
    out = orthoptim.orthogonalize(X, schedule="polar_express", normalization="frobenius", compute_dtype="float32").to(
        torch.float64
    )
    # Reference: the SVD of the values actually passed, and the scalar composite on their singular values.
    X64 = X.to(torch.float64)
    U, S, Vh = torch.linalg.svd(X64, full_matrices=False)
    expected = composite(sched.steps_coefficients(), (S / (sched.margin * S.norm())).numpy())
    got = torch.diagonal(U.T @ out @ Vh.T)
    assert torch.allclose(got, torch.from_numpy(expected), atol=2e-4)
    # And the polar factor itself (the input is well conditioned enough for 5 steps to be close).
    assert (out - polar(X64)).abs().max() < 0.2


@settings(max_examples=40, deadline=None)
@given(
    log2_scale=st.floats(min_value=-120.0, max_value=120.0),
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_property_scale_invariance_float32(log2_scale: float, m: int, n: int, seed: int) -> None:
    G = unit_max(m, n, torch.float32, seed=seed)
    t = 2.0**log2_scale
    X = (G.to(torch.float64) * t).to(torch.float32)
    out = orthoptim.orthogonalize(X)
    ref = orthoptim.orthogonalize(G)
    # t·G rounds each entry by ≤ 2^-24 relatively; the iteration amplifies that by a modest factor.
    assert (out - ref).abs().max() <= 1e-4
    assert math.isclose(float(out.norm()), float(ref.norm()), rel_tol=1e-4)


def test_torch_muon_routine_fails_where_we_do_not() -> None:
    """The failure this engine exists to fix, demonstrated on torch.optim.Muon's own routine."""
    muon_ns = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    G = unit_max(32, 64, torch.float32, seed=3)
    coeffs = (3.4445, -4.7750, 2.0315)
    ref_norm = float(muon_ns(G, coeffs, 5, 1e-7).float().norm())
    for t in (1e-20, 1e20, 1e38):
        theirs = float(muon_ns(G * t, coeffs, 5, 1e-7).float().norm())
        ours = float(orthoptim.orthogonalize(G * t, schedule=coeffs, steps=5, normalization="frobenius").norm())
        assert theirs < 0.05 * ref_norm  # collapsed (eps floor below, fp32/bf16 norm overflow above)
        assert math.isclose(ours, ref_norm, rel_tol=0.02)
