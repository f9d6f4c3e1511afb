"""The shared step of every orthogonalized optimizer: one functional update, one thin ``Optimizer`` shell.

Per parameter group (all options live in the group, so ``state_dict()`` carries them):

1. momentum ``B ← B + (1−μ)(G − B)`` (``lerp``, as torch.optim.Muon), Nesterov input ``M = G + μ(B − G)``;
2. ``O = orthogonalize(M)`` — one batched call per megabatch of same-shape matrices;
3. optional per-row second-moment normalization (NorMuon) and the scale mode (``shapes.lr_scale``; ``"nuclear"``
   multiplies each matrix by ``⟨O, M⟩ ≈ ‖M‖_*``);
4. decoupled weight decay ``θ ← (1 − lr·wd)θ`` with the unadjusted lr, then ``θ ← θ − lr·scale·O``.

Non-finite policy (optimizer-wide): ``"skip"`` checks every gradient before any state changes and every
orthogonalized matrix after, and commits the whole step — parameters, momentum, second moments, step counters —
only if all are finite, by selecting on a device-side flag (no host sync; the optional warning reads the flag
once per step). ``"raise"`` raises :class:`NonFiniteError` naming the parameter (host syncs). ``"propagate"``
checks nothing. Under ``"skip"`` the new state is computed out of place and selected at the end, which holds one
extra copy of the momentum and of the update for the duration of the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from ..polar import NonFiniteError, as_schedule, orthogonalize
from ..polar.normalize import NORMALIZATIONS
from ..polar.orthogonalize import ITERATIONS
from .adamw import AdamWPending, adamw_prepare
from .megabatch import Megabatch, plan_megabatches
from .shapes import SCALE_MODES, SHAPE_POLICIES, lr_scale, matrix_layout

NonFiniteMode: TypeAlias = Literal["skip", "raise", "propagate"]
NONFINITE_MODES: tuple[str, ...] = ("skip", "raise", "propagate")


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number in the stated range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok or value != value:
        interval = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}{']' if hi is not None else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def validate_orthogonalized_group(group: dict[str, Any]) -> None:
    """Validate the options of one orthogonalized param group up front (raises ``ValueError``/``TypeError``)."""
    check_number("lr", group["lr"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    check_number("momentum", group["momentum"], 0.0, 1.0)
    if not isinstance(group["nesterov"], bool):
        raise TypeError("nesterov must be a bool")
    if group["scale_mode"] not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {group['scale_mode']!r}; choose one of {SCALE_MODES}")
    if group["normalization"] not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {group['normalization']!r}; choose one of {NORMALIZATIONS}")
    if group.get("iteration", "auto") not in ITERATIONS:
        raise ValueError(f"unknown iteration {group['iteration']!r}; choose one of {ITERATIONS}")
    if group["shape_policy"] not in SHAPE_POLICIES:
        raise ValueError(f"unknown shape_policy {group['shape_policy']!r}; choose one of {SHAPE_POLICIES}")
    sched = as_schedule(group["schedule"])
    if group["ns_steps"] is not None:
        sched.steps_coefficients(group["ns_steps"])  # validates the step count
    if group["row_norm"]:
        check_number("beta2", group["beta2"], 0.0, 1.0)
        check_number("row_eps", group["row_eps"], 0.0, lo_open=True)
    for p in group["params"]:
        matrix_layout(tuple(p.shape), group["shape_policy"])


@dataclass
class _Pending:
    """A megabatch's new state, computed out of place, waiting for the step-wide finite flag."""

    params: list[Tensor]
    bufs: list[Tensor]
    old_bufs: Tensor
    new_bufs: Tensor
    update: Tensor  # (matrices, m, n): O, or O·(−lr·‖M‖_*) in the nuclear mode
    alpha: float  # the update is added with this factor (−lr·scale; 1 in the nuclear mode)
    counts: tuple[int, ...]
    decay: float
    finite: Tensor | None  # 0-d bool: every orthogonalized matrix of the megabatch is finite
    second: list[Tensor] | None = None
    old_second: Tensor | None = None
    new_second: Tensor | None = None
    steps: list[Tensor] | None = None


def _row_normalize(O: Tensor, v: Tensor, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """NorMuon (arXiv 2510.05491; microsoft/dion normuon.py; modded-nanogpt): per-row second moment of the
    orthogonalized update, divide each row by its root, restore the Frobenius norm of each matrix."""
    Of = O.float()
    v_new = torch.lerp(v, Of.square().mean(dim=-1), 1.0 - beta2)
    normed = Of / (v_new + eps).sqrt().unsqueeze(-1)
    ratio = torch.linalg.matrix_norm(Of) / torch.linalg.matrix_norm(normed).clamp_min(torch.finfo(torch.float32).tiny)
    return (normed * ratio.view(-1, 1, 1)).to(O.dtype), v_new


def orthogonalized_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    megabatches: Sequence[Megabatch],
    group: dict[str, Any],
    *,
    need_flags: bool,
) -> list[_Pending]:
    """Phase 1 of the functional update: compute every megabatch's new state and update, commit nothing.

    ``need_flags`` asks for a finite flag per megabatch of the output. Non-finite gradients need no cleaning
    here: the commit selects (``torch.where``) rather than multiplies, so a discarded NaN never leaks.
    """
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    pending = []
    for mb in megabatches:
        m, n = mb.matrix_shape
        idx = mb.indices
        G = torch.cat([grads[i].reshape(c, m, n) for i, c in zip(idx, mb.counts, strict=True)])
        old = torch.cat([bufs[i].reshape(c, m, n) for i, c in zip(idx, mb.counts, strict=True)])
        new = torch.lerp(old, G, 1.0 - mu)
        M = torch.lerp(G, new, mu) if group["nesterov"] else new
        O = orthogonalize(
            M,
            schedule=group["schedule"],
            steps=group["ns_steps"],
            normalization=group["normalization"],
            compute_dtype=group["compute_dtype"],
            nonfinite="propagate",
            iteration=group.get("iteration", "auto"),  # groups saved before the option existed run "auto"
        )
        p = _Pending([params[i] for i in idx], [bufs[i] for i in idx], old, new, O, 1.0, mb.counts, 1.0 - lr * wd, None)
        if group["row_norm"]:
            assert second is not None
            p.second = [second[i] for i in idx]
            p.old_second = torch.cat([second[i].reshape(c, m) for i, c in zip(idx, mb.counts, strict=True)])
            O, p.new_second = _row_normalize(O, p.old_second, group["beta2"], group["row_eps"])
        scale = lr_scale(group["scale_mode"], m, n)
        if group["scale_mode"] == "nuclear":
            # ⟨O, M⟩ = Σ gᵢσᵢ ≈ ‖M‖_* when the gains gᵢ ≈ 1 (PolarGrad runs enough steps for that).
            nuc = (O.to(torch.float32) * M.to(torch.float32)).sum(dim=(-2, -1), keepdim=True)
            p.update = O * (nuc * -lr).to(O.dtype)
        else:
            p.update, p.alpha = O, -lr * scale  # the scaling is fused into the final foreach add
        if need_flags:
            # |O| ≲ 1.3 entrywise, so the sum cannot overflow: it is non-finite iff some entry is.
            p.finite = torch.isfinite(O.sum())
        p.steps = [steps[i] for i in idx]
        pending.append(p)
    return pending


def _commit(p: _Pending, ok: Tensor | None) -> None:
    """Phase 2: write the megabatch's new state (or, where ``ok`` is false, keep the old one bit for bit)."""
    zero = torch.zeros((), dtype=p.update.dtype, device=p.update.device)
    new_bufs, update = p.new_bufs, p.update
    if ok is not None:
        new_bufs = torch.where(ok, new_bufs, p.old_bufs)
        update = torch.where(ok, update, zero)
    torch._foreach_copy_(p.bufs, [b.view_as(t) for b, t in zip(new_bufs.split(p.counts), p.bufs, strict=True)])
    if p.second is not None and p.new_second is not None and p.old_second is not None:
        new_second = p.new_second if ok is None else torch.where(ok, p.new_second, p.old_second)
        torch._foreach_copy_(
            p.second, [s.view_as(t) for s, t in zip(new_second.split(p.counts), p.second, strict=True)]
        )
    if p.decay != 1.0:
        if ok is None:
            torch._foreach_mul_(p.params, p.decay)
        else:
            torch._foreach_mul_(p.params, torch.where(ok, p.decay, 1.0).to(p.params[0].dtype))
    parts = [u.view_as(t) for u, t in zip(update.split(p.counts), p.params, strict=True)]
    torch._foreach_add_(p.params, parts, alpha=p.alpha)
    assert p.steps is not None
    torch._foreach_add_(p.steps, 1 if ok is None else ok.to(torch.int64))


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Shell shared by Muon, NorMuon, PolarGrad and Hybrid: gathers gradients, runs the functional update.

    Param groups with ``algorithm="adamw"`` (only ``Hybrid`` makes them) run AdamW; all others are orthogonalized.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], nonfinite: NonFiniteMode, warn: bool) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_MODES}")
        self.nonfinite: NonFiniteMode = nonfinite
        self.warn_on_skip = bool(warn)
        self._plans: dict[tuple[int, ...], list[Megabatch]] = {}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if group.get("algorithm", "orthogonalized") == "adamw":
            from .adamw import validate_adamw_group

            validate_adamw_group(group)
        else:
            validate_orthogonalized_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_plans"):  # called by Optimizer.__init__ before validation runs there
            self._validate_group(self.param_groups[-1])

    #: State kept in float32 whatever the parameter dtype (torch's load_state_dict would cast it to the param's).
    _FLOAT32_STATE = ("second_moment", "nonfinite_skips")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but float32 statistics stay float32 for low-precision
        parameters (torch casts every state tensor but ``step`` to the parameter's dtype)."""
        keep = {
            k: {key: v[key] for key in self._FLOAT32_STATE if key in v} for k, v in state_dict.get("state", {}).items()
        }
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, extra in keep.items():
            for key, value in extra.items():
                self.state[params[int(k)]][key] = value.to(device=params[int(k)].device, dtype=torch.float32)

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped by the ``"skip"`` policy so far (reads a device counter: a host sync)."""
        for state in self.state.values():
            if "nonfinite_skips" in state:
                return int(state["nonfinite_skips"])
        return 0

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        params, grads = [], []
        lists: dict[str, list[Tensor]] = {}
        adamw = group.get("algorithm", "orthogonalized") == "adamw"
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"sparse gradients are not supported (parameter of shape {tuple(p.shape)})")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if not state:
                # AdamW keeps a float32 step (as torch.optim.AdamW does) for its bias correction.
                state["step"] = torch.zeros((), dtype=torch.float32 if adamw else torch.int64, device=p.device)
                state["nonfinite_skips"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if adamw:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["row_norm"]:
                        count, m, _ = matrix_layout(tuple(p.shape), group["shape_policy"])
                        state["second_moment"] = torch.zeros(count, m, dtype=torch.float32, device=p.device)
            for key in ("step", "nonfinite_skips", "exp_avg", "exp_avg_sq", "momentum_buffer", "second_moment"):
                if key in state:
                    lists.setdefault(key, []).append(state[key])
        return params, grads, lists

    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> list[Megabatch]:
        key = (id(group), *(id(p) for p in params))
        plan = self._plans.get(key)
        if plan is None:
            layouts = [matrix_layout(tuple(p.shape), group["shape_policy"]) for p in params]
            plan = plan_megabatches(layouts, [p.dtype for p in params], [p.device for p in params])
            self._plans[key] = plan
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step over every group (see the module docstring for the order of operations)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [(group, *self._gather(group)) for group in self.param_groups]
        all_params = [p for _, params, _, _ in gathered for p in params]
        all_grads = [g for _, _, grads, _ in gathered for g in grads]
        if not all_grads:
            return loss
        policy = self.nonfinite
        grads_finite: Tensor | None = None
        if policy != "propagate":
            # Max-abs per gradient: NaN and ±Inf survive it, large finite values do not overflow.
            grads_finite = torch.isfinite(torch.stack(torch._foreach_norm(all_grads, float("inf"))))
            if policy == "raise" and not bool(grads_finite.all()):
                bad = all_params[int((~grads_finite).nonzero()[0])]
                raise NonFiniteError(f"non-finite gradient for the parameter of shape {tuple(bad.shape)}")
        ok = None if grads_finite is None else grads_finite.all()
        sanitize = ok if policy == "skip" else None
        pending: list[Any] = []
        for group, params, grads, lists in gathered:
            if not params:
                continue
            if group.get("algorithm", "orthogonalized") == "adamw":
                pending.append(adamw_prepare(params, grads, lists, group, sanitize=sanitize))
            else:
                plan = self._plan(group, params)
                pending.extend(
                    orthogonalized_prepare(
                        params,
                        grads,
                        lists["momentum_buffer"],
                        lists.get("second_moment"),
                        lists["step"],
                        plan,
                        group,
                        need_flags=policy != "propagate",
                    )
                )
        out_flags = [p.finite for p in pending if isinstance(p, _Pending) and p.finite is not None]
        if out_flags:
            out_ok = torch.stack(out_flags).all()
            if policy == "raise" and not bool(out_ok):
                raise NonFiniteError("orthogonalization produced a non-finite update; no state was changed")
            ok = out_ok if ok is None else ok & out_ok
        commit_ok = ok if policy == "skip" else None
        for p in pending:
            if isinstance(p, AdamWPending):
                p.commit(commit_ok)
            else:
                _commit(p, commit_ok)
        if policy == "skip":
            assert ok is not None
            skips = [s for _, _, _, lists in gathered for s in lists.get("nonfinite_skips", [])]
            torch._foreach_add_(skips, (~ok).to(torch.float32))
            if self.warn_on_skip and not bool(ok):  # the one read of the flag, once per step
                assert grads_finite is not None
                bad_idx = (~grads_finite).nonzero()
                what = (
                    f"a non-finite gradient (parameter of shape {tuple(all_params[int(bad_idx[0])].shape)})"
                    if bad_idx.numel()
                    else "a non-finite orthogonalized update"
                )
                warnings.warn(
                    f"orthoptim: step skipped for every parameter because of {what}; state is unchanged. "
                    "Pass warn_nonfinite=False to silence this (and drop its host sync).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return loss
