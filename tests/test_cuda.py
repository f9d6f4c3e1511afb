"""GPU checks, run where torch sees a CUDA device (skipped elsewhere, as on this project's CI machine).

What the CPU suite cannot check: the compiled Triton kernels, the step's accelerator paths on real CUDA tensors
(the CPU suite forces them onto CPU tensors), that no host sync happens where none is promised
(``torch.cuda.set_sync_debug_mode("error")``), and a captured CUDA graph of the step with a live tensor lr.

Run this file in its own process — ``pytest tests/test_cuda.py``, as ``benchmarks/gpu_session.sh`` does first:
``tests/test_kernels.py`` sets ``TRITON_INTERPRET=1`` for the CPU interpreter, and once the kernels have been
imported that way the compiled-kernel tests here skip (saying so).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim.backends import torch as torch_backend
from orthoptim.optim.backends import triton as fused
from orthoptim.polar import kernels, polar
from orthoptim.polar.workspace import Workspace

from .conftest import with_spectrum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _not_under_the_interpreter() -> None:
    """In a whole-suite run tests/test_kernels.py has set TRITON_INTERPRET=1 (at collection): the kernels would run
    interpreted on GPU tensors. These tests are for the compiled ones: run this file alone."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process (tests/test_kernels.py): run `pytest tests/test_cuda.py` alone")


CUDA = torch.device("cuda")
JORDAN = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon muon.py, torch.optim._muon DEFAULT_A/B/C
# Norm-wise relative error against float64 of the rounded inputs: 16-bit outputs are rounded once (2⁻⁹ bfloat16,
# 2⁻¹¹ float16 unit roundoff; bounds at twice that), float32 ("ieee" dot: no TF32) accumulates in float32.
RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float32: 1e-5}


def compiled_kernels() -> None:
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    from orthoptim.polar.kernels import symmetric

    if symmetric.INTERPRETED:
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1: run `pytest tests/test_cuda.py` alone")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 130, 70), (2, 300, 1000), (1, 768, 3072)])
def test_compiled_sym_gram_matches_float64(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    compiled_kernels()
    X = randn(*shape).to(dtype).to(CUDA)
    got = kernels.sym_gram(X)
    ref = X.double() @ X.double().mT
    assert got.dtype == dtype and got.shape == (shape[0], shape[1], shape[1])
    assert rel(got, ref) < RTOL[dtype]
    assert torch.equal(got, got.mT)  # lower tiles computed, upper ones mirrored: exactly symmetric


@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 37), (3, 130), (2, 768)])
def test_compiled_sym_poly_matches_float64(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    compiled_kernels()
    batch, m = shape
    X = randn(batch, m, m + 9, seed=1)
    A = X @ X.mT
    A = (A / torch.linalg.matrix_norm(A, ord=2, keepdim=True)).to(dtype)
    A = (torch.tril(A) + torch.tril(A, -1).mT).to(CUDA)  # exactly symmetric after rounding
    b, c = JORDAN[1], JORDAN[2]
    got = kernels.sym_poly(A, b, c)
    A64 = A.double()
    assert rel(got, b * A64 + c * A64 @ A64) < RTOL[dtype]
    assert torch.equal(got, got.mT)


@pytest.mark.parametrize("iteration", ["standard", "gram"])
def test_orthogonalize_on_cuda_gives_the_float64_polar_factor(iteration: str) -> None:
    """bfloat16 (the kernels where triton is installed) and float32 (cuBLAS) against the float64 SVD polar factor,
    wide and tall, as the CPU suite checks its own path."""
    s = torch.logspace(0, -1, 520, dtype=torch.float64)
    G = torch.stack([with_spectrum(520, 600, s, seed=k)[0] for k in (3, 4)])
    for tall in (False, True):
        X = G.mT.contiguous() if tall else G
        P = polar(X)
        for dtype, tol in ((torch.bfloat16, 0.03), (torch.float32, 5e-5)):
            if iteration == "gram" and dtype == torch.bfloat16:
                continue  # "auto" never takes the Gram form in bfloat16 (tests/test_gram.py)
            O = orthoptim.orthogonalize(
                X.float().to(CUDA), schedule="polar_express", steps=8, compute_dtype=dtype, iteration=iteration
            )
            assert O.device.type == "cuda"
            assert float(torch.linalg.matrix_norm(O.cpu().double() - P, ord=2).max()) < tol


def _params(shapes: list[tuple[int, ...]], device: torch.device, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


SHAPES = [(64, 192), (64, 192), (192, 64), (48, 48), (16, 8, 3, 3)]


def _grads(shapes: list[tuple[int, ...]], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("cls", [orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad], ids=lambda c: c.__name__)
def test_the_cuda_step_matches_the_cpu_step(cls: type) -> None:
    """The same optimizer on CUDA and on the CPU, float32 compute (no bfloat16 rounding to hide behind): the
    parameters agree to float32 accuracy after a few steps, through a skipped step (NaN gradient) too."""
    results = []
    for device in (torch.device("cpu"), CUDA):
        ps = _params(SHAPES, device)
        opt = cls(ps, lr=0.02, weight_decay=0.1, compute_dtype="float32", warn_nonfinite=False)
        for k in range(4):
            for p, g in zip(ps, _grads(SHAPES, k), strict=True):
                p.grad = g.to(device)
            if k == 2:
                ps[1].grad.view(-1)[5] = float("nan")  # type: ignore[union-attr]
            opt.step()
        assert opt.nonfinite_skips == 1
        results.append([p.detach().cpu() for p in ps])
    for a, b in zip(*results, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("warn", [False, True], ids=["selects", "reads flag"])
def test_the_fused_kernels_give_the_bits_of_torchs_cuda_ops(
    dtype: torch.dtype, warn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The triton backend's fused kernels compiled for this GPU (``optim/backends/triton.py``) against the step by
    torch's CUDA ops (foreach lerp, mul by the decay factor, add with α: the same roundings, each lerp and the add
    one fused multiply-add as nvcc contracts them): parameters and buffers bit for bit after four steps, one
    skipped (NaN). lr 2⁻⁴ and √(m/n) ∈ {1, 2} keep α exact in bfloat16. On a mismatch the message gives the
    largest difference, to tell a contraction difference (one unit in the last place) from a bug."""
    compiled_kernels()
    shapes = [(256, 512), (512, 128), (3, 96, 200), (384, 384)]
    launched: list[object] = []
    real_launch = fused._launch

    def counted(kernel: object, *args: object, **meta: object) -> None:
        launched.append(kernel)
        real_launch(kernel, *args, **meta)

    monkeypatch.setattr(fused, "_launch", counted)
    results = []
    for backend in ("torch", "triton"):
        ps = [nn.Parameter(p.detach().to(dtype)) for p in _params(shapes, CUDA)]
        opt = orthoptim.Muon(
            ps, lr=2.0**-4, weight_decay=0.1, scale_mode="original", warn_nonfinite=warn, backend=backend
        )
        for k in range(4):
            for p, g in zip(ps, _grads(shapes, k), strict=True):
                p.grad = g.to(CUDA, dtype)
            if k == 2:
                ps[1].grad.view(-1)[5] = float("nan")  # type: ignore[union-attr]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        assert opt.nonfinite_skips == 1
        results.append([t.detach().clone() for p in ps for t in (p, opt.state[p]["momentum_buffer"])])
    assert launched, "the fused kernels did not run"
    worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(*results, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True)), f"largest difference {worst:.3g}"


def test_fused_tables_built_on_one_stream_serve_another() -> None:
    """The fused kernels' address tables are copied to the GPU without a sync on the stream of the first step; a
    step on another stream waits for that copy (``fused.PointerTables``): the same bits as steps on one stream."""
    compiled_kernels()
    shapes = SHAPES[:4]
    one, two = _params(shapes, CUDA), _params(shapes, CUDA)
    opts = [orthoptim.Muon(ps, lr=0.02, warn_nonfinite=False, backend="triton") for ps in (one, two)]
    side = torch.cuda.Stream()
    for k in range(3):
        for ps in (one, two):
            for p, g in zip(ps, _grads(shapes, k), strict=True):
                if k == 0:
                    p.grad = g.to(CUDA)
                else:
                    p.grad.copy_(g)  # type: ignore[union-attr]  # the same tensors: the same tables
        opts[0].step()
        if k == 0:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opts[1].step()  # the tables are built here
            torch.cuda.current_stream().wait_stream(side)
        else:
            opts[1].step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_torch_commit_decays_16_bit_parameters_in_float32(dtype: torch.dtype) -> None:
    """Without the fused kernels, 16-bit parameters on CUDA are decayed by the float32 factor (on CUDA a 0-d
    float32 CUDA tensor would be cast to 16 bits first: 0.99 → 0.98828125 in bfloat16), with a host float, a
    device flag and a tensor decay alike."""
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, 48, generator=gen).to(CUDA, dtype) for _ in range(3)]
    want = [(t.float() * torch.tensor(0.99, dtype=torch.float32, device=CUDA)).to(dtype) for t in ts]
    rounded = [t * torch.tensor(0.99, device=CUDA).to(dtype) for t in ts]  # the factor rounded to 16 bits first
    assert not all(torch.equal(a, b) for a, b in zip(want, rounded, strict=True))  # the test can tell them apart
    scratch = Workspace()
    flags = [torch_backend.StepFlag(None), torch_backend.StepFlag(torch.tensor(True, device=CUDA))]
    for flag, decay in [(flags[0], 0.99), (flags[1], 0.99), (flags[0], torch.tensor(0.99, device=CUDA))]:
        got = [t.clone() for t in ts]
        torch_backend._decay_params(got, decay, flag, scratch)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (flag.ok, decay)
    got = [t.clone() for t in ts]
    torch_backend._decay_params(got, 0.99, torch_backend.StepFlag(torch.tensor(False, device=CUDA)), scratch)
    assert all(torch.equal(a, b) for a, b in zip(got, ts, strict=True))  # a skipped step: factor 1


def test_muon_on_cuda_matches_torch_optim_muon() -> None:
    """torch's math on CUDA (the Triton kernels where installed) against torch.optim.Muon on CUDA: the distance
    between the two relative to how far the parameters moved, as the CPU suite measures it (< 0.03)."""
    ours, theirs = _params(SHAPES[:4], CUDA), _params(SHAPES[:4], CUDA)
    start = [p.detach().clone() for p in ours]
    opt = orthoptim.Muon(ours, lr=0.02, ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16")
    ref = torch.optim.Muon(theirs, lr=0.02)
    for k in range(6):
        for p, q, g in zip(ours, theirs, _grads(SHAPES[:4], k), strict=True):
            p.grad, q.grad = g.to(CUDA), g.to(CUDA)
        opt.step()
        ref.step()
    for a, b, w in zip(ours, theirs, start, strict=True):
        assert float(((a - b).norm() / (b - w).norm()).detach()) < 0.03  # same math, bf16 rounding apart


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_no_host_sync_in_the_step_without_the_warning(nonfinite: str, backend: str) -> None:
    """``warn_nonfinite=False`` (and ``"propagate"``): not one synchronizing CUDA call in a steady-state step —
    torch raises on any under ``set_sync_debug_mode("error")``. Hybrid covers the fused AdamW half too."""
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 100)).to(CUDA)
    lr = torch.tensor(0.02, device=CUDA)
    opt = orthoptim.Hybrid(model, lr=lr, nonfinite=nonfinite, warn_nonfinite=False, backend=backend)
    x = torch.randint(0, 100, (8, 16), device=CUDA)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        model(x).logsumexp(-1).mean().backward()
        if step < 2:
            opt.step()  # state, kernel autotuning
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_captured_step_replays_the_eager_step_and_follows_a_tensor_lr(backend: str) -> None:
    """The step captured in a CUDA graph (warn_nonfinite=False, a tensor lr on the device): each replay gives the
    bits of an eager step on the same state, and a scheduler's in-place lr change reaches the replay."""
    shapes = SHAPES[:4]
    eager, captured = _params(shapes, CUDA), _params(shapes, CUDA)
    lrs = [torch.tensor(0.02, device=CUDA) for _ in range(2)]
    opts = [
        orthoptim.Muon(ps, lr=lr, warn_nonfinite=False, backend=backend)
        for ps, lr in zip((eager, captured), lrs, strict=True)
    ]
    for ps in (eager, captured):
        for p, g in zip(ps, _grads(shapes, 0), strict=True):
            p.grad = g.to(CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (state, autotuning), the same on both
            for opt in opts:
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[1].step()  # recorded, not run
    for k in range(4):
        if k == 2:
            for lr in lrs:
                lr.fill_(0.005)  # as a scheduler does for a tensor lr
        for ps in (eager, captured):
            for p, g in zip(ps, _grads(shapes, k + 1), strict=True):
                p.grad.copy_(g.to(CUDA))  # type: ignore[union-attr]  # the same .grad tensors the graph reads
        opts[0].step()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager, captured, strict=True):
            assert torch.equal(a, b), k


def test_bench_times_the_graph_replay_beside_the_eager_step() -> None:
    """``orthoptim bench`` on the GPU, CUDA-graph row included: every row timed with CUDA events, and the graph
    row's first update (taken eagerly, before the capture) is the eager row's, bit for bit."""
    from orthoptim.bench import run_bench

    names = ["torch_muon", "muon_no_sync", "muon_graph"]
    report = run_bench([(64, 192), (192, 64)] * 2, names, device="cuda", warmup=1, repeats=3, progress=False)
    rows = {r.name: r for r in report.rows}
    assert all(len(r.times_ms) == 3 and min(r.times_ms) > 0 for r in report.rows)
    assert rows["muon_graph"].update_vs_baseline == rows["muon_no_sync"].update_vs_baseline
    assert report.device_name == torch.cuda.get_device_name(CUDA)
