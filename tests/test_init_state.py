"""``init_state()``: every parameter's state made up front — what a checkpoint taken before the first step, or of
parameters that never had a gradient, needs — without changing any step.

References: the same training without ``init_state`` (bit for bit), and a run that was never checkpointed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

import orthoptim


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Linear(16, 4))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(k))
        opt.zero_grad(set_to_none=True)
        out = model[1](model[0](x))
        model[3](out).square().mean().backward()  # model[2] never gets a gradient
        opt.step()


def test_init_state_changes_no_step() -> None:
    results = []
    for up_front in (False, True):
        model = _model()
        opt = orthoptim.Hybrid(model, row_norm=True, adamw_lr=1e-2)
        if up_front:
            opt.init_state()
        _train(model, opt, range(3))
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_state_exists_for_every_parameter_before_the_first_step() -> None:
    model = _model()
    opt = orthoptim.Hybrid(model, row_norm=True)
    opt.init_state()
    state = opt.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    unused = model[2].weight  # never gets a gradient
    assert torch.equal(opt.state[unused]["momentum_buffer"], torch.zeros_like(unused))
    assert opt.state[unused]["second_moment"].shape == (1, 16)
    assert int(opt.state[unused]["step"]) == 0


def test_a_distributed_checkpoint_loads_into_a_fresh_optimizer(tmp_path: Path) -> None:
    """torch.distributed.checkpoint loads into an existing state_dict: a fresh optimizer has one to load into only
    after ``init_state`` (its state is otherwise made at its first step). Two steps, save, load into a fresh
    optimizer, two more steps on each: the same parameters — momentum, second moments, AdamW's moments and the
    never-stepped parameter's state all came back."""
    import torch.distributed.checkpoint as dcp

    model, twin = _model(), _model()
    opt = orthoptim.Hybrid(model, row_norm=True, adamw_lr=1e-2)
    opt.init_state()
    _train(model, opt, range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters(), strict=True):
            a.copy_(b)
    resumed = orthoptim.Hybrid(twin, row_norm=True, adamw_lr=1e-2)
    resumed.init_state()
    loaded = {"optim": resumed.state_dict()}
    assert len(loaded["optim"]["state"]) == len(list(twin.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(loaded["optim"])
    _train(model, opt, range(2, 4))
    _train(twin, resumed, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
