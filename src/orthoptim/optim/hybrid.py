"""``orthoptim.Hybrid``: hidden matrices orthogonalized, everything else AdamW — one optimizer object."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .adamw import validate_adamw_group
from .muon import Muon
from .options import check_number
from .split import _excluded_ids, _name_says_excluded, is_vector, matrix_options_by_module


def _check_algorithm(group: dict[str, Any]) -> None:
    if group.get("algorithm") not in ("muon", "adamw"):
        got = group.get("algorithm")
        raise ValueError(f'Hybrid: each param group needs "algorithm": "muon" or "adamw", got {got!r}')


#: A group without ``"algorithm"`` may set its AdamW half's options under the constructor's keyword names.
_ADAMW_GROUP_KEYS: dict[str, str] = {
    "adamw_lr": "lr",
    "adamw_betas": "betas",
    "adamw_eps": "eps",
    "adamw_weight_decay": "weight_decay",
}
#: Keys of a group without ``"algorithm"`` that are AdamW's alone, so its orthogonalized half does not get them
#: (Muon's own ``eps`` is accepted for torch.optim.Muon's sake and unused).
_ADAMW_ONLY = ("betas", "eps", *_ADAMW_GROUP_KEYS)
#: ... and the one its AdamW half does not get: Muon's lr (0.02) is ~100× AdamW's (3e-4); ``adamw_lr`` is AdamW's.
_MATRICES_ONLY = ("lr",)


def _sort_group(
    group: dict[str, Any], adamw: dict[str, Any], excluded: set[int], special: dict[int, tuple[tuple[str, Any], ...]]
) -> list[dict[str, Any]]:
    """A param group without ``"algorithm"`` as the explicit groups it becomes, in this order, empty ones left
    out: its orthogonalized matrices, a group per option set in ``special`` (Conv1d's flatten, Conv1D's (in, out)
    layout: ``matrix_options_by_module``), its AdamW parameters.

    A parameter goes to AdamW if it has < 2 dims, its ``id`` is in ``excluded``, or its name (``(name, param)``
    pairs, or the group's ``"param_names"``) matches :func:`split_params`'s name rules. Options: see
    :class:`Hybrid`. The caller's dict is not changed.
    """
    if "params" not in group:
        raise ValueError('a param group needs "params"')
    raw = group["params"]
    if isinstance(raw, set):  # as torch refuses: a set's order, hence the groups' and the state_dict's, varies
        raise TypeError("Hybrid: a param group's params need an ordered collection (a list), not a set")
    items: list[Any] = [raw] if isinstance(raw, torch.Tensor) else list(raw)
    named = [isinstance(item, tuple) for item in items]
    if any(named) and not all(named):
        raise ValueError("Hybrid: a param group's params must be all (name, parameter) pairs or all parameters")
    if "param_names" in group:  # names already taken out of the pairs (another optimizer's param_groups)
        if any(named) or len(group["param_names"]) != len(items):
            raise ValueError(
                f'Hybrid: a param group\'s "param_names" ({len(group["param_names"])}) must name each of its '
                f"{len(items)} parameters, which are then not (name, parameter) pairs"
            )
        items = list(zip(group["param_names"], items, strict=True))
    matrices: dict[tuple[tuple[str, Any], ...], list[Any]] = {(): []}  # by their extra options, plain first
    to_adamw_items: list[Any] = []
    for item in items:
        name, p = item if isinstance(item, tuple) else (None, item)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"Hybrid: optimizer params must be Tensors, but one is {type(p).__name__}")
        to_adamw = p.ndim < 2 or is_vector(p) or id(p) in excluded or (name is not None and _name_says_excluded(name))
        if to_adamw:
            to_adamw_items.append(item)
        else:
            matrices.setdefault(special.get(id(p), ()), []).append(item)
    options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    matrix = {k: v for k, v in options.items() if k not in _ADAMW_ONLY}
    rest = {
        **adamw,
        **{k: v for k, v in options.items() if k not in _MATRICES_ONLY and k not in _ADAMW_GROUP_KEYS},
        **{_ADAMW_GROUP_KEYS[k]: v for k, v in options.items() if k in _ADAMW_GROUP_KEYS},
    }
    made = [({**matrix, **dict(extra), "algorithm": "muon"}, half) for extra, half in matrices.items()]
    made.append(({**rest, "algorithm": "adamw"}, to_adamw_items))
    # Pairs stay pairs: torch's add_param_group takes the names out into each half's "param_names".
    return [{"params": half, **g} for g, half in made if half]


#: The keywords Hybrid passes on to Muon (its matrices' options).
_MUON_KEYWORDS = frozenset(inspect.signature(Muon.__init__).parameters) - {"self", "params"}


class Hybrid(Muon):
    """One optimizer: an orthogonalized update (Muon, or NorMuon/PolarGrad via ``row_norm``/``scale_mode``) for
    hidden matrices and AdamW for the rest (embeddings, head, biases, gains).

    ``params`` is one of:

    - an ``nn.Module``: split by :func:`split_params`; its ``nn.Conv1d`` weights get a group of their own with
      ``shape_policy="flatten"`` unless ``shape_policy`` is passed, and transformers' GPT-2 ``Conv1D`` weights,
      stored (in, out), one with ``weight_layout="in_out"`` unless ``weight_layout`` is passed — their lr scale
      and NorMuon's rows then follow the (out, in) orientation, as for the ``nn.Linear`` they stand for;
    - a pair ``(matrices, others)``, split by you (e.g. :func:`split_params`' result with a parameter moved);
      with ``module=`` (the model they belong to) its ``nn.Conv1d`` and ``Conv1D`` matrices get their groups
      as for ``Hybrid(model)``, and ``split="auto"`` or a name mapping applies;
    - a list of param groups (dicts). A group with ``"algorithm": "muon"`` or ``"adamw"`` is taken as it is. A
      group without ``"algorithm"`` (torch style, e.g. the decay/no-decay list transformers' Trainer builds) is
      sorted per parameter: one with ≥ 2 dims is orthogonalized, anything else goes to AdamW — and so does a
      ≥ 2-D parameter that :func:`split_params` would exclude, when that can be seen: with ``module=`` (the
      ``nn.Module`` the parameters belong to) by :func:`split_params`'s rules exactly, ``nn.Conv1d`` and
      ``Conv1D`` weights in groups of their own as for ``Hybrid(module)``; without it, from names only, where the
      group gives ``(name, parameter)`` pairs (``named_parameters()``) or ``"param_names"``: a head module's weights
      (``lm_head.weight``) and parameters whose own name contains ``embed``/``token`` (``pos_embed``). **An
      ``nn.Embedding`` table is recognized through ``module=`` only**: without it, a group of plain parameters
      (Trainer's) has its embeddings and head orthogonalized. Pass ``module=model`` (with Trainer:
      ``optimizer_cls_and_kwargs=(orthoptim.Hybrid, {"lr": 0.02, "module": model})``), or split by hand.

      The group's options: ``lr`` goes to the matrices only (AdamW's lr is of another scale: the AdamW half
      takes the group's ``adamw_lr``, else the constructor's); ``betas`` and ``eps`` to AdamW only;
      ``adamw_lr``/``adamw_betas``/``adamw_eps``/``adamw_weight_decay`` set the AdamW half's option, overriding
      the unprefixed key; every other key goes to both halves — ``weight_decay`` acts on both (decoupled in
      both), Muon's options (``momentum``, ``ns_steps``, ...) on the matrices only (AdamW ignores them), keys of
      your own are kept. Options the group leaves out are the constructor's: ``lr``/``weight_decay`` for the
      matrices, ``adamw_*`` for AdamW. Each group becomes, in
      order, its matrices' group, (with ``module=``) its Conv1d and its Conv1D weights' groups, its AdamW group;
      empty ones are
      left out, so there may be more or fewer groups than given (an lr scheduler taking one value per group
      must follow ``opt.param_groups``). A fresh Hybrid built from the same groups sorts them the same way:
      ``load_state_dict`` works as usual.

    Works with torch lr schedulers (each group has its own ``lr``; schedulers scale all groups), ``zero_grad``,
    closures and ``state_dict``. The non-finite policy covers both halves: a skipped step leaves AdamW's moments
    untouched too.

    Keyword arguments are :class:`orthoptim.Muon`'s for the matrices (``lr`` default 0.02, ``weight_decay`` 0)
    plus ``adamw_lr`` (3e-4), ``adamw_betas`` ((0.9, 0.95)), ``adamw_eps`` (1e-8), ``adamw_weight_decay`` (0),
    and ``module`` (above; with a pair or param groups). ``split``: a block count for every matrix (Muon's), or, with
    the model at hand, ``"auto"`` — fused projections cut into their parts: GPT-2's ``c_attn``, ``qkv``/``Wqkv``/
    ``qkv_proj`` with 3·in outputs (q, k, v), ``nn.MultiheadAttention``'s ``in_proj_weight`` into 3,
    ``gate_up_proj`` into 2, and a grouped-query ``qkv``/``qkv_proj`` into its q, k and v sizes when its attention
    module declares ``head_dim``, ``num_heads`` (or ``num_attention_heads``) and ``num_key_value_heads`` (itself
    or on its ``config``, as transformers' Phi-3) — or a ``{module name: count or sizes}`` dict (a name matches a
    suffix of the module's path): ``{"q_proj": heads}``, ``{"qkv_proj": (q_rows, kv_rows, kv_rows)}``.
    ``row_norm=True`` runs NorMuon
    on the matrices, with its ``beta2`` and ``row_eps`` (:class:`orthoptim.NorMuon`); ``scale_mode="nuclear"``
    runs PolarGrad's scale.
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
        module: nn.Module | None = None,
        row_norm: bool = False,
        beta2: float = 0.95,
        row_eps: float = 1e-8,
        split: int | tuple[int, ...] | str | dict[str, Any] = 1,
        **kw: Any,
    ) -> None:
        unknown = sorted(set(kw) - _MUON_KEYWORDS)
        if unknown:  # named here: passed on, Muon.__init__ would name itself
            raise TypeError(f"Hybrid.__init__() got an unexpected keyword argument {unknown[0]!r}")
        adamw: dict[str, Any] = {
            "lr": adamw_lr,
            "betas": adamw_betas,
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        # The options first, as torch's optimizers check them (each group is checked again when built).
        check_number("lr", lr, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        validate_adamw_group({**adamw, "params": []})
        adamw["betas"] = tuple(adamw_betas)
        if isinstance(params, torch.Tensor) or not isinstance(params, (nn.Module, Iterable)):
            raise TypeError(
                "Hybrid(params): an nn.Module, a pair (matrices, others) or param groups (dicts), got "
                f"{torch.typename(params)}"
            )
        by_module: str | dict[str, Any] | None = None  # split="auto" or {name: k or sizes}: per module, below
        if isinstance(split, (str, dict)):
            if split != "auto" and not isinstance(split, dict):
                raise ValueError(
                    f'Hybrid(split=): a block count, block sizes, "auto" or a {{module name: count or sizes}} dict; '
                    f"got {split!r}"
                )
            by_module, split = split, 1
            if not isinstance(params, nn.Module) and module is None:
                raise TypeError('Hybrid(split="auto" or a dict) needs the model: Hybrid(model) or module=model')
        kw["split"] = split
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"Hybrid(module=): an nn.Module, got {type(module).__name__}")
        if isinstance(params, nn.Module):
            if module is not None:
                raise TypeError("Hybrid(module=) is for param groups; Hybrid(model) already splits model")
            # Hybrid(model) is one group of model's trainable parameters sorted by model: split_params(model).
            module = params
            params = [{"params": [p for p in module.parameters() if p.requires_grad]}]
        groups: list[dict[str, Any]] = []
        if isinstance(params, tuple):
            if len(params) != 2:
                raise ValueError("Hybrid(params): a tuple must be (matrix_params, other_params)")
            mats, rest = list(params[0]), list(params[1])
            # The matrices as the caller split them; the model, when given, says which need options of their own
            # (Conv1d's flatten, Conv1D's (in, out) layout, a block split), as in Hybrid(model).
            special = matrix_options_by_module(module, kw, by_module) if module is not None else {}
            by_options: dict[tuple[tuple[str, Any], ...], list[Any]] = {(): []}
            for p in mats:
                by_options.setdefault(special.get(id(p), ()), []).append(p)
            for extra, half in by_options.items():
                if half:
                    groups.append({"params": half, "algorithm": "muon", **dict(extra)})
            if rest:
                groups.append({"params": rest, "algorithm": "adamw", **adamw})
        else:
            excluded = _excluded_ids(module) if module is not None else set()
            special = matrix_options_by_module(module, kw, by_module) if module is not None else {}
            for g in params:
                if not isinstance(g, dict):
                    raise TypeError(
                        "Hybrid(params): pass an nn.Module (split by orthoptim.split_params), a pair (matrices, "
                        'others), or param groups (dicts); a group without "algorithm" is sorted per parameter. '
                        f"Got an iterable of {type(g).__name__}: for model.parameters() or named_parameters(), "
                        'pass the model itself (its embeddings and head are then recognized); [{"params": tensors}] '
                        "sorts by shape only"
                    )
                if "algorithm" not in g:
                    mine = {i: o for i, o in special.items() if all(k not in g for k, _ in o)}
                    groups.extend(_sort_group(g, adamw, excluded, mine))
                    continue
                _check_algorithm(g)
                groups.append({**adamw, **g} if g["algorithm"] == "adamw" else dict(g))
        if not groups:
            raise ValueError("Hybrid got no parameters")
        self._adamw_defaults = adamw  # for groups added later (``add_param_group``)
        self._row_options = {"row_norm": row_norm, "beta2": beta2, "row_eps": row_eps}  # NorMuon's, on the matrices
        super().__init__(groups, lr=lr, weight_decay=weight_decay, **kw)

    _KEPT_ATTRIBUTES = (*Muon._KEPT_ATTRIBUTES, "_adamw_defaults")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's. A group without ``"algorithm"`` is sorted as the constructor sorts one (by its parameters'
        dims and names; ``module=`` is the constructor's alone) and its halves are added both or neither (a
        2-D-only group is one orthogonalized group, as when ``"algorithm"`` defaulted to ``"muon"``). An
        ``"adamw"`` group's missing options are the constructor's ``adamw_*`` (not the matrices' ``lr`` and
        ``weight_decay``)."""
        if isinstance(param_group, dict) and "algorithm" not in param_group:
            added = len(self.param_groups)
            try:
                for half in _sort_group(param_group, self._adamw_defaults, set(), {}):
                    self.add_param_group(half)
            except Exception:
                del self.param_groups[added:]  # a rejected AdamW half takes its matrices' group with it
                raise
            return
        if isinstance(param_group, dict):
            _check_algorithm(param_group)
            if param_group["algorithm"] == "adamw" and hasattr(self, "_adamw_defaults"):
                for key, value in self._adamw_defaults.items():
                    param_group.setdefault(key, value)
        super().add_param_group(param_group)
