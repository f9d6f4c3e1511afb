"""Hybrid with torch-style param groups (no ``"algorithm"``): each group is sorted per parameter into an
orthogonalized half and an AdamW half that keep the group's options. The reference in each test is a Hybrid built
from the same split done by hand with explicit ``"algorithm"`` groups: the same code paths run, so the updates
must agree bit for bit."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import orthoptim

VOCAB, WIDTH = 32, 16


class Tiny(nn.Module):
    """Transformer-shaped: an embedding table, a position table registered directly, Linear layers with biases, a
    LayerNorm and an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos_embed = nn.Parameter(torch.randn(6, WIDTH) * 0.1)
        self.attn = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos_embed[: x.shape[1]]
        h = h + self.attn(h)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.lm_head(h)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def trainer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The list transformers' Trainer.create_optimizer builds: weights decay, biases and LayerNorm parameters do
    not (its get_decay_parameter_names: LayerNorm modules and names containing "bias" are left out)."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay = {id(p) for n, p in model.named_parameters() if "bias" in n or id(p) in norms}
    return [
        {"params": [p for p in model.parameters() if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if id(p) in no_decay], "weight_decay": 0.0},
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 6), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def summary(opt: torch.optim.Optimizer, model: nn.Module) -> list[tuple[str, float, list[str]]]:
    """Each group as (algorithm, weight_decay, the model's names of its parameters), in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["algorithm"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]


MATRICES = ["attn.weight", "up.weight", "down.weight"]
NO_DECAY = ["attn.bias", "norm.weight", "norm.bias", "up.bias", "down.bias"]


def test_trainer_groups_without_a_module_sort_by_ndim_and_match_the_split_by_hand() -> None:
    """Without module= only the shapes are known: every ≥ 2-D parameter is orthogonalized, the embedding and the
    head too (the documented limit), and each group's weight decay stays with both of its halves."""
    model, twin = tiny(), tiny()
    opt = orthoptim.Hybrid(trainer_groups(model, 0.1), lr=0.02, adamw_lr=1e-3)
    assert summary(opt, model) == [
        ("muon", 0.1, ["pos_embed", "embed.weight", *MATRICES, "lm_head.weight"]),
        ("adamw", 0.0, NO_DECAY),
    ]
    p = dict(twin.named_parameters())
    by_hand = orthoptim.Hybrid(
        [
            {"params": [p[n] for n in ["pos_embed", "embed.weight", *MATRICES, "lm_head.weight"]], "algorithm": "muon",
             "weight_decay": 0.1},
            {"params": [p[n] for n in NO_DECAY], "algorithm": "adamw", "weight_decay": 0.0},
        ],
        lr=0.02, adamw_lr=1e-3,
    )  # fmt: skip
    train(model, opt, 3)
    train(twin, by_hand, 3)
    assert_same_parameters(model, twin)


def test_trainer_groups_with_the_module_keep_embeddings_and_head_on_adamw() -> None:
    """module= recognizes what split_params(model) does (the nn.Embedding table, pos_embed by its name, the
    lm_head module): those go to AdamW with the decay of the group they came in."""
    model, twin = tiny(), tiny()
    opt = orthoptim.Hybrid(trainer_groups(model, 0.1), module=model, lr=0.02, adamw_lr=1e-3, adamw_betas=(0.8, 0.9))
    want = [
        ("muon", 0.1, MATRICES),
        ("adamw", 0.1, ["pos_embed", "embed.weight", "lm_head.weight"]),
        ("adamw", 0.0, NO_DECAY),
    ]
    assert summary(opt, model) == want
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-3, 1e-3]
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups[1:])
    p = dict(twin.named_parameters())
    by_hand = orthoptim.Hybrid(
        [{"params": [p[n] for n in names], "algorithm": alg, "weight_decay": wd} for alg, wd, names in want],
        lr=0.02, adamw_lr=1e-3, adamw_betas=(0.8, 0.9),
    )  # fmt: skip
    train(model, opt, 3)
    train(twin, by_hand, 3)
    assert_same_parameters(model, twin)
    # The decay of the embedding's group acted: without it the embedding ends elsewhere.
    undecayed = tiny()
    groups = trainer_groups(undecayed, 0.1)
    groups[0]["adamw_weight_decay"] = 0.0
    train(undecayed, orthoptim.Hybrid(groups, module=undecayed, lr=0.02, adamw_lr=1e-3, adamw_betas=(0.8, 0.9)), 3)
    assert not torch.equal(undecayed.embed.weight, model.embed.weight)


def test_a_mixed_group_splits_its_options_between_the_halves() -> None:
    """weight_decay applies to both halves; lr and Muon's options to the matrices; betas, eps and adamw_* to
    AdamW (adamw_lr is its lr); keys Hybrid does not know (a name) go to both."""
    model, twin = tiny(), tiny()
    mixed = ["attn.weight", "attn.bias", "up.weight", "norm.weight"]
    options = {"lr": 0.01, "weight_decay": 0.05, "momentum": 0.9, "ns_steps": 6, "betas": (0.8, 0.9), "eps": 1e-6,
               "adamw_lr": 2e-3, "name": "block"}  # fmt: skip
    p = dict(model.named_parameters())
    rest = [q for n, q in p.items() if n not in mixed]
    opt = orthoptim.Hybrid(
        [{"params": [p[n] for n in mixed], **options}, {"params": rest, "algorithm": "adamw"}], lr=0.02, adamw_lr=1e-3
    )
    assert [names for _, _, names in summary(opt, model)[:2]] == [
        ["attn.weight", "up.weight"],
        ["attn.bias", "norm.weight"],
    ]
    muon, adamw, other = opt.param_groups
    assert (muon["algorithm"], muon["lr"], muon["weight_decay"], muon["momentum"], muon["ns_steps"]) == (
        "muon", 0.01, 0.05, 0.9, 6,
    )  # fmt: skip
    assert "betas" not in muon and muon["eps"] == opt.defaults["eps"] and muon["name"] == "block"
    assert (adamw["algorithm"], adamw["lr"], adamw["weight_decay"], adamw["betas"], adamw["eps"]) == (
        "adamw", 2e-3, 0.05, (0.8, 0.9), 1e-6,
    )  # fmt: skip
    assert adamw["name"] == "block" and not any(k.startswith("adamw_") for g in opt.param_groups for k in g)
    assert other["lr"] == 1e-3 and "name" not in other
    t = dict(twin.named_parameters())
    by_hand = orthoptim.Hybrid(
        [
            {"params": [t["attn.weight"], t["up.weight"]], "algorithm": "muon", "lr": 0.01, "weight_decay": 0.05,
             "momentum": 0.9, "ns_steps": 6},
            {"params": [t["attn.bias"], t["norm.weight"]], "algorithm": "adamw", "lr": 2e-3, "weight_decay": 0.05,
             "betas": (0.8, 0.9), "eps": 1e-6},
            {"params": [q for n, q in t.items() if n not in mixed], "algorithm": "adamw"},
        ],
        lr=0.02, adamw_lr=1e-3,
    )  # fmt: skip
    train(model, opt, 3)
    train(twin, by_hand, 3)
    assert_same_parameters(model, twin)


def test_a_plain_group_without_lr_takes_the_constructor_lr_and_adamw_lr() -> None:
    model = tiny()
    opt = orthoptim.Hybrid([{"params": model.parameters()}], lr=0.03, weight_decay=0.2, adamw_lr=5e-4)
    assert [(g["algorithm"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("muon", 0.03, 0.2),
        ("adamw", 5e-4, 0.0),  # the constructor's adamw_weight_decay, as Hybrid(model) gives it
    ]


def test_group_order_is_deterministic_and_empty_halves_make_no_group() -> None:
    model = tiny()
    vectors = [model.attn.bias, model.norm.weight]
    matrices = [model.attn.weight, model.up.weight]
    opt = orthoptim.Hybrid(
        [
            {"params": vectors, "lr": 0.5},  # only an AdamW half
            {"params": []},  # nothing
            {"params": [model.down.weight, model.down.bias]},  # both: matrices first
            {"params": matrices},  # only matrices
        ]
    )
    assert summary(opt, model) == [
        ("adamw", 0.0, ["attn.bias", "norm.weight"]),
        ("muon", 0.0, ["down.weight"]),
        ("adamw", 0.0, ["down.bias"]),
        ("muon", 0.0, ["attn.weight", "up.weight"]),
    ]
    with pytest.raises(ValueError, match="no parameters"):
        orthoptim.Hybrid([{"params": []}])


def test_state_dict_round_trip_into_a_fresh_hybrid_with_the_same_groups() -> None:
    model = tiny()
    opt = orthoptim.Hybrid(trainer_groups(model, 0.1), module=model, lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 2)
    sched.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 2, seed=1)
    twin = tiny(seed=5)
    twin.load_state_dict(saved_model)
    fresh = orthoptim.Hybrid(trainer_groups(twin, 0.1), module=twin, lr=0.02, adamw_lr=1e-3)
    fresh.load_state_dict(saved_opt)
    assert [g["lr"] for g in fresh.param_groups] == [0.01, 5e-4, 5e-4]
    train(twin, fresh, 2, seed=1)
    assert_same_parameters(model, twin)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_add_param_group_sorts_a_plain_group_like_the_constructor() -> None:
    model, twin = tiny(), tiny()
    opt = orthoptim.Hybrid([{"params": [model.attn.weight]}], lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.01)
    opt.add_param_group({"params": [model.up.weight, model.up.bias], "lr": 0.01})
    opt.add_param_group({"params": [model.down.weight]})  # a 2-D-only group: one orthogonalized group, as before
    opt.add_param_group({"params": [model.down.bias], "algorithm": "adamw"})  # as before
    assert [(g["algorithm"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("muon", 0.02, 0.0),
        ("muon", 0.01, 0.0),
        ("adamw", 1e-3, 0.01),
        ("muon", 0.02, 0.0),
        ("adamw", 1e-3, 0.01),
    ]
    t = dict(twin.named_parameters())
    by_hand = orthoptim.Hybrid([{"params": [t["attn.weight"]]}], lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.01)
    by_hand.add_param_group({"params": [t["up.weight"]], "algorithm": "muon", "lr": 0.01})
    by_hand.add_param_group({"params": [t["up.bias"]], "algorithm": "adamw"})
    by_hand.add_param_group({"params": [t["down.weight"]], "algorithm": "muon"})
    by_hand.add_param_group({"params": [t["down.bias"]], "algorithm": "adamw"})
    train(model, opt, 3)
    train(twin, by_hand, 3)
    assert_same_parameters(model, twin)


def test_add_param_group_adds_both_halves_or_neither() -> None:
    model = tiny()
    opt = orthoptim.Hybrid([{"params": [model.attn.weight]}])
    with pytest.raises(ValueError, match="betas"):  # the AdamW half is rejected after the matrices' was added
        opt.add_param_group({"params": [model.up.weight, model.up.bias], "betas": (1.5, 0.9)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model.up.weight, model.up.bias]})  # and the parameters are free to add
    assert len(opt.param_groups) == 3


def test_named_parameters_use_split_params_name_rules_and_keep_their_names() -> None:
    """From names alone the head module (lm_head) and parameters whose own name says embedding (pos_embed) are
    recognized; an nn.Embedding's table is known by its type only, so it needs module=."""
    model = tiny()
    opt = orthoptim.Hybrid([{"params": list(model.named_parameters()), "weight_decay": 0.1}])
    assert [(g["algorithm"], g["param_names"]) for g in opt.param_groups] == [
        ("muon", ["embed.weight", "attn.weight", "up.weight", "down.weight"]),
        ("adamw", ["pos_embed", "attn.bias", "norm.weight", "norm.bias", "up.bias", "down.bias", "lm_head.weight"]),
    ]
    with_module = orthoptim.Hybrid([{"params": list(model.named_parameters())}], module=model)
    assert with_module.param_groups[0]["param_names"] == ["attn.weight", "up.weight", "down.weight"]
    # A group that carries its names in "param_names" (as param_groups of a torch optimizer built from
    # named_parameters() do) is split with them.
    torch_groups = torch.optim.AdamW(model.named_parameters()).param_groups
    again = orthoptim.Hybrid([{k: v for k, v in torch_groups[0].items() if k in ("params", "param_names")}])
    assert [g["param_names"] for g in again.param_groups] == [g["param_names"] for g in opt.param_groups]
    assert [g["params"] for g in again.param_groups] == [g["params"] for g in opt.param_groups]
    sd = again.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [g["param_names"] for g in opt.param_groups]


def test_module_keyword_sorts_like_hybrid_of_the_module() -> None:
    """Hybrid(groups, module=m) with one group of m's parameters is Hybrid(m): Conv1d weights flattened too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 16, 3), nn.Flatten(), nn.Linear(16, 10))
    a = orthoptim.Hybrid(model)
    b = orthoptim.Hybrid([{"params": model.parameters()}], module=model)
    assert len(a.param_groups) == len(b.param_groups) == 3
    for g, h in zip(a.param_groups, b.param_groups, strict=True):
        assert g.keys() == h.keys() and all(g[k] is h[k] or g[k] == h[k] for k in g if k != "params")
        assert [id(p) for p in g["params"]] == [id(p) for p in h["params"]]
    assert b.param_groups[1]["shape_policy"] == "flatten"
    policy = orthoptim.Hybrid([{"params": model.parameters(), "shape_policy": "batch"}], module=model)
    assert [g["shape_policy"] for g in policy.param_groups if g["algorithm"] == "muon"] == ["batch"]


def test_a_pair_split_by_hand_with_the_module_gets_the_model_s_layer_options() -> None:
    """Hybrid((matrices, others), module=m): the pair decides the algorithm (here a router moved to AdamW), the
    model each matrix's options as Hybrid(m) sets them — Conv1D's (in, out) layout and a split by name, Conv1d's
    flatten."""
    from .test_weight_layout import Conv1D

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.c_attn = Conv1D(3 * WIDTH, WIDTH)
            self.conv = nn.Conv1d(WIDTH, WIDTH, 3)
            self.gate = nn.Linear(WIDTH, 4, bias=False)  # a router
            self.up = nn.Linear(WIDTH, 2 * WIDTH)

    model = Block()
    matrices, others = orthoptim.split_params(model)
    matrices = [p for p in matrices if p is not model.gate.weight]
    others.append(model.gate.weight)
    opt = orthoptim.Hybrid((matrices, others), module=model, split={"c_attn": 3})
    whole = orthoptim.Hybrid(model, split={"c_attn": 3})
    options = {"weight_layout", "shape_policy", "split"}

    def by_param(o: orthoptim.Hybrid) -> dict[int, tuple[str, dict[str, Any]]]:
        return {
            id(p): (g["algorithm"], {k: g[k] for k in options if k in g}) for g in o.param_groups for p in g["params"]
        }

    got, want = by_param(opt), by_param(whole)
    assert got[id(model.gate.weight)][0] == "adamw" and want[id(model.gate.weight)][0] == "muon"
    del got[id(model.gate.weight)], want[id(model.gate.weight)]
    assert got == want
    assert got[id(model.c_attn.weight)] == ("muon", {"weight_layout": "in_out", "shape_policy": "auto", "split": 3})
    assert got[id(model.conv.weight)][1]["shape_policy"] == "flatten"
    with pytest.raises(ValueError, match="no module or parameter named"):
        orthoptim.Hybrid((matrices, others), module=model, split={"c_atn": 3})


def test_bad_groups_are_refused_up_front() -> None:
    model = tiny()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        orthoptim.Hybrid(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        orthoptim.Hybrid([{"params": [model.attn.weight]}, model.up.weight])  # type: ignore[list-item]
    with pytest.raises(ValueError, match='"algorithm": "muon" or "adamw"'):
        orthoptim.Hybrid([{"params": [model.attn.weight], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match='"algorithm": "muon" or "adamw"'):
        orthoptim.Hybrid([{"params": [model.attn.weight], "algorithm": None}])
    with pytest.raises(TypeError, match="module="):
        orthoptim.Hybrid([{"params": [model.attn.weight]}], module=[model])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="module="):
        orthoptim.Hybrid(model, module=model)
    with pytest.raises(TypeError, match="needs the model"):
        orthoptim.Hybrid(([model.attn.weight], [model.attn.bias]), split="auto")
    with pytest.raises(TypeError, match="ordered"):
        orthoptim.Hybrid([{"params": {model.attn.weight, model.attn.bias}}])
    with pytest.raises(TypeError, match="Tensors"):
        orthoptim.Hybrid([{"params": [model.attn.weight, 3.0]}])
    with pytest.raises(ValueError, match=r"all \(name, parameter\) pairs or all parameters"):
        orthoptim.Hybrid([{"params": [("attn.weight", model.attn.weight), model.attn.bias]}])
    with pytest.raises(ValueError, match="param_names"):
        orthoptim.Hybrid([{"params": [model.attn.weight, model.attn.bias], "param_names": ["attn.weight"]}])
    with pytest.raises(ValueError, match="lr"):
        orthoptim.Hybrid([{"params": [model.attn.weight, model.attn.bias], "adamw_lr": -1.0}])
    opt = orthoptim.Hybrid([{"params": [model.attn.weight]}])
    with pytest.raises(ValueError, match='"algorithm": "muon" or "adamw"'):
        opt.add_param_group({"params": [model.up.weight], "algorithm": "sgd"})
    with pytest.raises(TypeError, match="dict"):
        opt.add_param_group([model.up.weight])  # type: ignore[arg-type]
    assert len(opt.param_groups) == 1
