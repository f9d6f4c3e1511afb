"""``orthoptim.Muon``: a drop-in for torch.optim.Muon on the scale-invariant polar engine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..distributed import DEFAULT_PROCESS_GROUP
from ..polar import DEFAULT_NORMALIZATION, DEFAULT_SCHEDULE
from ..polar.devices import Elementwise
from ..polar.orthogonalize import Iteration
from ..polar.schedules import ScheduleSpec
from .base import OrthogonalizedOptimizer
from .options import BackendName, NonFiniteMode, ScaleMode, ShapePolicy, WeightLayout, check_number

_TORCH_ADJUST = (None, "original", "match_rms_adamw")
_TORCH_DEFAULT_STEPS = 5  # torch/optim/_muon.py DEFAULT_NS_STEPS


def resolve_schedule(
    schedule: ScheduleSpec | None, ns_coefficients: tuple[float, float, float] | None, ns_steps: int | None
) -> tuple[ScheduleSpec, int | None]:
    """torch.optim.Muon's ``ns_coefficients``/``ns_steps`` or orthoptim's ``schedule`` (not both)."""
    if schedule is not None and ns_coefficients is not None:
        raise ValueError("pass either ns_coefficients (torch.optim.Muon style) or schedule, not both")
    if ns_coefficients is not None:
        coeffs = tuple(float(v) for v in ns_coefficients)
        if len(coeffs) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
        # A bare triple runs torch's default 5 steps unless told otherwise.
        return coeffs, _TORCH_DEFAULT_STEPS if ns_steps is None else ns_steps  # type: ignore[return-value]
    return (DEFAULT_SCHEDULE if schedule is None else schedule), ns_steps


class Muon(OrthogonalizedOptimizer):
    """Muon: momentum, then the orthogonalized (polar-factor) update, for matrix parameters.

    Accepts every argument of ``torch.optim.Muon`` with the same meaning — swapping the import works, and
    ``ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5`` reproduces torch.optim.Muon's parameters up to
    bfloat16 rounding (with ``compute_dtype="bfloat16"``). ``eps`` is accepted and ignored: orthoptim's
    normalization is exactly scale-invariant and needs no floor (README, "Scale invariance").

    Args:
        params: matrices (2-D; conv weights are flattened, 3-D weights are batches of matrices — see
            ``shape_policy``), or param groups. 0-D/1-D parameters raise and point to ``orthoptim.Hybrid``.
        lr, weight_decay, momentum, nesterov: as torch.optim.Muon (decoupled weight decay with the unadjusted lr).
            ``lr`` may be a 0-d tensor: on the parameters' device it is used there, never read back (schedulers
            ``fill_`` it in place, so a captured CUDA graph follows them; README, "Tensor learning rates").
        ns_coefficients: one (a, b, c) triple applied every step (torch.optim.Muon style).
        eps: accepted for compatibility; unused.
        ns_steps: Newton–Schulz steps (default: the schedule's, 5 for a bare triple).
        adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"`` (torch's names for ``scale_mode``).
        schedule: orthoptim schedule name, ``Schedule`` or list of triples (default ``"orthoptim"``, 5 steps).
        normalization: ``"schatten4"`` | ``"frobenius"`` | ``"aol"``. Default: ``"schatten4"``, or ``"frobenius"``
            when ``ns_coefficients`` is given (torch.optim.Muon's math, for a faithful drop-in).
        compute_dtype: dtype of the iteration (default: bfloat16 on GPUs and on CPUs with native bf16 products,
            else float32; ``orthoptim.polar.resolve_compute_dtype``).
        iteration: ``"auto"`` | ``"standard"`` | ``"gram"`` — the form of Newton–Schulz (``orthoptim.orthogonalize``;
            "auto" runs the Gram form for rectangular matrices in float32, where it needs fewer operations).
        scale_mode: ``"original"`` | ``"match_rms_adamw"`` | ``"unit_rms"`` | ``"spectral_norm"`` | ``"nuclear"``
            (see README table; ``orthoptim.optim.lr_scale``).
        shape_policy: ``"auto"`` | ``"flatten"`` | ``"batch"`` (``orthoptim.optim.options.matrix_layout``).
        nonfinite: ``"skip"`` (default) | ``"raise"`` | ``"propagate"`` (``orthoptim.optim.base``'s docstring).
        warn_nonfinite: warn when a step is skipped (reads the device flag once per step; rank 0 only).
        process_group: a ``torch.distributed`` group to split the orthogonalization over and agree on skips
            with (README, "Distributed"). Default: the world group when torch.distributed is initialized with
            more than one rank; ``None`` runs locally. Kept on the optimizer (``opt.process_group``), not in the
            param groups: it is not part of ``state_dict()``.
        backend: how the update is executed (``orthoptim.optim.backends``): ``"auto"`` (default: ``"torch"``),
            ``"reference"`` (float64, one parameter at a time, the formulas as printed: slow, for checking),
            ``"torch"`` (megabatches of stacked matrices, torch ops, any device) or ``"triton"`` (the torch
            backend with fused Triton elementwise kernels; opt-in until measured on a GPU). A param group option.
        elementwise: the arithmetic around the products, equal up to the last bit (``orthoptim.orthogonalize``):
            ``"auto"`` (the backend's device choice), ``"float32_copies"`` or ``"float64_factors"``.
        weight_layout: ``"out_in"`` (default: matrices stored (out, in), as ``nn.Linear``) or ``"in_out"``
            (stored transposed, as transformers' GPT-2 ``Conv1D``): the lr scale and NorMuon's rows follow the
            (out, in) orientation. ``orthoptim.Hybrid(model)`` sets it for ``Conv1D`` weights itself.
        split: cut each matrix's output rows into this many equal blocks, each orthogonalized on its own (with
            its own lr scale, NorMuon rows and PolarGrad norm): 3 for a fused QKV projection, 2 for gate and up in
            one weight, the number of heads for per-head updates; or the blocks' row counts in order, which
            must sum to the rows: ``(q, k, v)`` sizes for grouped-query attention in one weight. A param group
            option; default 1 (whole).

    Any other keyword raises ``TypeError``, as torch.optim.Muon's would: a misspelt option is never ignored.
    NorMuon's options (``beta2``, ``row_eps``) are :class:`orthoptim.NorMuon`'s (and :class:`orthoptim.Hybrid`'s).
    """

    def _algorithm_defaults(self) -> dict[str, Any]:
        """The group options of the algorithm beyond Muon's: NorMuon's per-row normalization, off here (subclasses
        set them before ``__init__`` runs this)."""
        return dict(getattr(self, "_row_options", None) or {"row_norm": False, "beta2": 0.95, "row_eps": 1e-8})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] | None = None,
        eps: float = 1e-7,
        ns_steps: int | None = None,
        adjust_lr_fn: str | None = None,
        *,
        schedule: ScheduleSpec | None = None,
        normalization: str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        iteration: Iteration = "auto",
        scale_mode: ScaleMode | None = None,
        shape_policy: ShapePolicy = "auto",
        nonfinite: NonFiniteMode = "skip",
        warn_nonfinite: bool = True,
        process_group: Any = DEFAULT_PROCESS_GROUP,
        backend: BackendName = "auto",
        elementwise: Elementwise = "auto",
        weight_layout: WeightLayout = "out_in",
        split: int | tuple[int, ...] = 1,
    ) -> None:
        # torch.optim.Muon's checks, first and in its order (before the params are looked at), so that a test
        # written against torch's errors sees the same exception; each group is checked again when it is built.
        check_number("lr", lr, 0.0)
        check_number("momentum", momentum, 0.0, 1.0)
        check_number("weight_decay", weight_decay, 0.0)
        if adjust_lr_fn not in _TORCH_ADJUST:
            raise ValueError(
                f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn must be one of "
                f"{_TORCH_ADJUST}"
            )
        if scale_mode is not None and adjust_lr_fn is not None and scale_mode != adjust_lr_fn:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} and scale_mode={scale_mode!r} disagree; pass one")
        check_number("eps", eps, 0.0)
        sched, steps = resolve_schedule(schedule, ns_coefficients, ns_steps)
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "eps": eps,
            "schedule": sched,
            "ns_steps": steps,
            "normalization": normalization or ("frobenius" if ns_coefficients is not None else DEFAULT_NORMALIZATION),
            "compute_dtype": compute_dtype,
            "iteration": iteration,
            "scale_mode": scale_mode or adjust_lr_fn or "original",
            "shape_policy": shape_policy,
            "backend": backend,
            "elementwise": elementwise,
            "weight_layout": weight_layout,
            "split": split,
            **self._algorithm_defaults(),
        }
        super().__init__(params, defaults, nonfinite, warn_nonfinite, process_group=process_group)
