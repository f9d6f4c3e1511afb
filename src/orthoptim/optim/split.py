"""Which of a model's parameters are orthogonalized, in which orientation and blocks, and why:
:func:`split_params`, the per-layer options :class:`~orthoptim.Hybrid` derives from a model, and :func:`explain`,
the table that shows it all."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .options import lr_scale, matrix_layout, row_blocks

#: Module names treated as the output head by :func:`split_params` (the last component of the module path). A
#: head module that is a direct child of the model is taken whole (ConvNeXt's ``head.fc``) unless its name is in
#: ``STACK_NAMES``; a nested one only its own parameters (BERT's per-layer ``attention.output`` holds hidden
#: ``dense`` layers). transformers' task heads: ``score`` (sequence classification of decoder-only models),
#: ``qa_outputs`` (question answering), ``seq_relationship`` (BERT's next-sentence head), ``decoder`` (the
#: vocabulary projection of masked-LM heads, ``cls.predictions.decoder``).
HEAD_NAMES: tuple[str, ...] = (
    "lm_head",
    "head",
    "head_dist",
    "output",
    "classifier",
    "decoder",
    "score",
    "qa_outputs",
    "seq_relationship",
)
#: Head names that, for a direct child of the model, name a whole stack of hidden layers instead: the decoder of
#: T5, BART (``BartModel``) and ``EncoderDecoderModel``. Only such a module's own parameters count as a head.
STACK_NAMES: tuple[str, ...] = ("decoder",)
#: Direct children of the model with these names are classifier heads too: torchvision's ResNet, RegNet,
#: Inception and GoogLeNet end in a top-level ``fc``.
TOP_LEVEL_HEAD_NAMES: tuple[str, ...] = ("fc",)
#: Parameters registered directly (not an ``nn.Embedding``'s weight) whose own name contains one of these are
#: embeddings too: a ViT's ``pos_embed``, ``cls_token``, ``register_tokens``, a GPT's raw ``wpe``-style tables named
#: ``*embed*``, TNT's ``patch_pos``/``pixel_pos`` position tables. Matched against the last component of the
#: parameter's name, lower-cased.
EMBEDDING_NAME_PARTS: tuple[str, ...] = ("embed", "token", "pos_", "_pos")
#: Parameters registered directly whose own name contains one of these are lookup tables of attention biases, not
#: linear maps: Swin's and BEiT's ``relative_position_bias_table`` (relative offsets × heads, indexed per token
#: pair), EfficientFormer's and LeViT's ``attention_biases``, SAM's ``rel_pos_h``. Matched like the embedding parts.
TABLE_NAME_PARTS: tuple[str, ...] = ("bias", "rel_pos")


def split_params(
    model: nn.Module,
    *,
    exclude_embeddings: bool = True,
    exclude_head: bool = True,
    head_names: Iterable[str] = HEAD_NAMES,
    embedding_name_parts: Iterable[str] = EMBEDDING_NAME_PARTS,
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s trainable parameters into (hidden matrices, everything else).

    Hidden matrices are weights with ≥ 2 dims (Linear, conv, stacked experts). Excluded by default, as Muon's
    authors recommend: embedding tables (``nn.Embedding``/``nn.EmbeddingBag``, and parameters whose own name
    contains one of ``embedding_name_parts``, e.g. ``pos_embed``, ``cls_token``), the output head (what the model's
    ``get_output_embeddings()`` (transformers) or ``get_classifier()`` (timm; a distilled model's pair of heads)
    returns, and a module whose name is in ``head_names`` — all of it when it is a direct child of ``model``,
    e.g. ConvNeXt's ``head.fc`` — or a direct child named ``fc``, torchvision's classifier), and any weight shared
    with an embedding (tied heads). Never matrices, whatever the options: depthwise convolution weights
    (``groups > 1``, one input channel per filter), attention-bias tables named by ``TABLE_NAME_PARTS`` (Swin's
    ``relative_position_bias_table``), and vectors stored with singleton dims (a weight-norm gain ``(out, 1)``,
    a layer-scale ``(C, 1, 1)``: at most one dim > 1). A model wrapped by ``torch.compile``, ``DataParallel`` or
    ``DistributedDataParallel`` is split as the model inside. Each parameter appears once (shared parameters are
    deduplicated).
    """
    excluded = _excluded_ids(
        model,
        exclude_embeddings=exclude_embeddings,
        exclude_head=exclude_head,
        head_names=head_names,
        embedding_name_parts=embedding_name_parts,
    )
    matrices: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (matrices if p.ndim >= 2 and id(p) not in excluded else others).append(p)
    return matrices, others


def _excluded_ids(
    model: nn.Module,
    *,
    exclude_embeddings: bool = True,
    exclude_head: bool = True,
    head_names: Iterable[str] = HEAD_NAMES,
    embedding_name_parts: Iterable[str] = EMBEDDING_NAME_PARTS,
) -> set[int]:
    """``id``s of ``model``'s parameters that :func:`split_params` keeps off the orthogonalized update whatever
    their shape (``exclusion_reasons``)."""
    return set(
        exclusion_reasons(
            model,
            exclude_embeddings=exclude_embeddings,
            exclude_head=exclude_head,
            head_names=head_names,
            embedding_name_parts=embedding_name_parts,
        )
    )


def exclusion_reasons(
    model: nn.Module,
    *,
    exclude_embeddings: bool = True,
    exclude_head: bool = True,
    head_names: Iterable[str] = HEAD_NAMES,
    embedding_name_parts: Iterable[str] = EMBEDDING_NAME_PARTS,
) -> dict[int, str]:
    """Why each of ``model``'s parameters that :func:`split_params` keeps off the orthogonalized update is kept
    off, by ``id``: embeddings (by type, and by their own name), head weights (by their module's name) and
    depthwise convolution weights. A parameter shared by two (a tied head) keeps the first reason found."""
    reasons: dict[int, str] = {}
    model = unwrapped(model)  # the direct-child and accessor rules are about the model inside a wrapper
    for name, p in model.named_parameters():
        if is_vector(p):
            reasons.setdefault(id(p), f"vector stored {'×'.join(map(str, p.shape))} (a gain or scale: ≤ 1 dim > 1)")
        elif p.ndim >= 2 and _own_name_says(name, TABLE_NAME_PARTS):
            reasons.setdefault(id(p), "attention-bias table (its name)")
    if exclude_embeddings:
        parts = tuple(part.lower() for part in embedding_name_parts)
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                for p in mod.parameters():
                    reasons.setdefault(id(p), f"embedding table ({type(mod).__name__} {name})")
        for name, p in model.named_parameters():
            if _own_name_says(name, parts):
                reasons.setdefault(id(p), "embedding (its name)")
    if exclude_head:
        # The model's own word for its head, where it has one: transformers' get_output_embeddings() (an LM head,
        # tied or not) and timm's get_classifier().
        for getter in ("get_output_embeddings", "get_classifier"):
            head = _call_quietly(model, getter)
            # timm's distilled models (DeiT, LeViT, EfficientFormer) answer with their two heads, a tuple.
            for module in head if isinstance(head, (tuple, list)) else (head,):
                if isinstance(module, nn.Module):
                    for p in module.parameters():
                        reasons.setdefault(id(p), f"output head ({type(model).__name__}.{getter}())")
        heads = set(head_names)
        for name, mod in model.named_modules():
            top_level = bool(name) and "." not in name
            if top_level and ((name in heads and name not in STACK_NAMES) or name in TOP_LEVEL_HEAD_NAMES):
                for p in mod.parameters():
                    reasons.setdefault(id(p), f"output head ({name})")
            elif name and name.rsplit(".", 1)[-1] in heads:
                for p in mod.parameters(recurse=False):
                    reasons.setdefault(id(p), f"output head ({name})")
    # Depthwise convolutions (groups = in_channels: weight (C, 1, *k)): each output channel filters one input
    # channel, so the C × k matrix holds C unrelated filters, not one linear map to orthogonalize (timm's Muon
    # sends them to AdamW as well).
    # A transposed convolution's weight is (in, out/groups, *k): depthwise too when that middle dim is 1.
    for mod in model.modules():
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.weight.shape[1] == 1:
            reasons.setdefault(id(mod.weight), "depthwise convolution (one input channel per filter)")
    return reasons


def _call_quietly(model: nn.Module, method: str) -> Any:
    """``model.method()`` if the model has such a method and it answers without arguments, else None (a model
    may define one that raises where it has no head)."""
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # a model's own accessor failing means "no head to report", not an error of ours
        return None


def _own_name_says(name: str, parts: tuple[str, ...]) -> bool:
    return any(part in name.rsplit(".", 1)[-1].lower() for part in parts)


def is_vector(p: torch.Tensor) -> bool:
    """Whether ``p`` has ≥ 2 dims but at most one of them > 1: a vector in a matrix's shape (a weight-norm gain
    ``(out, 1)``, a layer scale ``(C, 1, 1)``, Swin-v2's ``logit_scale`` ``(heads, 1, 1)``). Its "polar factor"
    is its sign pattern scaled, which is no orthogonalized update; AdamW takes it, as it takes gains."""
    return p.ndim >= 2 and sum(d > 1 for d in p.shape) <= 1


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and ``DataParallel``/
    ``DistributedDataParallel`` (``module``), which hold the same parameters under a prefixed name."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(
            model, (nn.DataParallel, nn.parallel.DistributedDataParallel)
        ):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _name_says_excluded(name: str) -> bool:
    """:func:`split_params`'s rules that a parameter's qualified name alone can decide: its own name contains
    ``embed``/``token``, or the module holding it is named like a head (``lm_head.weight``). An ``nn.Embedding``'s
    table is known by its module's type only (``embed_tokens.weight``, ``wte.weight``), which a name does not show."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return (
        _own_name_says(name, EMBEDDING_NAME_PARTS)
        or _own_name_says(name, TABLE_NAME_PARTS)
        or (bool(module) and module.rsplit(".", 1)[-1] in HEAD_NAMES)
    )


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer storing its weight (in, out): transformers' GPT-2 ``Conv1D``
    (``y = x·W + b``, ``W`` of shape (nx, nf)), recognized by its class name and ``nf`` (no import of transformers)."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and isinstance(nf, int)
        and weight.shape[1] == nf
    )


#: ``split="auto"``: fused projections recognized by the name of the module holding the weight (the last
#: component of its path) and their shape — q, k and v in one weight (out = 3·in), gate and up in one weight.
AUTO_SPLIT_NAMES: dict[str, int] = {"c_attn": 3, "qkv": 3, "wqkv": 3, "qkv_proj": 3, "gate_up_proj": 2}


def _auto_split(name: str, module: nn.Module, out: int, inputs: int, parent: nn.Module | None) -> int | tuple[int, ...]:
    """The blocks ``split="auto"`` gives the weight of ``module`` (named ``name``; or its parameter of that path):
    a block count (1: none), or q, k, v sizes for grouped-query attention (``_grouped_query_sizes``)."""
    if isinstance(module, nn.MultiheadAttention):
        return 3  # its in_proj_weight holds q, k and v (3·embed_dim rows)
    own = name.rsplit(".", 1)[-1]
    if isinstance(module, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)) and own.startswith(("weight_ih", "weight_hh")):
        # The gates' weights stacked by rows: LSTM's input, forget, cell and output gates, GRU's reset, update and
        # new (torch.nn.LSTM/GRU docs); the projection weight_hr of an LSTM with proj_size is one matrix.
        gates = 4 if isinstance(module, (nn.LSTM, nn.LSTMCell)) else 3
        return gates if out % gates == 0 else 1
    k = AUTO_SPLIT_NAMES.get(own.lower(), 1)
    if k == 3 and out != 3 * inputs:  # not q, k, v of the model's width: grouped-query, if the heads say so
        return _grouped_query_sizes(parent, out) or 1
    return k if out % k == 0 else 1


def _grouped_query_sizes(attention: nn.Module | None, out: int) -> tuple[int, int, int] | None:
    """(q, k, v) row counts of a fused grouped-query projection, from the head counts its attention module
    declares — ``head_dim``, ``num_heads`` or ``num_attention_heads``, ``num_key_value_heads`` (as attributes or
    on its ``config``: transformers' Phi-3) — if they account for all ``out`` rows; else None (not guessed)."""
    if attention is None:
        return None
    config = getattr(attention, "config", None)

    def declared(*names: str) -> int | None:
        for owner in (attention, config):
            for name in names:
                value = getattr(owner, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    head_dim = declared("head_dim")
    heads = declared("num_heads", "num_attention_heads")
    kv_heads = declared("num_key_value_heads", "num_kv_heads")
    if head_dim is None or heads is None or kv_heads is None or (heads + 2 * kv_heads) * head_dim != out:
        return None
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def matrix_options_by_module(
    module: nn.Module, given: dict[str, Any], split: str | dict[str, Any] | None = None
) -> dict[int, tuple[tuple[str, Any], ...]]:
    """The group options ``module``'s layers need beyond their group's, by weight ``id``: ``nn.Conv1d`` weights
    (out, in, k) are one out × in·k matrix (``shape_policy="flatten"``; a 3-D weight is otherwise a batch), as are
    ``nn.ConvTranspose1d`` weights (in, out, k), flattened as stored like every transposed convolution's, and
    ``Conv1D`` weights are stored (in, out) (``weight_layout="in_out"``) — each unless ``given`` sets that option.
    ``split``: ``"auto"`` (fused projections, ``AUTO_SPLIT_NAMES`` and ``nn.MultiheadAttention``) or a mapping
    from module names (a suffix of the path: ``"attn.c_attn"``, ``"c_attn"``), or names of matrix parameters
    other than a module's ``weight`` (``"experts.gate_up_proj"``), to block counts or block sizes."""
    special: dict[int, tuple[tuple[str, Any], ...]] = {}
    matched: set[str] = set()
    modules = dict(module.named_modules())

    def split_of(path: str, held_by: nn.Module, out: int, inputs: int) -> int | tuple[int, ...]:
        if split == "auto":
            parent = modules.get(path.rsplit(".", 1)[0] if "." in path else "")
            return _auto_split(path, held_by, out, inputs, parent)
        k: int | tuple[int, ...] = 1
        if isinstance(split, dict):
            for key, value in split.items():
                if path == key or path.endswith("." + key):
                    k = tuple(value) if isinstance(value, list) else value
                    matched.add(key)
                    try:  # checked here, where the weight's name is known (rows: its true output dimension)
                        matrix_layout((out, inputs), split=k)
                    except ValueError as exc:
                        raise ValueError(
                            f"Hybrid(split={{{key!r}: {value!r}}}): {path} ({out} outputs × {inputs} inputs): {exc}"
                        ) from None
        return k

    for name, m in module.named_modules():
        # Fused weights registered as raw parameters (stacked experts: Mixtral's ``experts.gate_up_proj``,
        # (experts, 2·intermediate, hidden)), matched by the parameter's own name.
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim >= 2 and pname != "weight" and not isinstance(m, nn.MultiheadAttention):
                path = f"{name}.{pname}" if name else pname
                k = split_of(path, m, p.shape[-2], p.shape[-1])
                if k != 1:
                    special[id(p)] = (("split", k),)
        options: list[tuple[str, Any]] = []
        weight = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            continue
        transposed = is_transposed_linear(m)
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and "shape_policy" not in given:
            options.append(("shape_policy", "flatten"))
        elif transposed and "weight_layout" not in given:
            options.append(("weight_layout", "in_out"))
        out, inputs = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
        k = split_of(name, m, out, inputs)
        if k != 1:
            options.append(("split", k))
        if options:
            special[id(weight)] = tuple(options)
    if isinstance(split, dict) and set(split) - matched:
        missing = sorted(set(split) - matched)
        raise ValueError(f"Hybrid(split=...): no module or parameter named {missing} holds a matrix weight")
    return special


@dataclass(frozen=True)
class ParamRow:
    """One parameter in :func:`explain`'s table."""

    name: str
    shape: tuple[int, ...]
    orientation: str  # "out×in", "in×out" (stored transposed), "–" for AdamW
    algorithm: str  # "muon", "normuon", "polargrad", "adamw", or "not optimized"
    split: int | tuple[int, ...] | None  # row blocks per matrix, or unequal blocks' sizes; None for AdamW
    lr_factor: str  # the lr scale of each (block) matrix, "‖M‖_*" for PolarGrad, "–" for AdamW
    why: str


@dataclass(frozen=True)
class Explanation:
    """What an optimizer does with each of a model's parameters (``str()`` prints the table)."""

    rows: tuple[ParamRow, ...]

    def __str__(self) -> str:
        head = ("parameter", "shape", "orientation", "algorithm", "split", "lr factor", "why")
        cells = [head] + [
            (
                r.name,
                "×".join(map(str, r.shape)),
                r.orientation,
                r.algorithm,
                "–" if r.split is None else "+".join(map(str, r.split)) if isinstance(r.split, tuple) else str(r.split),
                r.lr_factor,
                r.why,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def explain(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **hybrid_options: Any) -> Explanation:
    """The table a user needs to trust a split: for each of ``model``'s parameters, its name, shape, orientation,
    algorithm, row blocks, lr factor and why — as ``optimizer`` treats it (an orthoptim optimizer over
    ``model``'s parameters), or, by default, ``orthoptim.Hybrid(model, **hybrid_options)``::

        print(orthoptim.explain(model))                  # what Hybrid(model) would do
        print(orthoptim.explain(model, split="auto"))    # ... with fused projections cut into their parts
        print(orthoptim.explain(model, opt))             # what an optimizer already built does

    The lr factor is ``lr_scale`` of each matrix (of each block, with ``split``; "a/b" for blocks of unequal
    sizes whose factors differ) under its group's ``scale_mode``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain(model): an nn.Module, got {type(model).__name__}")
    if optimizer is None:
        from .hybrid import Hybrid  # the default optimizer; hybrid imports this module

        optimizer = Hybrid(model, **hybrid_options)
    elif hybrid_options:
        raise TypeError(f"explain(model, optimizer): Hybrid options {sorted(hybrid_options)} apply without optimizer")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    reasons = exclusion_reasons(model)
    transposed_convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)}
    special = matrix_options_by_module(model, {}, "auto")
    rows: list[ParamRow] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(p.shape)
        group = group_of.get(id(p))
        if group is None:
            why = "requires_grad=False" if not p.requires_grad else "not in the optimizer's param groups"
            rows.append(ParamRow(name, shape, "–", "not optimized", None, "–", why))
            continue
        if group.get("algorithm") == "adamw" or "schedule" not in group:
            why = reasons.get(id(p), "vector (bias, gain: < 2 dims)" if p.ndim < 2 else "its group is AdamW")
            rows.append(ParamRow(name, shape, "–", "adamw", None, "–", why))
            continue
        layout, split = group.get("weight_layout", "out_in"), group.get("split", 1)
        _, m, n = matrix_layout(shape, group["shape_policy"], layout, split)
        blocks, sizes = row_blocks(split)
        algorithm = "normuon" if group.get("row_norm") else "polargrad" if group["scale_mode"] == "nuclear" else "muon"
        factors = [lr_scale(group["scale_mode"], s, n) for s in sizes or (m,)]
        factor = "‖M‖_*" if group["scale_mode"] == "nuclear" else "/".join(f"{f:.3g}" for f in dict.fromkeys(factors))
        notes = ["hidden matrix"]
        if layout == "in_out":
            notes.append("stored (in, out): transformers' Conv1D")
        policy = group["shape_policy"]
        if p.ndim > 2 and (policy == "flatten" or (policy == "auto" and p.ndim >= 4)):
            if id(p) in transposed_convs:  # stored (in, out, *k): the transpose of its out·k × in operator
                notes.append("flattened as stored, in × out·k (transposed convolution)")
            else:
                notes.append("flattened to out × in·k")  # a convolution: one row per output channel
        elif p.ndim > 2:
            notes.append(f"{math.prod(shape[:-2])} matrices (experts or heads)")
        if sizes is not None:
            rows_each = ", ".join(map(str, sizes))
            notes.append(f"{len(sizes)} blocks of {rows_each} rows, each its own polar factor and lr factor")
        elif blocks > 1:
            notes.append(f"{blocks} blocks of {m} rows, each its own polar factor")
        elif any(k == "split" for k, _ in special.get(id(p), ())):
            notes.append('a fused projection: split="auto" would cut it')
        orientation = "in×out" if layout == "in_out" else "out×in"
        shown = blocks if sizes is None else sizes
        rows.append(ParamRow(name, shape, orientation, algorithm, shown, factor, "; ".join(notes)))
    return Explanation(tuple(rows))
