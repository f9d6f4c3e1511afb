"""A param group's options as a typed, frozen record, validated once; what the shape and scale options mean.

torch's optimizers keep options in ``param_groups`` dicts (so ``state_dict()`` carries them and schedulers edit
``lr`` in place). orthoptim keeps them there too, and the step reads them through :class:`MatrixOptions`: built
and checked by the constructor, ``add_param_group`` and ``load_state_dict`` (``matrix_options``), rebuilt only if
a group's options were edited since (``OptionsCache``), so the step never re-validates and the backends read
typed fields, not a dict. ``lr``, ``weight_decay`` and ``momentum`` are what schedulers change every step: they
are copied from the group at each step without checks, as torch's optimizers read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from ..polar import as_schedule
from ..polar.devices import ELEMENTWISE, Elementwise
from ..polar.normalize import NORMALIZATIONS, Normalization
from ..polar.orthogonalize import ITERATIONS, Iteration, PolarPlan, resolve_compute_dtype
from ..polar.schedules import Schedule, Triple, check_precision
from .backends import Backend, select_backend

NonFiniteMode: TypeAlias = Literal["skip", "raise", "propagate"]
ShapePolicy: TypeAlias = Literal["auto", "flatten", "batch"]
ScaleMode: TypeAlias = Literal["original", "match_rms_adamw", "unit_rms", "spectral_norm", "nuclear"]
#: How a parameter stores each matrix: (out, in) as ``nn.Linear``, or (in, out) as transformers' GPT-2 ``Conv1D``.
WeightLayout: TypeAlias = Literal["out_in", "in_out"]
#: How the step is executed (``optim/backends``): ``"auto"`` picks per device (``backends.select_backend``).
BackendName: TypeAlias = Literal["auto", "reference", "torch", "triton"]

NONFINITE_MODES: tuple[str, ...] = ("skip", "raise", "propagate")
SHAPE_POLICIES: tuple[str, ...] = ("auto", "flatten", "batch")
SCALE_MODES: tuple[str, ...] = ("original", "match_rms_adamw", "unit_rms", "spectral_norm", "nuclear")
WEIGHT_LAYOUTS: tuple[str, ...] = ("out_in", "in_out")
#: Accepted ``backend=`` values. ``"torch@cpu"`` / ``"torch@cuda"`` run the torch backend with the choices
#: measured fastest on that device type whatever the parameters' device (tests run the GPU's choices on the CPU).
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton", "torch@cpu", "torch@cuda")


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number in the stated range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element (or {name} a number), got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok or not math.isfinite(value):
        interval = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}{']' if hi is not None else ')'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")


def check_param_dtypes(params: list[Tensor]) -> None:
    """Raise ``TypeError`` for a parameter that is not real floating point (integer, bool, complex)."""
    for p in params:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"orthoptim optimizers take real floating-point parameters; the parameter of shape {tuple(p.shape)} "
                f"is {p.dtype}"
            )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the option unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


def row_blocks(split: Any) -> tuple[int, tuple[int, ...] | None]:
    """``(k, sizes)`` for a group's ``split`` option, checked: ``k`` equal blocks of output rows (1: whole
    matrices), or, for blocks of unequal sizes, ``k = 1`` and their row counts. Sizes that are all equal are k
    equal blocks (the same update, and batched as such). Raises ``ValueError`` naming the bad value."""
    if isinstance(split, (tuple, list)):
        sizes = tuple(split)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"split must be a positive int (that many equal blocks of output rows) or a non-empty sequence of "
                f"positive ints (the blocks' row counts, e.g. (q, k, v) sizes), got {split!r}"
            )
        if len(set(sizes)) == 1:
            return len(sizes), None
        return 1, sizes
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(
            f"split must be a positive int (that many equal blocks of output rows) or a sequence of positive ints "
            f"(the blocks' row counts), got {split!r}"
        )
    return split, None


def block_ranges(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ``[start, stop)`` row range of each block of sizes ``sizes``, in order."""
    stops = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return [(stop - size, stop) for size, stop in zip(sizes, stops, strict=True)]


def matrix_layout(
    shape: tuple[int, ...], policy: ShapePolicy = "auto", weight_layout: WeightLayout = "out_in", split: Any = 1
) -> tuple[int, int, int]:
    """``(count, m, n)``: the parameter is ``count`` matrices of m outputs × n inputs (rows are output neurons:
    what the lr scale, NorMuon's row statistics and a block split refer to).

    * 2-D: one matrix.
    * ``"flatten"`` (``"auto"`` for ≥ 4-D, i.e. conv2d/conv3d weights ``(out, in, *kernel)``): one ``out × rest``
      matrix — each output channel's filter is a row.
    * ``"batch"`` (``"auto"`` for 3-D: stacked experts or per-head weights ``(..., m, n)``): the leading dims index
      independent matrices. A Conv1d weight ``(out, in, k)`` is 3-D: give its group ``shape_policy="flatten"``.
    * ``weight_layout="in_out"``: each matrix is stored transposed, ``(..., in, out)`` in the last two dims
      (transformers' GPT-2 ``Conv1D``, ``y = x·W + b``): m and n are swapped. Only for matrices stored in the
      last two dims (2-D, or 3-D batches).
    * ``split=k``: each matrix's m output rows are cut into k equal blocks of m/k rows, each orthogonalized (and
      lr-scaled, row-normalized, nuclear-scaled) on its own: a fused QKV projection (k = 3), gate and up in one
      weight (k = 2), attention heads (k = heads). The parameter is then ``count·k`` matrices of m/k × n.
    * ``split=(s₁, s₂, …)``: blocks of those row counts (they must sum to m), each on its own as above — the q,
      k and v of grouped-query attention in one weight. Unequal blocks stay whole matrices in the layout (the
      backends cut them, ``backends.torch.polar``): ``(count, m, n)``.
    """
    count, m, n = _whole_matrices(shape, policy, weight_layout)
    k, sizes = row_blocks(split)
    if isinstance(split, (tuple, list)) and sum(split) != m:
        raise ValueError(
            f"split={tuple(split)} cuts each matrix's output rows into blocks of those sizes, which sum to "
            f"{sum(split)}, but the parameter of shape {tuple(shape)} has {m} output rows per matrix"
        )
    if sizes is not None or k == 1:
        return count, m, n
    if m % k:
        raise ValueError(
            f"split={k} cuts each matrix's {m} output rows into equal blocks, but {m} is not a multiple of "
            f"{k} (parameter of shape {tuple(shape)})"
        )
    return count * k, m // k, n


def _whole_matrices(shape: tuple[int, ...], policy: ShapePolicy, weight_layout: WeightLayout) -> tuple[int, int, int]:
    """``matrix_layout`` before any split."""
    if len(shape) < 2:
        raise ValueError(
            f"parameter of shape {tuple(shape)} has {len(shape)} dim(s): orthogonalized optimizers need matrices "
            "(≥ 2-D). Optimize biases, gains and other vectors with AdamW — orthoptim.Hybrid does both in one "
            "optimizer, and orthoptim.split_params(model) sorts a model's parameters for it."
        )
    _check_choice("shape_policy", policy, SHAPE_POLICIES)
    if any(d == 0 for d in shape):
        raise ValueError(f"parameter of shape {tuple(shape)} is empty")
    _check_choice("weight_layout", weight_layout, WEIGHT_LAYOUTS)
    flatten = len(shape) > 2 and (policy == "flatten" or (policy == "auto" and len(shape) >= 4))
    if weight_layout == "in_out":
        if flatten:
            raise ValueError(
                f"weight_layout='in_out' takes matrices stored (..., in, out) in the last two dims; the parameter "
                f"of shape {tuple(shape)} is flattened by shape_policy={policy!r} (use 'batch', or 'out_in')"
            )
        return math.prod(shape[:-2]), shape[-1], shape[-2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if flatten:
        return 1, shape[0], math.prod(shape[1:])
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def lr_scale(mode: ScaleMode, m: int, n: int) -> float:
    """Factor applied to the learning rate for an m×n matrix (rows = outputs).

    ============== ==================== =====================================================================
    mode           factor               meaning
    ============== ==================== =====================================================================
    original       √max(1, m/n)         KellerJordan/Muon; torch.optim.Muon ``adjust_lr_fn=None/"original"``
    match_rms_adamw 0.2·√max(m, n)      Moonlight (arXiv 2502.16982): update RMS ≈ AdamW's, so AdamW's lr and
                                        weight decay carry over; torch.optim.Muon ``"match_rms_adamw"``
    unit_rms       √max(m, n)           update RMS = 1 (an orthogonal m×n matrix has RMS 1/√max(m, n))
    spectral_norm  √(m/n)               RMS→RMS operator norm 1, the spectral condition (arXiv 2310.17813);
                                        microsoft/dion ``adjust_lr="spectral_norm"`` (dion/megabatch_base.py)
    nuclear        1                    PolarGrad (arXiv 2505.21799): the update is ‖M‖_*·polar(M) instead
    ============== ==================== =====================================================================
    """
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "unit_rms":
        return math.sqrt(max(m, n))
    if mode == "spectral_norm":
        return math.sqrt(m / n)
    if mode == "nuclear":
        return 1.0
    raise ValueError(f"unknown scale mode {mode!r}; choose one of {SCALE_MODES}")


@dataclass(frozen=True)
class MatrixOptions:
    """One orthogonalized param group's options, checked (``matrix_options``). The backends take this record.

    ``schedule`` is resolved to a :class:`~orthoptim.Schedule` and ``coefficients`` to the triples actually
    applied (``ns_steps`` of them); ``compute_dtype`` stays as given (None: per device,
    ``orthoptim.polar.resolve_compute_dtype``).
    """

    lr: float | Tensor
    weight_decay: float | Tensor
    momentum: float
    nesterov: bool
    schedule: Schedule
    ns_steps: int | None
    coefficients: tuple[Triple, ...]
    normalization: Normalization
    compute_dtype: torch.dtype | str | None
    iteration: Iteration
    scale_mode: ScaleMode
    shape_policy: ShapePolicy
    row_norm: bool
    beta2: float
    row_eps: float
    backend: str
    elementwise: Elementwise
    weight_layout: WeightLayout
    split: int  # equal blocks of output rows per matrix (1: whole, or unequal ``blocks``)
    #: Row counts of unequal blocks (``split=(s₁, s₂, …)``), cut by the backends from whole matrices; else None.
    blocks: tuple[int, ...] | None
    #: The polar engine's resolved options and the lr scale per (m, n, device, arithmetic), filled by the backends
    #: as they meet shapes (``backends.torch._polar_plan``); shared by the per-step copies of this record.
    polar_plans: dict[tuple[Any, ...], tuple[PolarPlan, float]] = field(default_factory=dict, compare=False, repr=False)
    #: The backend each device type of the group's parameters runs (``backends.select_backend``), resolved once.
    backends: dict[str, Backend] = field(default_factory=dict, compare=False, repr=False)
    nuclear: bool = field(init=False)  # PolarGrad's scale: the update is multiplied by ⟨O, M⟩ ≈ ‖M‖_*

    def __post_init__(self) -> None:
        object.__setattr__(self, "nuclear", self.scale_mode == "nuclear")

    def backend_for(self, device: torch.device) -> Backend:
        """The backend for parameters on ``device`` (resolved at validation; a device met later is resolved now)."""
        resolved = self.backends.get(device.type)
        if resolved is None:
            resolved = self.backends[device.type] = select_backend(self.backend, device)
        return resolved


#: The group keys ``MatrixOptions`` is built from besides the three schedulers change (lr, weight_decay, momentum).
_STATIC_KEYS = (
    "nesterov",
    "schedule",
    "ns_steps",
    "normalization",
    "compute_dtype",
    "iteration",
    "scale_mode",
    "shape_policy",
    "row_norm",
    "beta2",
    "row_eps",
    "backend",
    "elementwise",
    "weight_layout",
    "split",
)


def _static_key(group: dict[str, Any]) -> tuple[Any, ...]:
    # Groups saved before "iteration", "backend", "elementwise" and "weight_layout" existed run their defaults.
    defaults = {"iteration": "auto", "backend": "auto", "elementwise": "auto", "weight_layout": "out_in", "split": 1}
    return tuple(group.get(k, defaults.get(k)) for k in _STATIC_KEYS)


def matrix_options(group: dict[str, Any]) -> MatrixOptions:
    """Validate an orthogonalized param group (raises ``ValueError``/``TypeError`` naming the option) and return
    its record. Checks the parameters too: real floating dtypes, shapes the ``shape_policy`` makes matrices of,
    and the schedule's safety in each device's compute dtype — here, so that a compiled step (which cannot run
    that host-side check, see polar/orthogonalize.py) never runs an unvalidated configuration."""
    check_number("lr", group["lr"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    check_number("momentum", group["momentum"], 0.0, 1.0)
    key = _static_key(group)
    nesterov, schedule, ns_steps, normalization, compute_dtype, iteration, scale_mode, shape_policy = key[:8]
    row_norm, beta2, row_eps, backend, elementwise, weight_layout, split = key[8:]
    if not isinstance(nesterov, bool):
        raise TypeError("nesterov must be a bool")
    for name, value, choices in (
        ("scale mode", scale_mode, SCALE_MODES),
        ("normalization", normalization, NORMALIZATIONS),
        ("iteration", iteration, ITERATIONS),
        ("shape_policy", shape_policy, SHAPE_POLICIES),
        ("backend", backend, BACKENDS),
        ("weight_layout", weight_layout, WEIGHT_LAYOUTS),
        ("elementwise", elementwise, ELEMENTWISE),
    ):
        _check_choice(name, value, choices)
    equal_blocks, blocks = row_blocks(split)
    if not isinstance(row_norm, bool):
        raise TypeError("row_norm must be a bool")
    sched = as_schedule(schedule)
    coefficients = sched.steps_coefficients(ns_steps)  # validates the step count
    if row_norm:
        check_number("beta2", beta2, 0.0, 1.0)
        check_number("row_eps", row_eps, 0.0, lo_open=True)
    params = group["params"]
    # Complex parameters are refused where torch.optim.Muon refuses them, at the step (``base._gather``), with
    # its RuntimeError; integer and bool ones (which cannot have gradients) here.
    check_param_dtypes([p for p in params if not p.is_complex()])
    for p in params:
        matrix_layout(tuple(p.shape), shape_policy, weight_layout, split)
        if weight_layout == "in_out" and type(p).__name__ == "DTensor":
            raise ValueError(
                "weight_layout='in_out' is not supported for DTensor (sharded) parameters: FSDP2 shards the stored "
                "rows, which are the matrix's inputs here; keep such weights unsharded or store them (out, in)"
            )
    resolved = {}
    for device in {p.device for p in params}:
        dtype = resolve_compute_dtype(compute_dtype, device)
        check_precision(sched, ns_steps, str(dtype).replace("torch.", ""))
        resolved[device.type] = select_backend(backend, device)  # "triton" without triton: refused here
    return MatrixOptions(
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        momentum=float(group["momentum"]),
        nesterov=nesterov,
        schedule=sched,
        ns_steps=ns_steps,
        coefficients=coefficients,
        normalization=normalization,
        compute_dtype=compute_dtype,
        iteration=iteration,
        scale_mode=scale_mode,
        shape_policy=shape_policy,
        row_norm=row_norm,
        beta2=float(beta2),
        row_eps=float(row_eps),
        backend=backend,
        elementwise=elementwise,
        weight_layout=weight_layout,
        split=equal_blocks,
        blocks=blocks,
        backends=resolved,
    )


class OptionsCache:
    """Each orthogonalized group's :class:`MatrixOptions`, rebuilt (and so re-validated) only when one of its
    options other than lr, weight_decay and momentum was edited since; those three are copied in at every
    step. A few dict lookups per group per step, none per parameter."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[tuple[Any, ...], MatrixOptions]] = {}

    def build(self, group: dict[str, Any]) -> MatrixOptions:
        """Validate ``group`` and keep its record (the constructor, ``add_param_group``, ``load_state_dict``)."""
        record = matrix_options(group)
        self._records[id(group)] = (_static_key(group), record)
        return record

    def __call__(self, group: dict[str, Any]) -> MatrixOptions:
        """The group's record for this step."""
        kept = self._records.get(id(group))
        if kept is None or kept[0] != _static_key(group):
            record = self.build(group)
        else:
            record = kept[1]
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        if lr is record.lr and wd is record.weight_decay and mu == record.momentum:
            return record
        return replace(record, lr=lr, weight_decay=wd, momentum=float(mu))
