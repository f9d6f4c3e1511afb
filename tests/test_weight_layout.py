"""Matrices stored (in, out) — transformers' GPT-2 ``Conv1D`` — with ``weight_layout="in_out"``: the update is the
one the same layer stored (out, in) as ``nn.Linear`` gets, whatever the backend, and ``Hybrid(model)`` recognizes
such layers itself.

References: the same network built with ``nn.Linear`` (weights transposed), trained by the same optimizer (the
(out, in) case is held to torch.optim.Muon and the formulas elsewhere); the float64 SVD polar factor for the lr
scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthoptim


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` as it is built there: ``y = x·W + b`` with ``W`` of shape (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _mlp(layer: type[nn.Module], d: int = 12) -> nn.Module:
    """An MLP block: up (d → 4d), down (4d → d), the shape pair of GPT-2's c_fc and c_proj."""
    if layer is Conv1D:
        return nn.Sequential(Conv1D(4 * d, d), nn.GELU(), Conv1D(d, 4 * d))
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


@pytest.mark.parametrize("backend", ["torch@cpu", "torch@cuda", "reference"])
@pytest.mark.parametrize("algorithm", ["muon", "normuon", "polargrad"])
def test_conv1d_layers_train_as_the_linear_layers_they_stand_for(algorithm: str, backend: str) -> None:
    torch.manual_seed(0)
    ours, linear = _mlp(Conv1D).double(), _mlp(nn.Linear).double()
    with torch.no_grad():
        for conv, lin in zip([ours[0], ours[2]], [linear[0], linear[2]], strict=True):
            conv.weight.normal_()
            lin.weight.copy_(conv.weight.mT)
            lin.bias.copy_(conv.bias)
    options = {"muon": {}, "normuon": {"row_norm": True}, "polargrad": {"scale_mode": "nuclear", "ns_steps": 8}}
    kw = {"lr": 0.05, "weight_decay": 0.1, "compute_dtype": "float64", "backend": backend, **options[algorithm]}
    opts = [orthoptim.Hybrid(model, **kw) for model in (ours, linear)]  # type: ignore[arg-type]
    layouts = [g.get("weight_layout") for g in opts[0].param_groups if g["algorithm"] == "muon"]
    assert layouts == ["in_out"]  # the Conv1D weights found and grouped, the biases on AdamW
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 12, generator=gen, dtype=torch.float64)
        for model, opt in zip((ours, linear), opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for conv, lin in zip([ours[0], ours[2]], [linear[0], linear[2]], strict=True):
        assert torch.allclose(conv.weight.mT, lin.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_lr_scale_follows_the_out_in_orientation(backend: str) -> None:
    """A c_fc-like weight stored (in=8, out=32): one step from zero momentum moves it by
    −lr·√max(1, out/in)·polar(G) = −2·lr·polar(G) (float64 SVD); stored (out, in) it would be −1·lr·polar(G)."""
    gen = torch.Generator().manual_seed(2)
    u, _, vt = torch.linalg.svd(torch.randn(8, 32, generator=gen, dtype=torch.float64), full_matrices=False)
    G = u @ torch.diag(torch.linspace(1.0, 3.0, 8, dtype=torch.float64)) @ vt  # (in, out) as stored
    p = nn.Parameter(torch.zeros(8, 32, dtype=torch.float64))
    opt = orthoptim.Muon(
        [p],
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        schedule="polar_express",
        ns_steps=8,
        compute_dtype="float64",
        weight_layout="in_out",
        backend=backend,
    )
    p.grad = G.clone()
    opt.step()
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(p.detach(), -0.1 * math.sqrt(32 / 8) * (U @ Vt), atol=1e-7)


def test_normuon_rows_are_the_output_neurons() -> None:
    """NorMuon's second moment has one entry per output neuron: for a (in=8, out=32) weight, 32."""
    p = nn.Parameter(torch.randn(8, 32))
    opt = orthoptim.NorMuon([p], weight_layout="in_out")
    p.grad = torch.randn(8, 32)
    opt.step()
    assert opt.state[p]["second_moment"].shape == (1, 32)


def test_bad_weight_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown weight_layout 'cols'"):
        orthoptim.Muon([nn.Parameter(torch.randn(4, 6))], weight_layout="cols")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flattened by shape_policy"):
        orthoptim.Muon([nn.Parameter(torch.randn(8, 4, 3, 3))], weight_layout="in_out")
    opt = orthoptim.Muon([nn.Parameter(torch.randn(4, 6))])
    opt.param_groups[0]["weight_layout"] = "rows"
    opt.param_groups[0]["params"][0].grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match="unknown weight_layout 'rows'"):
        opt.step()


def test_a_linear_layer_is_not_taken_for_conv1d() -> None:
    """Only a module named ``Conv1D`` with ``nf`` matching its weight's columns is taken as stored (in, out)."""

    class Conv1D(nn.Linear):  # the name alone is not enough: no nf
        pass

    model = nn.Sequential(Conv1D(6, 4), nn.Linear(4, 6))
    opt = orthoptim.Hybrid(model)
    assert all(g.get("weight_layout", "out_in") == "out_in" for g in opt.param_groups)
