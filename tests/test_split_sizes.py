"""Blocks of unequal sizes (``split=(s₁, s₂, …)``): grouped-query attention's q, k and v in one weight.

References: the float64 SVD polar factor of each block of the gradient, with each block's own lr scale; the
float64 ``reference`` backend (which cuts each block out of the matrix, one at a time) for the torch backend's
stacked implementation (NorMuon's rows and Frobenius rescale, PolarGrad's norm, per block); the equal-block
``split=k`` for sizes that are all equal; an uninterrupted run for a ``state_dict`` round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim import lr_scale

GQA = (32, 8, 8)  # q of 4 heads, k and v of 1 head (head size 8): 48 output rows, from 16 inputs
RANGES = [(0, 32), (32, 40), (40, 48)]


def _svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    return U @ Vt


@pytest.mark.parametrize("scale_mode", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("backend", ["torch@cpu", "torch@cuda", "reference"])
def test_each_block_moves_by_its_own_polar_factor_and_scale(backend: str, weight_layout: str, scale_mode: str) -> None:
    """One step from zero momentum on a (48, 16) q/k/v weight: block i of the update is −lr·scale(sᵢ, 16)·polar(Gᵢ)
    — q's 32 rows are tall (√2 under "original"), k's and v's 8 are wide (1) — not a piece of polar(G)."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(48, 16, generator=gen, dtype=torch.float64)  # (out, in)
    stored = G.mT.contiguous() if weight_layout == "in_out" else G
    p = nn.Parameter(torch.zeros_like(stored))
    opt = orthoptim.Muon(
        [p],
        lr=0.1,
        momentum=0.0,
        schedule="polar_express",
        ns_steps=8,
        compute_dtype="float64",
        split=GQA,
        weight_layout=weight_layout,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        scale_mode=scale_mode,  # type: ignore[arg-type]
    )
    p.grad = stored.clone()
    opt.step()
    moved = p.detach().mT if weight_layout == "in_out" else p.detach()
    for a, z in RANGES:
        want = -0.1 * lr_scale(scale_mode, z - a, 16) * _svd_polar(G[a:z])  # type: ignore[arg-type]
        assert torch.allclose(moved[a:z], want, atol=1e-9), (a, z)
    assert not torch.allclose(moved, -0.1 * lr_scale(scale_mode, 48, 16) * _svd_polar(G), atol=1e-2)  # type: ignore[arg-type]


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("name", ["Muon", "NorMuon", "PolarGrad"])
@pytest.mark.parametrize("backend", ["torch@cpu", "torch@cuda"])
def test_the_torch_backend_cuts_unequal_blocks_as_the_reference(backend: str, name: str, weight_layout: str) -> None:
    """Three steps, float64: two q/k/v weights and a 3-D stack of them, batched together, against the reference
    (float64 rounding, and float32 rounding of NorMuon's second moments, which are float32 state)."""
    results = []
    for which in ("reference", backend):
        gen = torch.Generator().manual_seed(0)
        shapes = [(48, 16), (48, 24), (2, 48, 16)]
        if weight_layout == "in_out":
            shapes = [(s[1], s[0]) if len(s) == 2 else (s[0], s[2], s[1]) for s in shapes]
        ps = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        lr = 2e-3 if name == "PolarGrad" else 0.02
        opt = getattr(orthoptim, name)(
            ps, lr=lr, weight_decay=0.01, compute_dtype="float64", split=GQA, weight_layout=weight_layout, backend=which
        )
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        results.append([p.detach().clone() for p in ps] + [t.clone() for p in ps for t in opt.state[p].values()])
    tol = 1e-7 if name == "NorMuon" else 1e-12
    for a, b in zip(*results, strict=True):
        assert float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(b.double().abs().max()))


@pytest.mark.parametrize("name", ["Muon", "NorMuon", "PolarGrad"])
def test_the_fused_kernels_take_unequal_blocks_as_the_reference(name: str) -> None:
    """``backend="triton"`` (the fused elementwise kernels, under Triton's interpreter on the CPU): float32
    parameters computed in float32, three steps, against the float64 reference: float32 rounding."""
    from .conftest import require_interpreted_fused_kernels

    require_interpreted_fused_kernels()
    results = []
    for which in ("reference", "triton"):
        gen = torch.Generator().manual_seed(2)
        ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(48, 16), (2, 48, 24)]]
        lr = 2e-3 if name == "PolarGrad" else 0.02
        opt = getattr(orthoptim, name)(ps, lr=lr, weight_decay=0.01, compute_dtype="float32", split=GQA, backend=which)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("name", ["Muon", "NorMuon", "PolarGrad"])
def test_default_precision_agrees_with_the_reference(name: str) -> None:
    """float32 parameters with the CPU's default compute dtype (bfloat16 where the CPU multiplies it natively,
    float32 elsewhere): two steps agree with the float64 reference to that dtype's iteration error (relative to
    how far the parameters moved, in Frobenius norm)."""
    results = []
    for which in ("reference", "auto"):
        gen = torch.Generator().manual_seed(1)
        p = nn.Parameter(torch.randn(48, 16, generator=gen))
        opt = getattr(orthoptim, name)([p], lr=0.02 if name != "PolarGrad" else 1e-3, split=GQA, backend=which)
        for _ in range(2):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(p.detach().clone())
    start = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    moved = torch.linalg.matrix_norm(results[0] - start)
    # Measured: 3.5% (bfloat16, as the whole-matrix and equal-block paths) and 1e-5 (float32); a wrong cut is O(1).
    assert float(torch.linalg.matrix_norm(results[0] - results[1])) <= 0.06 * float(moved)


def test_equal_sizes_are_the_equal_split_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(48, 16, generator=gen) for _ in range(3)]
    ps = [nn.Parameter(torch.ones(48, 16)) for _ in range(2)]
    opts = [orthoptim.NorMuon([ps[0]], split=3), orthoptim.NorMuon([ps[1]], split=(16, 16, 16))]
    for g in grads:
        for p, opt in zip(ps, opts, strict=True):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(ps[0], ps[1])


def test_normuon_keeps_one_second_moment_per_output_row_across_blocks() -> None:
    """The second moment is per output row whatever the blocks: (1, 48); each block's rows are its own."""
    p = nn.Parameter(torch.zeros(48, 16, dtype=torch.float64))
    opt = orthoptim.NorMuon(
        [p], split=GQA, beta2=0.5, schedule="polar_express", ns_steps=8, compute_dtype="float64", backend="torch"
    )
    G = torch.randn(48, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p.grad = G.clone()
    opt.step()
    v = opt.state[p]["second_moment"]
    assert v.shape == (1, 48)
    # Step one from v = 0: v = (1 − β₂)·meanⱼ Oᵢⱼ², O each block's polar factor (rows of norm 1 in a wide block,
    # of norm √(16/32) in the tall q block: its columns are orthonormal).
    want = torch.cat([0.5 * _svd_polar(G[a:z]).square().mean(dim=-1) for a, z in RANGES])
    assert torch.allclose(v[0].double(), want, rtol=1e-6, atol=1e-9)  # v is float32 state


def test_an_unequal_split_run_resumes_bit_exactly_from_its_state_dict() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(48, 16, generator=gen) for _ in range(4)]
    params = [nn.Parameter(torch.randn(48, 16, generator=gen))]
    twin = [nn.Parameter(params[0].detach().clone())]
    opt = orthoptim.NorMuon(params, lr=0.02, split=GQA)
    for g in grads:
        params[0].grad = g.clone()
        opt.step()
    first = orthoptim.NorMuon(twin, lr=0.02, split=GQA)
    for g in grads[:2]:
        twin[0].grad = g.clone()
        first.step()
    saved = copy.deepcopy(first.state_dict())
    saved["param_groups"][0]["split"] = list(GQA)  # as a JSON round trip would give it back
    resumed = orthoptim.NorMuon(twin, lr=0.02, split=GQA)
    resumed.load_state_dict(saved)
    for g in grads[2:]:
        twin[0].grad = g.clone()
        resumed.step()
    assert torch.equal(params[0], twin[0])


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ((32, 8, 4), r"sum to 44, but the parameter of shape \(48, 16\) has 48 output rows"),
        ((32, 8, 0), "positive ints"),
        ((), "non-empty"),
        ((32.0, 16), "positive ints"),
        ((32, True, 15), "positive ints"),
    ],
)
def test_bad_sizes_are_refused_by_name(split: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        orthoptim.Muon([nn.Parameter(torch.randn(48, 16))], split=split)  # type: ignore[arg-type]


def test_sizes_must_fit_every_parameter_of_the_group() -> None:
    with pytest.raises(ValueError, match=r"shape \(40, 16\) has 40 output rows"):
        orthoptim.Muon([nn.Parameter(torch.randn(48, 16)), nn.Parameter(torch.randn(40, 16))], split=GQA)


class _GQAttention(nn.Module):
    """Grouped-query attention with q, k and v in one weight, as transformers' Phi-3 declares it."""

    def __init__(self, width: int = 16, heads: int = 4, kv_heads: int = 1) -> None:
        super().__init__()
        self.head_dim, self.num_heads, self.num_key_value_heads = width // heads, heads, kv_heads
        self.qkv_proj = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.attn = _GQAttention()
        self.lm_head = nn.Linear(16, 10)


def test_hybrid_takes_sizes_by_name_and_auto_reads_grouped_query_heads() -> None:
    model = _Block()
    for split in ("auto", {"qkv_proj": (16, 4, 4)}):
        opt = orthoptim.Hybrid(model, split=split)  # type: ignore[arg-type]
        group = next(g for g in opt.param_groups if any(p is model.attn.qkv_proj.weight for p in g["params"]))
        assert tuple(group["split"]) == (16, 4, 4)
        assert all(g.get("split", 1) == 1 for g in opt.param_groups if g is not group)
    text = str(orthoptim.explain(model, split="auto"))
    row = next(line for line in text.splitlines() if line.startswith("attn.qkv_proj.weight"))
    assert "16+4+4" in row and "blocks of 16, 4, 4 rows" in row


def test_auto_leaves_a_fused_weight_whole_when_the_heads_do_not_add_up() -> None:
    model = _Block()
    model.attn.num_key_value_heads = 2  # declares (4 + 2·2)·4 = 32 rows; the weight has 24
    opt = orthoptim.Hybrid(model, split="auto")
    assert all(g.get("split", 1) == 1 for g in opt.param_groups)
