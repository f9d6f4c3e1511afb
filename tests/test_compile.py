"""The orthogonalization path is capturable: ``torch.compile(fullgraph=True)`` traces it without a graph break.

A graph break would come from data-dependent Python control flow or a host sync (``.item()``, ``bool(tensor)``),
exactly what would also break CUDA-graph capture; ``fullgraph=True`` turns any of them into an error. The
non-finite check of ``nonfinite="raise"`` is such a sync by design, so compiled callers use ``"propagate"``
(the optimizers' ``"skip"`` policy decides on the device). The optimizers' whole step also compiles
(``torch.compile(opt.step)``, graph breaks allowed) to the eager step's bits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import orthoptim

pytestmark = pytest.mark.slow  # compiling; `make test-fast` leaves it out

CONFIGS = [
    {"normalization": "schatten4"},
    {"normalization": "frobenius"},
    {"normalization": "aol"},
    {"iteration": "standard"},
    {"iteration": "gram"},
    {"compute_dtype": "bfloat16"},
    {"schedule": "jordan", "normalization": "frobenius", "steps": 5},
    {"schedule": "deepseekv4", "iteration": "gram"},  # restarts inside the traced loop
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fullgraph_trace_equals_eager(config: dict[str, object]) -> None:
    G = torch.randn(3, 24, 72, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: orthoptim.orthogonalize(x, nonfinite="propagate", **config),  # type: ignore[arg-type]
        fullgraph=True,
        backend="aot_eager",  # Dynamo capture + AOT autograd functionalization, no code generation
    )
    for X in (G, G.mT, 1e-30 * G):  # both orientations and a scale the eager path handles exactly
        eager = orthoptim.orthogonalize(X, nonfinite="propagate", **config)  # type: ignore[arg-type]
        assert torch.equal(compiled(X), eager)


def test_inductor_compiles_and_matches_svd_polar() -> None:
    """The default path through Inductor's CPU code generation (slow to compile; one configuration)."""
    G = torch.randn(2, 16, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: orthoptim.orthogonalize(x, nonfinite="propagate", schedule="polar_express", steps=8), fullgraph=True
    )
    out = compiled(G.float())
    eager = orthoptim.orthogonalize(G.float(), schedule="polar_express", steps=8)
    assert (out - eager).abs().max() < 1e-4  # fp32, other fusion and summation order
    assert torch.linalg.matrix_norm(out.double() - orthoptim.polar(G), ord=2).max() < 2e-2


@pytest.mark.parametrize("iteration", ["standard", "gram"])
def test_fullgraph_trace_of_large_cpu_matrices(iteration: str, cpu_paths_at_small_sizes: None) -> None:
    """Matrices that take the CPU's own eager paths (matrix-by-matrix loop with a workspace; row-block symmetric
    products, which the trace replaces by full products; both at small sizes here) trace too."""
    from orthoptim.polar.newton_schulz import SYMMETRIC_MIN_ROWS, iterates_matrix_by_matrix

    G = torch.randn(2, SYMMETRIC_MIN_ROWS + 6, 130, generator=torch.Generator().manual_seed(2))
    assert iterates_matrix_by_matrix(G.shape, G.device)
    torch._dynamo.reset()
    kw = {
        "nonfinite": "propagate",
        "compute_dtype": "float32",
        "iteration": iteration,
        "schedule": "polar_express",
        "steps": 8,
    }
    compiled = torch.compile(lambda x: orthoptim.orthogonalize(x, **kw), fullgraph=True, backend="aot_eager")  # type: ignore[arg-type]
    out = compiled(G)
    eager = orthoptim.orthogonalize(G, **kw)  # type: ignore[arg-type]
    assert (out - eager).abs().max() < 1e-4  # full vs row-block products: rounding apart
    assert torch.linalg.matrix_norm(out.double() - orthoptim.polar(G.double()), ord=2).max() < 2e-2  # float64 SVD


TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def _eager_and_compiled(make: Any, steps: int, **compile_kw: Any) -> tuple[list[Tensor], list[Tensor], Any, Any]:
    """Twin parameter sets (two matrices and a vector), one stepped eagerly and one through
    ``torch.compile(opt.step, **compile_kw)``, on the same random gradients for ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16, 48), (24,)]
    eager = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    traced = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    opt_eager, opt_traced = make(eager), make(traced)
    step = torch.compile(opt_traced.step, **compile_kw)
    for _ in range(steps):
        for a, b in zip(eager, traced, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt_eager.step()
        step()
    return eager, traced, opt_eager, opt_traced


STEP_MAKERS = {
    "muon": lambda ps: orthoptim.Muon(ps[:2], lr=0.02),
    "muon-no-warning": lambda ps: orthoptim.Muon(ps[:2], lr=0.02, warn_nonfinite=False),
    "normuon-propagate": lambda ps: orthoptim.NorMuon(ps[:2], lr=0.02, nonfinite="propagate"),
    "polargrad": lambda ps: orthoptim.PolarGrad(ps[:2], lr=1e-3),
    "hybrid": lambda ps: orthoptim.Hybrid((ps[:2], ps[2:]), lr=0.02),
}


@pytest.mark.parametrize(("name", "backend"), [*((n, "eager") for n in STEP_MAKERS), ("muon-no-warning", "aot_eager")])
def test_a_compiled_step_equals_the_eager_step(name: str, backend: str) -> None:
    """``torch.compile(opt.step)`` as torch.optim users write it (graph breaks allowed where a policy reads the
    flag): the same parameters and state, bit for bit, over three steps. Regression: torch 2.13's Dynamo
    intercepted an optimizer attribute named ``_group`` (a substring of ``"_init_group"``), which made a local
    optimizer take the distributed branch and fail."""
    eager, traced, opt_eager, opt_traced = _eager_and_compiled(STEP_MAKERS[name], 3, backend=backend)
    # Bit for bit on torch ≥ 2.13. torch 2.11's Dynamo passes the step's Python floats (the lerp weight, the
    # update factor) as tensors, which moves last float32 bits (~3e-8 on weights of size ~1; seen 2026-11-23).
    same = torch.equal if TORCH >= (2, 13) else lambda x, y: torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    assert all(same(a, b) for a, b in zip(eager, traced, strict=True))
    for a, b in zip(eager, traced, strict=True):
        for key, value in opt_eager.state[a].items():
            assert same(value, opt_traced.state[b][key]), key


def test_inductor_compiles_a_hybrid_step() -> None:
    """Inductor (the default backend) on the whole Hybrid step: the orthogonalized half compiled (fused arithmetic
    moves last bits), the fused AdamW half run eagerly inside it, as torch.optim.AdamW(fused=True) is — Inductor
    cannot functionalize that in-place kernel, which failed the whole compile before."""
    eager, traced, _, _ = _eager_and_compiled(STEP_MAKERS["hybrid"], 2)
    for a, b in zip(eager, traced, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(eager[2], traced[2])  # the AdamW half ran the same kernel eagerly
