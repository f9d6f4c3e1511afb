"""The shell every orthogonalized optimizer shares (Muon, NorMuon, PolarGrad, Hybrid): a ``torch.optim.Optimizer``
whose ``step`` reads straight down —

1. **gather** each group's parameters with gradients and their state (made at the first step);
2. **check** gradients under the non-finite policy (``"skip"``: AdamW's, and every gradient when distributed;
   ``"raise"``: all, raising :class:`NonFiniteError` naming the parameter; ``"propagate"``: none);
3. **prepare** every group's update with its backend (``optim/backends``: ``reference``, ``torch``, ``triton``,
   chosen per group from ``backend=`` and the device), over megabatches of same-shape matrices — locally, or
   over a process group by the executor (``optim/executor.py``: replicated DDP parameters split by owner,
   FSDP2 shards gathered to theirs) — writing nothing;
4. **decide** once for the whole step: kept iff every update is finite (``"skip"``; with many ranks one MAX
   all-reduce makes every rank decide alike);
5. **commit** every pending update (parameters, momentum, second moments), or, for a skipped step, nothing —
   ``nonfinite_skips`` counts it and rank 0 warns.

Where the skip flag is read on the host anyway — the CPU's choices (``Backend.host_ways``), where a read is
free, and rank 0 when the skip warning is on — it is read before the commit: a kept step commits without
selects, a skipped one writes nothing. Elsewhere the commit selects on the device flag: no host sync,
capturable. Hybrid's AdamW half is taken by the commit too, with torch's fused AdamW kernel (``optim/adamw.py``).

Distributed (``process_group``): every step issues the same collectives in the same order on every rank. First
one fixed-size all-reduce checks that all ranks hold the same parameters and have gradients for the same ones
(a mismatch raises ``RuntimeError`` on every rank instead of hanging), then the executor's exchanges, then the
skip flag's all-reduce. The process group is kept on the optimizer, not in the param groups: it is not part of
``state_dict()``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..distributed import (
    DEFAULT_PROCESS_GROUP,
    GroupRef,
    agree_ok,
    check_sharded,
    is_dtensor,
    resolve_process_group,
    zeros_row_state,
)
from ..polar import NonFiniteError
from ..polar.workspace import Workspace
from .adamw import validate_adamw_group
from .backends import torch as torch_backend
from .backends.triton import PointerTables
from .checkpoint import (
    converted_groups,
    from_torch_muon,
    merge_loaded_options,
    normalize_loaded_state,
    refuse_foreign_groups,
    saved_state_by_param,
)
from .executor import DistributedExecutor, LocalExecutor, local_shards
from .options import NONFINITE_MODES, MatrixOptions, NonFiniteMode, OptionsCache, matrix_layout

#: Source trees whose frames a warning skips to reach the user's line: torch's step wrappers (``no_grad``, the
#: optimizer's hooks, an lr scheduler's counter) and ours.
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised in ``step`` so that it names the first frame outside torch and
    orthoptim: the user's ``opt.step()`` line, however many wrappers torch put around the call."""
    frame, level = sys._getframe(1), 1  # level 1: the function calling warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _each_finite(tensors: list[Tensor], host_ways: bool) -> Tensor:
    """Per tensor (plain tensors or local shards): True iff every entry is finite, as a bool vector on the device.

    Max-abs per tensor: NaN and ±Inf survive it (``max_propagate_nan`` in torch's CUDA norm and block reductions),
    large finite values cannot overflow it, and ``< inf`` is false for both Inf and NaN. Without ``host_ways``
    (the CPU's choices) one ``_foreach_norm(·, inf)`` (a few launches for all tensors; one ``amin`` per tensor
    would be 48 launches for GPT-2 small); on the CPU, where torch computes that norm tensor by tensor and ~10×
    slower (121 vs 13 ms for GPT-2-small's 48 gradients, measured 2026-11-23), a foreach max and a min per tensor.
    Empty tensors have no max: they count as finite.
    """
    if any(t.numel() == 0 for t in tensors):
        return torch.stack([torch.isfinite(t).all() for t in tensors])
    if not host_ways:
        return torch.stack(torch._foreach_norm(tensors, math.inf)) < math.inf
    hi = torch.stack(torch._foreach_max(tensors))
    lo = torch.stack([t.amin() for t in tensors])  # torch has no foreach min; one small reduction per tensor
    return (hi < math.inf) & (lo > -math.inf)


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Shell shared by Muon, NorMuon, PolarGrad and Hybrid: gathers gradients, runs the functional update.

    Param groups with ``algorithm="adamw"`` (only ``Hybrid`` makes them) run AdamW; all others are orthogonalized.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        nonfinite: NonFiniteMode,
        warn: bool,
        process_group: Any = DEFAULT_PROCESS_GROUP,
    ) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_MODES}")
        self.nonfinite: NonFiniteMode = nonfinite
        self.warn_on_skip = bool(warn)
        # On the object, not in the param groups: a process group is not serializable (not in state_dict()).
        self._start_runtime(resolve_process_group(process_group))
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)

    def _start_runtime(self, group: GroupRef | None) -> None:
        """What the step keeps beyond torch's optimizer state — the process group, plans, buffers, address tables
        — set up by ``__init__`` and again by ``__setstate__`` (a deep copy or an unpickled optimizer)."""
        # Not named ``_group``: torch 2.13's Dynamo intercepts any optimizer attribute whose name is a substring
        # of "_init_group" (``name in ("_init_group")`` in torch/_dynamo/variables/optimizer.py tests a string,
        # not a tuple), so under torch.compile ``self._group is None`` was False for a local optimizer.
        self._pg_ref: GroupRef | None = group
        self._rank = 0 if group is None else group.rank
        self._world = 1 if group is None else group.size
        # The distributed step also runs for DTensor parameters on a one-rank mesh (without collectives).
        self._distributed = group is not None
        # Phases 1–3 over this process's parameters, or over the process group (``optim/executor.py``).
        self._local = LocalExecutor()
        self._executor = DistributedExecutor(group)
        # Each orthogonalized group's typed options, validated when built (``options.OptionsCache``).
        self._options = OptionsCache()
        # The CPU's update buffers, kept between steps (``backends.torch.prepare``); not optimizer state.
        self._held = Workspace()
        # Address tables of the fused elementwise kernels (``backends/triton.py``), kept between steps; not state.
        self._tables = PointerTables()

    #: Attributes that ``copy.deepcopy`` and pickling keep besides torch's (defaults, state, param_groups): the
    #: options ``__init__`` takes outside the param groups. The process group survives a deep copy as the same
    #: group and refuses pickling (``distributed.GroupRef``); plans, buffers and tables are rebuilt.
    _KEPT_ATTRIBUTES: tuple[str, ...] = ("nonfinite", "warn_on_skip", "_pg_ref")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._KEPT_ATTRIBUTES})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with state and param_groups only
        if "_local" not in self.__dict__:  # a deep copy or an unpickled optimizer: rebuild what is not state
            self._start_runtime(self.__dict__.get("_pg_ref"))
            for group in self.param_groups:
                if any(is_dtensor(p) for p in group["params"]):
                    self._distributed = True

    @property
    def process_group(self) -> Any:
        """The process group work is split over and skips are agreed on (``None``: local)."""
        if self._pg_ref is None:
            return None
        return torch.distributed.group.WORLD if self._pg_ref.group is None else self._pg_ref.group

    def _validate_group(self, group: dict[str, Any]) -> None:
        if group.get("algorithm", "orthogonalized") == "adamw":
            validate_adamw_group(group)
        else:
            opts = self._options.build(group)  # the backend too: "triton" without triton is refused here
            for p in group["params"]:
                if is_dtensor(p):
                    if opts.backend == "reference":
                        raise ValueError(
                            'backend="reference" computes whole parameters on one process; it does not take '
                            'DTensor (FSDP2) parameters: use backend="torch"'
                        )
                    check_sharded(p, None if self._pg_ref is None else self._pg_ref.ranks, self._rank)
        if any(is_dtensor(p) for p in group["params"]):
            self._distributed = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_local"):  # called by Optimizer.__init__ before validation runs there
            try:
                self._validate_group(self.param_groups[-1])
            except Exception:
                self.param_groups.pop()  # a rejected group leaves the optimizer as it was
                raise

    def load_state_dict(self, state_dict: dict[str, Any], *, convert: bool = False) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but all or nothing, and checked whole.

        The loaded options are validated as the constructor validates them (options newer than the checkpoint
        take this optimizer's values), and every parameter's state must have the keys, shapes, dtypes and finite
        values its algorithm needs (``optim/checkpoint.py``): a ``step`` saved as a number becomes a counter, as
        torch's optimizers convert it; state for no parameter, a missing momentum, NaN/Inf or a negative second
        moment is refused, naming the parameter. On any failure the optimizer's state and param groups are exactly
        as before. float32 statistics stay float32 for low-precision parameters (torch casts every state tensor
        but ``step`` to the parameter's dtype).

        A checkpoint of another orthoptim algorithm (Muon, NorMuon, PolarGrad: ``row_norm``/``scale_mode``) is
        refused by name; ``convert=True`` loads it anyway, carrying the momentum, steps and skip counts over and
        keeping this optimizer's algorithm options (``checkpoint.ALGORITHM_OPTIONS``); NorMuon's second moments
        are dropped, or start at zero as at a first step. AdamW and orthogonalized groups never convert. A
        torch.optim.Muon checkpoint loads with ``convert=True`` too (``checkpoint.from_torch_muon``): its
        momentum buffers, lr, weight decay, momentum and nesterov carry over, this optimizer's schedule stays.
        """
        # torch's order, with the checks where they belong: the pre-hooks see (and may rewrite) the checkpoint
        # before anything checks it, and the post-hooks run only after a load that stands — what they write into
        # the state is theirs, not the checkpoint's. torch's own load runs with the hooks set aside meanwhile.
        state_dict = state_dict.copy()  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if convert:  # a torch.optim.Muon checkpoint, in orthoptim's form (others unchanged)
            state_dict = from_torch_muon(state_dict, self.param_groups)
        saved_groups = state_dict.get("param_groups", [])
        refuse_foreign_groups(saved_groups, self.param_groups)
        converted: list[bool] = []  # torch's own check below names a mismatch in the number of groups
        if len(saved_groups) == len(self.param_groups):
            converted = converted_groups(saved_groups, self.param_groups, convert)
        before: dict[str, Any] = {"state": self.state, "param_groups": self.param_groups}
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        try:
            merge_loaded_options(self.param_groups, before["param_groups"], converted, self._validate_group)
            saved_state = saved_state_by_param(state_dict, saved_groups, self.param_groups)
            normalize_loaded_state(self.param_groups, self.state, saved_state, converted, self._agree)
        except Exception:
            self.__setstate__(before)  # a rejected checkpoint changes nothing
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank. Only sharded (DTensor) parameters need the all-reduce: every rank
        holds the same replicated state otherwise, so every rank decides alike without one."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self._pg_ref is None or not any(is_dtensor(p) for p in params):
            return ok
        device = params[0].to_local().device if is_dtensor(params[0]) else params[0].device
        return bool(agree_ok(torch.tensor(ok, device=device), self._pg_ref.group))

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped by the ``"skip"`` policy so far (reads a device counter: a host sync)."""
        for state in self.state.values():
            if "nonfinite_skips" in state:
                return int(state["nonfinite_skips"])
        return 0

    def _gather(
        self, group: dict[str, Any], opts: MatrixOptions | None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor]]]:
        """The group's parameters with gradients, their gradients, and their state by key (made at the first
        step: ``opts`` None for an AdamW group)."""
        params, grads = [], []
        lists: dict[str, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or (opts is not None and p.is_complex()):  # torch.optim.Muon's errors, its words
                what = "sparse gradients" if p.grad.is_sparse else f"complex parameters ({p.dtype})"
                name = type(self).__name__  # "PolarGrad: Muon does not ...", torch's words for its whole family
                who = f"{name}'s AdamW half" if opts is None else name if name.endswith("Muon") else f"{name}: Muon"
                raise RuntimeError(f"{who} does not support {what}: parameter of shape {tuple(p.shape)}")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if not state:
                self._new_state(p, opts)
            for key in ("step", "nonfinite_skips", "exp_avg", "exp_avg_sq", "momentum_buffer", "second_moment"):
                if key in state:
                    lists.setdefault(key, []).append(state[key])
        return params, grads, lists

    def _new_state(self, p: Tensor, opts: MatrixOptions | None) -> None:
        """``p``'s state as a first step finds it: zero moments and counters (``opts`` None: AdamW's)."""
        state = self.state[p]
        # AdamW keeps a float32 step (as torch.optim.AdamW does) for its bias correction.
        state["step"] = torch.zeros((), dtype=torch.float32 if opts is None else torch.int64, device=p.device)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if opts is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if opts.row_norm:
            count, m, _ = matrix_layout(tuple(p.shape), opts.shape_policy, opts.weight_layout, opts.split)
            if is_dtensor(p):  # sharded like p's rows: (d0, count·m/d0), see distributed.fsdp
                state["second_moment"] = zeros_row_state(p, count * m)
            else:
                state["second_moment"] = torch.zeros(count, m, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state now — zeros, exactly what the first step would create — instead of at
        the first step that parameter has a gradient. Then ``state_dict()`` (and ``torch.distributed.checkpoint``,
        which loads into an existing state) covers every parameter before any step, and parameters that never get
        a gradient (frozen for a while, unused experts) too; steps are unchanged. Parameters that already have
        state keep it."""
        for group in self.param_groups:
            opts = None if group.get("algorithm") == "adamw" else self._options(group)
            for p in group["params"]:
                if not self.state[p]:
                    self._new_state(p, opts)

    def _layouts(self, group: dict[str, Any], opts: MatrixOptions, params: list[Tensor]) -> list[tuple[int, int, int]]:
        """Each parameter as (matrices, m, n) under the group's ``shape_policy`` (which may have been changed since
        the last plan: plans are keyed by it); NorMuon's second moments, made for the layout of the first step,
        must still fit."""
        policy = opts.shape_policy
        layouts = [matrix_layout(tuple(p.shape), policy, opts.weight_layout, opts.split) for p in params]
        for p, (count, m, _) in zip(params, layouts, strict=True):
            second = self.state[p].get("second_moment") if opts.row_norm else None
            if second is not None and second.numel() != count * m:
                raise ValueError(
                    f"shape_policy={policy!r} makes the parameter of shape {tuple(p.shape)} {count} matrices of {m} "
                    f"rows, but its NorMuon second moment holds {second.numel()} rows (made under the policy of "
                    "its first step): set shape_policy before the first step, or delete that parameter's state"
                )
        return layouts

    @property
    def _reads_skip_flag(self) -> bool:
        """Whether this rank reads the step's skip flag on the host (the skip warning, rank 0 only)."""
        return self.warn_on_skip and self._rank == 0

    def _nonfinite_cause(self, params: list[Tensor], grads_finite: Tensor | None) -> str:
        """What made the step non-finite, for the warning and the error (reads the local flags: a host sync)."""
        bad = (~grads_finite).nonzero() if grads_finite is not None else torch.zeros(0)
        if bad.numel():
            return f"a non-finite gradient (parameter of shape {tuple(params[int(bad[0])].shape)})"
        if self._pg_ref is not None:
            return "a non-finite orthogonalized update, or a non-finite gradient on another rank"
        return "a non-finite orthogonalized update"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step over every group (see the module docstring for the order of operations)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        options = [None if group.get("algorithm") == "adamw" else self._options(group) for group in self.param_groups]
        gathered = [
            (group, opts, *self._gather(group, opts)) for group, opts in zip(self.param_groups, options, strict=True)
        ]
        all_params = [p for _, _, params, _, _ in gathered for p in params]
        all_grads = [g for _, _, _, grads, _ in gathered for g in grads]
        local = self._pg_ref is None
        if not local:
            # Before any other collective, and before a rank may return early.
            self._executor.check_presence(self.param_groups)
        if not all_grads:
            return loss
        device = all_grads[0].device
        adamw = [opts is None for _, opts, params, _, _ in gathered for _ in params]
        # The CPU's choices (a free host read of the flag, per-tensor finite checks) where every group takes them.
        host_ways = all(
            (opts.backends.get(grads[0].device.type) or opts.backend_for(grads[0].device)).host_ways
            if opts is not None
            else device.type == "cpu"
            for _, opts, _, grads, _ in gathered
            if grads
        )
        if self._distributed:  # the finite check reads this rank's shards (empty ones have no max-abs)
            kept = [t for t in zip(all_params, local_shards(all_grads), adamw, strict=True) if t[1].numel()]
            all_params, all_grads, adamw = [t[0] for t in kept], [t[1] for t in kept], [t[2] for t in kept]
        policy = self.nonfinite
        grads_finite: Tensor | None = None  # per gradient, "raise" only
        ok: Tensor | None = None
        if policy == "raise":
            grads_finite = (
                _each_finite(all_grads, host_ways) if all_grads else torch.ones(0, dtype=torch.bool, device=device)
            )
            if local and not bool(grads_finite.all()):
                bad = all_params[int((~grads_finite).nonzero()[0])]
                raise NonFiniteError(f"non-finite gradient for the parameter of shape {tuple(bad.shape)}")
            ok = grads_finite.all()
        elif policy == "skip":
            # One process: only AdamW's gradients are checked before (its fused kernel takes the flag when it runs).
            # An orthogonalized matrix's NaN/Inf gradient needs no pass of its own there: it reaches that matrix's
            # update — the momentum, the normalization (Inf·0 = NaN) and every product propagate it — and the
            # updates are checked below (tested for every form, normalization and bad value on both step paths).
            # Distributed, every gradient: a rank updates the momentum of matrices another rank orthogonalizes.
            checked = all_grads if self._distributed else [g for g, a in zip(all_grads, adamw, strict=True) if a]
            ok = _each_finite(checked, host_ways).all() if checked else torch.ones((), dtype=torch.bool, device=device)
        # Under "skip" the flag is read on the host before the commit where that read is free (the CPU) or done
        # anyway (the skip warning's, rank 0): a kept step then commits without selects (on a GPU ~16 fewer bytes
        # per matrix entry, and the commit's kernels overlap what follows), a skipped one writes nothing. Elsewhere
        # the commit selects on the device flag (no host sync, capturable). Same state either way (tested).
        reads_flag = policy == "skip" and (host_ways or self._reads_skip_flag)
        selects = policy == "skip" and not reads_flag
        need_flags = policy != "propagate"
        executor = self._executor if self._distributed else self._local
        pending = executor.prepare(gathered, self._layouts, need_flags, selects, self._tables, self._held)
        out_sums = [p.out_sum for p in pending if getattr(p, "out_sum", None) is not None]
        if out_sums:
            out_ok = (torch.stack(out_sums).abs() < math.inf).all()
            if policy == "raise" and local and not bool(out_ok):
                raise NonFiniteError("orthogonalization produced a non-finite update; no state was changed")
            ok = out_ok if ok is None else ok & out_ok
        if not local and ok is not None:
            # One MAX all-reduce over the whole group, every step, whatever the data: all ranks skip together.
            assert self._pg_ref is not None
            ok = agree_ok(ok, self._pg_ref.group)
            if policy == "raise" and not bool(ok):
                raise NonFiniteError(f"{self._nonfinite_cause(all_params, grads_finite)}; no state was changed")
        commit_ok = ok if policy == "skip" else None
        keep = True
        if reads_flag:
            assert commit_ok is not None
            keep, commit_ok = bool(commit_ok), None
        # The commit's per-parameter temporaries (roles "momentum", "update"), kept too; a compiled step keeps none
        # (inductor refuses persistent views of one buffer as graph inputs; it plans its own memory anyway).
        scratch = Workspace() if torch.compiler.is_compiling() else self._held
        flag, steps = torch_backend.StepFlag(commit_ok), list[Tensor]()
        for p in pending if keep else ():
            p.commit(flag, scratch)  # a backend's Pending, or Hybrid's AdamW half (optim/adamw.py)
            steps += getattr(p, "step_counters", None) or []
        if steps:  # int64 counters; one foreach for all megabatches, +0 on a skipped step
            torch._foreach_add_(steps, 1 if commit_ok is None else commit_ok.to(torch.int64))
        if policy == "skip":
            assert ok is not None
            skips = [s for *_, lists in gathered for s in lists.get("nonfinite_skips", [])]
            torch._foreach_add_(skips, (~ok).to(torch.float32))
            # The one read of the flag, once per step; with many ranks only rank 0 reads and warns.
            if self._reads_skip_flag and not (keep if reads_flag else bool(ok)):
                what = self._nonfinite_cause(all_params, _each_finite(all_grads, host_ways) if all_grads else None)
                warnings.warn(
                    f"orthoptim: step skipped for every parameter because of {what}; state is unchanged. "
                    "Pass warn_nonfinite=False to silence this (and drop its host sync).",
                    RuntimeWarning,
                    stacklevel=_user_stacklevel(),
                )
        return loss
