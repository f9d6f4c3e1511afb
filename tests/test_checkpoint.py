"""``load_state_dict`` takes a checkpoint whole or not at all: every parameter's state is checked against what its
algorithm needs, numeric steps are converted as torch's optimizers convert them, another orthoptim algorithm's
checkpoint is refused by name (or converted on request), and a refused checkpoint leaves the optimizer exactly as
it was — the same state and group objects, the same values, still stepping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import orthoptim

SHAPES = [(16, 40), (40, 16), (3, 8, 12)]  # wide, tall, a batch of three matrices


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params: list[nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _snapshot(opt: torch.optim.Optimizer) -> tuple[Any, Any, list[torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's state and group objects, and copies of every tensor and option in them."""
    params = [p for g in opt.param_groups for p in g["params"]]
    values = [p.detach().clone() for p in params]
    values += [v.clone() for p in params for _, v in sorted(opt.state[p].items())]
    options = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return opt.state, opt.param_groups, values, copy.deepcopy(options)


def _assert_unchanged(opt: torch.optim.Optimizer, snap: tuple[Any, Any, list[torch.Tensor], Any]) -> None:
    state, groups, values, options = snap
    assert opt.state is state and opt.param_groups is groups
    now = _snapshot(opt)
    assert len(now[2]) == len(values) and all(torch.equal(a, b) for a, b in zip(now[2], values, strict=True))
    assert now[3] == options


def _stepped(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = 2) -> torch.optim.Optimizer:
    params = _params()
    opt = make(params)
    for s in range(steps):
        _grads(params, s)
        opt.step()
    return opt


def _muon(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return orthoptim.Muon(ps, lr=0.02, compute_dtype="float32")


def _normuon(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return orthoptim.NorMuon(ps, lr=0.02, compute_dtype="float32")


def _polargrad(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return orthoptim.PolarGrad(ps, lr=1e-3, compute_dtype="float32")


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {  # how a checkpoint is damaged → the error
    "missing momentum": (lambda sd: sd["state"][1].pop("momentum_buffer"), "lacks \\['momentum_buffer'\\]"),
    "missing second moment": (lambda sd: sd["state"][0].pop("second_moment"), "lacks \\['second_moment'\\]"),
    "stray state id": (lambda sd: sd["state"].__setitem__(7, sd["state"][0]), "belong to no parameter.*7"),
    "nan momentum": (lambda sd: sd["state"][2]["momentum_buffer"].view(-1)[3].fill_(float("nan")), "NaN"),
    "inf momentum": (lambda sd: sd["state"][0]["momentum_buffer"].view(-1)[0].fill_(float("-inf")), "Inf"),
    "negative second moment": (lambda sd: sd["state"][1]["second_moment"].view(-1)[2].fill_(-1.0), "negative"),
    "momentum of another shape": (
        lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(40, 16)),
        "shape \\(40, 16\\), not the parameter's \\(16, 40\\)",
    ),
    "negative step": (lambda sd: sd["state"][0].__setitem__("step", -3), "non-negative whole number"),
    "fractional step": (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(1.5)), "whole number"),
    "unknown state": (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(16, 40)), "does not keep"),
    "second moment of other rows": (
        lambda sd: sd["state"][2].__setitem__("second_moment", torch.zeros(3, 9)),
        "27 rows, but the parameter is 3 matrices of 8 rows",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_damaged_checkpoint_is_refused_and_changes_nothing(case: str) -> None:
    damage, message = BROKEN[case]
    saved = copy.deepcopy(_stepped(_normuon).state_dict())
    damage(saved)
    opt = _stepped(_normuon, steps=3)  # a different state than the checkpoint's, so a partial load would show
    snap = _snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, snap)
    _grads([p for g in opt.param_groups for p in g["params"]], 9)
    opt.step()  # and it still steps


def test_a_numeric_step_is_converted_as_torch_does_and_resumes_exactly() -> None:
    """torch's optimizers turn a ``step`` saved as a Python number into a tensor when loading; the resumed run
    equals the uninterrupted one (Muon's int64 counter, Hybrid's AdamW float32 counter)."""
    for make in (_muon, lambda ps: orthoptim.Hybrid((ps[:2], ps[2:]), lr=0.02, adamw_lr=1e-3)):
        reference = _stepped(make, steps=3)
        first = _stepped(make, steps=2)
        saved = copy.deepcopy(first.state_dict())
        for entry in saved["state"].values():
            entry["step"] = int(entry["step"])  # as a hand-written or converted checkpoint might hold it
        params = _params()
        resumed = make(params)
        with torch.no_grad():
            for p, q in zip(params, [p for g in first.param_groups for p in g["params"]], strict=True):
                p.copy_(q)
        resumed.load_state_dict(saved)
        for p in params:
            step = resumed.state[p]["step"]
            assert isinstance(step, torch.Tensor) and int(step) == 2
        _grads(params, 2)
        resumed.step()
        want = [p for g in reference.param_groups for p in g["params"]]
        assert all(torch.equal(a, b) for a, b in zip(params, want, strict=True))


CONVERSIONS = [(_muon, _polargrad), (_muon, _normuon), (_normuon, _muon), (_polargrad, _normuon)]


@pytest.mark.parametrize(("source", "target"), CONVERSIONS, ids=lambda f: f.__name__.strip("_"))
def test_another_algorithms_checkpoint_is_refused_by_name_or_converted_on_request(
    source: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    target: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    saved = copy.deepcopy(_stepped(source).state_dict())
    opt = _stepped(target, steps=1)
    was, now = type(_stepped(source, 0)).__name__, type(opt).__name__
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=f"{was}'s, but this optimizer's group 0 runs {now}"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, snap)
    algorithm = {k: opt.param_groups[0][k] for k in ("row_norm", "scale_mode", "ns_steps", "schedule")}
    opt.load_state_dict(saved, convert=True)
    group = opt.param_groups[0]
    assert {k: group[k] for k in algorithm} == algorithm  # still the target algorithm
    params = group["params"]
    for p, entry in zip(params, saved["state"].values(), strict=True):
        state = opt.state[p]
        assert torch.equal(state["momentum_buffer"], entry["momentum_buffer"])
        assert int(state["step"]) == 2
        if now == "NorMuon":  # started at zero, as at a first step, with NorMuon's (count, rows) layout
            count, m = (3, 8) if p.ndim == 3 else (1, p.shape[0])
            assert state["second_moment"].shape == (count, m) and not state["second_moment"].any()
        else:
            assert "second_moment" not in state
    _grads(params, 5)
    opt.step()
    assert all(int(opt.state[p]["step"]) == 3 for p in params)


def test_an_adamw_group_never_takes_an_orthogonalized_groups_state() -> None:
    params = _params()
    saved = orthoptim.Hybrid(
        [{"params": params[:1], "algorithm": "muon"}, {"params": params[1:], "algorithm": "adamw"}]
    )
    _grads(params, 0)
    saved.step()
    swapped = orthoptim.Hybrid(
        [{"params": params[:1], "algorithm": "adamw"}, {"params": params[1:], "algorithm": "muon"}]
    )
    for convert in (False, True):
        with pytest.raises(ValueError, match=r"ran (Muon|AdamW), but .* runs (AdamW|Muon): their states differ"):
            swapped.load_state_dict(copy.deepcopy(saved.state_dict()), convert=convert)


def test_float32_statistics_stay_float32_for_bfloat16_parameters() -> None:
    params = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    opt = orthoptim.NorMuon(params, lr=0.02)
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = orthoptim.NorMuon(params, lr=0.02)
    fresh.load_state_dict(saved)
    for p, entry in zip(params, saved["state"].values(), strict=True):
        state = fresh.state[p]
        assert state["second_moment"].dtype == torch.float32 and state["nonfinite_skips"].dtype == torch.float32
        assert torch.equal(state["second_moment"], entry["second_moment"])  # not rounded through bfloat16
        assert state["momentum_buffer"].dtype == torch.bfloat16


def test_load_hooks_run_where_torchs_do_around_the_checks() -> None:
    """torch.optim.Optimizer's load hooks: a pre-hook may rewrite the checkpoint before it is checked (here it
    repairs a NaN momentum the check would refuse), a post-hook runs only after a load that stands and may write
    into the state (torch's optimizer tests do) without that being blamed on the checkpoint."""
    saved = copy.deepcopy(_stepped(_muon).state_dict())
    damaged = copy.deepcopy(saved)
    BROKEN["nan momentum"][0](damaged)
    calls: list[str] = []

    def repair(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("pre")
        sd = copy.deepcopy(sd)
        sd["state"][2]["momentum_buffer"] = saved["state"][2]["momentum_buffer"].clone()
        return sd

    def mark(opt: torch.optim.Optimizer) -> None:
        calls.append("post")
        opt.state["loaded_by_hook"] = True  # type: ignore[index]

    opt = _stepped(_muon, steps=3)
    opt.register_load_state_dict_post_hook(mark)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="NaN"):
        opt.load_state_dict(damaged)
    assert calls == []  # a refused load fires no post-hook
    _assert_unchanged(opt, snap)
    opt.register_load_state_dict_pre_hook(repair)
    opt.load_state_dict(damaged)
    assert calls == ["pre", "post"] and opt.state["loaded_by_hook"] is True  # type: ignore[index]
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        assert torch.equal(opt.state[p]["momentum_buffer"], saved["state"][i]["momentum_buffer"])


def test_a_torch_muon_checkpoint_converts_on_request() -> None:
    """Switching a run from torch.optim.Muon: without ``convert`` the checkpoint is refused with the way out; with it
    the momentum buffers and torch's lr, weight decay, momentum, nesterov and adjust_lr_fn carry over, the schedule
    is this optimizer's, and the next step is the closed form on the float64-SVD polar factor of the Nesterov
    momentum."""
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(16, 40, generator=gen, dtype=torch.float64)) for _ in range(2)]
    theirs = torch.optim.Muon(params, lr=0.03, weight_decay=0.05, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        theirs.step()
    saved = copy.deepcopy(theirs.state_dict())
    ours = orthoptim.Muon(params, lr=0.5, schedule="polar_express", ns_steps=12, compute_dtype="float64")
    with pytest.raises(ValueError, match="convert=True"):
        ours.load_state_dict(saved)
    ours.load_state_dict(saved, convert=True)
    group = ours.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]) == (0.03, 0.05, 0.9, True)
    assert group["scale_mode"] == "match_rms_adamw" and group["ns_steps"] == 12
    for p in params:
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"])
    # Copies: the loaded state may share memory with the checkpoint's tensors (torch's load does not copy them).
    buffers = [theirs.state[p]["momentum_buffer"].clone() for p in params]
    before = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    ours.step()
    for p, w, g, b in zip(params, before, grads, buffers, strict=True):
        buf = torch.lerp(b, g, 1 - 0.9)
        M = torch.lerp(g, buf, 0.9)
        U, _, Vt = torch.linalg.svd(M, full_matrices=False)
        want = w * (1 - 0.03 * 0.05) - 0.03 * 0.2 * math.sqrt(40) * (U @ Vt)  # match_rms_adamw: 0.2·√max(m, n)
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
    # A NorMuon loads it as from orthoptim.Muon: the momentum carries over, the second moments start at zero.
    normuon = orthoptim.NorMuon(params, lr=0.02)
    normuon.load_state_dict(theirs.state_dict(), convert=True)
    assert all(float(normuon.state[p]["second_moment"].abs().sum()) == 0.0 for p in params)
    assert normuon.param_groups[0]["row_norm"] is True


def test_a_torch_adamw_checkpoint_is_named_as_no_orthoptim_optimizers() -> None:
    """Hybrid facing torch.optim.AdamW's state_dict of the same two groups: refused as not orthoptim's (not as
    "Muon's"), naming its options."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    hybrid = orthoptim.Hybrid(model)
    halves = [{"params": g["params"]} for g in hybrid.param_groups]
    adamw = torch.optim.AdamW(halves)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adamw.step()
    with pytest.raises(ValueError, match=r"not saved by an orthoptim optimizer.*torch\.optim\.AdamW's"):
        hybrid.load_state_dict(adamw.state_dict())
