"""The optimizers against torch.optim.Muon / torch.optim.AdamW, float64-SVD references and the published formulas."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim import lr_scale

from .conftest import SMALL_LARGE, require_interpreted_fused_kernels, with_spectrum

JORDAN = (3.4445, -4.7750, 2.0315)


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def run(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


SHAPES = [(32, 48), (64, 32), (48, 48)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"adjust_lr_fn": "match_rms_adamw"},
        {"nesterov": False, "momentum": 0.9, "weight_decay": 0.0},
    ],
)
def test_muon_matches_torch_optim_muon(kw: dict[str, object], step_paths: str) -> None:
    ours, theirs = make_params(SHAPES), make_params(SHAPES)
    start = [p.detach().clone() for p in ours]
    run(torch.optim.Muon(theirs, lr=0.02, **kw), theirs, 6)  # type: ignore[arg-type]
    opt = orthoptim.Muon(
        ours, lr=0.02, ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16", **kw, backend=step_paths
    )  # type: ignore[arg-type]
    run(opt, ours, 6)
    for a, b, w in zip(ours, theirs, start, strict=True):
        rel = float(((a - b).norm() / (b - w).norm()).detach())
        assert rel < 0.03, rel  # same math, bf16 rounding apart


def reference_muon(shapes: list[tuple[int, int]], steps: int, lr: float, mu: float, wd: float) -> list[torch.Tensor]:
    """Muon written out in float64 from its definition (torch.optim.Muon docs), Jordan NS in float64."""
    ps = [p.detach().double() for p in make_params(shapes)]
    bufs = [torch.zeros_like(p) for p in ps]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for i, p in enumerate(ps):
            g = torch.randn(p.shape, generator=gen).double()
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            m = g + mu * (bufs[i] - g)
            x = m.T if m.shape[0] > m.shape[1] else m
            x = x / x.norm()
            for _ in range(5):
                a = x @ x.T
                x = JORDAN[0] * x + (JORDAN[1] * a + JORDAN[2] * a @ a) @ x
            o = x.T if m.shape[0] > m.shape[1] else x
            p.mul_(1 - lr * wd).sub_(lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * o)
    return ps


def test_muon_float32_matches_float64_definition() -> None:
    ours = make_params(SHAPES)
    run(orthoptim.Muon(ours, lr=0.02, ns_coefficients=JORDAN, compute_dtype="float32"), ours, 4)
    for a, b in zip(ours, reference_muon(SHAPES, 4, 0.02, 0.95, 0.1), strict=True):  # type: ignore[arg-type]
        assert torch.allclose(a.double(), b, atol=2e-5)


def test_muon_float64_matches_float64_definition_on_both_paths(step_paths: str) -> None:
    """Float64 parameters and compute: equal to the definition to float64 rounding, weight decay included (CUDA's
    select once built the decay factor in float32: 0.999 became 0.99900001, a 5e-8 error here)."""
    ours = [nn.Parameter(p.detach().double()) for p in make_params(SHAPES)]
    run(orthoptim.Muon(ours, lr=0.02, ns_coefficients=JORDAN, compute_dtype="float64", backend=step_paths), ours, 4)
    for a, b in zip(ours, reference_muon(SHAPES, 4, 0.02, 0.95, 0.1), strict=True):  # type: ignore[arg-type]
        assert torch.allclose(a, b, rtol=0.0, atol=1e-11), float((a - b).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_weight_decay_equals_torch_optim_muon_in_every_dtype(dtype: torch.dtype, step_paths: str) -> None:
    """With a zero gradient the step is the weight decay alone: ``param.mul_(1 − lr·wd)`` as torch.optim.Muon
    computes it, bit for bit, in 16-bit dtypes too (torch's CPU ``_foreach_mul_`` would round 0.99 to bfloat16's
    0.98828 first)."""
    theirs = [nn.Parameter(p.detach().to(dtype)) for p in make_params([(24, 40), (40, 24)])]
    ours = [nn.Parameter(p.detach().clone()) for p in theirs]
    expected = [p.detach().clone().mul_(1 - 0.1 * 0.1) for p in theirs]
    for opt, ps in (
        (torch.optim.Muon(theirs, lr=0.1, weight_decay=0.1), theirs),
        (orthoptim.Muon(ours, lr=0.1, backend=step_paths), ours),
    ):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
    for a, b, e in zip(ours, theirs, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a, e)


def test_conv_and_batched_weights() -> None:
    """A conv weight acts as its (out, in·k·k) matrix; a 3-D weight as independent matrices."""
    conv, flat = make_params([(8, 3, 3, 3)]), make_params([(8, 27)])
    run(orthoptim.Muon(conv, lr=0.02), conv, 3)
    run(orthoptim.Muon(flat, lr=0.02), flat, 3)
    assert torch.allclose(conv[0].reshape(8, 27), flat[0], atol=1e-6)
    batched = make_params([(4, 6, 10)])
    singles = [nn.Parameter(batched[0][i].detach().clone()) for i in range(4)]
    opt_b = orthoptim.Muon(batched, lr=0.02)
    opt_s = orthoptim.Muon(singles, lr=0.02)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        g = torch.randn(4, 6, 10, generator=gen)
        batched[0].grad = g.clone()
        for i, p in enumerate(singles):
            p.grad = g[i].clone()
        opt_b.step()
        opt_s.step()
    for i, p in enumerate(singles):
        assert torch.allclose(batched[0][i], p, atol=1e-6)
    conv1d = make_params([(8, 3, 5)])
    opt = orthoptim.Muon([{"params": conv1d, "shape_policy": "flatten"}], lr=0.02)
    run(opt, conv1d, 1)


#: Each scale mode's factor for an m×n matrix, as its source states it (README table).
SCALE_FACTORS = {
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),  # KellerJordan/Muon, torch.optim.Muon
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),  # arXiv 2502.16982
    "unit_rms": lambda m, n: math.sqrt(max(m, n)),
    "spectral_norm": lambda m, n: math.sqrt(m / n),  # arXiv 2310.17813; microsoft/dion adjust_lr="spectral_norm"
}


@pytest.mark.parametrize("mode", list(SCALE_FACTORS))
def test_scale_modes_set_the_update_size(mode: str) -> None:
    """One step, no momentum or decay, fully converged polar factor: Δθ = −lr·scale·UVᵀ (float64 SVD)."""
    for shape in ((24, 40), (40, 24)):
        assert math.isclose(lr_scale(mode, *shape), SCALE_FACTORS[mode](*shape), rel_tol=1e-12)  # type: ignore[arg-type]
        (p,) = make_params([shape])
        w0 = p.detach().clone()
        g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        opt = orthoptim.Muon(  # type: ignore[arg-type]
            [p], lr=0.01, momentum=0.0, weight_decay=0.0, scale_mode=mode, ns_steps=10, compute_dtype="float32"
        )
        p.grad = g
        opt.step()
        expected = -0.01 * lr_scale(mode, *shape) * orthoptim.polar(g.double())  # type: ignore[arg-type]
        assert torch.allclose((p - w0).double(), expected, atol=2e-5 * lr_scale(mode, *shape))
    if mode == "unit_rms":
        rms = float((p.detach() - w0).pow(2).mean().sqrt())
        assert math.isclose(rms, 0.01, rel_tol=1e-3)


@pytest.mark.parametrize("cond", [1e3, 1e5])
def test_polargrad_nuclear_norm_within_one_percent(cond: float) -> None:
    s = torch.logspace(0, -math.log10(cond), 40, dtype=torch.float64)
    G, _, _ = with_spectrum(40, 90, s, seed=6)
    p = nn.Parameter(torch.zeros(40, 90))
    opt = orthoptim.PolarGrad([p], lr=1e-3, momentum=0.0, weight_decay=0.0)
    p.grad = G.float()
    opt.step()
    O = orthoptim.orthogonalize(G.float(), steps=8)  # the same computation the step ran
    s_est = float(-(p.detach().double() / 1e-3 * O.double()).sum() / O.double().pow(2).sum())
    truth = float(orthoptim.nuclear_norm(G))
    assert abs(s_est - truth) / truth < 0.01, (s_est, truth)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
def test_polargrad_in_float64_is_the_closed_form(step_paths: str, param_dtype: torch.dtype) -> None:
    """``compute_dtype="float64"``: one step is θ − lr·‖G‖_*·polar(G) from the float64 SVD, to the iteration's
    own convergence (a well-conditioned G: 8 Polar Express steps bring every gain within 1e-3 of 1)."""
    s = torch.linspace(1.0, 0.1, 24, dtype=torch.float64)
    G, _, _ = with_spectrum(24, 56, s, seed=11)
    p = nn.Parameter(torch.zeros(24, 56, dtype=param_dtype))
    opt = orthoptim.PolarGrad([p], lr=1e-3, momentum=0.0, weight_decay=0.0, compute_dtype="float64", backend=step_paths)
    p.grad = G.to(param_dtype)
    opt.step()
    want = -1e-3 * orthoptim.nuclear_norm(G) * orthoptim.polar(G)
    err = float((p.detach().double() - want).norm() / want.norm())
    assert err < 2e-3, err


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_normuon_matches_published_formula(step_paths: str, compute: str) -> None:
    """One step from zero state, against the formula applied to the float64-SVD polar factor (both step paths: the
    CPU's float32 copies and the GPUs' row sums; a float64 update takes the float32-copy way on both)."""
    (p,) = make_params([(16, 40)])
    w0 = p.detach().clone()
    g = torch.randn(16, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    opt = orthoptim.NorMuon(
        [p],
        lr=0.01,
        momentum=0.0,
        weight_decay=0.0,
        ns_steps=10,
        beta2=0.95,
        row_eps=1e-8,
        compute_dtype=compute,
        backend=step_paths,
    )
    p.grad = g.float()
    opt.step()
    O = orthoptim.polar(g)
    v = 0.05 * O.pow(2).mean(dim=1)  # β₂·0 + (1 − β₂)·mean_j O_ij²
    normed = O / (v + 1e-8).sqrt().unsqueeze(1)
    normed = normed * (O.norm() / normed.norm())
    assert torch.allclose((p - w0).double(), -0.01 * normed, atol=1e-5)
    assert torch.allclose(opt.state[p]["second_moment"].double().reshape(-1), v, rtol=1e-3)


def test_vectors_are_refused_with_a_pointer_to_hybrid() -> None:
    with pytest.raises(ValueError, match="Hybrid"):
        orthoptim.Muon([nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="Hybrid"):
        orthoptim.NorMuon([nn.Parameter(torch.zeros(()))])


@pytest.mark.parametrize(
    "kw,pattern",
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adjust_lr_fn": "bogus"}, "adjust_lr_fn"),
        ({"ns_coefficients": JORDAN, "schedule": "jordan"}, "not both"),
        ({"scale_mode": "huge"}, "scale mode"),
        ({"normalization": "l1"}, "normalization"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"ns_steps": 0}, "steps"),
        ({"schedule": "aol_emerging"}, "refused"),
    ],
)
def test_bad_arguments_are_named(kw: dict[str, object], pattern: str) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        orthoptim.Muon(make_params([(4, 4)]), **kw)  # type: ignore[arg-type]


def snapshot(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> tuple[list[torch.Tensor], dict[str, object]]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict, ignore: tuple[str, ...] = ("nonfinite_skips",)) -> None:  # type: ignore[type-arg]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key, val in a["state"][k].items():
            if key not in ignore:
                assert torch.equal(val, b["state"][k][key]), key


def _step_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The backend a test's optimizers take (``backend=``), so the test runs through every way the step is taken:
    ``"torch@cpu"``, the torch backend's CPU choices (momentum input per parameter, recomputed at the commit; the
    skip flag read on the host; float32 copies in the normalization, the Gram scalings and NorMuon's rows);
    ``"torch@cuda"``, its CUDA choices (foreach or stacked momentum; device-side selects unless the warning reads
    the flag; float64 factors and row sums instead of float32 copies, ``polar/devices.py``); and ``"triton"``, the
    same with the momentum input and the commit by the fused kernels (``optim/backends/triton.py``) run by Triton's
    interpreter — all on the CPU."""
    if request.param != "triton":
        yield str(request.param)
        return
    require_interpreted_fused_kernels()
    # The interpreter computes with numpy, which warns where a GPU silently makes Inf − Inf = NaN; the tests
    # that turn warnings into errors mean the optimizer's warning, not those.
    with np.errstate(all="ignore"):
        yield str(request.param)


step_paths = pytest.fixture(params=["torch@cpu", "torch@cuda", "triton"], name="step_paths")(_step_paths)
# Tests on matrices of ~10⁵–10⁶ entries take the first two only: Triton's interpreter runs ~3 ms per program
# (2048 entries), ~20 s per such test; tests/test_fused.py covers the kernels on small matrices (tiles, the
# non-finite gradient reaching the checked update).
unfused_step_paths = pytest.fixture(params=["torch@cpu", "torch@cuda"], name="unfused_step_paths")(_step_paths)


def test_hybrid_skip_covers_the_adamw_half(step_paths: str) -> None:
    """A NaN in an AdamW parameter's gradient skips the whole Hybrid step, matrices included (both commit paths)."""
    params = make_params([*SHAPES, (48,)])
    opt = orthoptim.Hybrid((params[:3], params[3:]), lr=0.02, backend=step_paths)
    run(opt, params, 2)
    before, state = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[3].grad[5] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"shape \(48,\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert_same_state(state, opt.state_dict())  # type: ignore[arg-type]
    params[3].grad[5] = 0.0
    opt.step()
    assert not any(torch.equal(p, q) for p, q in zip(params, before, strict=True))


@pytest.mark.parametrize("cls", [orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad])
def test_nonfinite_skip_leaves_everything_bit_identical(cls: type, step_paths: str) -> None:
    params = make_params(SHAPES)
    opt = cls(params, lr=0.02, backend=step_paths)
    run(opt, params, 2)
    before, state = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"shape \(64, 32\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert_same_state(state, opt.state_dict())  # type: ignore[arg-type]
    assert opt.nonfinite_skips == 1
    params[0].grad[0, 0] = float("inf")
    params[1].grad[3, 4] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.warn_on_skip = False
        opt.step()  # skipped silently
    assert opt.nonfinite_skips == 2
    params[0].grad[0, 0] = float("-inf")  # only a min-side reduction sees this one
    opt.step()
    assert opt.nonfinite_skips == 3
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    params[0].grad[0, 0] = 1e30  # huge but finite: not a skip
    opt.step()
    assert opt.nonfinite_skips == 3 and all(torch.isfinite(p).all() for p in params)
    run(opt, params, 1)  # and training goes on
    assert all(torch.isfinite(p).all() for p in params)


def test_nonfinite_raise_and_propagate() -> None:
    params = make_params(SHAPES)
    opt = orthoptim.Muon(params, lr=0.02, nonfinite="raise")
    run(opt, params, 1)
    before, state = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[2].grad[0, 0] = float("inf")
    with pytest.raises(orthoptim.NonFiniteError, match=r"\(48, 48\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert_same_state(state, opt.state_dict(), ignore=())  # type: ignore[arg-type]
    opt = orthoptim.Muon(params, lr=0.02, nonfinite="propagate")
    params[2].grad = torch.full((48, 48), float("nan"))
    opt.step()
    assert torch.isnan(params[2]).all()


def test_hybrid_split_adamw_half_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 50))
    mats, rest = orthoptim.split_params(model)
    assert {id(p) for p in mats} == {id(model[1].weight), id(model[3].weight)}
    assert {id(p) for p in rest} == {id(model[0].weight), id(model[1].bias), id(model[3].bias)}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.body = nn.Linear(16, 32)
            self.lm_head = nn.Linear(32, 50)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.relu(self.body(self.emb(x))))

    net = Net()
    mats, _ = orthoptim.split_params(net)
    assert [id(p) for p in mats] == [id(net.body.weight)]
    twin = copy.deepcopy(net)
    opt = orthoptim.Hybrid(net, lr=0.02, adamw_lr=1e-3, adamw_betas=(0.9, 0.99), adamw_weight_decay=0.01)
    ref = torch.optim.AdamW(orthoptim.split_params(twin)[1], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    ref_muon = orthoptim.Muon(orthoptim.split_params(twin)[0], lr=0.02, weight_decay=0.0)  # the other half, alike
    x = torch.randint(0, 50, (8, 5))
    for _ in range(5):
        for m, opts in ((net, (opt,)), (twin, (ref, ref_muon))):
            for o in opts:
                o.zero_grad()
            loss = m(x).logsumexp(-1).mean()
            loss.backward()
            for o in opts:
                o.step()
    for a, b in zip(orthoptim.split_params(net)[1], orthoptim.split_params(twin)[1], strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_hybrid_scheduler_closure_and_state_dict_resume_bit_exact() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def make(model: nn.Module) -> tuple[orthoptim.Hybrid, torch.optim.lr_scheduler.LRScheduler]:
        mats = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        opt = orthoptim.Hybrid((mats, rest), lr=0.02, adamw_lr=1e-3)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def train(
        model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int
    ) -> None:
        for _ in range(n):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            sched.step()

    opt, sched = make(net)
    train(net, opt, sched, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and opt.param_groups[1]["lr"] == pytest.approx(5e-4)
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    train(net, opt, sched, 3)
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    twin.load_state_dict(saved_model)
    opt2, sched2 = make(twin)
    opt2.load_state_dict(copy.deepcopy(saved_opt))
    sched2.load_state_dict(saved_sched)
    train(twin, opt2, sched2, 3)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_group_aware_clip_ignores_scale_invariant_groups() -> None:
    mats, rest = make_params([(8, 8), (8, 4)]), make_params([(8,), (4,)])
    opt = orthoptim.Hybrid((mats, rest))
    for p in mats:
        p.grad = torch.full(p.shape, 1e6)
    for p in rest:
        p.grad = torch.full(p.shape, 3.0)
    norm = orthoptim.clip_grad_norm_(opt, 1.0)
    assert float(norm) == pytest.approx(3.0 * math.sqrt(12))
    assert all(torch.equal(p.grad, torch.full(p.shape, 1e6)) for p in mats)  # type: ignore[arg-type]
    assert float(torch.cat([p.grad for p in rest]).norm()) == pytest.approx(1.0, rel=1e-5)  # type: ignore[misc]
    assert float(orthoptim.clip_grad_norm_(orthoptim.Muon(make_params([(3, 3)])), 1.0)) == 0.0


def overfit(opt_factory: object, clip: bool, steps: int = 150) -> float:
    """Fixed-batch MLP regression; the middle layer's gradient is scaled by 1e12 by a hook."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64, bias=False), nn.Tanh(), nn.Linear(64, 64, bias=False), nn.Tanh(),
                        nn.Linear(64, 4, bias=False))  # fmt: skip
    net[2].weight.register_hook(lambda g: g * 1e12)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    opt = opt_factory(net.parameters())  # type: ignore[operator]
    # Linear decay to 0: the final loss settles instead of depending on where a constant-lr orbit stops.
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay.step()
    return float(nn.functional.mse_loss(net(x), y).detach())


def test_acceptance_global_clipping_does_not_stall_orthoptim_but_stalls_torch_muon() -> None:
    ours = lambda ps: orthoptim.Muon(ps, lr=0.02, weight_decay=0.0)  # noqa: E731
    theirs = lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0)  # noqa: E731
    # Measured (CPU, torch 2.13, 150 steps, lr decayed linearly to 0): orthoptim.Muon 3.5e-4 unclipped / 1e-5
    # clipped; torch.optim.Muon 8.4e-4 unclipped / 0.60 clipped. Both orthoptim runs converge (the clip only
    # rescales each step's gradient, which a scale-invariant update ignores up to momentum weighting); torch's
    # clipped run stalls because max(‖X‖, 1e-7) floors every layer but the hooked one.
    ours_free, ours_clipped = overfit(ours, False), overfit(ours, True)
    theirs_free, theirs_clipped = overfit(theirs, False), overfit(theirs, True)
    assert ours_free < 2e-3 and ours_clipped < 2e-3, (ours_free, ours_clipped)
    assert theirs_free < 2e-3 and theirs_clipped > 0.1, (theirs_free, theirs_clipped)  # the scenario bites


def test_registry() -> None:
    assert orthoptim.available() == ["hybrid", "muon", "normuon", "polargrad"]
    opt = orthoptim.create("NorMuon", make_params([(4, 6)]), lr=0.01)
    assert isinstance(opt, orthoptim.NorMuon)
    with pytest.raises(ValueError, match="available"):
        orthoptim.create("lion", make_params([(4, 6)]))


def test_bfloat16_params_keep_float32_statistics_across_state_dict() -> None:
    params = [nn.Parameter(torch.randn(8, 12).bfloat16())]
    opt = orthoptim.NorMuon(params, lr=0.01)
    run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    twin = [nn.Parameter(params[0].detach().clone())]
    opt2 = orthoptim.NorMuon(twin, lr=0.01)
    opt2.load_state_dict(saved)
    assert opt2.state[twin[0]]["second_moment"].dtype == torch.float32
    assert torch.equal(opt2.state[twin[0]]["second_moment"], opt.state[params[0]]["second_moment"])
    for p in (params, twin):
        p[0].grad = torch.ones(8, 12, dtype=torch.bfloat16)
    opt.step()
    opt2.step()
    assert torch.equal(params[0], twin[0])


def test_schedule_unsafe_in_the_compute_dtype_is_refused_at_construction() -> None:
    """Checked up front for each parameter's device, so a compiled step never runs an unvalidated schedule."""
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="refused in bfloat16"):
        orthoptim.Muon([w], schedule="cans", compute_dtype="bfloat16")
    orthoptim.Muon([w], schedule="cans", compute_dtype="float32")  # fine in float32


# Large enough for the CPU's own paths: matrix-by-matrix iteration (``newton_schulz.iterates_matrix_by_matrix``),
# symmetric row-block products (≥ SYMMETRIC_MIN_ROWS rows, 530 with an uneven last block), a megabatch of two
# parameters, a tall one.
LARGE = [(256, 1100), (1100, 256), (256, 1100), (530, 530)]


def test_large_shapes_take_the_cpu_paths() -> None:
    from orthoptim.polar.newton_schulz import SYMMETRIC_MIN_ROWS, iterates_matrix_by_matrix

    assert all(iterates_matrix_by_matrix(s, torch.device("cpu")) for s in LARGE)
    assert max(min(s) for s in LARGE) >= SYMMETRIC_MIN_ROWS


def test_large_cpu_matrices_match_torch_optim_muon(unfused_step_paths: str, cpu_paths_at_small_sizes: None) -> None:
    """The CPU's large-matrix paths (taken here at small sizes) against the real torch.optim.Muon."""
    ours, theirs = make_params(SMALL_LARGE), make_params(SMALL_LARGE)
    start = [p.detach().clone() for p in ours]
    run(torch.optim.Muon(theirs, lr=0.02), theirs, 3)
    run(
        orthoptim.Muon(
            ours, lr=0.02, ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16", backend=unfused_step_paths
        ),
        ours,
        3,
    )
    for a, b, w in zip(ours, theirs, start, strict=True):
        rel = float(((a - b).norm() / (b - w).norm()).detach())
        assert rel < 0.03, rel


def test_large_cpu_matrices_float32_match_float64_definition() -> None:
    ours = make_params(LARGE)
    run(orthoptim.Muon(ours, lr=0.02, ns_coefficients=JORDAN, compute_dtype="float32"), ours, 2)
    for a, b in zip(ours, reference_muon(LARGE, 2, 0.02, 0.95, 0.1), strict=True):
        assert torch.allclose(a.double(), b, atol=2e-5)


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_buffer_is_torch_lerp_bit_for_bit(nonfinite: str, nesterov: bool, step_paths: str) -> None:
    """The commit recomputes the momentum in place (it is not held across the step): it must be exactly
    ``lerp(B, G, 1−μ)``, as torch.optim.Muon writes it, for stacked, tall, conv and 3-D parameters."""
    large = LARGE if step_paths != "triton" else [(60, 110), (110, 60), (60, 110), (53, 53)]  # interpreter
    params = make_params([*large, (16, 8, 3, 3), (3, 40, 24)])
    opt = orthoptim.Muon(params, lr=0.02, momentum=0.9, nesterov=nesterov, nonfinite=nonfinite, backend=step_paths)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        old = [opt.state[p]["momentum_buffer"].clone() if p in opt.state else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for p, b in zip(params, old, strict=True):
            assert torch.equal(opt.state[p]["momentum_buffer"], torch.lerp(b, p.grad, 1 - 0.9))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts minor page faults with getrusage")
@pytest.mark.parametrize("compute_dtype", [None, "float32"], ids=["default", "float32"])
def test_cpu_step_reuses_its_buffers_in_steady_state(compute_dtype: str | None) -> None:
    """After the first steps a CPU step allocates nothing large afresh (optim/prepare.py ``_held_update``): fresh
    large allocations are page-faulted in on every step. Before the optimizer kept its buffers, this
    configuration faulted 7k–10k pages per step (measured 2026-11-23); now it faults none. This CPU's default
    compute dtype (bfloat16 with native bfloat16 products, else float32: emulated bfloat16 would take minutes at
    these sizes) and float32, which runs the rectangular matrices in the Gram form, whose m×m chain faulted ~13.7k
    pages per step until it took the workspace too (2026-12-07)."""
    import resource

    params = make_params([(768, 3072), (3072, 768), (768, 768)] * 2)
    opt = orthoptim.Muon(params, lr=0.02, compute_dtype=compute_dtype)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.step()
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults) < 500, faults  # 2 MB; one fresh update buffer here is 4.7 MB


def test_normuon_and_polargrad_on_large_cpu_matrices_match_their_formulas(unfused_step_paths: str) -> None:
    """The in-place row normalization and nuclear scaling (the CPU's float32 temporaries kept by the optimizer, the
    GPUs' row sums; tall updates as transposed views) against the formulas on the float64-SVD polar factor, wide
    and tall."""
    shapes = [(256, 1100), (1100, 256)]
    s = torch.logspace(0, -1, 256, dtype=torch.float64)
    grads = [with_spectrum(256, 1100, s, seed=3)[0], with_spectrum(256, 1100, s, seed=4)[0].T]
    kw = {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "compute_dtype": "float32"}
    ours = make_params(shapes)
    start = [p.detach().clone() for p in ours]
    opt = orthoptim.NorMuon(ours, ns_steps=10, beta2=0.95, row_eps=1e-8, **kw, backend=unfused_step_paths)  # type: ignore[arg-type]
    for _ in range(2):  # the second step runs on kept buffers
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.float()
        opt.step()
    mode = opt.param_groups[0]["scale_mode"]
    for p, w, g in zip(ours, start, grads, strict=True):
        O = orthoptim.polar(g)
        v1 = 0.05 * O.pow(2).mean(dim=1)  # β₂·0 + (1 − β₂)·mean_j O_ij², then one more step of the same O
        expected = torch.zeros_like(O)
        for v in (v1, 0.95 * v1 + 0.05 * O.pow(2).mean(dim=1)):
            normed = O / (v + 1e-8).sqrt().unsqueeze(1)
            expected -= 0.01 * lr_scale(mode, *p.shape) * normed * (O.norm() / normed.norm())
        diff = float(((p.detach() - w).double() - expected).abs().max())
        assert diff < 1e-5, diff
    polar_params = make_params(shapes)
    start = [p.detach().clone() for p in polar_params]
    opt = orthoptim.PolarGrad(polar_params, **kw, backend=unfused_step_paths)  # type: ignore[arg-type]
    for _ in range(2):
        for p, g in zip(polar_params, grads, strict=True):
            p.grad = g.float()
        opt.step()
    for p, w, g in zip(polar_params, start, grads, strict=True):
        # Two identical steps of −lr·‖G‖_*·polar(G).
        expected = -2 * 0.01 * orthoptim.nuclear_norm(g) * orthoptim.polar(g)
        rel = float(((p.detach() - w).double() - expected).norm() / expected.norm())
        assert rel < 1e-3, rel  # measured 6e-6 (float32, PolarGrad's defaults, a 10:1 spectrum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_hybrid_adamw_half_is_torch_fused_adamw_bit_for_bit(step_paths: str, dtype: torch.dtype) -> None:
    """Hybrid's AdamW half against ``torch.optim.AdamW(fused=True)`` on a twin model: every parameter, moment and
    step counter bit for bit, with weight decay, with lr 0, and through a skipped step (a NaN in a matrix's
    gradient: Hybrid drops the step, the reference is not stepped), on both step paths."""
    for lr in (0.05, 0.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 96), nn.ReLU(), nn.LayerNorm(96), nn.Linear(96, 8))
        model = model.to(dtype)
        twin = copy.deepcopy(model)
        opt = orthoptim.Hybrid(
            model, lr=0.02, adamw_lr=lr, adamw_weight_decay=0.2, warn_nonfinite=False, backend=step_paths
        )
        rest, twin_rest = orthoptim.split_params(model)[1], orthoptim.split_params(twin)[1]
        ref = torch.optim.AdamW(twin_rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.2, fused=True)
        x = torch.randint(0, 300, (16, 4))
        for k in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            for p, q in zip(rest, twin_rest, strict=True):
                q.grad = p.grad.clone()  # type: ignore[union-attr]
            if k == 2:
                model[1].weight.grad[0, 0] = float("nan")  # type: ignore[index]
            opt.step()
            if k != 2:
                ref.step()
        assert opt.nonfinite_skips == 1
        for p, q in zip(rest, twin_rest, strict=True):
            assert torch.equal(p, q)
            mine, theirs = opt.state[p], ref.state[q]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(mine[key], theirs[key]), key


_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_CLASSES = (orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad)
_PATH_CASES = [  # the full grid for both ways of committing, the rest in float32
    *((c, d, commit, True) for c in _CLASSES for d in _DTYPES for commit in ("selects", "reads flag")),
    *((c, torch.float32, "reads flag", False) for c in _CLASSES),
    *((c, torch.float32, "propagate", True) for c in _CLASSES),
]


@pytest.mark.parametrize(
    ("cls", "dtype", "commit", "nesterov"),
    _PATH_CASES,
    ids=[f"{c.__name__}-{str(d)[6:]}-{m}-{'nesterov' if n else 'plain'}" for c, d, m, n in _PATH_CASES],
)
def test_cpu_and_cuda_step_paths_give_the_same_bits(cls: type, dtype: torch.dtype, commit: str, nesterov: bool) -> None:
    """The CPU's step (momentum per parameter, recomputed at the commit, host-read skip flag, kept buffers, in-place
    NorMuon and PolarGrad post-processing) and CUDA's (forced here) are implementations of one update: every
    parameter and state tensor must agree bit for bit, through a skipped step (NaN gradient) too. CUDA's momentum
    is stacked and held for a commit that selects on the device flag (``warn_nonfinite=False``); built by foreach
    ops (the Nesterov input as ``lerp(new, G, 1 − μ)``) where the commit does not select (the warning's read; or
    ``"propagate"``, no skipped step then). The normalization is the CPU's on both (its GPU form rounds
    differently by design, checked on its own). The update itself is checked against torch.optim.Muon and the
    formulas elsewhere; this comparison found a float32 decay factor applied to float64 parameters on CUDA."""
    shapes = [(600, 450), (450, 600), (16, 8, 3, 3), (3, 40, 24), (64, 64)]  # per-matrix, tall, conv, 3-D, batched

    def train(cuda_paths: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        policy = {"nonfinite": "propagate"} if commit == "propagate" else {"warn_nonfinite": commit == "reads flag"}
        backend = "torch@cuda" if cuda_paths else "torch@cpu"
        # The normalization's arithmetic pinned to the CPU's on both: its GPU form rounds differently by design.
        opt = cls(
            ps, lr=0.05, weight_decay=0.2, nesterov=nesterov, backend=backend, elementwise="float32_copies", **policy
        )
        for k in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if k == 1 and commit != "propagate":
                ps[2].grad.view(-1)[3] = float("nan")  # type: ignore[union-attr]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning ("reads flag")
                opt.step()
        assert opt.nonfinite_skips == (0 if commit == "propagate" else 1)
        states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in ps] + [t.clone() for t in states]

    cpu, cuda = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(cpu, cuda, strict=True))


@pytest.mark.parametrize("paths", ["cpu", "device"])
def test_each_finite_flags_exactly_the_non_finite_tensors(paths: str) -> None:
    """The skip policy's per-gradient check (foreach max-abs norm off the CPU, max and min on it) against
    ``torch.isfinite(t).all()``: NaN, +Inf, −Inf, the largest finite values (no overflow), mixed dtypes."""
    from orthoptim.optim.base import _each_finite

    gen = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(5, 7, generator=gen, dtype=torch.float64).to(dt)
        for dt in (
            torch.float32,
            torch.bfloat16,
            torch.float64,
            torch.float32,
            torch.float16,
            torch.float32,
            torch.bfloat16,
        )
    ]
    tensors[1][2, 3] = float("nan")
    tensors[2][0, 0] = float("-inf")
    tensors[3].fill_(torch.finfo(torch.float32).max)
    tensors[3][1, 1] = -torch.finfo(torch.float32).max
    tensors[4][4, 6] = float("inf")
    tensors[6].fill_(float("-inf"))
    expected = torch.stack([torch.isfinite(t).all() for t in tensors])
    assert expected.tolist() == [True, False, False, True, False, True, False]
    assert torch.equal(_each_finite(tensors, paths == "cpu"), expected)
    with_empty = [*tensors, torch.empty(0, 3)]
    assert torch.equal(_each_finite(with_empty, paths == "cpu"), torch.cat([expected, torch.tensor([True])]))


def test_hybrid_adamw_half_takes_a_tensor_lr() -> None:
    """A 1-element tensor ``adamw_lr`` (what some schedulers hold) gives the bits of the same float lr."""
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 12), nn.LayerNorm(12))
        opt = orthoptim.Hybrid(model, adamw_lr=lr)
        start = model[0].weight.detach().clone()
        for _ in range(2):
            opt.zero_grad()
            model(torch.arange(6)).square().mean().backward()
            opt.step()
        assert not torch.equal(model[0].weight, start)  # the AdamW half did step
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("iteration", ["standard", "gram"])
@pytest.mark.parametrize("normalization", ["frobenius", "schatten4", "aol"])
def test_a_non_finite_gradient_always_reaches_the_checked_update(
    bad: float, iteration: str, normalization: str, unfused_step_paths: str
) -> None:
    """Under ``"skip"`` in one process the orthogonalized matrices' gradients are not checked on their own: their
    NaN/Inf must make the update non-finite, whatever the form, the normalization and the optimizer, or the step
    would commit it. Here one entry of one matrix (of a batch of two; tall and per-matrix-sized ones too) is bad:
    the step must be skipped with every parameter and state tensor unchanged."""
    shapes = [(24, 40), (24, 40), (40, 24), (300, 900)]
    for cls in (orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad):
        params = make_params(shapes)
        kw = {"iteration": iteration, "normalization": normalization, "warn_nonfinite": False}
        opt = cls(params, lr=0.02, weight_decay=0.1, **kw, backend=unfused_step_paths)
        run(opt, params, 1)
        before, state = snapshot(opt, params)
        for k in range(len(shapes)):
            for p in params:
                p.grad = torch.randn(p.shape)
            params[k].grad.view(-1)[7] = bad  # type: ignore[union-attr]
            opt.step()
            assert opt.nonfinite_skips == k + 1, (cls.__name__, k)
            assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True)), (cls.__name__, k)
            assert_same_state(state, opt.state_dict(), ignore=("nonfinite_skips",))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.02, 0.03])
@pytest.mark.parametrize("cls", [orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad, orthoptim.Hybrid])
def test_a_tensor_lr_is_read_live_and_gives_the_float_lr_bits(cls: type, step_paths: str, value: float) -> None:
    """``lr`` as a 0-d tensor (what a captured CUDA graph needs: it reads the value on the device): the same bits as
    the float lr of the tensor's value; changed in place between steps (as torch's schedulers do for tensor lrs:
    ``fill_``), the next step uses the new value without the optimizer re-reading any Python number. 0.03 on the
    tall matrix: −lr·√1.5 rounds differently in float32 than in float64 (the float lr's), 0.02 happens not to."""
    shapes = [(16, 24), (24, 16), (8,)]

    def train(tensor: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        lr: float | torch.Tensor = torch.tensor(value) if tensor else float(torch.tensor(value))
        if cls is orthoptim.Hybrid:
            adamw_lr: float | torch.Tensor = torch.tensor(1e-3) if tensor else 1e-3
            opt = cls(
                (ps[:2], ps[2:]), lr=lr, weight_decay=0.1, adamw_lr=adamw_lr, adamw_weight_decay=0.1, backend=step_paths
            )
        else:
            opt = cls(ps[:2], lr=lr, weight_decay=0.1, backend=step_paths)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor
        return [p.detach().clone() for p in ps]

    floats, tensors = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(floats, tensors, strict=True))
