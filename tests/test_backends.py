"""The step's backends (``optim/backends``): the float64 ``reference`` written from the papers' formulas, the
stacked ``torch`` backend with the CPU's and CUDA's choices, and how one is chosen.

The reference is itself checked against an independent oracle (the float64 SVD polar factor); the torch backend
is then held to the reference after several steps of every optimizer, every normalization and the shapes the
optimizers take (wide, tall, conv, stacked 3-D), within float32 rounding.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim import BACKENDS
from orthoptim.optim.backends import Backend, select_backend

SHAPES = [(24, 40), (40, 24), (8, 6, 3, 3), (3, 10, 12)]


def _train(make: object, dtype: torch.dtype, steps: int = 4, nan_at: int | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
    opt = make(params)  # type: ignore[operator]
    for k in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        if k == nan_at:
            params[1].grad.view(-1)[3] = math.nan  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning
            opt.step()
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + [t.clone() for t in state]


MAKERS = {
    "Muon": lambda backend, **kw: lambda ps: orthoptim.Muon(ps, lr=0.02, weight_decay=0.1, backend=backend, **kw),
    "NorMuon": lambda backend, **kw: lambda ps: orthoptim.NorMuon(ps, lr=0.02, weight_decay=0.1, backend=backend, **kw),
    "PolarGrad": lambda backend, **kw: (
        lambda ps: orthoptim.PolarGrad(ps, lr=2e-3, weight_decay=0.1, backend=backend, **kw)
    ),
    "Hybrid": lambda backend, **kw: (
        lambda ps: orthoptim.Hybrid((ps[:3], ps[3:]), lr=0.02, weight_decay=0.1, backend=backend, **kw)
    ),
}


@pytest.mark.parametrize("normalization", ["frobenius", "schatten4", "aol"])
@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("backend", ["torch@cpu", "torch@cuda"])
def test_the_torch_backend_agrees_with_the_reference(backend: str, name: str, normalization: str) -> None:
    """Four steps on float32 parameters, the torch backend computing in float32: every parameter and state tensor
    within float32 rounding of the float64 reference (relative to the tensor's size)."""
    kw = {"normalization": normalization, "compute_dtype": "float32"}
    want = _train(MAKERS[name]("reference", **kw), torch.float32)
    got = _train(MAKERS[name](backend, **kw), torch.float32)
    for a, b in zip(got, want, strict=True):
        scale = float(b.double().abs().max()) or 1.0
        assert float((a.double() - b.double()).abs().max()) <= 2e-5 * scale, (a.shape, name)


@pytest.mark.parametrize("name", list(MAKERS))
def test_the_torch_backend_in_float64_agrees_with_the_reference_to_float64_rounding(name: str) -> None:
    """float64 parameters and compute: the same update, so agreement to ~1e-12 (NorMuon's second moments are float32
    state on both, which bounds its agreement at float32's rounding of that state)."""
    kw = {"compute_dtype": "float64"}
    want = _train(MAKERS[name]("reference", **kw), torch.float64)
    got = _train(MAKERS[name]("torch", **kw), torch.float64)
    tol = 3e-7 if name == "NorMuon" else 1e-12  # NorMuon: a few float32 ulps of its second moments
    for a, b in zip(got, want, strict=True):
        assert float((a.double() - b.double()).abs().max()) <= tol * (float(b.double().abs().max()) or 1.0)


def test_the_reference_update_is_the_svd_polar_factor() -> None:
    """The oracle against an independent one: one PolarGrad-length Muon step from zero momentum (μ = 0, no decay)
    moves each matrix by −lr·√max(1, m/n)·polar(G), polar(G) from the float64 SVD; Polar Express's 8 steps bring
    every singular value of these well-conditioned matrices within 1e-6 of 1."""
    gen = torch.Generator().manual_seed(1)
    for m, n in [(24, 40), (40, 24)]:
        u, _, vt = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64), full_matrices=False)
        G = u @ torch.diag(torch.linspace(1.0, 3.0, min(m, n), dtype=torch.float64)) @ vt
        p = nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
        opt = orthoptim.Muon(
            [p], lr=0.1, momentum=0.0, weight_decay=0.0, schedule="polar_express", ns_steps=8, backend="reference"
        )
        p.grad = G.clone()
        opt.step()
        U, _, Vt = torch.linalg.svd(G, full_matrices=False)
        want = -0.1 * math.sqrt(max(1.0, m / n)) * (U @ Vt)
        assert torch.allclose(p.detach(), want, atol=1e-7), float((p.detach() - want).abs().max())


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_non_finite_step_is_skipped_whole_by_the_reference(name: str) -> None:
    """A NaN gradient at step 2 of 3: the reference keeps every tensor as after step 1 and counts the skip, as the
    torch backend does (the same final state as training without that step's gradients)."""
    got = _train(MAKERS[name]("reference"), torch.float32, steps=3, nan_at=1)
    want = _train(MAKERS[name]("torch"), torch.float32, steps=3, nan_at=1)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=0.02, atol=2e-3)  # bfloat16 compute on some CPUs


def test_backend_selection_per_device() -> None:
    """ "auto" is the torch backend everywhere — with the CPU's choices on the CPU, the accelerators' elsewhere;
    the fused Triton kernels are opt-in until a GPU run shows them faster (issue "GPU")."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("auto", cpu) == Backend("torch", host_ways=True)
    assert select_backend("auto", cuda) == Backend("torch", host_ways=False, fused=False)
    assert select_backend("torch@cuda", cpu) == Backend("torch", host_ways=False)
    assert select_backend("torch@cpu", cuda) == Backend("torch", host_ways=True)
    assert select_backend("reference", cuda).reference
    assert set(BACKENDS) >= {"auto", "reference", "torch", "triton"}


def test_bad_backends_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    w = [nn.Parameter(torch.randn(4, 6))]
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        orthoptim.Muon(w, backend="cuda")  # type: ignore[arg-type]
    monkeypatch.setattr("orthoptim.optim.backends.triton_available", lambda: False)
    with pytest.raises(ValueError, match='backend="triton" needs triton'):
        orthoptim.Muon(w, backend="triton")
    opt = orthoptim.Muon(w)
    opt.param_groups[0]["backend"] = "fast"  # an edited option is validated before the next step uses it
    w[0].grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        opt.step()


def test_options_are_validated_once_and_follow_edits() -> None:
    """The step reads a group's options from a record built when the group was (``options.OptionsCache``): the
    same record step after step, a new one when an option is edited, and lr/momentum from the group every step
    (schedulers change them in place)."""
    w = nn.Parameter(torch.randn(4, 6))
    opt = orthoptim.Muon([w], lr=0.02)
    group = opt.param_groups[0]
    first = opt._options(group)
    assert opt._options(group) is first
    group["lr"] = 0.01
    assert opt._options(group).lr == 0.01 and opt._options(group).schedule is first.schedule
    group["nesterov"] = False
    assert opt._options(group).nesterov is False
    group["nesterov"] = "yes"
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        opt._options(group)
