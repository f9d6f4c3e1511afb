"""orthogonalize against float64 SVD, torch.optim.Muon's routine, and its input contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import orthoptim
from orthoptim.polar import Workspace, composite, get_schedule, list_schedules, polar

from .conftest import gains, with_spectrum


def expected_gains(name: str, s: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Closed form: the output's gain along singular direction i is p(sᵢ / (margin·‖s‖₂)) (float64 scalars)."""
    sched = get_schedule(name)
    x = (s / (sched.margin * s.norm())).numpy()
    return torch.from_numpy(composite(sched.steps_coefficients(steps), x))


@pytest.mark.parametrize("name", list_schedules())
def test_float64_iteration_matches_closed_form(name: str) -> None:
    """In float64 the matrix iteration must act on each singular value exactly as the scalar polynomial."""
    s = torch.logspace(0, -2.5, 24, dtype=torch.float64)
    G, U, V = with_spectrum(24, 40, s, seed=5)
    O = orthoptim.orthogonalize(G, schedule=name, normalization="frobenius", compute_dtype=torch.float64)
    M = gains(O, U, V)
    assert torch.allclose(torch.diagonal(M), expected_gains(name, s), atol=1e-9)
    off = M - torch.diag(torch.diagonal(M))
    assert off.abs().max() < 1e-9


# Tolerances on the gain around the closed-form float64 value. bf16 rounds every entry by up to 2^-9 at each
# product. Measured worst cases on this test's matrix (float32 / bf16, CPU, standard form): jordan 6e-7 / 0.017,
# polar_express 4e-6 / 0.033. The Gram form (float32 only: "auto" never picks it in bf16) carries the product of
# all polynomials, whose norm grows to ~1/σmin, so its float32 rounding shows more: measured jordan 2e-4,
# polar_express 3e-4, polar_express_5 4e-4, cans 7e-4. The bounds leave room for other BLAS summation orders.
# cans is refused in bf16 (see test_schedules.py) and runs here in float32 only.
GAIN_TOL = {(torch.float32, "standard"): 2e-4, (torch.bfloat16, "standard"): 0.12, (torch.float32, "gram"): 2e-3}
LOW_PRECISION_CASES = [
    (name, dtype, iteration)
    for name in ("jordan", "polar_express", "polar_express_5", "cans", "you", "cubic5")
    for dtype, iteration in GAIN_TOL
    if not (name == "cans" and dtype == torch.bfloat16)
]


@pytest.mark.parametrize("name,compute_dtype,iteration", LOW_PRECISION_CASES)
def test_low_precision_gains_near_closed_form(name: str, compute_dtype: torch.dtype, iteration: str) -> None:
    s = torch.logspace(0, -2.5, 32, dtype=torch.float64)
    G, U, V = with_spectrum(32, 96, s, seed=6)
    O = orthoptim.orthogonalize(
        G.float(),
        schedule=name,
        normalization="frobenius",
        compute_dtype=compute_dtype,
        iteration=iteration,  # type: ignore[arg-type]
    )
    got = torch.diagonal(gains(O, U, V))
    assert (got - expected_gains(name, s)).abs().max() < GAIN_TOL[compute_dtype, iteration]


@pytest.mark.parametrize("steps,tol", [(6, 0.01), (8, 1e-3)])
def test_polar_express_converges_to_svd_polar(steps: int, tol: float) -> None:
    """More Polar Express steps → the float64 SVD polar factor (spectrum ≥ 1e-2·σmax, float32 compute)."""
    s = torch.logspace(0, -2, 20, dtype=torch.float64)
    G, _, _ = with_spectrum(20, 50, s, seed=7)
    O = orthoptim.orthogonalize(G.float(), schedule="polar_express", steps=steps, compute_dtype="float32")
    P = polar(G)
    assert torch.linalg.matrix_norm(O.double() - P, ord=2) < tol


def test_torch_muon_coefficients_match_torch_optim_muon() -> None:
    """With torch.optim.Muon's coefficients, steps and bf16 compute we reproduce its routine up to bf16."""
    muon_ns = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    G = torch.randn(64, 160, generator=torch.Generator().manual_seed(8))
    for A in (G, G.T):
        theirs = muon_ns(A, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
        ours = orthoptim.orthogonalize(
            A, schedule=(3.4445, -4.7750, 2.0315), steps=5, normalization="frobenius", compute_dtype="bf16"
        )
        assert ours.shape == A.shape
        rel = (ours - theirs).norm() / theirs.norm()
        assert rel < 0.03, rel  # bf16: a few roundings per step, same math


def test_batched_equals_loop() -> None:
    G = torch.randn(3, 2, 12, 20, generator=torch.Generator().manual_seed(9))
    G[1, 0] *= 1e-30  # wildly different scales inside one batch: each matrix is prescaled on its own
    G[2, 1] = 0.0
    out = orthoptim.orthogonalize(G)
    assert out.shape == G.shape
    for i in range(3):
        for j in range(2):
            single = orthoptim.orthogonalize(G[i, j])
            assert torch.allclose(out[i, j], single, atol=1e-6, rtol=0)
    assert torch.equal(out[2, 1], torch.zeros(12, 20))


def test_tall_is_transpose_of_wide() -> None:
    G = torch.randn(50, 18, generator=torch.Generator().manual_seed(10))
    assert torch.equal(orthoptim.orthogonalize(G), orthoptim.orthogonalize(G.T.contiguous()).T)
    assert torch.equal(orthoptim.orthogonalize(G.T), orthoptim.orthogonalize(G).T)


def test_zero_and_partially_zero() -> None:
    assert torch.equal(orthoptim.orthogonalize(torch.zeros(5, 7)), torch.zeros(5, 7))
    assert torch.equal(orthoptim.orthogonalize(torch.zeros(2, 3, 3, dtype=torch.bfloat16)), torch.zeros(2, 3, 3))
    # A zero row stays zero (its direction has σ = 0).
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(11))
    G[2] = 0
    out = orthoptim.orthogonalize(G)
    assert torch.equal(out[2], torch.zeros(9)) and torch.isfinite(out).all()


def test_nonfinite_raise_names_shape_and_propagate_gives_nan() -> None:
    G = torch.randn(2, 4, 5)
    G[1, 2, 3] = float("nan")
    with pytest.raises(orthoptim.NonFiniteError, match=r"shape \(2, 4, 5\).*1 of 2 matrices.*index 1"):
        orthoptim.orthogonalize(G)
    H = torch.randn(4, 5)
    H[0, 0] = float("inf")
    with pytest.raises(orthoptim.NonFiniteError, match=r"\(4, 5\)"):
        orthoptim.orthogonalize(H)
    out = orthoptim.orthogonalize(G, nonfinite="propagate")
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all()  # the clean matrix of the batch is untouched
    assert torch.isnan(orthoptim.orthogonalize(H, nonfinite="propagate")).all()


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (2000, 3), (3, 2000)])
def test_vectors_and_extreme_aspect_ratios(shape: tuple[int, int]) -> None:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = orthoptim.orthogonalize(G.float(), schedule="polar_express", steps=8, compute_dtype="float32")
    P = polar(G)
    assert out.shape == G.shape
    assert (out.double() - P).abs().max() < 1e-3


def test_non_contiguous_views() -> None:
    base = torch.randn(40, 60, generator=torch.Generator().manual_seed(13))
    view = base[::2, 1::3]  # strided, non-contiguous
    assert not view.is_contiguous()
    assert torch.equal(orthoptim.orthogonalize(view), orthoptim.orthogonalize(view.contiguous()))
    before = base.clone()
    orthoptim.orthogonalize(base)
    assert torch.equal(base, before)  # input untouched


def test_float16_extremes() -> None:
    """Entries up to fp16's max and entries deep in its subnormal range: the output acts on the singular
    values of the values actually passed as the float64 closed form says."""
    sched = get_schedule("polar_express")
    G = torch.randn(8, 12, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    big = (G / G.abs().max() * 65504).half()  # entries up to fp16's max
    tiny = (G / G.abs().max() * 2.0**-20).half()  # all below fp16's smallest normal (6.1e-5)
    assert bool((tiny.abs() < torch.finfo(torch.float16).tiny).all())
    for X in (big, tiny):
        out = orthoptim.orthogonalize(X, schedule="polar_express", normalization="frobenius", compute_dtype="float32")
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        expected = composite(sched.steps_coefficients(), (S / (sched.margin * S.norm())).numpy())
        M = U.T @ out.double() @ Vh.T
        assert (torch.diagonal(M) - torch.from_numpy(expected)).abs().max() < 5e-3  # fp16 output rounding
        assert (M - torch.diag(torch.diagonal(M))).abs().max() < 5e-3


def test_output_dtype_follows_input() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        G = torch.randn(5, 6).to(dtype)
        assert orthoptim.orthogonalize(G).dtype == dtype


@pytest.mark.parametrize(
    "bad,exc,pattern",
    [
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(3, 3, dtype=torch.complex64), TypeError, "complex"),
        (torch.ones(5), ValueError, "1 dim"),
        (torch.ones(0, 4), ValueError, "empty"),
        (torch.ones(2, 0, 4), ValueError, "empty"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_named(bad: object, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        orthoptim.orthogonalize(bad)  # type: ignore[arg-type]


def test_bad_options_are_named() -> None:
    G = torch.randn(3, 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        orthoptim.orthogonalize(G, schedule="nope")
    with pytest.raises(ValueError, match="steps"):
        orthoptim.orthogonalize(G, steps=0)
    with pytest.raises(TypeError, match="steps must be a positive int, got float"):
        orthoptim.orthogonalize(G, steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"workspace must be an orthoptim\.polar\.Workspace"):
        orthoptim.orthogonalize(G, workspace={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out is on meta, but G is on cpu"):
        orthoptim.orthogonalize(G, out=torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match="compute_dtype"):
        orthoptim.orthogonalize(G, compute_dtype="int8")
    with pytest.raises(ValueError, match="normalization"):
        orthoptim.orthogonalize(G, normalization="spectral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite"):
        orthoptim.orthogonalize(G, nonfinite="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refused"):
        orthoptim.orthogonalize(G, schedule="aol_emerging")


def test_auto_compute_dtype_follows_the_cpu() -> None:
    """None → bfloat16 on accelerators and on CPUs with native bf16 products, float32 on other CPUs; the probe is
    checked against the kernel's own CPU flags where Linux exposes them, and torch's kernel level (an AVX-512
    machine under ``ATEN_CPU_CAPABILITY=avx2`` computes, and chooses, as an AVX2 one)."""
    from pathlib import Path

    from orthoptim.polar.orthogonalize import cpu_has_native_bf16, resolve_compute_dtype

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        flags = set(next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")).split())
        avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        assert cpu_has_native_bf16() == (avx512 and bool(flags & {"avx512_bf16", "amx_tile"}))
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_compute_dtype(None, torch.device("cpu")) == want
    assert resolve_compute_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_compute_dtype("fp32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("iteration", ["standard", "gram"])
@pytest.mark.parametrize("normalization", ["frobenius", "schatten4"])
def test_out_and_workspace_give_the_float64_polar_factor(
    tall: bool, iteration: str, normalization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out=`` and ``workspace=`` (what the optimizers pass on the CPU): the result is written into ``out``,
    equals the float64 SVD polar factor to the compute dtype's accuracy and the plain call bit for bit, and a
    later call through the same workspace leaves the earlier result alone. The CPU's large-matrix paths (matrix
    by matrix through the workspace, row-block symmetric products with an uneven last block) taken at 70 rows by
    lowering their thresholds: at their real sizes (≥ 512 rows) bfloat16 products cost seconds where the CPU
    emulates them."""
    from orthoptim.polar import newton_schulz

    monkeypatch.setattr(newton_schulz, "SYMMETRIC_MIN_ROWS", 64)
    monkeypatch.setattr(newton_schulz, "PER_MATRIX_MIN_ROWS", 32)
    monkeypatch.setattr(newton_schulz, "PER_MATRIX_MIN_ENTRIES", 1024)
    m, n = 70, 90
    assert newton_schulz.iterates_matrix_by_matrix((m, n), torch.device("cpu"))
    s = torch.logspace(0, -1, m, dtype=torch.float64)
    G = torch.stack([with_spectrum(m, n, s, seed=k)[0] for k in (3, 4)])
    if tall:
        G = G.mT.contiguous()
    P = polar(G)
    kw: dict[str, Any] = dict(schedule="polar_express", steps=8, normalization=normalization, iteration=iteration)
    ws = Workspace()
    for dtype, tol in ((torch.bfloat16, 0.03), (torch.float32, 5e-5)):
        plain = orthoptim.orthogonalize(G.float(), compute_dtype=dtype, **kw)
        for out_dtype in (dtype, torch.float32):  # the compute dtype (written directly) or a copy into out
            wide = torch.empty(2, m, n, dtype=out_dtype)
            out = wide.mT if tall else wide
            got = orthoptim.orthogonalize(
                G.float(), compute_dtype=dtype, out_dtype=out_dtype, out=out, workspace=ws, **kw
            )
            assert got is out
            assert float(torch.linalg.matrix_norm(got.double() - P, ord=2).max()) < tol
            assert torch.equal(got, plain.to(out_dtype))
            kept = got.clone()
            orthoptim.orthogonalize(-2.0 * G.float(), compute_dtype=dtype, workspace=ws, **kw)
            assert torch.equal(got, kept)


def test_bad_out_is_named() -> None:
    G = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="shape"):
        orthoptim.orthogonalize(G, out=torch.empty(2, 12, 8))
    with pytest.raises(ValueError, match="dtype"):
        orthoptim.orthogonalize(G, out=torch.empty(2, 8, 12, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="share memory"):
        orthoptim.orthogonalize(G, out=G)
    both = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="share memory"):
        orthoptim.orthogonalize(both[0], out=both.view(-1)[4:100].view(8, 12))  # overlapping windows of one buffer
    got = orthoptim.orthogonalize(both[0], out=both[1], compute_dtype="float32")  # separate halves: allowed
    assert got is not None and torch.equal(both[1], orthoptim.orthogonalize(both[0].clone(), compute_dtype="float32"))


def test_overwrite_input_is_ignored_for_an_expanded_input() -> None:
    """Stride-0 dims make one element stand for many: such a G cannot be scratch space, so the call copies."""
    G = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(5)).expand(3, 16, 32)
    got = orthoptim.orthogonalize(G, overwrite_input=True, compute_dtype="float32")
    assert torch.equal(got, orthoptim.orthogonalize(G.contiguous(), compute_dtype="float32"))
