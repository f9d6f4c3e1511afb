"""``Hybrid(model, split="auto")`` on transformers' own models built from tiny configs (no downloads): what goes
to AdamW, what is orthogonalized whole, and what in blocks — each block's step checked against the float64-SVD
polar factor of that block of its gradient (one step from zero momentum)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import orthoptim  # noqa: E402
from orthoptim.optim import lr_scale  # noqa: E402

STEP = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "schedule": "polar_express", "ns_steps": 8}


def _groups(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["algorithm"], g.get("split", 1)) for g in opt.param_groups for p in g["params"]}


def _polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    return U @ Vt


def test_mixtral_experts_gate_up_are_orthogonalized_per_expert_and_half() -> None:
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config)  # float32: its grouped expert products take no float64
    opt = orthoptim.Hybrid(model, split="auto", compute_dtype="float64", **STEP)
    groups = _groups(opt, model)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj  # (experts, 2·intermediate, hidden)
    assert groups["model.layers.0.mlp.experts.gate_up_proj"] == ("muon", 2)
    assert groups["model.layers.0.mlp.experts.down_proj"] == ("muon", 1)
    assert groups["model.embed_tokens.weight"][0] == groups["lm_head.weight"][0] == "adamw"
    assert groups["model.layers.0.self_attn.k_proj.weight"] == ("muon", 1)  # grouped-query: separate, whole
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # every parameter gets its gradient from the model...
    # ... but the experts' from a dozen tokens are low-rank, where the SVD's polar factor is not defined: a
    # well-conditioned random one instead for the checked weight.
    G = torch.randn(gate_up.shape, generator=torch.Generator().manual_seed(1))
    gate_up.grad = G.clone()
    before = gate_up.detach().clone()
    opt.step()
    moved = gate_up.detach() - before
    half = G.shape[1] // 2
    scale = lr_scale("original", half, G.shape[2])
    for e in range(G.shape[0]):
        for b in range(2):
            rows = slice(b * half, (b + 1) * half)
            want = -0.1 * scale * _polar(G[e, rows].double()).float()
            assert torch.allclose(moved[e, rows], want, atol=1e-5), (e, b)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_llama_and_bert_keep_their_projections_whole_and_heads_on_adamw(family: str) -> None:
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
        head, hidden = "lm_head.weight", "model.layers.0.mlp.gate_proj.weight"
    else:
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
        model = transformers.BertForSequenceClassification(config)
        head, hidden = "classifier.weight", "bert.encoder.layer.0.intermediate.dense.weight"
    opt = orthoptim.Hybrid(model, split="auto")
    groups = _groups(opt, model)
    assert groups[head][0] == "adamw"
    assert groups[hidden] == ("muon", 1)
    assert all(k == 1 for algorithm, k in groups.values() if algorithm == "muon")  # nothing fused to cut
    rows = {r.name: r for r in orthoptim.explain(model, opt).rows}
    assert rows[hidden].lr_factor == f"{math.sqrt(64 / 32):.3g}"
