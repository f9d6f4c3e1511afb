"""``orthogonalize``: the public entry of the polar engine (validate, normalize, iterate, restore)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

from . import devices
from .checks import check_matrix_input
from .devices import ELEMENTWISE, Elementwise
from .newton_schulz import gram_newton_schulz, gram_product, gram_restarts, iteration_cost, newton_schulz
from .normalize import NONFINITE_POLICIES, NORMALIZATIONS, NonFinitePolicy, Normalization, gram_scale, normalize
from .schedules import ScheduleSpec, Triple, as_schedule, check_precision
from .workspace import Workspace

#: The schedule and step count used when the caller names none (see README "Choosing a default").
DEFAULT_SCHEDULE = "orthoptim"
#: The normalization used when the caller names none (README "Choosing the default").
DEFAULT_NORMALIZATION = "schatten4"

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_COMPUTE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

Iteration: TypeAlias = Literal["auto", "standard", "gram"]
ITERATIONS: tuple[str, ...] = ("auto", "standard", "gram")
#: ``iteration="auto"`` uses the Gram form only when it saves at least this fraction of the operations: the
#: Gram form issues more, smaller products, so a marginal saving in multiply-adds is not worth it.
GRAM_MIN_SAVING = 0.15


def _probe_cpu_native_bf16() -> bool:
    """The hardware probes, and whether torch runs its AVX-512 kernels at all: ``ATEN_CPU_CAPABILITY=avx2`` (with
    ``ONEDNN_MAX_CPU_ISA=AVX2`` for the products) makes an AVX-512 machine compute as an AVX2 one does, and then
    orthoptim chooses as it would there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private but present since 2.1
    try:
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except Exception:  # a probe failing at runtime means "unknown": the portable choice is float32
        return False


# Probed once at import: a module constant is also what torch.compile can read (it refuses to trace the probe).
_CPU_NATIVE_BF16 = _probe_cpu_native_bf16()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX-512 BF16 or AMX tiles), by torch's own
    CPU feature detection; False where torch cannot say (e.g. other architectures)."""
    return _CPU_NATIVE_BF16


def resolve_compute_dtype(compute_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The dtype the iteration runs in.

    ``None`` ("auto"): bfloat16 on accelerators (tensor cores; the polynomials tolerate its rounding, see
    ``schedules.ROUNDING_UPPER``), and on CPUs with native bfloat16 dot products (AVX-512 BF16 or AMX), where it
    is 2–4× faster than float32 per product — the speed torch.optim.Muon, which always runs bfloat16, gets
    there. On other CPUs torch emulates bfloat16 products and they fall behind float32, so float32 (README,
    "Compute dtype on the CPU"). float32 is about three digits more accurate: pass it explicitly for that.
    """
    if compute_dtype is None:
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    if isinstance(compute_dtype, str):
        if compute_dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown compute_dtype {compute_dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[compute_dtype]
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")
    return compute_dtype


def gram_plan(
    iteration: str, m: int, n: int, coefficients: tuple[Triple, ...], dtype: torch.dtype
) -> tuple[int, ...] | None:
    """The Gram form's restart steps if ``iteration`` runs it for an m×n matrix (either orientation) in ``dtype``,
    else None (the standard form)."""
    if iteration not in ITERATIONS:
        raise ValueError(f"unknown iteration {iteration!r}; choose one of {ITERATIONS}")
    if iteration == "standard":
        return None
    restarts = gram_restarts(coefficients, dtype)
    if iteration == "gram":
        return restarts
    short, long = min(m, n), max(m, n)
    saving = iteration_cost(short, long, coefficients, restarts) <= (1.0 - GRAM_MIN_SAVING) * iteration_cost(
        short, long, coefficients, None
    )
    return restarts if saving else None


def uses_gram(iteration: str, m: int, n: int, coefficients: tuple[Triple, ...], dtype: torch.dtype) -> bool:
    """Whether ``iteration`` runs the Gram form for an m×n matrix (either orientation) in ``dtype``."""
    return gram_plan(iteration, m, n, coefficients, dtype) is not None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges ``a`` and ``b`` span in one storage intersect (conservative inside the ranges:
    interleaved views count as overlapping; separate slices of one buffer do not)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = int(t.storage_offset()) * t.element_size()
        extent = sum((int(size) - 1) * int(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def orthogonalize(
    G: torch.Tensor,
    *,
    schedule: ScheduleSpec = DEFAULT_SCHEDULE,
    steps: int | None = None,
    normalization: Normalization = "schatten4",
    compute_dtype: torch.dtype | str | None = None,
    nonfinite: NonFinitePolicy = "raise",
    iteration: Iteration = "auto",
    out_dtype: torch.dtype | None = None,
    overwrite_input: bool = False,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    elementwise: Elementwise = "auto",
) -> torch.Tensor:
    """Approximate the polar factor ``U Vᵀ`` of each matrix in ``G`` (..., m, n) by Newton–Schulz.

    Exactly scale-invariant: ``orthogonalize(2^k·G)`` is bit for bit ``orthogonalize(G)`` for every ``k`` that
    keeps ``2^k·G`` exact in ``G``'s dtype (no entry over- or underflowing), over each dtype's whole range — from
    a matrix of subnormals to one whose max-abs entry is in the top binade (float32/bfloat16 ``2^127``, float64
    ``2^1023``, float16 ``2^15``); for any other ``t > 0`` with ``t·G`` finite and nonzero, ``orthogonalize(t·G)``
    differs from ``orthogonalize(G)`` only by the rounding of ``t·G`` itself. The zero matrix maps to zeros.

    Args:
        G: real floating tensor (..., m, n), any m, n ≥ 1, any float dtype, any strides. Not differentiable: a
            ``G`` that requires grad is refused while grad mode is on (use ``torch.no_grad()`` or ``G.detach()``).
        schedule: a shipped schedule name (``orthoptim.list_schedules()``), a ``Schedule``, one ``(a, b, c)``
            triple (applied every step, as in torch.optim.Muon), or a list of triples (validated once).
        steps: iterations; the schedule's default (5 for most) if None. A schedule that fails validation under
            the compute dtype's rounding model is refused with a ``ValueError`` saying which dtypes it is safe in
            (``cans`` in bfloat16 and float16).
        normalization: how σmax is bounded before the first step: ``"frobenius"`` (divide by ‖G‖_F),
            ``"schatten4"`` (divide by ‖GGᵀ‖_F^{1/2}, tighter, reuses the first Gram product) or ``"aol"``
            (row scaling from the Gram matrix; a preconditioner that changes the limit, see
            ``orthoptim.polar.normalize``).
        compute_dtype: dtype of the iteration; None picks bfloat16 on accelerators and on CPUs with native
            bfloat16 products, float32 on other CPUs (:func:`resolve_compute_dtype`).
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError` naming the shape if ``G`` holds
            NaN/Inf (costs one host sync); ``"propagate"`` skips the check and lets NaN flow to the output.
        iteration: ``"standard"`` (re-derive the Gram matrix from X every step), ``"gram"`` (iterate on the small
            m×m Gram matrix, apply the product once; fewer operations for rectangular matrices, restarts
            where rounding requires — ``orthoptim.polar.newton_schulz``), or ``"auto"`` (the Gram form where it
            saves ≥ ``GRAM_MIN_SAVING`` of the multiply-adds: float32/float64 and aspect ratio ≳ 2; in
            bfloat16/float16 only for gentle schedules, whose restarts are rarer). Both forms compute the same
            polynomial.
        out_dtype: dtype of the result (default: ``G``'s). Pass the compute dtype to skip the final conversion
            when the caller consumes the update in it (the optimizers add a bfloat16 update into float32
            parameters directly).
        overwrite_input: ``G`` is the caller's temporary and may be used as scratch space (its contents are
            undefined afterwards); saves a float32 copy of it. The optimizers pass their momentum input. The
            result equals the copying call's up to rounding, not bit for bit where ``G`` is not contiguous in
            the wide orientation (tall, sliced, permuted): the norms are then summed in ``G``'s own order. Ignored
            for an input whose elements share memory (expanded, stride 0), which cannot be written in place.
        out: a tensor of ``G``'s shape and the result's dtype (``out_dtype``, else ``G``'s) to write the result
            into, which is then returned (torch's ``out=`` convention; its memory must not overlap ``G``'s).
            When it is in the compute dtype and contiguous in the wide orientation (``out.mT`` contiguous for
            tall matrices) the last product is written straight into it; otherwise the result is copied in.
            The optimizers pass buffers they keep between steps (no fresh allocation per step on the CPU).
        workspace: a :class:`~orthoptim.polar.workspace.Workspace` whose buffers hold the call's large
            temporaries (the normalized copy, Gram matrices, the CPU loop's products) instead of fresh tensors;
            keep one across calls to allocate nothing after the first (the optimizers do, on the CPU). Its
            buffers are overwritten by the next call that uses it; the result never lives in it.
        elementwise: the arithmetic around the products (``orthoptim.polar.devices``): ``"float32_copies"``
            (fastest on the CPU), ``"float64_factors"`` (fewer bytes moved: GPUs), or ``"auto"`` (by ``G``'s
            device). Equal up to the last bit.

    Returns:
        A tensor of ``G``'s shape and dtype (a transposed view for tall matrices), or ``out``.
    """
    check_matrix_input(G, "orthogonalize")
    if G.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "orthogonalize: the input requires grad, but orthogonalize is not differentiable (it computes in "
            "place, in preallocated buffers): call it under torch.no_grad(), or on G.detach()"
        )
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"orthogonalize: out_dtype must be a real floating dtype, got {out_dtype!r}")
    result_dtype = G.dtype if out_dtype is None else out_dtype
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(
            f"orthogonalize: workspace must be an orthoptim.polar.Workspace (or None), got {type(workspace).__name__}"
        )
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"orthogonalize: out must be a tensor (or None), got {type(out).__name__}")
        if out.device != G.device:
            raise ValueError(f"orthogonalize: out is on {out.device}, but G is on {G.device}")
        if out.shape != G.shape or out.dtype != result_dtype:
            raise ValueError(
                f"orthogonalize: out must have shape {tuple(G.shape)} and dtype {result_dtype}, "
                f"got {tuple(out.shape)} and {out.dtype}"
            )
        if _overlaps(out, G):
            raise ValueError("orthogonalize: out must not share memory with G")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    plan = polar_plan(
        G.shape[-2],
        G.shape[-1],
        G.device,
        schedule=schedule,
        steps=steps,
        normalization=normalization,
        compute_dtype=compute_dtype,
        iteration=iteration,
        elementwise=elementwise,
    )
    return run_plan(
        G, plan, nonfinite=nonfinite, out_dtype=out_dtype, overwrite_input=overwrite_input, out=out, workspace=workspace
    )


@dataclass(frozen=True)
class PolarPlan:
    """What ``orthogonalize``'s options resolve to for m×n matrices on one device, validated (``polar_plan``): the
    optimizers build one per megabatch shape and keep it, so their steps run ``run_plan`` without re-validating."""

    coefficients: tuple[Triple, ...]
    margin: float
    normalization: Normalization
    dtype: torch.dtype  # the compute dtype
    restarts: tuple[int, ...] | None  # the Gram form's restart steps, or None: the standard form
    float32_copies: bool  # the elementwise arithmetic (``polar/devices.py``)


def polar_plan(
    m: int,
    n: int,
    device: torch.device,
    *,
    schedule: ScheduleSpec = DEFAULT_SCHEDULE,
    steps: int | None = None,
    normalization: Normalization = "schatten4",
    compute_dtype: torch.dtype | str | None = None,
    iteration: Iteration = "auto",
    elementwise: Elementwise = "auto",
) -> PolarPlan:
    """Validate ``orthogonalize``'s options for m×n matrices on ``device`` and resolve them (see its arguments):
    the schedule's triples for ``steps``, checked under the compute dtype's rounding; the form; the arithmetic."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if elementwise not in ELEMENTWISE:
        raise ValueError(f"unknown elementwise {elementwise!r}; choose one of {ELEMENTWISE}")
    sched = as_schedule(schedule)
    coefficients = sched.steps_coefficients(steps)
    dtype = resolve_compute_dtype(compute_dtype, device)
    if not torch.compiler.is_compiling():
        # Host-side (numpy) validation, cached after the first call. torch.compile cannot trace it, so a traced
        # call relies on an earlier eager call or on the optimizers, which run this check in their constructor.
        check_precision(sched, steps, str(dtype).replace("torch.", ""))
    restarts = gram_plan(iteration, m, n, coefficients, dtype)
    copies = devices.float32_copies(device, elementwise)
    return PolarPlan(coefficients, sched.margin, normalization, dtype, restarts, copies)


def run_plan(
    G: torch.Tensor,
    plan: PolarPlan,
    *,
    nonfinite: NonFinitePolicy = "propagate",
    out_dtype: torch.dtype | None = None,
    overwrite_input: bool = False,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``orthogonalize(G, ...)`` with its options resolved in ``plan`` and its arguments trusted (the optimizers'
    inner call; ``orthogonalize`` validates, then calls this): normalize, iterate in the plan's form, restore
    the orientation, shape and dtype."""
    if overwrite_input and any(stride == 0 and size > 1 for stride, size in zip(G.stride(), G.shape, strict=True)):
        overwrite_input = False  # an expanded input: one element stands for many, so it is no scratch space
    result_dtype = G.dtype if out_dtype is None else out_dtype
    dtype, copies, margin = plan.dtype, plan.float32_copies, plan.margin
    m, n = G.shape[-2], G.shape[-1]
    tall = m > n
    X = G.mT if tall else G
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, X.shape[-2], X.shape[-1])
    direct = None  # ``out`` as the wide (B, m, n) batch the last product can be written into
    if out is not None:
        wide_out = out.mT if tall else out
        if wide_out.dtype == dtype and wide_out.is_contiguous():
            direct = wide_out.view(X.shape)
    gram_based = plan.normalization != "frobenius"
    X = normalize(
        X,
        normalization=plan.normalization,
        # The Gram-based normalizations start from the Frobenius one without the margin (``gram_scale`` applies it).
        margin=1.0 if gram_based else margin,
        nonfinite=nonfinite,
        shape=G.shape,
        out_dtype=dtype,
        overwrite_input=overwrite_input,
        workspace=workspace,
        float32_copies=copies,
    )
    first_gram = row_scale = None
    if gram_based:
        gram = None if workspace is None else workspace.get("first_gram", (*X.shape[:-1], X.shape[-2]), dtype, X.device)
        first_gram, row_scale = gram_scale(
            gram_product(X, out=gram),
            plan.normalization,
            margin,
            overwrite_input=True,
            workspace=workspace,
            float32_copies=copies,
        )
    if plan.restarts is None:
        X = newton_schulz(
            X,
            plan.coefficients,
            first_gram=first_gram,
            row_scale=row_scale,
            out=direct,
            work=workspace,
            float32_copies=copies,
        )
    else:
        X = gram_newton_schulz(
            X,
            plan.coefficients,
            first_gram=first_gram,
            row_scale=row_scale,
            restarts=plan.restarts,
            out=direct,
            work=workspace,
            float32_copies=copies,
        )
    X = X.reshape(*batch_shape, X.shape[-2], X.shape[-1])
    if out is not None:
        if direct is None:
            out.copy_(X.mT if tall else X)
        return out
    X = X.to(result_dtype)
    return X.mT if tall else X
