"""Scale invariance of orthogonalize over each dtype's whole range, subnormals included.

References: for power-of-two scales the result must be bit-identical to scale 1 (the prescale is exact);
for other scales it must agree with the result for the same values rescaled exactly in float64; and at
every scale the output must match the float64-SVD picture (gains from the closed-form scalar composite).
"""

from __future__ import annotations

import functools
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


# The exact-exponent sweeps: for each input dtype, two matrices whose every power-of-two scale in a range is exact.
# "deep": max-abs 1.75 (so 2^k·G reaches the dtype's top binade) and entries down to odd multiples of the smallest
# subnormal s, 22+ binades and more below the max (exact for k ≥ 0 up to the top); "subnormal": max-abs 7·s·2^20,
# every entry a multiple of s (exact from k = 0, a matrix of subnormals, to the top).
SWEEP_DTYPES = {
    # dtype: (compute dtypes, largest k with 1.75·2^k finite)
    torch.float32: ((torch.float32, torch.bfloat16), 127),
    torch.bfloat16: ((torch.float32, torch.bfloat16), 127),
    torch.float16: ((torch.float32, torch.float16), 15),
    torch.float64: ((torch.float64, torch.float32), 1023),
}


def sweep_matrices(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    finfo = torch.finfo(dtype)
    s = finfo.tiny * finfo.eps  # the smallest subnormal
    gen = torch.Generator().manual_seed(30)
    ints = torch.randint(1, 56, (8, 14), generator=gen, dtype=torch.int64).double()
    signs = torch.randint(0, 2, (8, 14), generator=gen).double() * 2 - 1
    deep = signs * ints / 32.0  # six significant bits: exact in every dtype, below 1.75
    deep[2] = signs[2] * (2 * ints[2] + 1) * s  # a row of odd multiples of s, far below the rest
    deep[:, 5] = (2 * ints[:, 5] + 1) * s  # and a column
    deep[0, 0] = 1.75
    subnormal = signs * ints * 2.0**14 * s
    subnormal[1] = signs[1] * (2 * ints[1] + 1) * s  # down to the last bit of the subnormals
    subnormal[0, 0] = 7 * 2.0**20 * s
    out = {"deep": deep.to(dtype), "subnormal": subnormal.to(dtype)}
    for name, G in out.items():
        assert torch.equal(G.double(), {"deep": deep, "subnormal": subnormal}[name]), name  # the values are exact
    return out


def times_pow2(G: torch.Tensor, k: int) -> torch.Tensor:
    """2^k·G, rounded once into G's dtype: via float64 for narrower dtypes (a tensor-scalar product of a float32 or
    bfloat16 tensor takes the scalar as float32, where 2^128 is inf); for float64 in steps of at most 2^±1000
    (2^2075 is not a float64; each step is exact as long as the result is, the entries only grow or only shrink)."""
    if G.dtype != torch.float64:
        return (G.double() * 2.0**k).to(G.dtype)
    while k != 0:
        step = max(-1000, min(1000, k))
        G, k = G * 2.0**step, k - step
    return G


def exact_exponents(G: torch.Tensor, top: int) -> list[int]:
    """The k ≥ 0 with 2^k·G exact in G's dtype (every one up to where the max-abs reaches the top binade)."""
    e_max = int(torch.frexp(G.abs().max().double())[1]) - 1  # max-abs = m·2^e_max, m ∈ [1, 2)
    return list(range(0, top - e_max + 1))


@pytest.mark.slow  # hundreds of calls per case; `make test-fast` leaves it out
@pytest.mark.parametrize("normalization", ["frobenius", "schatten4", "aol"])
@pytest.mark.parametrize("dtype", list(SWEEP_DTYPES), ids=str)
def test_power_of_two_scales_are_bit_identical_over_the_whole_range(dtype: torch.dtype, normalization: str) -> None:
    """orthogonalize(2^k·G) is bit for bit orthogonalize(G) for every k that keeps 2^k·G exact in G's dtype, from a
    matrix of subnormals to a max-abs in the dtype's top binade (float32's 2^127, float64's 2^1023).

    Why bit equality is right, by construction: the prescale multiplies each matrix by the power of two that puts
    its max-abs entry in [2, 4), so 2^k·G and G are both brought to the very same real values, and each one is then
    rounded once, to the same float — a product with a power of two is exact unless it overflows or underflows,
    and an underflowed product rounds the same real value the same way at every k. From there on the inputs are
    the same bits, and so are the outputs, whatever the kernels' summation order or FMA use (the same ops run on
    the same bits). Where the largest entry is so small that one factor cannot bring it up (2^150 is not a float32),
    the remaining power of two is folded into the norm and the final factor, both exactly (all intermediate values
    normal), so the quotient is the same real value again. It must hold on every x86 CPU (AVX2 and AVX-512 builds
    sum in different orders, but each sums the same bits at every k). The accelerators' way of normalizing the
    optimizers' input (``overwrite_input`` with ``elementwise="float64_factors"``: the norm accumulated in float64, no
    prescale) is exact for another reason: float32 squares, sums and quotients stay normal float64 numbers.

    The "deep" matrix's row and column of odd multiples of the smallest subnormal are ~126 binades below its max
    at the top: they become subnormals in the prescaled matrix, which is where 2^126·G and 2^127·G used to differ
    (the prescale 2^-127 or 2^-128 was applied as 2^-126 and then 2^-1 or 2^-2, rounding those entries twice).
    """
    compute_dtypes, top = SWEEP_DTYPES[dtype]
    for name, G in sweep_matrices(dtype).items():
        # Every exponent at both ends, where the prescale changes form (a remainder folded into the norm at the
        # bottom, the top binades' factors near the smallest normal), every 41st between, where nothing does.
        ks = exact_exponents(G, top)
        ends = 48 if dtype == torch.float64 else 6
        ks = sorted({*ks[:ends], *ks[ends:-ends:41], *ks[-ends:]})
        for compute_dtype in compute_dtypes:
            # The CPU's way, its in-place variant, and the accelerators' way (which may differ from the CPU's in the
            # last bit, so each is compared with itself at k = 0).
            for overwrite_input, elementwise in (
                (False, "float32_copies"),
                (True, "float32_copies"),
                (True, "float64_factors"),
            ):
                run = functools.partial(
                    orthoptim.orthogonalize,
                    normalization=normalization,  # type: ignore[arg-type]
                    compute_dtype=compute_dtype,
                    overwrite_input=overwrite_input,
                    elementwise=elementwise,  # type: ignore[arg-type]
                )
                ref = run(G.clone())  # a copy: overwrite_input scales its input in place
                assert bool(torch.isfinite(ref).all()) and bool((ref != 0).any())
                for k in ks:
                    X = times_pow2(G, k)
                    assert torch.equal(times_pow2(X, -k), G), (name, k)  # 2^k·G is exact
                    assert torch.equal(run(X.clone()), ref), (name, k, compute_dtype, overwrite_input, elementwise)
