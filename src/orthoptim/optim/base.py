"""The shared step of every orthogonalized optimizer: one functional update, one thin ``Optimizer`` shell.

Per parameter group (all options live in the group, so ``state_dict()`` carries them):

1. momentum ``B ← B + (1−μ)(G − B)`` (``lerp``, as torch.optim.Muon), Nesterov input ``M = G + μ(B − G)``;
2. ``O = orthogonalize(M)`` — one batched call per megabatch of same-shape matrices;
3. optional per-row second-moment normalization (NorMuon) and the scale mode (``shapes.lr_scale``; ``"nuclear"``
   multiplies each matrix by ``⟨O, M⟩ ≈ ‖M‖_*``);
4. decoupled weight decay ``θ ← (1 − lr·wd)θ`` with the unadjusted lr, then ``θ ← θ − lr·scale·O``.

Non-finite policy (optimizer-wide): ``"skip"`` checks AdamW's gradients (every gradient when distributed: a rank
updates the momentum of matrices others orthogonalize) before any state changes and every orthogonalized matrix
after (in one process a NaN/Inf gradient of a matrix reaches its update, so that check covers it), and
commits the whole step — parameters, momentum, second moments, step counters — only if all are finite. The
decision is a device-side flag. Where it is read on the host anyway — on the CPU (``CPU_PATH_DEVICES``), where a
read is free, and on rank 0 when the skip warning is on (its one read per step) — it is read before the commit:
a kept step commits without selects, a skipped one writes nothing. Elsewhere (``warn_nonfinite=False``, other
ranks) the commit selects on the flag: no host sync, capturable. ``"raise"`` checks every gradient first and
raises :class:`NonFiniteError` naming the parameter (host syncs). ``"propagate"`` checks nothing. Every policy
computes all updates before writing any state (two phases), so the updates (in the compute dtype) are held until
the commit. The new momentum is held too where the commit selects (stacked); elsewhere it is recomputed in place
at the commit, so nothing but the updates outlives phase 1. Hybrid's AdamW half is taken entirely by the commit,
in place, with torch's fused AdamW kernel, which reads the flag on the device (``optim/adamw.py``).

On CUDA with triton installed (``ORTHOPTIM_TRITON=0`` turns it off) the elementwise work around the
orthogonalization is two Triton launches per megabatch (``optim/fused.py``): the momentum input from B and G in
one pass, and the commit — momentum, weight decay, update — in one pass masked by the device flag (so it never
selects and holds nothing); the same bits as the torch ops it replaces.

Distributed (``process_group``; ``orthoptim.distributed`` moves the tensors): plain parameters are taken to be
replicated (DDP): every rank computes the momentum of every matrix, but orthogonalizes only the matrices it owns
(owners balance FLOPs over all megabatches of all groups; the plan is cached) and the results are all-gathered.
DTensor parameters sharded ``Shard(0)`` (FSDP2) send their rows to the owner, which computes the whole update
(NorMuon's row statistics and Frobenius rescale, PolarGrad's nuclear norm: on whole matrices, exact) and sends
each rank its rows back; their optimizer state stays sharded (DTensors). Every step issues the same collectives
in the same order on every rank: first one all-reduce checks that all ranks have gradients for the same
parameters (a mismatch raises ``RuntimeError`` instead of hanging; it costs one host read), and under
``"skip"``/``"raise"`` one MAX all-reduce of the finite flag makes every rank take the same decision. The
skip warning is printed by rank 0 only. The process group is kept on the optimizer, not in the param groups:
it is not part of ``state_dict()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from ..distributed import (
    DEFAULT_PROCESS_GROUP,
    GroupRef,
    agree_ok,
    assign_owners,
    check_sharded,
    gather_to_owners,
    is_dtensor,
    matrix_flops,
    orthogonalize_split,
    presence_mismatch,
    rank_counts,
    resolve_process_group,
    scatter_from_owners,
    zeros_row_state,
)
from ..polar import NonFiniteError, as_schedule, devices, orthogonalize
from ..polar.normalize import NORMALIZATIONS, scales_input_in_place
from ..polar.orthogonalize import ITERATIONS, resolve_compute_dtype
from ..polar.schedules import check_precision
from ..polar.workspace import Workspace, scratch, scratch_like
from . import fused
from .adamw import adamw_prepare
from .megabatch import CPU_MEGABATCH_BYTES, Megabatch, plan_megabatches
from .shapes import SCALE_MODES, SHAPE_POLICIES, lr_scale, matrix_layout

NonFiniteMode: TypeAlias = Literal["skip", "raise", "propagate"]
#: Devices on which the step takes the CPU's ways, both measured faster there (benchmarks/RESULTS.md): the momentum
#: input is written per parameter and the new momentum recomputed at the commit (``_momentum_input``: nothing held
#: across the step, no page faults), and ``"skip"`` reads its flag on the host — free there — and commits without
#: selects, or not at all. Elsewhere (CUDA) the momentum input is built by a few foreach/batched kernels instead
#: of two launches per parameter (``_momentum_stacks``), and the skip is a device-side select (no host sync,
#: capturable in a CUDA graph) unless the skip warning reads the flag anyway.
CPU_PATH_DEVICES: tuple[str, ...] = ("cpu",)
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
    # The schedule's safety in the compute dtype of each device, checked here so that a compiled step (which
    # cannot run this host-side check, see polar/orthogonalize.py) never runs an unvalidated configuration.
    for device in {p.device for p in group["params"]}:
        dtype = resolve_compute_dtype(group["compute_dtype"], device)
        check_precision(sched, group["ns_steps"], str(dtype).replace("torch.", ""))


@dataclass
class _Pending:
    """A megabatch's update, computed in phase 1, and what its commit needs (the step-wide finite flag aside).

    The new momentum is not held unless the commit selects on a device-side flag: the commit recomputes it in
    place from the gradients, with the very operation that produced phase 1's copy inside ``M`` (``lerp``), so
    both have the same bits. For a selecting commit ``old_bufs``/``new_bufs`` hold the stacked momentum
    (``_momentum_stacks``).
    """

    params: list[Tensor]
    bufs: list[Tensor]
    grads: list[Tensor]
    momentum: float
    update: Tensor  # (matrices, m, n): O, or O·(−lr·‖M‖_*) in the nuclear mode
    alpha: float | Tensor  # the update is added with this factor (−lr·scale; 1 in the nuclear mode)
    counts: tuple[int, ...]
    decay: float | Tensor  # 1 − lr·wd; the float 1.0 when there is no weight decay
    out_sum: Tensor | None  # 0-d: the sum of O, finite iff every orthogonalized matrix of the megabatch is
    second: list[Tensor] | None = None
    old_second: Tensor | None = None
    new_second: Tensor | None = None
    steps: list[Tensor] | None = None
    second_counts: tuple[int, ...] | None = None  # splits of the second moments, when not ``counts`` (sharded)
    old_bufs: Tensor | None = None  # stacked old and new momentum, held for a commit that selects
    new_bufs: Tensor | None = None  # on a device-side flag (``_momentum_stacks``)
    # Left for the commit to multiply the update by (``_finish``'s ``defer``): NorMuon's (matrices, m, 1) float32
    # row factor, or PolarGrad's (matrices, 1, 1) −lr·⟨O, M⟩ in the update's dtype.
    update_factor: Tensor | None = None
    table: fused.Table | None = None  # the megabatch's address table where the fused kernels apply (``fused.table``)


def _momentum_stacks(
    bufs: list[Tensor],
    grads: list[Tensor],
    mu: float,
    nesterov: bool,
    shape: tuple[int, ...],
    held: Workspace | None = None,
    selects: bool = True,
    table: fused.Table | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(M, old, new)`` for parameters stacked to ``shape`` (matrices, m, n) or flat (numel,): the optimizer's
    input ``M`` — a temporary the normalization may overwrite — and the stacked old and new momentum for a commit
    that ``selects`` between them on a device-side flag (else None: the commit recomputes the new momentum in
    place, ``_commit_momentum``). ``held``: ``M`` is written into its role ``"input"`` (one megabatch at a time
    uses it: the one-process CPU path).

    Four ways, one value: on ``CPU_PATH_DEVICES`` per parameter into the stack (``_momentum_input``); elsewhere,
    given the megabatch's address ``table`` (``fused.table``: the fused kernels apply), one Triton launch
    (``fused.momentum_input``: 12 bytes per float32 entry, and the fused commit needs nothing held, select or
    not); else, when the commit does not select, three foreach ops into the stack
    (``_momentum_foreach``); for a selecting commit, stacked copies of the gradients and buffers, the new momentum
    held."""
    if grads[0].device.type in CPU_PATH_DEVICES:
        M = scratch(held, "input", shape, bufs[0].dtype, bufs[0].device)
        return _momentum_input(bufs, grads, mu, nesterov, M), None, None
    if table is not None:
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        if fused.momentum_input(table, mu, nesterov, M):
            return M, None, None
    if not selects and (mu > 0.5 or not nesterov):
        M = torch.empty(shape, dtype=bufs[0].dtype, device=bufs[0].device)
        return _momentum_foreach(bufs, grads, mu, nesterov, M), None, None
    G = torch.cat([g.reshape(-1) for g in grads]).view(shape)
    old = torch.cat([b.reshape(-1) for b in bufs]).view(shape)
    new = torch.lerp(old, G, 1.0 - mu)
    M = G.lerp_(new, mu) if nesterov else new.clone()  # lerp(G, new, μ) in the stacked gradient (a temporary)
    return M, old, new


def _momentum_input(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """The optimizer's input ``M`` written per parameter into consecutive slices of ``out`` (stacked or flat):
    ``lerp(G, lerp(B, G, 1−μ), μ)`` with Nesterov, else ``lerp(B, G, 1−μ)``; the buffers are not changed.

    Why per parameter into one preallocated stack instead of stacking the gradients and buffers first: no
    stacked copies of either, and nothing but ``M`` allocated. On the CPU each large allocation held across
    the step is returned to the OS when freed and page-faulted back in on the next step (glibc trims the heap
    top): with the old and new momentum stacked and held until the commit, that cost ~0.25 s of a 2.3 s
    GPT-2-small step (measured 2026-11-23, 2-core CPU, with and without ``GLIBC_TUNABLES`` disabling trimming).
    """
    flat = out.view(-1)
    start = 0
    for b, g in zip(bufs, grads, strict=True):
        dst = flat[start : start + b.numel()].view(b.shape)
        torch.lerp(b, g, 1.0 - mu, out=dst)
        if nesterov:
            torch.lerp(g, dst, mu, out=dst)
        start += b.numel()
    return out


def _momentum_foreach(bufs: list[Tensor], grads: list[Tensor], mu: float, nesterov: bool, out: Tensor) -> Tensor:
    """``_momentum_input``'s values with three foreach ops over views of ``out`` (copy the buffers in, then lerp
    in place) instead of two ops per parameter: no per-parameter launches, and no stacked copies of the gradients
    and buffers (32 bytes per float32 entry instead of 40, and 2× the momentum's size less memory held than the
    selecting path). The Nesterov input is ``lerp(new, G, w)`` with ``w = 1 − μ`` rounded as torch rounds it:
    for μ > 0.5 that is ``lerp(G, new, μ)`` bit for bit (torch's lerp takes ``new + w·(G − new)`` for w < 0.5 and
    ``new − (new − G)·(1 − μ)`` for μ ≥ 0.5, the same operations up to exact negations, with or without FMA);
    the caller takes the other paths for μ ≤ 0.5."""
    views = list(out.view(-1).split([b.numel() for b in bufs]))
    views = [v.view(b.shape) for v, b in zip(views, bufs, strict=True)]
    torch._foreach_copy_(views, bufs)
    torch._foreach_lerp_(views, grads, 1.0 - mu)
    if nesterov:
        # 1 − μ as torch computes it in the op's math dtype: μ rounded to float32 (float64 stays), then 1 − μ,
        # exact for μ ∈ [0.5, 2] (Sterbenz) and so the same in Python's double.
        w = 1.0 - (mu if out.dtype == torch.float64 else fused.float32(mu))
        torch._foreach_lerp_(views, grads, w)
    return out


def _commit_momentum(bufs: list[Tensor], grads: list[Tensor], mu: float, ok: Tensor | None, scratch: Workspace) -> None:
    """``B ← lerp(B, G, 1−μ)`` in place where ``ok`` (or always when None); the same bits ``_momentum_input``
    computed (same operation on the same tensors). A non-finite G under a false ``ok`` is selected away."""
    if ok is None:
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        return
    for b, g in zip(bufs, grads, strict=True):
        torch.where(ok, torch.lerp(b, g, 1.0 - mu, out=scratch.like("momentum", b)), b, out=b)


#: 16-bit parameter dtypes: on CUDA a 0-d float32 CUDA tensor operand is cast to theirs before the arithmetic.
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _widened(t: Tensor, scratch: Workspace) -> Tensor:
    """A float32 copy of ``t`` in ``scratch`` (role ``"widened"``), to compute in and copy back."""
    return scratch.like("widened", t, torch.float32).copy_(t)


def _decay_params(params: list[Tensor], decay: float | Tensor, flag: _StepFlag, scratch: Workspace) -> None:
    """``θ ← θ·(1 − lr·wd)`` (a factor of 1 where ``flag.ok`` is false) for the torch commit, in float32.

    ``_foreach_mul_`` by the 0-d float32 factor (``decay_factor``) does that on the CPU, which reads a 0-d CPU
    tensor as a float32 scalar. On CUDA, TensorIterator casts a 0-d CUDA tensor to a 16-bit parameter's dtype
    first (0.999 → 1.0 in bfloat16: no decay at all), so 16-bit parameters there take a host float where the
    factor is one and no flag selects (CUDA's foreach kernels use it in float32), else a float32 copy per
    parameter (three launches each: the fused commit, which reads the float32 factor, is the usual CUDA path)."""
    like = params[0]
    if like.is_cuda and like.dtype in _HALF_DTYPES:
        if flag.ok is None and not isinstance(decay, Tensor):
            torch._foreach_mul_(params, decay)
            return
        factor = flag.decay_factor(decay, like)
        for t in params:
            t.copy_(_widened(t, scratch).mul_(factor))
        return
    torch._foreach_mul_(params, flag.decay_factor(decay, like))


def _add_update(params: list[Tensor], parts: list[Tensor], alpha: float | Tensor, scratch: Workspace) -> None:
    """``θ ← θ + alpha·U`` for every parameter. A CPU update in another dtype (bfloat16 into float32) is converted
    into the scratch buffer first: torch's CPU kernels would convert it into a fresh tensor per parameter (the
    GPU ones cast on the fly). Same values either way: the conversion to the wider dtype is exact.

    A tensor ``alpha`` (a tensor learning rate) is read on the device: on the CPU it is read on the host (free
    there); elsewhere each parameter gets ``addcmul_(U, alpha)`` — one launch per parameter, which a captured
    CUDA graph makes free, and no host read (torch's foreach add takes its alpha only as a host number)."""
    if isinstance(alpha, Tensor):
        if not parts or parts[0].device.type in CPU_PATH_DEVICES:
            alpha = float(alpha)
        elif params[0].is_cuda and params[0].dtype in _HALF_DTYPES:  # α would be cast to 16 bits (_decay_params)
            for t, u in zip(params, parts, strict=True):
                t.copy_(_widened(t, scratch).addcmul_(u, alpha))
            return
        else:
            for t, u in zip(params, parts, strict=True):
                t.addcmul_(u, alpha)
            return
    if parts and parts[0].device.type == "cpu" and parts[0].dtype != params[0].dtype:
        for t, u in zip(params, parts, strict=True):
            t.add_(scratch.like("update", u, t.dtype).copy_(u), alpha=alpha)
        return
    torch._foreach_add_(params, parts, alpha=alpha)


def _row_normalize(
    O: Tensor, v: Tensor, beta2: float, eps: float, work: Workspace | None, defer: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """NorMuon (arXiv 2510.05491; microsoft/dion normuon.py; modded-nanogpt): per-row second moment of the
    orthogonalized update, divide each row by its root, restore the Frobenius norm of each matrix.

    Returns ``(update, new second moment, row factor)``. Written back into ``O`` (the step's own output); the float32
    temporaries live in ``work`` if given. The same operations, in the same order, as computing ``normed = Of / d``
    and ``(normed · ratio).to(O.dtype)`` afresh. The row factor is None, except where ``defer`` asks for it and the
    row-sum way below is taken: then ``O`` is returned unscaled with the (matrices, m, 1) float32 factor, and the
    commit applies it (``O.mul_(factor)``, the same bits; the fused commit in its one pass).

    Off ``devices.FLOAT32_COPY_DEVICES`` (GPUs), for updates narrower than float64 (``devices.float64_factors``),
    without the float32 copy: one pass for the rows' sums of squares
    (accumulated in float32), from which the second moment, both Frobenius norms (‖O‖² = Σᵢ rowᵢ, ‖O/d‖² =
    Σᵢ rowᵢ/dᵢ²) and a per-row factor follow on m numbers per matrix, and one pass applying it in place —
    6 bytes per bfloat16 entry instead of ~48 (``benchmarks/step_launches.py``). Equal to the above up to the
    rounding of the row sums."""
    if devices.float64_factors(O):
        rows = torch.linalg.vector_norm(O, dim=-1, dtype=torch.float32).square_()  # (B, m): Σⱼ Oᵢⱼ²
        v_new = torch.lerp(v, rows / O.shape[-1], 1.0 - beta2)
        d2 = v_new + eps
        before = rows.sum(dim=-1, keepdim=True).sqrt_()
        after = (rows / d2).sum(dim=-1, keepdim=True).sqrt_().clamp_min_(torch.finfo(torch.float32).tiny)
        factor = ((before / after) / d2.sqrt()).unsqueeze(-1)  # (B, m, 1): ratio / dᵢ
        if defer:
            return O, v_new, factor
        return O.mul_(factor), v_new, None  # float32 product, rounded once into O
    Of = scratch_like(work, "row_norm", O, torch.float32).copy_(O)
    v_new = torch.lerp(
        v, torch.square(Of, out=scratch_like(work, "row_square", O, torch.float32)).mean(dim=-1), 1.0 - beta2
    )
    before = torch.linalg.matrix_norm(Of)
    normed = Of.div_((v_new + eps).sqrt().unsqueeze(-1))
    ratio = before / torch.linalg.matrix_norm(normed).clamp_min(torch.finfo(torch.float32).tiny)
    return O.copy_(normed.mul_(ratio.view(-1, 1, 1))), v_new, None


def _each_finite(tensors: list[Tensor]) -> Tensor:
    """Per tensor (plain tensors or local shards): True iff every entry is finite, as a bool vector on the device.

    Max-abs per tensor: NaN and ±Inf survive it (``max_propagate_nan`` in torch's CUDA norm and block reductions),
    large finite values cannot overflow it, and ``< inf`` is false for both Inf and NaN. Outside
    ``CPU_PATH_DEVICES`` one ``_foreach_norm(·, inf)`` (a few launches for all tensors; one ``amin`` per tensor
    would be 48 launches for GPT-2 small); on the CPU, where torch computes that norm tensor by tensor and ~10×
    slower (121 vs 13 ms for GPT-2-small's 48 gradients, measured 2026-11-23), a foreach max and a min per tensor.
    Empty tensors have no max: they count as finite.
    """
    if any(t.numel() == 0 for t in tensors):
        return torch.stack([torch.isfinite(t).all() for t in tensors])
    if tensors[0].device.type not in CPU_PATH_DEVICES:
        return torch.stack(torch._foreach_norm(tensors, math.inf)) < math.inf
    hi = torch.stack(torch._foreach_max(tensors))
    lo = torch.stack([t.amin() for t in tensors])  # torch has no foreach min; one small reduction per tensor
    return (hi < math.inf) & (lo > -math.inf)


def _orthogonalizer(group: dict[str, Any], *, compute_dtype_out: bool = False) -> Callable[..., Tensor]:
    """The group's ``orthogonalize`` call on a stacked (B, m, n) batch (output finiteness is checked by the step).

    ``compute_dtype_out``: return O in the compute dtype (e.g. bfloat16) rather than the parameters' — the final
    foreach add takes mixed dtypes, so the conversion pass over every update is saved (one-process path).
    ``M`` is the step's own temporary: it is normalized in place (no float32 copy), except in the nuclear scale
    mode, which needs it afterwards for ``⟨O, M⟩`` — there only where the normalization reads ``M`` without
    writing it (``normalize.scales_input_in_place``), which saves its five-pass copy path.
    ``orth(M, out, workspace)``: O is written into ``out``, the temporaries live in ``workspace`` (see
    ``orthogonalize``).
    """
    nuclear = group["scale_mode"] == "nuclear"

    def orth(M: Tensor, out: Tensor | None = None, workspace: Workspace | None = None) -> Tensor:
        out_dtype = resolve_compute_dtype(group["compute_dtype"], M.device) if compute_dtype_out else None
        scratch = not nuclear or not scales_input_in_place(M)
        return orthogonalize(
            M,
            schedule=group["schedule"],
            steps=group["ns_steps"],
            normalization=group["normalization"],
            compute_dtype=group["compute_dtype"],
            nonfinite="propagate",
            iteration=group.get("iteration", "auto"),  # groups saved before the option existed run "auto"
            out_dtype=out_dtype,
            overwrite_input=scratch,
            out=out,
            workspace=workspace,
        )

    return orth


def _alpha(group: dict[str, Any], m: int, n: int) -> float | Tensor:
    """Factor of the final add: −lr·scale (a 0-d tensor for a tensor lr), or 1 in the nuclear mode (where the
    update carries it)."""
    return 1.0 if group["scale_mode"] == "nuclear" else -group["lr"] * lr_scale(group["scale_mode"], m, n)


def _decay(group: dict[str, Any]) -> float | Tensor:
    """``1 − lr·wd`` (a 0-d tensor for a tensor lr), or exactly 1.0 without weight decay (nothing to apply)."""
    return 1.0 if group["weight_decay"] == 0 else 1.0 - group["lr"] * group["weight_decay"]


def _finish(
    O: Tensor,
    M: Tensor,
    old_second: Tensor | None,
    group: dict[str, Any],
    need_flags: bool,
    work: Workspace | None = None,
    defer: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """From a megabatch's orthogonalized O (B, m, n) and its input M: ``(update, new second moment, check,
    factor)`` — the check (if ``need_flags``) is finite iff every entry of the update is; the step checks all
    megabatches' at once. ``O`` is the step's own tensor and becomes the update in place; float32 temporaries
    live in ``work`` if given. ``defer``: the last multiply of the update — NorMuon's row factor (where
    ``_row_normalize`` defers it: off the CPU; not before the nuclear scale, which needs the scaled update) or
    the nuclear scale's −lr·⟨O, M⟩ — is left for the commit: returned as ``factor`` (else None), ``O`` unscaled.
    The commit multiplies by it exactly as here (``_commit``), or the fused commit does in its pass."""
    new_second, factor = None, None
    if group["row_norm"]:
        assert old_second is not None
        defer = defer and group["scale_mode"] != "nuclear"
        O, new_second, factor = _row_normalize(O, old_second, group["beta2"], group["row_eps"], work, defer)
    if group["scale_mode"] == "nuclear":
        # ⟨O, M⟩ = Σ gᵢσᵢ ≈ ‖M‖_* when the gains gᵢ ≈ 1 (PolarGrad runs enough steps for that).
        if devices.float32_copies(O.device):  # CPU: a kept float32 copy (mixed-dtype products are slow loops there)
            Of = scratch_like(work, "nuclear", O, torch.float32).copy_(O)
            nuc = Of.mul_(M.to(torch.float32)).sum(dim=(-2, -1), keepdim=True)
        else:  # the same float32 products, O widened on the fly: 14 bytes per entry instead of 22
            nuc = torch.mul(O, M.to(torch.float32)).sum(dim=(-2, -1), keepdim=True)
        scale = (nuc * -group["lr"]).to(O.dtype)
        update, factor = (O, scale) if defer else (O.mul_(scale), None)
    else:
        update = O  # −lr·scale is fused into the final foreach add (``_alpha``)
    if not need_flags:
        return update, new_second, None, factor
    # |O| ≲ 1.3 entrywise (a Newton–Schulz output), so the sum cannot overflow: it is non-finite iff some entry
    # is. With a deferred factor f the update is O·f: with |O| ≤ 2 an entry can overflow only where |f| exceeds
    # half the largest float, so O's sum plus 2‖f‖₁ is finite iff every entry of O·f is (a factor beyond 2⁻¹ of
    # the range skips the step even if O·f would just fit: never met at real learning rates).
    if factor is None:
        return update, new_second, O.sum(), None
    size = torch.linalg.vector_norm(factor, ord=1, dtype=torch.float32)
    return update, new_second, torch.add(O.sum(), size, alpha=2.0), factor


#: ``start(k, M, orthogonalize)`` begins orthogonalizing megabatch k's ``M`` and returns a thunk yielding O.
StartFn: TypeAlias = Callable[[int, Tensor, Callable[[Tensor], Tensor]], Callable[[], Tensor]]


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
    start: StartFn | None = None,
    held: Workspace | None = None,
    role: str = "",
    selects: bool = True,
    tables: fused.PointerTables | None = None,
) -> list[_Pending]:
    """Phase 1 of the functional update: compute every megabatch's new state and update, commit nothing.

    ``need_flags`` asks for a finite flag per megabatch of the output. Non-finite gradients need no cleaning
    here: the commit selects (``torch.where``) rather than multiplies, so a discarded NaN never leaks.
    ``start`` (distributed): every megabatch's orthogonalization is started first — each rank computes its share
    while earlier results travel — and the updates are finished once all have started.
    ``held`` (the CPU, one process): the optimizer's buffers kept between steps; megabatch k's O is written into
    its role ``f"{role}{k}"`` (``_held_update``) instead of a fresh tensor. ``selects``: the commit will select
    on a device-side flag, so the new momentum is held (``_momentum_stacks``). ``tables``: the optimizer's address
    tables for the fused kernels (``optim/fused.py``; None: the torch ops).
    """
    mu = group["momentum"]
    orth = _orthogonalizer(group, compute_dtype_out=start is None)
    pending = []
    started = []
    for k, mb in enumerate(megabatches):
        m, n = mb.matrix_shape
        idx = mb.indices
        b_mb, g_mb = [bufs[i] for i in idx], [grads[i] for i in idx]
        table = None if tables is None else fused.table(tables, [params[i] for i in idx], b_mb, g_mb, mb.counts, m * n)
        M, old, new = _momentum_stacks(b_mb, g_mb, mu, group["nesterov"], (mb.matrices, m, n), held, selects, table)
        if start is None:
            out = None if held is None else _held_update(held, f"{role}{k}", M, group)
            O = orth(M, out, held)
            p = _megabatch_pending(mb, params, grads, bufs, second, steps, M, O, group, need_flags, held)
            p.old_bufs, p.new_bufs, p.table = old, new, table
            pending.append(p)
        else:
            started.append((mb, M, old, new, table, start(k, M, orth)))
    for mb, M, old, new, table, wait in started:
        p = _megabatch_pending(mb, params, grads, bufs, second, steps, M, wait(), group, need_flags)
        p.old_bufs, p.new_bufs, p.table = old, new, table
        pending.append(p)
    return pending


def _held_update(held: Workspace, role: str, M: Tensor, group: dict[str, Any]) -> Tensor:
    """A buffer for megabatch M's orthogonalized update, in the compute dtype, laid out wide (the iteration's
    orientation, so its last product writes straight into it), kept in ``held`` from step to step.

    Why (CPU): every update is held until the commit, and freeing them all at the end of a step let glibc return
    the memory to the OS, to be page-faulted back in on the next step — ~40k faults and 0.1–0.5 s of system time
    on a 2.5 s GPT-2-small step (measured 2026-11-23, 2-core CPU; benchmarks/RESULTS.md). The price is that
    memory held between steps: the size of the updates (half the momentum's in bfloat16).
    """
    dtype = resolve_compute_dtype(group["compute_dtype"], M.device)
    b, m, n = M.shape
    if m > n:
        return held.get(role, (b, n, m), dtype, M.device).mT
    return held.get(role, (b, m, n), dtype, M.device)


def _megabatch_pending(
    mb: Megabatch,
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    M: Tensor,
    O: Tensor,
    group: dict[str, Any],
    need_flags: bool,
    work: Workspace | None = None,
) -> _Pending:
    m, n = mb.matrix_shape
    idx = mb.indices
    decay = _decay(group)
    p = _Pending(
        [params[i] for i in idx],
        [bufs[i] for i in idx],
        [grads[i] for i in idx],
        group["momentum"],
        O,
        _alpha(group, m, n),
        mb.counts,
        decay,
        None,
    )
    if group["row_norm"]:
        assert second is not None
        p.second = [second[i] for i in idx]
        p.old_second = torch.cat([second[i].reshape(c, m) for i, c in zip(idx, mb.counts, strict=True)])
    p.update, p.new_second, p.out_sum, p.update_factor = _finish(O, M, p.old_second, group, need_flags, work, True)
    p.steps = [steps[i] for i in idx]
    return p


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """DTensors replaced by their local shards (views of the same storage under no_grad), others unchanged."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


def _split_starter(counts: list[tuple[int, ...]], rank: int, process_group: Any) -> StartFn:
    """Replicated megabatch k: this rank orthogonalizes its ``counts[k][rank]`` matrices, all ranks all-gather."""

    def start(k: int, M: Tensor, fn: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return orthogonalize_split(M, counts[k], rank, process_group, fn).wait

    return start


def sharded_prepare(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    megabatches: Sequence[Megabatch],
    owners: dict[int, int],
    rows: dict[int, list[int]],
    group: dict[str, Any],
    *,
    need_flags: bool,
    rank: int,
    process_group: Any,
    selects: bool = True,
) -> list[_Pending]:
    """Phase 1 for DTensor ``Shard(0)`` parameters (FSDP2); ``megabatches`` group them by full matrix shape.

    Every rank computes the momentum of its own rows (elementwise, as the replicated path); each parameter's
    rows of M (and of NorMuon's second moment) go to its owner (``owners``), which orthogonalizes whole
    matrices and computes the whole update — row statistics on whole rows, the Frobenius rescale and the nuclear
    norm over whole matrices, as on one device — and each rank gets its rows of the update back. The pending
    state is flat (1-D) over this rank's shards; ``rows[i][r]`` is how many stacked matrix rows rank r holds.
    ``selects``: as in ``orthogonalized_prepare``.
    """
    mu, decay = group["momentum"], _decay(group)
    row_norm = group["row_norm"]
    pieces: list[Tensor] = []
    item_owner: list[int] = []
    item_rows: list[list[int]] = []
    staged = []
    for mb in megabatches:
        m, n = mb.matrix_shape
        idx = mb.indices
        p_loc, b_loc, g_loc = (
            _local([params[i] for i in idx]),
            _local([bufs[i] for i in idx]),
            _local([grads[i] for i in idx]),
        )
        numels = tuple(t.numel() for t in p_loc)
        M, old, new = _momentum_stacks(b_loc, g_loc, mu, group["nesterov"], (sum(numels),), selects=selects)
        base = len(pieces)
        for i, part in zip(idx, M.split(numels), strict=True):
            pieces.append(part.view(-1, n))
            item_owner.append(owners[i])
            item_rows.append(rows[i])
        s_loc, old_s, s_numels = None, None, None
        if row_norm:
            assert second is not None
            s_loc = _local([second[i] for i in idx])
            s_numels = tuple(t.numel() for t in s_loc)
            old_s = torch.cat([s.reshape(-1) for s in s_loc])
            for i, part in zip(idx, old_s.split(s_numels), strict=True):
                pieces.append(part.view(-1, 1))
                item_owner.append(owners[i])
                item_rows.append(rows[i])
        staged.append((mb, base, p_loc, b_loc, g_loc, numels, M, old, new, s_loc, old_s, s_numels))
    full = gather_to_owners(pieces, item_owner, item_rows, rank, process_group)
    orth = _orthogonalizer(group)
    results: list[Tensor | None] = [None] * len(pieces)
    like: list[tuple[tuple[int, ...], torch.dtype]] = []
    flags: list[Tensor | None] = []
    for mb, base, _, _, _, _, M, *_ in staged:
        m, n = mb.matrix_shape
        k = len(mb.indices)
        like += [((n,), M.dtype)] * k + ([((1,), torch.float32)] * k if row_norm else [])
        mine = [j for j, i in enumerate(mb.indices) if owners[i] == rank]
        if not mine:
            flags.append(None)
            continue
        counts = [mb.counts[j] for j in mine]
        M_full = torch.cat([full[base + j].view(c, m, n) for j, c in zip(mine, counts, strict=True)])  # type: ignore[union-attr]
        v_full = None
        if row_norm:
            v_full = torch.cat([full[base + k + j].view(c, m) for j, c in zip(mine, counts, strict=True)])  # type: ignore[union-attr]
        update, new_v, out_sum, _ = _finish(orth(M_full), M_full, v_full, group, need_flags)  # not deferred
        flags.append(out_sum)
        for j, u in zip(mine, update.split(counts), strict=True):
            results[base + j] = u.reshape(-1, n)
        if new_v is not None:
            for j, v in zip(mine, new_v.split(counts), strict=True):
                results[base + k + j] = v.reshape(-1, 1)
    device = pieces[0].device if pieces else torch.device("cpu")
    back = scatter_from_owners(results, like, item_owner, item_rows, rank, device, process_group)
    pending = []
    for (mb, base, p_loc, b_loc, g_loc, numels, _, old, new, s_loc, old_s, s_numels), out_sum in zip(
        staged, flags, strict=True
    ):
        k = len(mb.indices)
        update = torch.cat([back[base + j].reshape(-1) for j in range(k)])
        alpha = _alpha(group, *mb.matrix_shape)
        p = _Pending(p_loc, b_loc, g_loc, mu, update, alpha, numels, decay, out_sum, old_bufs=old, new_bufs=new)
        if row_norm:
            p.second, p.old_second, p.second_counts = s_loc, old_s, s_numels
            p.new_second = torch.cat([back[base + k + j].reshape(-1) for j in range(k)])
        p.steps = [steps[i] for i in mb.indices]
        pending.append(p)
    return pending


def decay_factor(decay: float | Tensor, like: Tensor, ok: Tensor | None = None) -> Tensor:
    """The weight-decay factor for ``torch._foreach_mul_`` over parameters like ``like`` (1 where ``ok`` is false; on
    CUDA 16-bit parameters take it through ``_decay_params``):
    a 0-d tensor in the parameters' dtype, or float32 for 16-bit ones — what ``param.mul_(decay)`` computes in
    (torch.optim.Muon's decay). Why not the Python float: torch's CPU ``_foreach_mul_`` rounds a scalar to a
    bfloat16 tensor's dtype first (0.998 → 0.99609: 2.8× the decay), and ``torch.where`` on Python floats builds
    float32 (0.999 → 0.99900001 for float64 parameters). Measured, torch 2.13."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(decay, Tensor):  # a tensor lr's decay: computed on the device, from the live value
        factor = decay.reshape(()).to(dtype=dtype, device=like.device)
    else:
        factor = torch.full((), decay, dtype=dtype, device=like.device)
    return factor if ok is None else torch.where(ok, factor, 1.0)


class _StepFlag:
    """The step-wide flag ``ok`` (None: commit unconditionally) in the forms the commits use, each built once per
    step rather than once per megabatch: every tensor op outside the CPU is a kernel launch."""

    def __init__(self, ok: Tensor | None) -> None:
        self.ok = ok
        self.skipped = None if ok is None else ~ok
        self._decay: dict[tuple[float | int, torch.dtype, torch.device], Tensor] = {}

    def decay_factor(self, decay: float | Tensor, like: Tensor) -> Tensor:
        """``decay_factor(decay, like, ok)``, shared by the megabatches with the same decay and dtype (a tensor
        decay by identity: comparing tensors would read them on the host)."""
        key = (id(decay) if isinstance(decay, Tensor) else decay, like.dtype, like.device)
        if key not in self._decay:
            self._decay[key] = decay_factor(decay, like, self.ok)
        return self._decay[key]


def _commit(p: _Pending, flag: _StepFlag, scratch: Workspace) -> None:
    """Phase 2: write the megabatch's new state (or, where ``flag.ok`` is false, keep the old one bit for bit).
    The step counters are advanced by the step, all at once. Where the fused kernels apply (``p.table``) and the
    new momentum is not held, the momentum, weight decay and update (with a deferred factor: NorMuon's rows',
    PolarGrad's) go through one fused launch (``fused.commit``; the same bits)."""
    ok, update = flag.ok, p.update
    fused_done = False
    if p.table is not None and p.new_bufs is None:
        decay = None if not isinstance(p.decay, Tensor) and p.decay == 1.0 else flag.decay_factor(p.decay, p.params[0])
        fused_done = fused.commit(p.table, p.momentum, update, p.alpha, decay, ok, p.update_factor)
    if not fused_done and p.update_factor is not None:
        update = update.mul_(p.update_factor)  # what _finish would have done: the float32 product, rounded once
    if p.second is not None and p.new_second is not None and p.old_second is not None:
        new_second = p.new_second if ok is None else torch.where(ok, p.new_second, p.old_second)
        counts = p.counts if p.second_counts is None else p.second_counts
        torch._foreach_copy_(p.second, [s.view_as(t) for s, t in zip(new_second.split(counts), p.second, strict=True)])
    if fused_done:
        return
    if flag.skipped is not None:
        # In place into the step's own temporary: no fresh allocation (on the CPU: no pass of page faults).
        update = update.masked_fill_(flag.skipped, 0.0)
    if p.new_bufs is None:
        _commit_momentum(p.bufs, p.grads, p.momentum, ok, scratch)
    else:
        assert p.old_bufs is not None
        new = p.new_bufs if ok is None else torch.where(ok, p.new_bufs, p.old_bufs, out=p.new_bufs)
        torch._foreach_copy_(p.bufs, [b.view_as(t) for b, t in zip(new.split(p.counts), p.bufs, strict=True)])
    if isinstance(p.decay, Tensor) or p.decay != 1.0:
        _decay_params(p.params, p.decay, flag, scratch)
    parts = [u.view_as(t) for u, t in zip(update.split(p.counts), p.params, strict=True)]
    _add_update(p.params, parts, p.alpha, scratch)


@dataclass
class _GroupSplit:
    """One orthogonalized group's part of the distributed plan (indices are positions in the step's lists)."""

    plain: list[Megabatch] = field(default_factory=list)  # replicated parameters
    counts: list[tuple[int, ...]] = field(default_factory=list)  # per plain megabatch: matrices per rank
    sharded: list[Megabatch] = field(default_factory=list)  # DTensor parameters, by whole-matrix shape
    owners: dict[int, int] = field(default_factory=dict)  # sharded position → owner rank
    rows: dict[int, list[int]] = field(default_factory=dict)  # sharded position → stacked rows held per rank


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
        self._group: GroupRef | None = resolve_process_group(process_group)
        self._rank = 0 if self._group is None else self._group.rank
        self._world = 1 if self._group is None else self._group.size
        # The distributed step also runs for DTensor parameters on a one-rank mesh (without collectives).
        self._distributed = self._group is not None
        self._dist_plans: dict[tuple[int, ...], list[_GroupSplit | None]] = {}
        self._plans: dict[tuple[int, ...], list[Megabatch]] = {}
        # The CPU's phase-1 update buffers, kept between steps (``_held_update``); not optimizer state.
        self._held = Workspace()
        # Address tables of the fused elementwise kernels (``optim/fused.py``), kept between steps; not state.
        self._tables = fused.PointerTables()
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)

    @property
    def process_group(self) -> Any:
        """The process group work is split over and skips are agreed on (``None``: local)."""
        if self._group is None:
            return None
        return torch.distributed.group.WORLD if self._group.group is None else self._group.group

    def _validate_group(self, group: dict[str, Any]) -> None:
        if group.get("algorithm", "orthogonalized") == "adamw":
            from .adamw import validate_adamw_group

            validate_adamw_group(group)
        else:
            validate_orthogonalized_group(group)
            for p in group["params"]:
                if is_dtensor(p):
                    check_sharded(p, None if self._group is None else self._group.ranks, self._rank)
        if any(is_dtensor(p) for p in group["params"]):
            self._distributed = True

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
        # Keys are matched to parameters through the saved groups' "params" lists, as torch does: they are
        # indices for a plain state_dict() and fully qualified names from torch.distributed.checkpoint.
        saved = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = dict(zip(saved, (p for g in self.param_groups for p in g["params"]), strict=False))
        for k, extra in keep.items():
            for key, value in extra.items():
                self.state[params[k]][key] = value.to(device=params[k].device, dtype=torch.float32)

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
                        if is_dtensor(p):  # sharded like p's rows: (d0, count·m/d0), see distributed.fsdp
                            state["second_moment"] = zeros_row_state(p, count * m)
                        else:
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
            on_cpu = all(p.device.type == "cpu" for p in params)
            plan = plan_megabatches(
                layouts,
                [p.dtype for p in params],
                [p.device for p in params],
                max_bytes=CPU_MEGABATCH_BYTES if on_cpu else None,
            )
            self._plans[key] = plan
        return plan

    def _prepare_local(self, gathered: list[Any], need_flags: bool, selects: bool) -> list[Any]:
        """Phase 1 on one process: every group's update, nothing committed (``selects``: see
        ``orthogonalized_prepare``)."""
        pending: list[Any] = []
        for g, (group, params, grads, lists) in enumerate(gathered):
            if not params:
                continue
            on_cpu = grads[0].device.type in CPU_PATH_DEVICES
            if group.get("algorithm", "orthogonalized") == "adamw":
                pending.append(adamw_prepare(params, grads, lists, group))  # the commit takes the step
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
                        need_flags=need_flags,
                        held=self._held if on_cpu else None,
                        role=f"update{g}.",
                        selects=selects,
                        tables=None if on_cpu else self._tables,
                    )
                )
        return pending

    def _prepare_distributed(self, gathered: list[Any], need_flags: bool, selects: bool) -> list[Any]:
        """Phase 1 over the process group: replicated matrices split by owner, sharded ones gathered to theirs.

        The collectives depend only on the (cached) plan, which every rank builds from the same shapes, so they
        are issued in the same order everywhere whatever the data.
        """
        splits = self._dist_plan(gathered)
        local, rank = self._group is None, self._rank
        pg = None if self._group is None else self._group.group  # None: the default group (or no collective)
        pending: list[Any] = []
        for (group, params, grads, lists), split in zip(gathered, splits, strict=True):
            if not params:
                continue
            if split is None:  # AdamW: elementwise, so each rank updates its own shards (or replicas)
                local_lists = {k: _local(v) for k, v in lists.items()}
                pending.append(adamw_prepare(_local(params), _local(grads), local_lists, group))
                continue
            state = (lists["momentum_buffer"], lists.get("second_moment"), lists["step"])
            if split.plain:
                start = None if local else _split_starter(split.counts, rank, pg)
                pending.extend(
                    orthogonalized_prepare(
                        params,
                        grads,
                        *state,
                        split.plain,
                        group,
                        need_flags=need_flags,
                        start=start,
                        selects=selects,
                        tables=self._tables,
                    )
                )
            if split.sharded:
                pending.extend(
                    sharded_prepare(
                        params,
                        grads,
                        *state,
                        split.sharded,
                        split.owners,
                        split.rows,
                        group,
                        need_flags=need_flags,
                        rank=rank,
                        process_group=pg,
                        selects=selects,
                    )
                )
        return pending

    def _dist_plan(self, gathered: list[Any]) -> list[_GroupSplit | None]:
        """Megabatches and owners for this set of parameters with gradients (cached; identical on all ranks).

        Owners balance the orthogonalization FLOPs over all groups at once: every replicated matrix and every
        sharded parameter is one item, assigned largest first to the least-loaded rank.
        """
        key = tuple(x for group, params, _, _ in gathered for x in (id(group), len(params), *map(id, params)))
        cached = self._dist_plans.get(key)
        if cached is not None:
            return cached
        splits: list[_GroupSplit | None] = []
        costs: list[int] = []
        refs: list[tuple[_GroupSplit, int, int]] = []  # (split, plain megabatch k or -1, sharded position)
        for group, params, _, _ in gathered:
            if group.get("algorithm", "orthogonalized") == "adamw":
                splits.append(None)
                continue
            policy = group["shape_policy"]
            layouts = [matrix_layout(tuple(p.shape), policy) for p in params]
            split = _GroupSplit()
            for sharded in (False, True):
                pos = [i for i, p in enumerate(params) if is_dtensor(p) == sharded]
                sub = plan_megabatches(
                    [layouts[i] for i in pos], [params[i].dtype for i in pos], [params[i].device for i in pos]
                )
                mbs = [Megabatch(tuple(pos[j] for j in mb.indices), mb.matrix_shape, mb.counts) for mb in sub]
                if sharded:
                    split.sharded = mbs
                else:
                    split.plain = mbs
            for k, mb in enumerate(split.plain):
                costs += [matrix_flops(*mb.matrix_shape)] * mb.matrices
                refs += [(split, k, -1)] * mb.matrices
            for mb in split.sharded:
                for i, count in zip(mb.indices, mb.counts, strict=True):
                    p = params[i]
                    per_row = layouts[i][0] * layouts[i][1] // p.shape[0]  # stacked matrix rows per dim-0 index
                    sizes = check_sharded(p, None if self._group is None else self._group.ranks, self._rank)
                    split.rows[i] = [r * per_row for r in sizes]
                    costs.append(count * matrix_flops(*mb.matrix_shape))
                    refs.append((split, -1, i))
            splits.append(split)
        owners, _ = assign_owners(costs, self._world)
        plain_owners: dict[tuple[int, int], list[int]] = {}
        for (target, k, i), owner in zip(refs, owners, strict=True):
            if k >= 0:
                plain_owners.setdefault((id(target), k), []).append(owner)
            else:
                target.owners[i] = owner
        for done in splits:
            if done is not None:
                done.counts = [rank_counts(plain_owners[(id(done), k)], self._world) for k in range(len(done.plain))]
        self._dist_plans[key] = splits
        return splits

    @property
    def _reads_skip_flag(self) -> bool:
        """Whether this rank reads the step's skip flag on the host (the skip warning, rank 0 only)."""
        return self.warn_on_skip and self._rank == 0

    def _check_presence(self) -> None:
        """Raise ``RuntimeError`` (on every rank) if some parameter has a gradient on some ranks only."""
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            return
        assert self._group is not None
        bad = presence_mismatch([p.grad is not None for p in params], params[0].device, self._group.group)
        if bad:
            p = params[bad[0]]
            raise RuntimeError(
                f"orthoptim: {len(bad)} parameter(s) (the first of shape {tuple(p.shape)}, position {bad[0]} over "
                "all param groups) have a gradient on some ranks and .grad=None on others. Every rank must step "
                "the same parameters: give the missing ones zero gradients (p.grad = torch.zeros_like(p)) on every "
                "rank, or set them to None everywhere"
            )

    def _nonfinite_cause(self, params: list[Tensor], grads_finite: Tensor | None) -> str:
        """What made the step non-finite, for the warning and the error (reads the local flags: a host sync)."""
        bad = (~grads_finite).nonzero() if grads_finite is not None else torch.zeros(0)
        if bad.numel():
            return f"a non-finite gradient (parameter of shape {tuple(params[int(bad[0])].shape)})"
        if self._group is not None:
            return "a non-finite orthogonalized update, or a non-finite gradient on another rank"
        return "a non-finite orthogonalized update"

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
        local = self._group is None
        if not local:
            self._check_presence()  # before any other collective, and before a rank may return early
        if not all_grads:
            return loss
        device = all_grads[0].device
        adamw = [group.get("algorithm") == "adamw" for group, params, _, _ in gathered for _ in params]
        if self._distributed:  # the finite check reads this rank's shards (empty ones have no max-abs)
            kept = [t for t in zip(all_params, _local(all_grads), adamw, strict=True) if t[1].numel()]
            all_params, all_grads, adamw = [t[0] for t in kept], [t[1] for t in kept], [t[2] for t in kept]
        policy = self.nonfinite
        grads_finite: Tensor | None = None  # per gradient, "raise" only
        ok: Tensor | None = None
        if policy == "raise":
            grads_finite = _each_finite(all_grads) if all_grads else torch.ones(0, dtype=torch.bool, device=device)
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
            ok = _each_finite(checked).all() if checked else torch.ones((), dtype=torch.bool, device=device)
        # Under "skip" the flag is read on the host before the commit where that read is free (the CPU) or done
        # anyway (the skip warning's, rank 0): a kept step then commits without selects (on a GPU ~16 fewer bytes
        # per matrix entry, and the commit's kernels overlap what follows), a skipped one writes nothing. Elsewhere
        # the commit selects on the device flag (no host sync, capturable). Same state either way (tested).
        reads_flag = policy == "skip" and (device.type in CPU_PATH_DEVICES or self._reads_skip_flag)
        selects = policy == "skip" and not reads_flag
        if self._distributed:
            pending = self._prepare_distributed(gathered, need_flags=policy != "propagate", selects=selects)
        else:
            pending = self._prepare_local(gathered, need_flags=policy != "propagate", selects=selects)
        out_sums = [p.out_sum for p in pending if isinstance(p, _Pending) and p.out_sum is not None]
        if out_sums:
            out_ok = (torch.stack(out_sums).abs() < math.inf).all()
            if policy == "raise" and local and not bool(out_ok):
                raise NonFiniteError("orthogonalization produced a non-finite update; no state was changed")
            ok = out_ok if ok is None else ok & out_ok
        if not local and ok is not None:
            # One MAX all-reduce over the whole group, every step, whatever the data: all ranks skip together.
            assert self._group is not None
            ok = agree_ok(ok, self._group.group)
            if policy == "raise" and not bool(ok):
                raise NonFiniteError(f"{self._nonfinite_cause(all_params, grads_finite)}; no state was changed")
        commit_ok = ok if policy == "skip" else None
        keep = True
        if reads_flag:
            assert commit_ok is not None
            keep, commit_ok = bool(commit_ok), None
        scratch = self._held  # the commit's per-parameter temporaries (roles "momentum", "update"), kept too
        flag, steps = _StepFlag(commit_ok), []
        for p in pending if keep else ():
            if isinstance(p, _Pending):
                _commit(p, flag, scratch)
                assert p.steps is not None
                steps += p.steps
            else:  # Hybrid's AdamW half (optim/adamw.py)
                p.commit(commit_ok)
        if steps:  # int64 counters; one foreach for all megabatches, +0 on a skipped step
            torch._foreach_add_(steps, 1 if commit_ok is None else commit_ok.to(torch.int64))
        if policy == "skip":
            assert ok is not None
            skips = [s for _, _, _, lists in gathered for s in lists.get("nonfinite_skips", [])]
            torch._foreach_add_(skips, (~ok).to(torch.float32))
            # The one read of the flag, once per step; with many ranks only rank 0 reads and warns.
            if self._reads_skip_flag and not (keep if reads_flag else bool(ok)):
                what = self._nonfinite_cause(all_params, _each_finite(all_grads) if all_grads else None)
                warnings.warn(
                    f"orthoptim: step skipped for every parameter because of {what}; state is unchanged. "
                    "Pass warn_nonfinite=False to silence this (and drop its host sync).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return loss
