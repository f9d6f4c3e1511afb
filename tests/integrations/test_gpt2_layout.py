"""transformers' GPT-2 stores its projections as ``Conv1D`` (in, out): ``Hybrid(model)`` must orthogonalize them
with the (out, in) orientation's lr scale — c_attn √3 (its output is q, k, v: 3·d), c_fc 2 (4·d), c_proj 1
(``lr_scale("original")`` = √max(1, out/in)) — not the transposed one (1, 1, 2)."""

from __future__ import annotations

import math

import pytest

transformers = pytest.importorskip("transformers")

import orthoptim  # noqa: E402
from orthoptim.optim import lr_scale, matrix_layout  # noqa: E402


def test_gpt2_projections_get_the_out_in_lr_scale() -> None:
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = orthoptim.Hybrid(model)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {}
    for group in opt.param_groups:
        if group["algorithm"] != "muon":
            continue
        for p in group["params"]:
            _, m, n = matrix_layout(tuple(p.shape), group["shape_policy"], group["weight_layout"])
            scales[names[id(p)].split(".", 3)[-1]] = lr_scale(group["scale_mode"], m, n)
    assert scales == {
        "attn.c_attn.weight": math.sqrt(3.0),
        "attn.c_proj.weight": 1.0,
        "mlp.c_fc.weight": 2.0,
        "mlp.c_proj.weight": 1.0,
    }


def test_gpt2_split_auto_orthogonalizes_q_k_v_apart() -> None:
    """``Hybrid(model, split="auto")``: c_attn (stored (d, 3·d)) in three (d, d) blocks of its (out, in) view;
    one training step stays finite and moves every block."""
    import torch

    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = orthoptim.Hybrid(model, split="auto")
    c_attn = model.transformer.h[0].attn.c_attn.weight
    group = next(g for g in opt.param_groups if any(p is c_attn for p in g["params"]))
    assert (group["split"], group["weight_layout"]) == (3, "in_out")
    before = c_attn.detach().clone()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moved = (c_attn.detach() - before).mT  # (out, in)
    assert bool(torch.isfinite(moved).all())
    assert all(float(moved[16 * i : 16 * (i + 1)].abs().max()) > 0 for i in range(3))
