"""The Gram form of Newton–Schulz (polar/newton_schulz.py) against closed forms, float64 SVD and the standard form."""

from __future__ import annotations

import pytest
import torch

import orthoptim
from orthoptim.polar import composite, get_schedule, list_schedules, polar
from orthoptim.polar.newton_schulz import gram_newton_schulz, gram_restarts, iteration_cost, newton_schulz
from orthoptim.polar.orthogonalize import uses_gram

from .conftest import gains, with_spectrum


@pytest.mark.parametrize("name", list_schedules())
def test_float64_gram_form_acts_as_the_scalar_polynomial(name: str) -> None:
    """Exact arithmetic (float64): the Gram form maps each singular value by the schedule's polynomial."""
    sched = get_schedule(name)
    s = torch.logspace(0, -2.5, 16, dtype=torch.float64)
    G, U, V = with_spectrum(16, 64, s, seed=11)
    O = orthoptim.orthogonalize(
        G, schedule=name, normalization="frobenius", compute_dtype=torch.float64, iteration="gram"
    )
    M = gains(O, U, V)
    want = composite(sched.steps_coefficients(None), (s / (sched.margin * s.norm())).numpy())
    assert torch.allclose(torch.diagonal(M), torch.from_numpy(want), atol=1e-9)
    assert (M - torch.diag(torch.diagonal(M))).abs().max() < 1e-9


@pytest.mark.parametrize("normalization", ["frobenius", "schatten4", "aol"])
def test_gram_form_equals_standard_form_in_float64(normalization: str) -> None:
    """Every normalization, including AOL's non-scalar row scaling (which does not commute with the polynomials,
    so the accumulated product must be built by left multiplication), and with forced restarts."""
    G = torch.randn(3, 12, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    std = orthoptim.orthogonalize(G, normalization=normalization, compute_dtype=torch.float64, iteration="standard")  # type: ignore[arg-type]
    gram = orthoptim.orthogonalize(G, normalization=normalization, compute_dtype=torch.float64, iteration="gram")  # type: ignore[arg-type]
    assert (std - gram).abs().max() < 1e-12
    coeffs = get_schedule("orthoptim").steps_coefficients(None)
    X = G / torch.linalg.matrix_norm(G).view(-1, 1, 1)
    for restarts in ((), (1,), (2, 4), (1, 2, 3, 4)):
        assert (gram_newton_schulz(X, coeffs, restarts=restarts) - newton_schulz(X, coeffs)).abs().max() < 1e-12


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 200)])
def test_float32_gram_form_near_svd_polar(shape: tuple[int, int]) -> None:
    """float32 Gram form, 8 steps: the float64 SVD polar factor within 1e-3 (spectrum ≥ 1e-2·σmax)."""
    m, n = shape
    s = torch.logspace(0, -2, min(m, n), dtype=torch.float64)
    G, _, _ = with_spectrum(m, n, s, seed=12)
    O = orthoptim.orthogonalize(G.float(), schedule="polar_express", steps=8, iteration="gram", compute_dtype="float32")
    assert O.shape == shape and O.dtype == torch.float32
    err = torch.linalg.matrix_norm(O.double() - polar(G), ord=2)
    assert err < 1e-3


def test_bfloat16_gram_form_matches_standard_gains() -> None:
    """In bfloat16 the Gram form restarts where its rule says and stays within bf16 rounding of the closed form."""
    s = torch.logspace(0, -2.5, 32, dtype=torch.float64)
    G, U, V = with_spectrum(32, 128, s, seed=13)
    sched = get_schedule("jordan")
    want = composite(sched.steps_coefficients(None), (s / (sched.margin * s.norm())).numpy())
    O = orthoptim.orthogonalize(
        G.float(), schedule="jordan", normalization="frobenius", compute_dtype="bfloat16", iteration="gram"
    )
    assert (torch.diagonal(gains(O, U, V)) - torch.from_numpy(want)).abs().max() < 0.12


def test_restart_rule() -> None:
    """Restarts follow the rounding of the dtype: none for 5-step schedules in float32, some for 10 aggressive
    steps in float32, every step for the ~8× first step in bfloat16 (which "auto" then never picks)."""
    default = get_schedule("orthoptim").steps_coefficients(None)
    assert gram_restarts(default, torch.float32) == ()
    assert gram_restarts(default, torch.float64) == ()
    assert gram_restarts(default, torch.bfloat16) == (1, 2, 3, 4)
    assert gram_restarts(get_schedule("deepseekv4").steps_coefficients(None), torch.float32) != ()


def test_iteration_cost_closed_forms() -> None:
    m, n = 8, 40
    coeffs = ((3.0, -4.0, 2.0),) * 3
    assert iteration_cost(m, n, coeffs, None) == 3 * (2 * m * m * n + m**3)
    # R₀ and Q·X; step 0: R², P·R·P; step 1: R², P·Q, P·R·P; step 2: R², P·Q.
    assert iteration_cost(m, n, coeffs, ()) == 2 * m * m * n + 3 * m**3 + 4 * m**3 + 2 * m**3
    # A restart before step 1 adds Q·X and X·Xᵀ, drops step 0's P·R·P and step 1's P·Q.
    assert iteration_cost(m, n, coeffs, (1,)) == 4 * m * m * n + m**3 + 3 * m**3 + 2 * m**3


def test_auto_picks_the_cheaper_form() -> None:
    default = get_schedule("orthoptim").steps_coefficients(None)
    assert uses_gram("auto", 768, 3072, default, torch.float32)
    assert uses_gram("auto", 3072, 768, default, torch.float32)
    assert not uses_gram("auto", 768, 768, default, torch.float32)
    assert not uses_gram("auto", 768, 3072, default, torch.bfloat16)  # every step would restart
    assert uses_gram("gram", 768, 768, default, torch.bfloat16)
    assert not uses_gram("standard", 768, 3072, default, torch.float32)
    with pytest.raises(ValueError, match="unknown iteration"):
        orthoptim.orthogonalize(torch.randn(3, 4), iteration="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("iteration", ["standard", "gram"])
def test_large_batches_on_the_cpu_run_matrix_by_matrix(iteration: str) -> None:
    """Large matrices on the CPU are iterated matrix by matrix (faster there): every matrix of a batch gets
    exactly the bits it gets alone, and the result is the polar factor (8 steps, float32, well-conditioned)."""
    from orthoptim.polar.newton_schulz import iterates_matrix_by_matrix

    G = torch.randn(3, 256, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert iterates_matrix_by_matrix(G.shape, G.device)
    kw = {"schedule": "polar_express", "steps": 8, "compute_dtype": "float32", "iteration": iteration}
    O = orthoptim.orthogonalize(G.float(), **kw)  # type: ignore[arg-type]
    for i in range(G.shape[0]):
        assert torch.equal(O[i], orthoptim.orthogonalize(G[i].float(), **kw))  # type: ignore[arg-type]
    assert torch.linalg.matrix_norm(O.double() - polar(G), ord=2).max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [512, 530, 1025])
def test_cpu_symmetric_row_blocks_match_float64_products(dtype: torch.dtype, rows: int) -> None:
    """CPU symmetric products (``SYMMETRIC_MIN_ROWS`` rows and up) are computed as lower row blocks and mirrored:
    as close to the float64 product as the full product is, and as symmetric (mirrored off the diagonal blocks;
    within them BLAS may round (i, j) and (j, i) differently, as it does in the full product)."""
    from orthoptim.polar.newton_schulz import SYMMETRIC_MIN_ROWS, _poly_part, gram_product

    assert rows >= SYMMETRIC_MIN_ROWS
    X64 = torch.randn(rows, 700, dtype=torch.float64, generator=torch.Generator().manual_seed(rows)) / 700**0.5
    X = X64.to(dtype)
    A = gram_product(X)
    exact = X.double() @ X.double().mT
    tol = (X @ X.mT).double().sub(exact).abs().max() * 2 + 1e-12  # the full product's own rounding, with room
    assert (A.double() - exact).abs().max() <= tol
    assert torch.equal(gram_product(X[None])[0], A)  # a batch goes matrix by matrix through the same blocks
    b, c = -4.775, 2.0315
    P = _poly_part(A, b, c)
    P_exact = b * A.double() + c * A.double() @ A.double()
    P_full = torch.addmm(A, A, A, beta=b, alpha=c).double()
    full_error = (P_full - P_exact).abs().max()
    assert (P.double() - P_exact).abs().max() <= full_error * 2 + 1e-12
    for M in (A, P):  # symmetric to the rounding of one product
        assert (M - M.mT).abs().max() <= 2 * full_error + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("into", ["fresh", "Z"])
def test_first_gram_factor_without_a_float32_copy_gives_the_same_bits(
    dtype: torch.dtype, scaled: bool, into: str
) -> None:
    """``(aI + Z)·diag(s)``: the GPUs' way (diagonal at float32 precision first, then one mixed-precision pass) and
    the CPU's (a float32 copy of Z) round the same float32 values once: bit for bit equal; Z itself is left
    unchanged unless it is the destination. And both against float64 within one rounding."""
    from orthoptim.polar.newton_schulz import _plus_identity

    gen = torch.Generator().manual_seed(4)
    Z = torch.randn(3, 17, 17, generator=gen).to(dtype)
    s = (torch.rand(3, 17, 1, generator=gen) + 0.5) if scaled else None
    a = 3.4445
    results = []
    for copies in (True, False):
        z = Z.clone()
        results.append(_plus_identity(z, a, s, out=z if into == "Z" else None, float32_copies=copies))
        if into == "fresh":
            assert torch.equal(z, Z)
    assert results[0].dtype == results[1].dtype == dtype
    assert torch.equal(results[0], results[1])
    exact = Z.double() + a * torch.eye(17, dtype=torch.float64)
    if s is not None:
        exact = exact * s.double().mT
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 23}[dtype]
    assert ((results[1].double() - exact).abs() <= 2.0**-bits * exact.abs()).all()
