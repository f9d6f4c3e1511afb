"""``Hybrid(model, split="auto")`` on transformers' own models built from tiny configs (no downloads): what goes
to AdamW, what is orthogonalized whole, and what in blocks — each block's step checked against the float64-SVD
polar factor of that block of its gradient (one step from zero momentum)."""

from __future__ import annotations

import math
from typing import Any

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


def _tiny_mixtral() -> Any:
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
    return transformers.MixtralForCausalLM(config)


def test_mixtral_experts_gate_up_are_orthogonalized_per_expert_and_half() -> None:
    model = _tiny_mixtral()  # float32: its grouped expert products take no float64
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


def test_phi3_grouped_query_qkv_is_cut_into_its_q_k_and_v() -> None:
    """Phi-3 stores q, k and v of grouped-query attention in one ``qkv_proj`` weight: q 4 heads × 8, k and v 2 heads
    × 8 (rows 32, 16, 16 of 64). ``split="auto"`` reads those sizes from the attention module; each block moves by
    its own polar factor and its own lr scale (q is 32×32: 1; k and v 16×32: 1)."""
    config = transformers.Phi3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.Phi3ForCausalLM(config).double()
    opt = orthoptim.Hybrid(model, split="auto", compute_dtype="float64", **STEP)
    groups = _groups(opt, model)
    assert tuple(groups["model.layers.0.self_attn.qkv_proj.weight"][1]) == (32, 16, 16)
    assert groups["model.layers.0.mlp.gate_up_proj.weight"] == ("muon", 2)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    # Blocks with singular values in [0.2, 1] (a random square q block has some near 0, where 8 iteration steps
    # have not converged yet: the check would test the schedule, not the split).
    gen = torch.Generator().manual_seed(1)
    parts = []
    for rows in (32, 16, 16):
        U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(32, rows, generator=gen, dtype=torch.float64))
        parts.append(U @ torch.diag(torch.linspace(1.0, 0.2, rows, dtype=torch.float64)) @ V.mT)
    G = torch.cat(parts)
    qkv.grad = G.clone()
    before = qkv.detach().clone()
    opt.step()
    moved = qkv.detach() - before
    for a, z in [(0, 32), (32, 48), (48, 64)]:
        want = -0.1 * lr_scale("original", z - a, 32) * _polar(G[a:z])
        assert torch.allclose(moved[a:z], want, atol=1e-9), (a, z)
    row = next(r for r in orthoptim.explain(model, opt).rows if r.name == "model.layers.0.self_attn.qkv_proj.weight")
    assert row.split == (32, 16, 16) and "3 blocks of 32, 16, 16 rows" in row.why


def test_the_readme_recipe_sends_mixtral_s_router_to_adamw_and_keeps_the_expert_split() -> None:
    """README, "a mixture-of-experts router": the pair split by hand with ``module=model``."""
    model = _tiny_mixtral()
    matrices, others = orthoptim.split_params(model)
    routers = {id(m.gate.weight) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")}
    opt = orthoptim.Hybrid(
        ([p for p in matrices if id(p) not in routers], others + [p for p in matrices if id(p) in routers]),
        module=model,
        split="auto",
    )
    groups = _groups(opt, model)
    assert groups["model.layers.0.mlp.gate.weight"][0] == "adamw"
    assert groups["model.layers.0.mlp.experts.gate_up_proj"] == ("muon", 2)
    assert groups["model.layers.0.self_attn.q_proj.weight"] == ("muon", 1)


def _task_models() -> dict[str, Any]:
    """transformers' task heads and seq2seq stacks, from tiny configs (vocabulary 97, labels 3: no hidden layer has
    those widths): what each model's own structure says is its
    head (an nn.Linear to the label/vocabulary space) or a hidden layer of a decoder stack."""
    llama = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    bert = transformers.BertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_labels=3
    )
    t5 = transformers.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4
    )
    bart = transformers.BartConfig(
        vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
    )  # fmt: skip
    return {
        "llama_seqcls": transformers.LlamaForSequenceClassification(llama),
        "llama_tokcls": transformers.LlamaForTokenClassification(llama),
        "bert_qa": transformers.BertForQuestionAnswering(bert),
        "bert_pretraining": transformers.BertForPreTraining(bert),
        "t5": transformers.T5ForConditionalGeneration(t5),
        "t5_model": transformers.T5Model(t5),
        "bart_model": transformers.BartModel(bart),
    }


@pytest.mark.parametrize("name", list(_task_models()))
def test_task_heads_go_to_adamw_and_decoder_stacks_stay_orthogonalized(name: str) -> None:
    model = _task_models()[name]
    matrices, _ = orthoptim.split_params(model)
    chosen = {id(p) for p in matrices}
    names = {id(p): n for n, p in model.named_parameters()}
    labels = getattr(model.config, "num_labels", None)
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        out = module.weight.shape[0]
        # A head maps to labels (2 for QA's start/end and BERT's next-sentence head) or to the vocabulary.
        is_head = out in (labels, 2, model.config.vocab_size) and "attention" not in module_name
        assert (id(module.weight) in chosen) != is_head, (module_name, tuple(module.weight.shape))
    decoder_matrices = [names[i] for i in chosen if ".decoder." in f".{names[i]}" or names[i].startswith("decoder.")]
    if name.startswith(("t5", "bart")):
        assert decoder_matrices, "the decoder stack's projections are hidden matrices"
