"""Shared helpers: matrices with a prescribed spectrum, built in float64 from random orthogonal factors."""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's interpreter on a machine without a GPU; it is read when a kernel is
    # decorated, i.e. when its module is first imported, which no test module does at import time before this.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_interpreted_fused_kernels() -> None:
    """Skip unless the step's fused kernels (``orthoptim.optim.backends.triton_kernels``) run under Triton's
    interpreter, the only way they run on CPU tensors, and that interpreter evaluates ``tl.fma`` with one rounding
    as a GPU does (Triton 3.9's does; 3.6's multiplies and adds, rounding twice: bit-for-bit tests would fail there
    for the interpreter's sake, not the kernels')."""
    pytest.importorskip("triton")
    from orthoptim.optim.backends import triton_kernels as fused_kernels

    if not fused_kernels.INTERPRETED:
        pytest.skip("the fused kernels were compiled for a GPU (TRITON_INTERPRET was not set at their import)")
    if not _interpreter_fma_rounds_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice (before 3.9); the GPU tests cover the kernels")


@functools.cache
def _interpreter_fma_rounds_once() -> bool:
    """fma(1 + 2⁻¹², 1 + 2⁻¹², −1) = 2⁻¹¹ + 2⁻²⁴ exactly; rounding the product first loses the 2⁻²⁴ (a tie)."""
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]

    @triton.jit
    def fma_kernel(x_ptr, out_ptr):  # type: ignore[no-untyped-def]
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -1.0))

    out = torch.zeros(1)
    fma_kernel[(1,)](torch.tensor([1.0 + 2.0**-12]), out)
    return float(out) == 2.0**-11 + 2.0**-24


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A rows×cols float64 matrix with orthonormal columns (rows ≥ cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return (G, U, V) with G = U diag(s) Vᵀ in float64, U m×k and V n×k orthonormal, k = len(s)."""
    gen = torch.Generator().manual_seed(seed)
    k = s.numel()
    U = orthonormal(m, k, gen)
    V = orthonormal(n, k, gen)
    return (U * s.to(torch.float64)) @ V.T, U, V


def gains(O: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """UᵀOV in float64: its diagonal is the gain along each input singular direction."""
    return U.T @ O.to(torch.float64) @ V


#: Shapes that take the CPU's large-matrix paths once ``cpu_paths_at_small_sizes`` has lowered their thresholds:
#: matrix by matrix, symmetric row blocks (70 rows: an uneven last block), a megabatch of two, a tall one.
SMALL_LARGE = [(40, 130), (130, 40), (40, 130), (70, 70)]


@pytest.fixture
def cpu_paths_at_small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the sizes from which the CPU iterates matrix by matrix and computes symmetric products in row blocks
    (``newton_schulz.PER_MATRIX_MIN_*``, ``SYMMETRIC_MIN_ROWS``), so a test takes those paths on small matrices:
    at their real sizes a bfloat16 product costs seconds on CPUs that emulate bfloat16."""
    from orthoptim.polar import newton_schulz

    monkeypatch.setattr(newton_schulz, "SYMMETRIC_MIN_ROWS", 64)
    monkeypatch.setattr(newton_schulz, "PER_MATRIX_MIN_ROWS", 32)
    monkeypatch.setattr(newton_schulz, "PER_MATRIX_MIN_ENTRIES", 1024)
    assert all(newton_schulz.iterates_matrix_by_matrix(s, torch.device("cpu")) for s in SMALL_LARGE)
