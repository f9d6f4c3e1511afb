"""orthoptim.clip_grad_norm_ over several optimizers (a chained setup) or param groups: one norm over the groups
whose update depends on the gradient's scale, checked against hand-computed norms; and the Megatron-LM report's
scenario reproduced with Megatron-core's chained-clip arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthoptim


def param(*shape: int, grad: float) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(shape))
    p.grad = torch.full(shape, grad)
    return p


def test_one_norm_over_every_clipped_group_of_every_optimizer() -> None:
    muon_w = param(8, 8, grad=1e6)  # orthoptim.Muon: exempt
    torch_muon_w = param(6, 6, grad=1e6)  # torch.optim.Muon: exempt too (its update is orthogonalized as well)
    adamw_b = param(3, grad=3.0)  # 3 entries of 3
    polar_w = param(2, 2, grad=2.0)  # PolarGrad scales by the nuclear norm: clipped
    sgd_w = param(5, grad=1.0)  # any other optimizer: clipped
    hybrid = orthoptim.Hybrid(([param(4, 4, grad=1e6)], [param(4, grad=0.5)]))  # its AdamW half: 4 entries of 0.5
    chain = [
        orthoptim.Muon([muon_w]),
        torch.optim.Muon([torch_muon_w]),
        torch.optim.AdamW([adamw_b]),
        orthoptim.PolarGrad([polar_w]),
        torch.optim.SGD([sgd_w], lr=0.1),
        hybrid,
    ]
    expected = math.sqrt(3 * 3.0**2 + 4 * 2.0**2 + 5 * 1.0**2 + 4 * 0.5**2)  # = sqrt(49) = 7
    norm = orthoptim.clip_grad_norm_(chain, max_norm=1.0)
    assert float(norm) == pytest.approx(expected, rel=1e-6)
    coef = 1.0 / (expected + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    for p, g in [(adamw_b, 3.0), (polar_w, 2.0), (sgd_w, 1.0), (hybrid.param_groups[1]["params"][0], 0.5)]:
        torch.testing.assert_close(p.grad, torch.full(p.shape, g * coef), rtol=1e-6, atol=0)
    for p in (muon_w, torch_muon_w, hybrid.param_groups[0]["params"][0]):
        assert torch.equal(p.grad, torch.full(p.shape, 1e6))


def test_param_groups_and_a_shared_parameter_count_once() -> None:
    shared = param(4, grad=2.0)  # in two optimizers: one contribution to the norm, scaled once
    a, b = torch.optim.AdamW([shared, param(4, grad=2.0)]), torch.optim.SGD([shared], lr=0.1)
    norm = orthoptim.clip_grad_norm_([*a.param_groups, *b.param_groups], max_norm=1.0)
    assert float(norm) == pytest.approx(math.sqrt(8 * 2.0**2), rel=1e-6)
    torch.testing.assert_close(shared.grad, torch.full((4,), 2.0 / (math.sqrt(32) + 1e-6)), rtol=1e-6, atol=0)


def test_single_optimizer_and_nothing_to_clip() -> None:
    w = param(3, 3, grad=5.0)
    assert float(orthoptim.clip_grad_norm_((orthoptim.Muon([w]), orthoptim.NorMuon([param(2, 2, grad=1.0)])), 1.0)) == 0
    assert torch.equal(w.grad, torch.full((3, 3), 5.0))  # type: ignore[arg-type]
    b = param(4, grad=1.0)
    assert float(orthoptim.clip_grad_norm_(torch.optim.AdamW([b]), max_norm=10.0)) == pytest.approx(2.0)
    assert torch.equal(b.grad, torch.ones(4))  # type: ignore[arg-type]  # under max_norm: unchanged


def test_bad_targets_are_type_errors() -> None:
    with pytest.raises(TypeError, match="list of param groups"):
        orthoptim.clip_grad_norm_({"params": [param(2, grad=1.0)]}, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer or a param group"):
        orthoptim.clip_grad_norm_([torch.zeros(2)], 1.0)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="expected an optimizer"):
        orthoptim.clip_grad_norm_(3.0, 1.0)  # type: ignore[arg-type]


def megatron_chained_clip_(optimizers: list[torch.optim.Optimizer], max_norm: float) -> None:
    """Megatron-core's global clip over a ChainedOptimizer, as arithmetic (its code asserts CUDA tensors):
    ChainedOptimizer.get_grad_norm takes one 2-norm over every chained optimizer's gradients, then
    clip_grad_by_total_norm_fp32 scales all of them by max_norm / (norm + 1e-6) when that is below 1
    (NVIDIA/Megatron-LM, megatron/core/optimizer/optimizer.py and clip_grads.py, megatron-core 0.16)."""
    grads = [p.grad for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    coef = max_norm / (total + 1.0e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


def chained_overfit(muon_cls: type[torch.optim.Optimizer], clip: str | None, steps: int = 150) -> float:
    """Fixed-batch MLP regression, Muon on the hidden matrices chained with AdamW on biases and the head; the
    middle layer's gradient is scaled by 1e12 by a hook (the Megatron-LM report's scenario). Summed loss, so
    the AdamW half's gradient norm is above 1 and a clip at 1.0 acts on it on most steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    net[2].weight.register_hook(lambda g: g * 1e12)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    muon = muon_cls([net[0].weight, net[2].weight], lr=0.02, weight_decay=0.0)  # type: ignore[call-arg]
    adamw = torch.optim.AdamW([net[0].bias, net[2].bias, net[4].weight, net[4].bias], lr=1e-2, weight_decay=0.0)
    chain = [muon, adamw]
    # Linear decay to 0: the final loss settles instead of depending on where a constant-lr orbit stops.
    decays = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 - t / steps) for o in chain]
    for _ in range(steps):
        for o in chain:
            o.zero_grad()
        nn.functional.mse_loss(net(x), y, reduction="sum").backward()
        if clip == "megatron":
            megatron_chained_clip_(chain, 1.0)
        elif clip == "orthoptim":
            orthoptim.clip_grad_norm_(chain, 1.0)
        for o in chain:
            o.step()
        for d in decays:
            d.step()
    with torch.no_grad():
        return float(nn.functional.mse_loss(net(x), y))


def test_chained_clip_survives_the_megatron_scenario() -> None:
    # Measured (CPU, torch 2.13, 150 steps): orthoptim.Muon + AdamW 1.4e-5 unclipped, 2.5e-6 with
    # orthoptim.clip_grad_norm_([muon, adamw], 1.0), 0.18 with Megatron's global clip (its coefficient, ~1e-12,
    # starves the AdamW half); torch.optim.Muon + AdamW 4.5e-5 / 7.1e-6 / 0.70 (0.70: its 1e-7 floor too).
    free = chained_overfit(orthoptim.Muon, None)
    ours = chained_overfit(orthoptim.Muon, "orthoptim")
    megatron = chained_overfit(orthoptim.Muon, "megatron")
    assert free < 1e-3 and ours < 1e-3, (free, ours)
    assert megatron > 0.05, megatron  # the scenario bites a global clip over the chain
    assert chained_overfit(torch.optim.Muon, "orthoptim") < 1e-3  # torch.optim.Muon in the chain: exempt as well
