"""What ``load_state_dict`` checks: a checkpoint is taken whole or not at all.

torch's ``Optimizer.load_state_dict`` checks only the number of groups and of parameters per group, so a state
missing one parameter's momentum, a state entry that belongs to no parameter, a ``step`` saved as a Python number,
a NaN momentum or another algorithm's checkpoint all load — and fail later, at every step, or silently turn the
optimizer into another algorithm. Here, once torch has mapped the checkpoint onto this optimizer's parameters,
every parameter's state is checked against what its group's algorithm needs (keys, shapes, dtypes, finiteness,
signs) and put in the form the step uses (numeric steps become counters, statistics float32); the caller keeps the
loaded state only if all of it passes, and otherwise restores its previous state and groups (the same objects).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..distributed import is_dtensor, zeros_row_state
from .options import matrix_layout

#: The options that make an orthogonalized group one algorithm rather than another. When a checkpoint of another
#: algorithm is converted (``load_state_dict(..., convert=True)``), the group keeps this optimizer's values of these.
ALGORITHM_OPTIONS: tuple[str, ...] = ("row_norm", "beta2", "row_eps", "scale_mode", "schedule", "ns_steps")

#: State that may not be negative (second moments); every state tensor must be finite.
_NON_NEGATIVE = ("exp_avg_sq", "second_moment")


def algorithm_name(group: dict[str, Any]) -> str:
    """The algorithm a param group runs, read off its options: "AdamW", "NorMuon", "PolarGrad" or "Muon"."""
    if group.get("algorithm") == "adamw":
        return "AdamW"
    if group.get("row_norm"):
        return "NorMuon"
    if group.get("scale_mode") == "nuclear":
        return "PolarGrad"
    return "Muon"


def converted_groups(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]], convert: bool) -> list[bool]:
    """Per group, whether the checkpoint's group ran another orthogonalized algorithm than this optimizer's (only
    allowed with ``convert``: Muon, NorMuon and PolarGrad share the momentum state). Raises ``ValueError`` naming
    both algorithms otherwise, and always for an AdamW group against an orthogonalized one (other state)."""
    converted = []
    for i, (saved, current) in enumerate(zip(saved_groups, groups, strict=True)):
        was, now = algorithm_name(saved), algorithm_name(current)
        if was != now and "AdamW" in (was, now):
            raise ValueError(
                f"load_state_dict: saved param group {i} ran {was}, but this optimizer's group {i} runs {now}: "
                f"their states differ (AdamW's moments vs. momentum), so it cannot be loaded"
            )
        if was != now and not convert:
            raise ValueError(
                f"load_state_dict: saved param group {i} is {was}'s, but this optimizer's group {i} runs {now}; "
                f"loading it would silently turn that group into {was}. Load it into orthoptim.{was}, or pass "
                f"load_state_dict(state_dict, convert=True) to carry its momentum and steps over to {now}"
            )
        converted.append(was != now)
    return converted


def _local(value: Tensor) -> Tensor:
    """This rank's part of a sharded (DTensor) state, or the tensor itself."""
    return value.to_local() if is_dtensor(value) else value  # type: ignore[attr-defined,no-any-return]


def _counter(key: str, value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A saved ``step``/``nonfinite_skips`` as the 0-d counter the step keeps. torch's optimizers turn a numeric
    ``step`` into a tensor when they load one (torch.optim.Adam's ``__setstate__``); orthoptim does the same."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{key!r} must be one number, got a tensor of shape {tuple(value.shape)}")
        number = float(_local(value).reshape(()))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{key!r} must be a number or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{key!r} must be a non-negative whole number, got {number}")
    return torch.tensor(number, dtype=dtype, device=device)


def _matrix_state(key: str, value: Any, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{key!r} must be a floating-point tensor, got {kind}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{key!r} has shape {tuple(value.shape)}, not the parameter's {shape}")
    return value


def _second_moment(value: Any, count: int, rows: int, policy: str) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"'second_moment' must be a floating-point tensor, got {type(value).__name__}")
    if value.numel() != count * rows:
        raise ValueError(
            f"'second_moment' holds {value.numel()} rows, but the parameter is {count} matrices of {rows} rows under "
            f"shape_policy={policy!r}"
        )
    return value


def _normalize_entry(
    p: Tensor, group: dict[str, Any], entry: dict[str, Any], saved: dict[str, Any], converted: bool
) -> str | None:
    """Check one parameter's loaded state and put it in the step's form, in place. Returns the first state key
    holding a NaN/Inf (or negative second moment), if any; raises for everything else."""
    if group.get("algorithm") == "adamw":
        moments, step_dtype, rows = ["exp_avg", "exp_avg_sq"], torch.float32, None
    else:
        moments, step_dtype = ["momentum_buffer"], torch.int64
        layout = (group.get("weight_layout", "out_in"), group.get("split", 1))
        count, m, _ = matrix_layout(tuple(p.shape), group["shape_policy"], *layout)
        rows = (count, m) if group["row_norm"] else None
        if converted:  # from another orthogonalized algorithm: NorMuon's v is dropped, or starts at 0 as at step 1
            entry.pop("second_moment", None)
            saved.pop("second_moment", None)
            if rows is not None:
                entry["second_moment"] = (
                    zeros_row_state(p, count * m)
                    if is_dtensor(p)
                    else torch.zeros(rows, dtype=torch.float32, device=p.device)
                )
    needed = ["step", "nonfinite_skips", *moments, *(["second_moment"] if rows is not None else [])]
    missing = [key for key in needed if key not in entry]
    if missing:
        raise ValueError(f"has state {sorted(entry)} but lacks {missing}, which its {algorithm_name(group)} needs")
    unknown = sorted(set(entry) - set(needed))
    if unknown:
        raise ValueError(f"has state {unknown}, which {algorithm_name(group)} does not keep")
    entry["step"] = _counter("step", entry["step"], step_dtype, p.device)
    # torch casts every state tensor to the parameter's dtype; these statistics stay float32 (as the step keeps
    # them), so they are taken from the checkpoint as saved.
    entry["nonfinite_skips"] = _counter(
        "nonfinite_skips", saved.get("nonfinite_skips", entry["nonfinite_skips"]), torch.float32, p.device
    )
    for key in moments:
        _matrix_state(key, entry[key], tuple(p.shape))
    if rows is not None:
        value = _second_moment(saved.get("second_moment", entry["second_moment"]), *rows, group["shape_policy"])
        value = value.to(device=p.device, dtype=torch.float32)
        entry["second_moment"] = value if is_dtensor(value) else value.reshape(rows)
    for key in (*moments, *(["second_moment"] if rows is not None else [])):
        local = _local(entry[key])
        if not bool(torch.isfinite(local).all()) or (key in _NON_NEGATIVE and bool((local < 0).any())):
            return key
    return None


def normalize_loaded_state(
    groups: list[dict[str, Any]],
    state: dict[Any, dict[str, Any]],
    saved_state: dict[int, dict[str, Any]],
    converted: list[bool],
    agree: Callable[[bool], bool],
) -> None:
    """Check every parameter's loaded state against its group's algorithm and put it in the step's form, in place.

    ``groups``: the loaded param groups (options already validated); ``state``: what torch mapped onto this
    optimizer's parameters; ``saved_state``: the checkpoint's own entries by ``id(param)``, before torch cast them;
    ``converted``: per group, whether the checkpoint ran another orthogonalized algorithm there
    (:func:`converted_groups`). ``agree(ok)`` is true only if ``ok`` holds on every rank: a sharded checkpoint is
    refused by every rank together (no rank steps on while another has raised). Raises ``ValueError``/``TypeError``
    naming the parameter (group, position, shape) and the problem.
    """
    params = {id(p) for g in groups for p in g["params"]}
    stray = [k for k in state if not isinstance(k, Tensor) or id(k) not in params]
    if stray:
        raise ValueError(
            f"load_state_dict: the checkpoint has state under {len(stray)} key(s) that belong to no parameter of its "
            f"param groups (the first: {stray[0]!r}): was it saved by an optimizer over other parameters?"
        )
    error: Exception | None = None
    position = 0
    for g, group in enumerate(groups):
        for p in group["params"]:
            where = f"load_state_dict: param group {g}, parameter {position} (shape {tuple(p.shape)})"
            position += 1
            entry = state.get(p)
            if not entry or error is not None:
                continue  # no state: never stepped (no gradient yet); the step creates it
            try:
                bad = _normalize_entry(p, group, entry, dict(saved_state.get(id(p), {})), converted[g])
            except (TypeError, ValueError) as e:
                error = type(e)(f"{where}: {e}")
                continue
            if bad is not None:
                error = ValueError(
                    f"{where}: state {bad!r} holds NaN, Inf"
                    f"{' or negative values' if bad in _NON_NEGATIVE else ''}: every step from it would be skipped"
                )
    if not agree(error is None):
        raise error or ValueError("load_state_dict: another rank refused its part of the checkpoint")


def _is_torch_muons(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved group is torch.optim.Muon's (its ``ns_coefficients``, no ``schedule``) facing an
    orthogonalized group of this optimizer."""
    return current.get("algorithm") != "adamw" and "schedule" not in saved and "ns_coefficients" in saved


def from_torch_muon(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """A torch.optim.Muon checkpoint (``state_dict()``) in orthoptim's form, for ``load_state_dict(...,
    convert=True)``: each group keeps torch's lr, weight_decay, momentum, nesterov, eps and ``adjust_lr_fn`` (as
    ``scale_mode``) and takes this optimizer's other options (schedule, steps, normalization); each parameter keeps
    its momentum buffer — torch's update of it is the same lerp as orthoptim's — and its step counters start at 0
    (torch.optim.Muon keeps none). Groups of other checkpoints are returned as they are."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups) or not any(map(_is_torch_muons, saved_groups, groups)):
        return state_dict  # torch's own check names a mismatch in the number of groups
    new_groups, keys = [], set()
    for saved, current in zip(saved_groups, groups, strict=True):
        if not _is_torch_muons(saved, current):
            new_groups.append(saved)
            continue
        taken = {k: saved[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "eps") if k in saved}
        mine = {k: v for k, v in current.items() if k not in ("params", "param_names")}
        # Muon's own algorithm options, so that a NorMuon or PolarGrad loading it converts as from orthoptim.Muon.
        muon = {"row_norm": False, "scale_mode": saved.get("adjust_lr_fn") or "original"}
        names = {"param_names": saved["param_names"]} if "param_names" in saved else {}
        new_groups.append({**mine, **taken, **muon, "params": saved["params"], **names})
        keys.update(saved["params"])
    state = {
        k: {**v, "step": v.get("step", 0), "nonfinite_skips": 0} if k in keys else v
        for k, v in state_dict.get("state", {}).items()
    }
    return {**state_dict, "param_groups": new_groups, "state": state}


def refuse_foreign_groups(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` for a saved group that no orthoptim optimizer wrote (no ``schedule`` and not an
    ``"adamw"`` group: torch.optim.Muon's and torch.optim.AdamW's look like that), naming its options and what to
    do instead."""
    for i, (saved, current) in enumerate(zip(saved_groups, groups, strict=False)):
        # orthoptim writes a schedule into every orthogonalized group and "algorithm": "adamw" into AdamW ones.
        ours = "schedule" in saved or saved.get("algorithm") == "adamw"
        if not ours:
            options = sorted(k for k in saved if k not in ("params", "param_names"))
            hint = (
                "torch.optim.Muon's: load_state_dict(state_dict, convert=True) carries its momentum buffers and "
                "options over"
                if _is_torch_muons(saved, current)
                else "another torch optimizer's, e.g. torch.optim.AdamW's"
                if "betas" in saved
                else "torch.optim.Muon's would have ns_coefficients"
            )
            raise ValueError(
                f"load_state_dict: saved param group {i} has neither a 'schedule' option nor 'algorithm': 'adamw', "
                f"so it was not saved by an orthoptim optimizer (its options: {options}; {hint})"
            )


def merge_loaded_options(
    groups: list[dict[str, Any]],
    current: list[dict[str, Any]],
    converted: list[bool],
    validate: Callable[[dict[str, Any]], None],
) -> None:
    """The loaded ``groups`` completed and checked in place: options newer than the checkpoint take this
    optimizer's (``current``) values, a converted group keeps this optimizer's algorithm options, and each is
    validated as the constructor validates it."""
    for group, now, change in zip(groups, current, converted, strict=True):
        for key, value in now.items():
            group.setdefault(key, value)
        if change:
            group.update({key: now[key] for key in ALGORITHM_OPTIONS if key in now})
        validate(group)


def saved_state_by_param(
    state_dict: dict[str, Any], saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """The checkpoint's own state entries by ``id`` of this optimizer's parameter. Keys are matched through the
    saved groups' ``"params"`` lists, as torch does: indices for a plain ``state_dict()``, fully qualified names
    from torch.distributed.checkpoint."""
    keys = [k for g in saved_groups for k in g["params"]]
    params = dict(zip(keys, (p for g in groups for p in g["params"]), strict=True))
    return {id(params[k]): v for k, v in state_dict.get("state", {}).items() if k in params}
