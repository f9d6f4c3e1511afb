"""The optimizer objects as torch users handle them: copies and pickles, unknown options, param groups added or
changed later, checkpoints with custom schedules, bad parameters, and where a warning points."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.distributed.group import GroupRef
from orthoptim.optim.options import matrix_layout

Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _matrices(ps: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in ps if p.ndim >= 2]


MAKERS: dict[str, Maker] = {  # the orthogonalized ones get the matrices; Hybrid all
    "muon": lambda ps: orthoptim.Muon(_matrices(ps), lr=0.02, nonfinite="raise", warn_nonfinite=False),
    "normuon": lambda ps: orthoptim.NorMuon(_matrices(ps), lr=0.02),
    "polargrad": lambda ps: orthoptim.PolarGrad(_matrices(ps), lr=1e-3, compute_dtype="float32"),
    "hybrid": lambda ps: orthoptim.Hybrid((ps[:2], ps[2:]), lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.1),
}
SHAPES = [(16, 40), (40, 16), (24,), (8, 8)]


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params: list[nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return [*(p.detach() for p in params), *(v for p in params for _, v in sorted(opt.state[p].items()))]


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(name: str, how: str) -> None:
    """torch's __getstate__ keeps defaults, state and param groups only: the copy must rebuild the rest and keep
    the options set outside the groups."""
    opt = MAKERS[name](_params())
    params = [p for g in opt.param_groups for p in g["params"]]
    _grads(params, 1)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(twin_params, params, strict=True))
    assert (twin.nonfinite, twin.warn_on_skip) == (opt.nonfinite, opt.warn_on_skip)
    for step in range(2, 4):
        _grads(params, step)
        _grads(twin_params, step)
        opt.step()
        twin.step()
    mine, theirs = _state(opt), _state(twin)
    assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_a_process_group_is_shared_by_a_deep_copy_and_refuses_pickling() -> None:
    ref = GroupRef(None, (0, 1), 0)
    assert copy.deepcopy(ref) is ref
    with pytest.raises(TypeError, match=r"cannot be pickled.*state_dict"):
        pickle.dumps(ref)


@pytest.mark.parametrize(
    ("make", "typo"),
    [
        (lambda ps: orthoptim.Muon(ps, lr=0.02, weight_decy=0.0), "weight_decy"),
        (lambda ps: orthoptim.NorMuon(ps, lr=0.02, beta=0.9), "beta"),
        (lambda ps: orthoptim.PolarGrad(ps, lr=1e-3, foreach=True), "foreach"),
        (lambda ps: orthoptim.Hybrid((ps[:2], ps[2:]), betas=(0.9, 0.99)), "betas"),
        (lambda ps: orthoptim.create("muon", ps, bogus=1), "bogus"),
    ],
)
def test_an_unknown_option_raises_naming_it(make: Maker, typo: str) -> None:
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{typo}'"):
        make(_params())


def test_a_rejected_param_group_leaves_the_optimizer_as_it_was() -> None:
    params = _params()
    opt = orthoptim.Muon(params[:2], lr=0.02)
    with pytest.raises(ValueError, match="Hybrid"):  # a 1-D parameter: the error points to Hybrid
        opt.add_param_group({"params": [params[2]]})
    assert len(opt.param_groups) == 1
    _grads(params, 1)
    opt.step()  # still steps
    opt.add_param_group({"params": [params[3]], "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01


def test_hybrid_adds_an_adamw_group_with_its_adamw_options() -> None:
    """The added group runs the constructor's adamw_* options, not the matrices' lr and weight decay: checked
    against torch.optim.AdamW(fused=True), which Hybrid's AdamW half matches bit for bit."""
    params, twin = _params(), _params()
    betas = (0.8, 0.9)
    opt = orthoptim.Hybrid(([params[0]], [params[2]]), lr=0.02, weight_decay=0.3, adamw_lr=1e-3,
                           adamw_betas=betas, adamw_eps=1e-6, adamw_weight_decay=0.05)  # fmt: skip
    opt.add_param_group({"params": [params[3]], "algorithm": "adamw"})
    ref = torch.optim.AdamW([twin[3]], lr=1e-3, betas=betas, eps=1e-6, weight_decay=0.05, fused=True)
    for step in range(3):
        _grads(params, step)
        _grads(twin, step)
        opt.step()
        ref.step()
    assert torch.equal(params[3], twin[3])
    with pytest.raises(ValueError, match='"algorithm": "muon" or "adamw"'):
        opt.add_param_group({"params": [params[1]], "algorithm": "sgd"})
    assert len(opt.param_groups) == 3
    with pytest.raises(TypeError, match=r"nn\.Module"):
        orthoptim.Hybrid(list(_params()))  # type: ignore[arg-type]


def test_a_checkpoint_with_a_schedule_object_loads_with_torch_load_defaults() -> None:
    """torch.load's default weights_only unpickler (torch ≥ 2.6) accepts a designed Schedule in the groups, and
    the resumed optimizer steps as the one that saved it."""
    sched = orthoptim.design_schedule(5, 1e-3, safety=0.02, cushion=0.02)
    params, twin = _params(), _params()
    opt = orthoptim.Muon(params[:2], lr=0.02, schedule=sched)
    _grads(params, 1)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True by default
    assert saved["param_groups"][0]["schedule"] == sched
    with torch.no_grad():
        for a, b in zip(twin, params, strict=True):
            a.copy_(b)
    resumed = orthoptim.Muon(twin[:2], lr=0.02)
    resumed.load_state_dict(saved)
    _grads(params, 2)
    _grads(twin, 2)
    opt.step()
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(params[:2], twin[:2], strict=True))


def test_a_changed_shape_policy_takes_effect() -> None:
    """Plans are keyed by the policy: after ``shape_policy="flatten"`` the next update is the flattened matrix's
    (momentum 0: the update depends on that step's gradient only), against orthogonalize on that matrix."""
    w = nn.Parameter(torch.zeros(3, 8, 12))
    opt = orthoptim.Muon([w], lr=0.5, momentum=0.0, weight_decay=0.0, compute_dtype="float32")
    _grads([w], 1)
    opt.step()
    opt.param_groups[0]["shape_policy"] = "flatten"
    before = w.detach().clone()
    _grads([w], 2)
    opt.step()
    count, m, n = matrix_layout(tuple(w.shape), "flatten")
    assert count == 1
    scale = max(1.0, m / n) ** 0.5  # the "original" scale mode (torch.optim.Muon's)
    want = -0.5 * scale * orthoptim.orthogonalize(w.grad.reshape(m, n), compute_dtype="float32")  # type: ignore[union-attr]
    assert torch.allclose((w.detach() - before).reshape(m, n), want, atol=1e-6)


def test_a_changed_shape_policy_under_normuon_says_what_is_wrong() -> None:
    w = nn.Parameter(torch.zeros(3, 8, 12))
    opt = orthoptim.NorMuon([w], lr=0.02)
    _grads([w], 1)
    opt.step()
    opt.param_groups[0]["shape_policy"] = "flatten"
    with pytest.raises(ValueError, match="second moment holds 24 rows"):
        opt.step()


@pytest.mark.parametrize(
    ("kw", "message"), [({"lr": math.inf}, "lr must be a finite"), ({"weight_decay": math.inf}, "weight_decay")]
)
def test_infinite_options_are_refused(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        orthoptim.Muon(_params()[:1], **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_parameters_must_be_real_floating_point(dtype: torch.dtype) -> None:
    bad = nn.Parameter(torch.zeros(4, 4, dtype=dtype), requires_grad=dtype.is_complex)
    if dtype.is_complex:  # refused at the step, with torch.optim.Muon's RuntimeError and words
        for cls in (orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad):
            opt = cls([bad])
            bad.grad = torch.ones_like(bad)
            with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
                opt.step()
            assert torch.equal(bad, torch.zeros_like(bad))
    else:
        with pytest.raises(TypeError, match=f"shape \\(4, 4\\) is {dtype}"):
            orthoptim.Muon([bad])
    with pytest.raises(TypeError, match="real floating-point"):
        orthoptim.Hybrid(([], [bad]))


def test_constructor_errors_match_torch_muons() -> None:
    """The errors torch's optimizer test-suite expects of torch.optim.Muon (torch/testing/_internal/
    common_optimizers.py, ``optim_error_inputs_func_muon``): same exception types, and torch's words in the message,
    checked in torch's order — a bad lr before the params are looked at."""
    p = nn.Parameter(torch.zeros(2, 3))
    for cls in (torch.optim.Muon, orthoptim.Muon):
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            cls(None, lr=torch.tensor([1e-3, 1e-3]))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="Adjust learning rate function arbitrary is not supported"):
            cls([p], adjust_lr_fn="arbitrary")
        for kw in ({"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0}):
            with pytest.raises(ValueError):
                cls(None, **kw)  # type: ignore[arg-type]
    p.grad = torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.int64), torch.ones(1), (2, 3))
    for cls in (torch.optim.Muon, orthoptim.Muon):
        with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
            cls([p]).step()


def test_the_skip_warning_points_at_the_callers_line() -> None:
    p = nn.Parameter(torch.zeros(8, 16))
    opt = orthoptim.Hybrid(([p], []))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps opt.step once more
    p.grad = torch.full((8, 16), math.nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.filename for w in caught if "step skipped" in str(w.message)] == [__file__]


def test_orthogonalize_refuses_autograd_inputs_and_bad_out_dtypes() -> None:
    weight = nn.Linear(16, 32).weight
    with pytest.raises(ValueError, match=r"torch\.no_grad"):
        orthoptim.orthogonalize(weight)
    with torch.no_grad():
        got = orthoptim.orthogonalize(weight, compute_dtype="float32")
    assert torch.equal(got, orthoptim.orthogonalize(weight.detach(), compute_dtype="float32"))
    for dtype in (torch.int32, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="out_dtype"):
            orthoptim.orthogonalize(torch.randn(8, 4), out_dtype=dtype)


def test_hybrid_of_a_module_treats_a_conv1d_weight_as_one_flattened_matrix() -> None:
    """A Conv1d weight (out, in, k) is 3-D, which "auto" would take as k-row batches; Hybrid(model) knows the
    module and flattens it: the update is the orthogonalized out × in·k gradient (momentum 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 5), nn.Flatten(), nn.Linear(64, 10))
    opt = orthoptim.Hybrid(model, lr=0.5, momentum=0.0, compute_dtype="float32")
    conv = model[0].weight
    assert [g.get("shape_policy") for g in opt.param_groups if any(p is conv for p in g["params"])] == ["flatten"]
    before = conv.detach().clone()
    model(torch.randn(4, 8, 8)).square().sum().backward()
    opt.step()
    G = conv.grad.reshape(16, 40)  # type: ignore[union-attr]
    want = -0.5 * orthoptim.orthogonalize(G, compute_dtype="float32")  # scale √max(1, 16/40) = 1
    assert torch.allclose((conv.detach() - before).reshape(16, 40), want, atol=1e-6)
    kept = orthoptim.Hybrid(model, shape_policy="batch")  # an explicit policy is the user's choice
    assert all(g["shape_policy"] == "batch" for g in kept.param_groups if g["algorithm"] == "muon")


def test_load_state_dict_refuses_foreign_and_invalid_checkpoints_and_changes_nothing() -> None:
    params = _params()
    torch_muon = torch.optim.Muon(params[:2], lr=0.02)
    _grads(params, 1)
    torch_muon.step()
    opt = orthoptim.Muon(params[:2], lr=0.02)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="not saved by an orthoptim optimizer"):
        opt.load_state_dict(torch_muon.state_dict())
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["momentum"] == 0.95  # the rejected checkpoint changed nothing
    old = copy.deepcopy(state)
    del old["param_groups"][0]["iteration"]  # a checkpoint older than an option loads with this optimizer's value
    opt.load_state_dict(old)
    assert opt.param_groups[0]["iteration"] == "auto"
    opt.step()


def test_split_params_sends_raw_embedding_parameters_to_adamw() -> None:
    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 16))
            self.experts = nn.Parameter(torch.zeros(4, 16, 32))  # stacked expert weights: matrices
            self.block = nn.Linear(16, 16)
            self.head = nn.Linear(16, 10)

    vit = TinyViT()
    matrices, others = orthoptim.split_params(vit)
    assert {id(p) for p in matrices} == {id(vit.patch.weight), id(vit.experts), id(vit.block.weight)}
    assert {id(vit.cls_token), id(vit.pos_embed), id(vit.head.weight)} <= {id(p) for p in others}
    kept, _ = orthoptim.split_params(vit, embedding_name_parts=())
    assert any(p is vit.pos_embed for p in kept)


def test_split_params_on_classifier_heads_and_depthwise_convolutions() -> None:
    """Laid out as torchvision's ResNet (a top-level ``fc``), timm's ConvNeXt (``head`` holding ``norm`` and
    ``fc``, depthwise 7×7 convolutions) and transformers' BERT (each layer's ``attention.output.dense`` is hidden):
    heads and depthwise filters go to AdamW, hidden layers stay matrices."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dwconv = nn.Conv2d(16, 16, 7, padding=3, groups=16)  # depthwise: weight (16, 1, 7, 7)
            self.pwconv1 = nn.Linear(16, 64)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc", nn.Linear(64, 16))  # a nested ``fc`` is hidden

    class ConvNeXtLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 4, stride=4)
            self.grouped = nn.Conv2d(16, 16, 3, groups=4)  # grouped, not depthwise: 4 input channels per filter
            self.block = Block()
            self.head = nn.Sequential()
            self.head.add_module("norm", nn.LayerNorm(16))
            self.head.add_module("fc", nn.Linear(16, 10))

    class ResNetLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 7)
            self.bn1 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output = nn.Module()
            self.output.add_module("dense", nn.Linear(16, 16))

    class BertLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Embedding(30, 16)
            self.layer = nn.ModuleList([Attention()])
            self.classifier = nn.Linear(16, 2)

    def matrix_ids(model: nn.Module) -> set[int]:
        return {id(p) for p in orthoptim.split_params(model)[0]}

    convnext = ConvNeXtLike()
    want = {id(convnext.stem.weight), id(convnext.grouped.weight), id(convnext.block.pwconv1.weight)}
    assert matrix_ids(convnext) == want | {id(convnext.block.mlp.fc.weight)}
    resnet = ResNetLike()
    assert matrix_ids(resnet) == {id(resnet.conv1.weight)}
    bert = BertLike()
    assert matrix_ids(bert) == {id(bert.layer[0].output.dense.weight)}
    kept = orthoptim.split_params(resnet, exclude_head=False)[0]
    assert {id(p) for p in kept} == {id(resnet.conv1.weight), id(resnet.fc.weight)}


def test_normuon_options_belong_to_normuon_and_hybrid() -> None:
    """``beta2``/``row_eps`` are NorMuon's: Muon refuses them as torch.optim.Muon would an unknown keyword; NorMuon
    and Hybrid(row_norm=True) put them in their matrices' groups."""
    w = [nn.Parameter(torch.randn(4, 6))]
    with pytest.raises(TypeError, match="beta2"):
        orthoptim.Muon(w, beta2=0.9)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="row_norm"):
        orthoptim.Muon(w, row_norm=True)  # type: ignore[call-arg]
    group = orthoptim.NorMuon(w, beta2=0.9, row_eps=1e-6).param_groups[0]
    assert (group["row_norm"], group["beta2"], group["row_eps"]) == (True, 0.9, 1e-6)
    assert orthoptim.Muon(w).param_groups[0]["row_norm"] is False
    bias = nn.Parameter(torch.zeros(4))
    hybrid = orthoptim.Hybrid((w, [bias]), row_norm=True, beta2=0.8)
    assert hybrid.param_groups[0]["row_norm"] is True and hybrid.param_groups[0]["beta2"] == 0.8


def test_torch_coefficients_keep_the_cpus_native_compute_dtype() -> None:
    """``ns_coefficients`` (torch.optim.Muon's math) does not pin bfloat16: the compute dtype follows what this CPU
    computes natively, as with the defaults; ``compute_dtype="bfloat16"`` is how to reproduce torch's bits."""
    w = [nn.Parameter(torch.randn(4, 6))]
    opt = orthoptim.Muon(w, ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5)
    assert opt.param_groups[0]["compute_dtype"] is None
    assert orthoptim.resolve_compute_dtype(None, torch.device("cpu")) == orthoptim.resolve_compute_dtype(
        opt.param_groups[0]["compute_dtype"], torch.device("cpu")
    )


def test_adamw_betas_of_one_are_refused_as_torch_refuses_them() -> None:
    """β = 1 makes AdamW's bias correction divide by 1 − βᵗ = 0: torch.optim.AdamW refuses it, and so does
    Hybrid's AdamW half, at construction and in a group added later, instead of writing NaN weights."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    for betas in ((0.9, 1.0), (1.0, 0.95)):
        with pytest.raises(ValueError):
            torch.optim.AdamW(model.parameters(), betas=betas)
        with pytest.raises(ValueError, match=r"betas\[\d\] must be in \[0, 1\)"):
            orthoptim.Hybrid(model, adamw_betas=betas)
    opt = orthoptim.Hybrid(model)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "algorithm": "adamw", "betas": (0.9, 1.0)})


def test_the_triton_backend_on_cpu_parameters_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a CUDA device Triton has no driver: refused at construction, naming the way out, not at the step."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r'backend="triton" runs its kernels on CUDA devices.*cpu'):
        orthoptim.Muon([nn.Parameter(torch.zeros(8, 8))], backend="triton")


def test_hybrid_names_itself_for_unknown_keywords_and_sparse_adamw_gradients() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"Hybrid\.__init__\(\) got an unexpected keyword argument 'betas'"):
        orthoptim.Hybrid(model, betas=(0.9, 0.99))
    opt = orthoptim.Hybrid(model)
    table = model[0].weight
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 8), (10, 8))
    with pytest.raises(RuntimeError, match="Hybrid's AdamW half does not support sparse gradients"):
        opt.step()
