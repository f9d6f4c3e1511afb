"""The Triton symmetric-product kernels (sym_gram, sym_poly) against float64 torch references.

Runs under Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported), where the
kernels use a single 32×32 tile config: sizes below are chosen around that block (ragged edges, one partial
tile, several tile rows so mirrored off-diagonal tiles are written). Skipped when triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process's test run

import pytest
import torch

pytest.importorskip("triton")

from orthoptim.polar import kernels
from orthoptim.polar.kernels import sym_gram, sym_poly, symmetric, triton_available, use_triton
from orthoptim.polar.newton_schulz import newton_schulz

pytestmark = [
    pytest.mark.slow,  # Triton's interpreter; `make test-fast` leaves it out
    pytest.mark.skipif(
        not symmetric.INTERPRETED,
        reason="orthoptim.polar.kernels.symmetric was imported before TRITON_INTERPRET=1 was set: GPU kernels",
    ),
]

BLOCK = 32
JORDAN = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon muon.py (torch.optim.Muon's defaults)
# Norm-wise relative error allowed against the float64 product of the (rounded) inputs: float32 accumulates
# k ≤ 100 products in float32 (≲ k·2⁻²⁴ worst case, far less in norm); 16-bit outputs are rounded once to
# nearest, at most their unit roundoff per entry (2⁻⁹ bfloat16, 2⁻¹¹ float16): the bounds are twice that.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
DTYPES = list(RTOL)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def symmetric_matrix(batch: int, m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A symmetric (bit for bit) positive semidefinite matrix like a Gram matrix, spectral norm about 1."""
    X = randn(batch, m, m + 5, seed=seed)
    A = X @ X.mT
    A = A / torch.linalg.matrix_norm(A, ord=2, keepdim=True)
    A = A.to(dtype)
    return torch.tril(A) + torch.tril(A, -1).mT  # exact symmetry after rounding


def test_dispatch_flags() -> None:
    assert triton_available() is True
    assert use_triton(torch.zeros(2, 2)) is False  # CPU tensors always take the torch path


def test_block_is_what_the_tests_assume() -> None:
    assert [c.kwargs for c in symmetric._configs()] == [{"BLOCK_M": BLOCK, "BLOCK_K": BLOCK}]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 37, 53),  # ragged m and k (neither a multiple of the block)
        (3, 37, 53),  # a batch
        (2, 20, 9),  # m and k smaller than one block
        (1, 70, 40),  # three tile rows: mirrored off-diagonal tiles, a partial last tile row
        (1, 64, 64),  # exact multiples of the block: no masking at all
    ],
)
def test_sym_gram_matches_float64(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    X = randn(*shape, dtype=dtype)
    out = sym_gram(X)
    ref = X.double() @ X.double().mT
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel(out, ref) < RTOL[dtype]
    assert torch.equal(out, out.mT)  # symmetric bit for bit, diagonal tiles included


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_outputs_are_rounded_to_nearest(dtype: torch.dtype) -> None:
    """One rounding of the float32 accumulator to nearest: the entries equal the float64 product rounded to
    ``dtype`` except within float32 accumulation error of a rounding boundary (truncation would match ~half)."""
    X = randn(2, 70, 53, dtype=dtype)
    ref = X.double() @ X.double().mT
    assert (sym_gram(X) == ref.to(dtype)).double().mean() > 0.99
    A = symmetric_matrix(2, 70, dtype)
    Ad = A.double()
    assert (sym_poly(A, -4.775, 2.0315) == (-4.775 * Ad + 2.0315 * Ad @ Ad).to(dtype)).double().mean() > 0.99


def test_sym_gram_float32_elementwise() -> None:
    """Entry by entry, not just in norm: each entry within float32 accumulation error of |X||X|ᵀ."""
    X = randn(2, 70, 53)
    out = sym_gram(X).double()
    Xd = X.double()
    bound = 53 * 2.0**-24 * (Xd.abs() @ Xd.abs().mT)
    assert bool(((out - Xd @ Xd.mT).abs() <= bound).all())


def test_sym_gram_many_tile_rows() -> None:
    """T = 10 tile rows, 55 lower tiles: the closed-form triangle index p → (i, j) covers every tile once."""
    X = randn(1, 300, 3)
    ref = X.double() @ X.double().mT
    assert rel(sym_gram(X), ref) < 1e-6


def test_two_d_input_gives_two_d_output() -> None:
    X = randn(37, 53)
    out = sym_gram(X)
    assert out.shape == (37, 37)
    assert rel(out, X.double() @ X.double().T) < 1e-5
    A = symmetric_matrix(1, 37, torch.float32)[0]
    P = sym_poly(A, 1.5, -0.5)
    assert P.shape == (37, 37)
    assert rel(P, 1.5 * A.double() - 0.5 * A.double() @ A.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input_uses_strides(dtype: torch.dtype) -> None:
    Y = randn(3, 53, 37, dtype=dtype)
    X = Y.mT  # (3, 37, 53), unit stride along m instead of k
    assert not X.is_contiguous()
    out = sym_gram(X)
    assert torch.equal(out, sym_gram(X.contiguous()))  # same values loaded, same arithmetic
    assert rel(out, X.double() @ X.double().mT) < RTOL[dtype]
    Z = randn(6, 37, 80, dtype=dtype)[::2, :, 5:58]  # batch stride and column offset
    assert torch.equal(sym_gram(Z), sym_gram(Z.contiguous()))
    A = symmetric_matrix(3, 37, dtype)
    At = A.mT  # the same symmetric values through transposed strides
    assert torch.equal(sym_poly(At, -4.775, 2.0315), sym_poly(A, -4.775, 2.0315))


def test_64_bit_offsets_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int64 address path (for matrices of ≥ 2³¹ elements) gives the same bits as the int32 one."""
    X = randn(2, 37, 53)
    expected = sym_gram(X)
    monkeypatch.setattr(symmetric, "_INT32_LIMIT", 0)
    assert torch.equal(sym_gram(X), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, c", [JORDAN[1:], (1.5, -0.7), (-2.0, -1.0), (0.5, 0.0), (0.0, 3.0)])
@pytest.mark.parametrize("shape", [(3, 37), (1, 70), (1, 20)])
def test_sym_poly_matches_float64(shape: tuple[int, int], b: float, c: float, dtype: torch.dtype) -> None:
    batch, m = shape
    A = symmetric_matrix(batch, m, dtype, seed=m)
    out = sym_poly(A, b, c)
    Ad = A.double()
    ref = b * Ad + c * (Ad @ Ad)
    assert out.shape == A.shape and out.dtype == dtype
    assert rel(out, ref) < RTOL[dtype]
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ns_step_from_kernels_equals_torch_step(dtype: torch.dtype) -> None:
    """One quintic NS step with A = sym_gram(X), B = sym_poly(A, b, c), X ← aX + BX (torch.baddbmm) against
    orthoptim's torch step (bmm/baddbmm) and float64: equal to the rounding of the compute dtype."""
    a, b, c = JORDAN
    X64 = randn(2, 30, 50)
    X64 = X64 / torch.linalg.matrix_norm(X64, keepdim=True)
    X = X64.to(dtype)
    A = sym_gram(X)
    step = torch.baddbmm(X, sym_poly(A, b, c), X, beta=a)
    torch_step = newton_schulz(X, [(a, b, c)])
    Xd = X.double()
    Ad = Xd @ Xd.mT
    ref = a * Xd + (b * Ad + c * Ad @ Ad) @ Xd
    # float32: accumulation error only; bfloat16: A, bA + cA² and the output each rounded once (measured ~1.7e-3).
    tol = 1e-6 if dtype == torch.float32 else 2.0**-7
    assert rel(step, ref) < tol
    assert rel(torch_step, ref) < tol
    assert rel(step, torch_step.double()) < tol


def test_float64_and_empty_inputs_take_torch() -> None:
    X = randn(2, 5, 7, dtype=torch.float64)
    assert torch.equal(sym_gram(X), X @ X.mT)
    A = X @ X.mT
    assert torch.equal(sym_poly(A, 2.0, -1.0), torch.baddbmm(A, A, A, beta=2.0, alpha=-1.0))
    assert torch.equal(sym_gram(torch.empty(2, 4, 0)), torch.zeros(2, 4, 4))
    assert sym_gram(torch.empty(0, 4, 3)).shape == (0, 4, 4)
    assert sym_poly(torch.empty(3, 0, 0), 1.0, 1.0).shape == (3, 0, 0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sym_gram(torch.zeros(5)), "2-D"),
        (lambda: sym_gram(torch.zeros(2, 2, 3, 4)), "2-D"),
        (lambda: sym_gram(torch.zeros(3, 4, dtype=torch.int32)), "float32"),
        (lambda: sym_gram(torch.zeros(3, 4, dtype=torch.bool)), "float32"),
        (lambda: sym_gram(torch.zeros(3, 4, dtype=torch.complex64)), "float32"),
        (lambda: sym_poly(torch.zeros(3, 4), 1.0, 1.0), "square"),
        (lambda: sym_poly(torch.zeros(2, 3, 4), 1.0, 1.0), "square"),
        (lambda: sym_poly(torch.zeros(4), 1.0, 1.0), "2-D"),
        (lambda: sym_poly(torch.zeros(3, 3, dtype=torch.int64), 1.0, 1.0), "float32"),
    ],
)
def test_bad_input_is_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_without_triton_the_kernels_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert use_triton(torch.zeros(2, 2)) is False
    with pytest.raises(RuntimeError, match=r"triton.*not installed"):
        sym_gram(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"triton.*not installed"):
        sym_poly(torch.zeros(3, 3), 1.0, 1.0)


def test_module_imports_without_triton() -> None:
    """In a fresh interpreter where ``import triton`` fails: the dispatch module imports, reports no triton,
    keeps CUDA tensors on the torch path, and the kernels raise a RuntimeError naming triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from orthoptim.polar import kernels\n"
        "assert kernels.triton_available() is False\n"
        "try:\n"
        "    kernels.sym_gram(torch.zeros(3, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e) and 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("normalization", ["frobenius", "schatten4"])
def test_orthogonalize_through_the_kernels(monkeypatch: pytest.MonkeyPatch, normalization: str) -> None:
    """The engine's dispatch (newton_schulz._kernels_for) wired to the kernels, here for CPU bf16 tensors under the
    interpreter: orthogonalize must equal its torch path up to bf16 rounding, and both the SVD polar factor's
    neighbourhood (5 steps on a well-conditioned matrix)."""
    import orthoptim
    from orthoptim.polar import newton_schulz as ns_module

    G = torch.randn(2, 40, 70, generator=torch.Generator().manual_seed(4))
    kw = {"compute_dtype": "bfloat16", "normalization": normalization, "iteration": "standard"}
    torch_path = orthoptim.orthogonalize(G, **kw)  # type: ignore[arg-type]
    calls: list[str] = []
    real_gram, real_poly = kernels.sym_gram, kernels.sym_poly

    def counting_gram(X: torch.Tensor) -> torch.Tensor:
        calls.append("gram")
        return real_gram(X)

    def counting_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
        calls.append("poly")
        return real_poly(A, b, c)

    monkeypatch.setattr(ns_module, "_kernels_for", lambda X: X.dtype == torch.bfloat16)
    monkeypatch.setattr(kernels, "sym_gram", counting_gram)
    monkeypatch.setattr(kernels, "sym_poly", counting_poly)
    kernel_path = orthoptim.orthogonalize(G, **kw)  # type: ignore[arg-type]
    # Every step's two symmetric products: once per batch, or once per matrix for large matrices on the CPU
    # (newton_schulz._per_matrix_on_cpu); Schatten-4 computes the first Gram product in the normalization.
    per = G.shape[0] if ns_module.iterates_matrix_by_matrix(G.shape, G.device) else 1
    grams = 1 + 4 * per if normalization == "schatten4" else 5 * per
    assert calls.count("gram") == grams and calls.count("poly") == 5 * per
    assert (kernel_path - torch_path).abs().max() < 0.02  # measured 0.004 (frobenius), 2.4e-4 (schatten4)
    polar = orthoptim.polar(G.double())
    for out in (kernel_path, torch_path):
        assert torch.linalg.matrix_norm(out.double() - polar, ord=2).max() < 0.2  # measured 0.13-0.14
