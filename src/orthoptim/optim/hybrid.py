"""``orthoptim.Hybrid``: hidden matrices orthogonalized, everything else AdamW — one optimizer object."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .muon import Muon

#: Module names treated as the output head by :func:`split_params` (the last component of the module path).
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "output", "classifier", "decoder")
#: Parameters registered directly (not an ``nn.Embedding``'s weight) whose own name contains one of these are
#: embeddings too: a ViT's ``pos_embed``, ``cls_token``, ``register_tokens``, a GPT's raw ``wpe``-style tables named
#: ``*embed*``. Matched against the last component of the parameter's name, lower-cased.
EMBEDDING_NAME_PARTS: tuple[str, ...] = ("embed", "token")


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
    contains one of ``embedding_name_parts``, e.g. ``pos_embed``, ``cls_token``), the output head (a module
    whose name is in ``head_names``), and any weight shared with an embedding (tied heads). Each parameter
    appears once (shared parameters are deduplicated).
    """
    heads = set(head_names)
    parts = tuple(part.lower() for part in embedding_name_parts)
    embedding_ids = {
        id(p) for mod in model.modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) for p in mod.parameters()
    }
    embedding_ids.update(
        id(p) for name, p in model.named_parameters() if any(part in name.rsplit(".", 1)[-1].lower() for part in parts)
    )
    head_ids: set[int] = set()
    for name, mod in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in heads:
            head_ids.update(id(p) for p in mod.parameters(recurse=False))
    matrices: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        excluded = (exclude_embeddings and id(p) in embedding_ids) or (exclude_head and id(p) in head_ids)
        (matrices if p.ndim >= 2 and not excluded else others).append(p)
    return matrices, others


def _check_algorithm(group: dict[str, Any]) -> None:
    if group.get("algorithm") not in ("muon", "adamw"):
        got = group.get("algorithm")
        raise ValueError(f'Hybrid: each param group needs "algorithm": "muon" or "adamw", got {got!r}')


class Hybrid(Muon):
    """One optimizer: an orthogonalized update (Muon, or NorMuon/PolarGrad via ``row_norm``/``scale_mode``) for
    hidden matrices and AdamW for the rest (embeddings, head, biases, gains).

    ``params`` is an ``nn.Module`` (split by :func:`split_params`; its ``nn.Conv1d`` weights get a group of their
    own with ``shape_policy="flatten"`` unless ``shape_policy`` is passed), a pair ``(matrices, others)``, or a list of
    param groups each with ``"algorithm": "muon"`` or ``"adamw"``. Works with torch lr schedulers (each group has
    its own ``lr``; schedulers scale all groups), ``zero_grad``, closures and ``state_dict``. The non-finite policy
    covers both halves: a skipped step leaves AdamW's moments untouched too.

    Keyword arguments are :class:`orthoptim.Muon`'s for the matrices (``lr`` default 0.02, ``weight_decay`` 0)
    plus ``adamw_lr`` (3e-4), ``adamw_betas`` ((0.9, 0.95)), ``adamw_eps`` (1e-8), ``adamw_weight_decay`` (0).
    ``process_group`` (Muon's) splits the matrices' orthogonalization over ranks; the AdamW half is elementwise
    and runs on each rank's replicas or shards, and both halves skip together on every rank.
    """

    def __init__(
        self,
        params: nn.Module | tuple[Iterable[Any], Iterable[Any]] | list[dict[str, Any]],
        *,
        lr: float | torch.Tensor = 0.02,
        weight_decay: float = 0.0,
        adamw_lr: float | torch.Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        **kw: Any,
    ) -> None:
        adamw = {"lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps, "weight_decay": adamw_weight_decay}
        groups: list[dict[str, Any]]
        conv1d: set[int] = set()
        if isinstance(params, nn.Module):
            if "shape_policy" not in kw:  # a Conv1d weight (out, in, k) is one out × in·k matrix, not k-row batches
                conv1d = {id(m.weight) for m in params.modules() if isinstance(m, nn.Conv1d)}
            params = split_params(params)
        if isinstance(params, tuple):
            if len(params) != 2:
                raise ValueError("Hybrid(params): a tuple must be (matrix_params, other_params)")
            mats, rest = list(params[0]), list(params[1])
            groups = []
            flat = [p for p in mats if id(p) in conv1d]
            mats = [p for p in mats if id(p) not in conv1d]
            if mats:
                groups.append({"params": mats, "algorithm": "muon"})
            if flat:
                groups.append({"params": flat, "algorithm": "muon", "shape_policy": "flatten"})
            if rest:
                groups.append({"params": rest, "algorithm": "adamw", **adamw})
        else:
            groups = []
            for g in params:
                if not isinstance(g, dict):
                    raise TypeError(
                        "Hybrid(params): pass an nn.Module (split by orthoptim.split_params), a pair (matrices, "
                        'others), or param groups (dicts) each with "algorithm": "muon" or "adamw"; got an '
                        f"iterable of {type(g).__name__}"
                    )
                _check_algorithm(g)
                groups.append({**adamw, **g} if g["algorithm"] == "adamw" else dict(g))
        if not groups:
            raise ValueError("Hybrid got no parameters")
        self._adamw_defaults = adamw  # for groups added later (``add_param_group``)
        super().__init__(groups, lr=lr, weight_decay=weight_decay, **kw)

    _KEPT_ATTRIBUTES = (*Muon._KEPT_ATTRIBUTES, "_adamw_defaults")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with ``"algorithm"`` defaulting to ``"muon"``; an ``"adamw"`` group's missing options are
        the constructor's ``adamw_*`` (not the matrices' ``lr``/``weight_decay``)."""
        param_group.setdefault("algorithm", "muon")
        _check_algorithm(param_group)
        if param_group["algorithm"] == "adamw" and hasattr(self, "_adamw_defaults"):
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
