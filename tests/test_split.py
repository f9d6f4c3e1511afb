"""Block orthogonalization (``split=k``): each of a matrix's k row blocks — Q, K and V of a fused projection, gate
and up, the heads — is orthogonalized on its own.

References: the float64 SVD polar factor of each block of the gradient; the float64 ``reference`` backend for the
torch backend's stacked, megabatched implementation (NorMuon's rows and PolarGrad's norm per block included);
an uninterrupted run for a ``state_dict`` round trip.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim import lr_scale


def _svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    return U @ Vt


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("backend", ["torch", "torch@cuda", "reference"])
def test_each_block_moves_by_its_own_polar_factor(backend: str, weight_layout: str) -> None:
    """A fused QKV weight (out = 3·24, in = 16), one step from zero momentum: block i of the update is
    −lr·√max(1, 24/16)·polar(G_i), G_i the i-th 24 rows of the (out, in) gradient — not a third of polar(G)."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(72, 16, generator=gen, dtype=torch.float64)  # (out, in)
    stored = G.mT.contiguous() if weight_layout == "in_out" else G
    p = nn.Parameter(torch.zeros_like(stored))
    opt = orthoptim.Muon(
        [p],
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        schedule="polar_express",
        ns_steps=8,
        compute_dtype="float64",
        split=3,
        weight_layout=weight_layout,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
    )
    p.grad = stored.clone()
    opt.step()
    moved = p.detach().mT if weight_layout == "in_out" else p.detach()
    scale = lr_scale("original", 24, 16)
    for i in range(3):
        want = -0.1 * scale * _svd_polar(G[24 * i : 24 * (i + 1)])
        assert torch.allclose(moved[24 * i : 24 * (i + 1)], want, atol=1e-6), i
    whole = -0.1 * math.sqrt(72 / 16) * _svd_polar(G)
    assert not torch.allclose(moved, whole, atol=1e-2)  # the test tells the two apart


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("name", ["Muon", "NorMuon", "PolarGrad"])
@pytest.mark.parametrize("backend", ["torch@cpu", "torch@cuda"])
def test_the_torch_backend_splits_as_the_reference(backend: str, name: str, weight_layout: str) -> None:
    """Three steps, float64: two split weights batched with a 3-D one (heads), against the reference (the
    agreement is float64 rounding, and float32 rounding of NorMuon's second moments, which are float32 state)."""
    results = []
    for which in ("reference", backend):
        gen = torch.Generator().manual_seed(0)
        shapes = [(48, 16), (48, 16), (3, 24, 10)]
        if weight_layout == "in_out":
            shapes = [tuple(reversed(s[-2:])) if len(s) == 2 else (s[0], s[2], s[1]) for s in shapes]
        ps = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        lr = 2e-3 if name == "PolarGrad" else 0.02
        opt = getattr(orthoptim, name)(
            ps, lr=lr, compute_dtype="float64", split=2, weight_layout=weight_layout, backend=which
        )
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        results.append([p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()])
    tol = 1e-7 if name == "NorMuon" else 1e-12
    for a, b in zip(*results, strict=True):
        assert float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(b.double().abs().max()))


def test_normuon_keeps_one_second_moment_per_output_row() -> None:
    p = nn.Parameter(torch.randn(48, 16))
    opt = orthoptim.NorMuon([p], split=4)
    p.grad = torch.randn(48, 16)
    opt.step()
    assert opt.state[p]["second_moment"].shape == (4, 12)  # four blocks of 12 rows


def test_a_split_run_resumes_bit_exactly_from_its_state_dict() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(48, 16, generator=gen) for _ in range(4)]
    params = [nn.Parameter(torch.randn(48, 16, generator=gen))]
    twin = [nn.Parameter(params[0].detach().clone())]
    opt = orthoptim.NorMuon(params, lr=0.02, split=3)
    for g in grads:
        params[0].grad = g.clone()
        opt.step()
    first = orthoptim.NorMuon(twin, lr=0.02, split=3)
    for g in grads[:2]:
        twin[0].grad = g.clone()
        first.step()
    resumed = orthoptim.NorMuon(twin, lr=0.02, split=3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for g in grads[2:]:
        twin[0].grad = g.clone()
        resumed.step()
    assert torch.equal(params[0], twin[0])


@pytest.mark.parametrize(("split", "message"), [(5, "not a multiple of 5"), (0, "positive int"), (True, "positive")])
def test_bad_splits_are_refused_by_name(split: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        orthoptim.Muon([nn.Parameter(torch.randn(48, 16))], split=split)  # type: ignore[arg-type]


class _Attention(nn.Module):
    """The fused projections ``split="auto"`` knows, and one it must not guess (grouped-query: out ≠ 3·in)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)  # q, k, v of width 16
        self.gqa = nn.Module()
        self.gqa.qkv_proj = nn.Linear(16, 32)  # q 16, k 8, v 8: blocks of unequal size, not split
        self.gate_up_proj = nn.Linear(16, 64)
        self.mha = nn.MultiheadAttention(16, 2)
        self.down = nn.Linear(32, 16)


def test_hybrid_split_auto_cuts_fused_projections() -> None:
    model = _Attention()
    opt = orthoptim.Hybrid(model, split="auto")
    by_split = {
        g.get("split"): {tuple(p.shape) for p in g["params"]} for g in opt.param_groups if g["algorithm"] == "muon"
    }
    assert by_split[3] == {(48, 16)}  # qkv and the attention's in_proj_weight (48, 16)
    assert len(next(g for g in opt.param_groups if g.get("split") == 3)["params"]) == 2
    assert by_split[2] == {(64, 16)}
    assert by_split[1] == {(32, 16), (16, 16), (16, 32)}  # the grouped-query projection, out_proj, down


def test_hybrid_split_by_name_and_its_errors() -> None:
    model = _Attention()
    opt = orthoptim.Hybrid(model, split={"gqa.qkv_proj": 4, "down": 2})
    splits = {tuple(p.shape): g.get("split") for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]}
    assert splits[(32, 16)] == 4 and splits[(16, 32)] == 2 and splits[(48, 16)] == 1
    with pytest.raises(ValueError, match=r"no module or parameter named \[.nope.\]"):
        orthoptim.Hybrid(model, split={"nope": 2})
    with pytest.raises(TypeError, match="needs the model"):
        orthoptim.Hybrid(([model.qkv.weight], [model.qkv.bias]), split="auto")
    with pytest.raises(ValueError, match="block count"):
        orthoptim.Hybrid(model, split="heads")


def test_split_auto_finds_fused_expert_parameters_by_name() -> None:
    """Stacked experts registered as raw parameters (as transformers' Mixtral does): ``gate_up_proj`` of shape
    (experts, 2·intermediate, hidden) is cut into gate and up, ``down_proj`` left whole."""
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(4, 32, 8))
    experts.down_proj = nn.Parameter(torch.randn(4, 8, 16))
    model = nn.Module()
    model.experts = experts
    splits = {
        g.get("split"): [tuple(p.shape) for p in g["params"]]
        for g in orthoptim.Hybrid(model, split="auto").param_groups
    }
    assert splits == {1: [(4, 8, 16)], 2: [(4, 32, 8)]}
    opt = orthoptim.Hybrid(model, split={"experts.down_proj": 2})
    assert {g.get("split") for g in opt.param_groups if any(p is experts.down_proj for p in g["params"])} == {2}


@pytest.mark.parametrize(("cell", "gates"), [(nn.LSTM, 4), (nn.GRU, 3)])
def test_split_auto_orthogonalizes_each_recurrent_gate_on_its_own(cell: type, gates: int) -> None:
    """An LSTM's weight_ih/weight_hh stack its four gates' matrices by rows (a GRU's three): with split="auto" one
    step from zero momentum moves gate block i by −lr·√max(1, h/n)·polar(G_i), G_i its rows of the gradient
    (float64 SVD) — not a quarter of polar(G)."""
    torch.manual_seed(0)
    hidden, inputs = 16, 8
    rnn = cell(inputs, hidden, num_layers=1)
    model = nn.ModuleDict({"rnn": rnn})
    opt = orthoptim.Hybrid(
        model, split="auto", lr=0.1, momentum=0.0, weight_decay=0.0, compute_dtype="float64",
        schedule="polar_express", ns_steps=12,
    )  # fmt: skip
    weights = {"weight_ih_l0": inputs, "weight_hh_l0": hidden}
    splits = {id(p): g.get("split") for g in opt.param_groups for p in g["params"]}
    assert all(splits[id(getattr(rnn, name))] == gates for name in weights)
    before = {name: getattr(rnn, name).detach().clone() for name in weights}
    for name in weights:
        getattr(rnn, name).grad = torch.randn(getattr(rnn, name).shape, dtype=torch.float32)
    for p in rnn.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    for name, n in weights.items():
        w = getattr(rnn, name)
        G = w.grad.double()  # type: ignore[union-attr]
        moved = (w.detach() - before[name]).double()
        for i in range(gates):
            rows = slice(i * hidden, (i + 1) * hidden)
            want = -0.1 * math.sqrt(max(1.0, hidden / n)) * _svd_polar(G[rows])
            assert torch.allclose(moved[rows], want, atol=1e-6), (name, i)
