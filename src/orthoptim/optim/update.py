"""A megabatch's update from its orthogonalized ``O``: NorMuon's row normalization, PolarGrad's nuclear scale, the
finite check, and the group's ``orthogonalize`` call and commit factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..polar import devices, orthogonalize
from ..polar.normalize import scales_input_in_place
from ..polar.orthogonalize import resolve_compute_dtype
from ..polar.workspace import Workspace, scratch_like
from .shapes import lr_scale


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


def orthogonalizer(group: dict[str, Any], *, compute_dtype_out: bool = False) -> Callable[..., Tensor]:
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


def group_alpha(group: dict[str, Any], m: int, n: int) -> float | Tensor:
    """Factor of the final add: −lr·scale (a 0-d tensor for a tensor lr), or 1 in the nuclear mode (where the
    update carries it)."""
    return 1.0 if group["scale_mode"] == "nuclear" else -group["lr"] * lr_scale(group["scale_mode"], m, n)


def group_decay(group: dict[str, Any]) -> float | Tensor:
    """``1 − lr·wd`` (a 0-d tensor for a tensor lr), or exactly 1.0 without weight decay (nothing to apply)."""
    return 1.0 if group["weight_decay"] == 0 else 1.0 - group["lr"] * group["weight_decay"]


def finish_update(
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
    The commit multiplies by it exactly as here (``commit.commit_megabatch``), or the fused commit does in its pass."""
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
        update = O  # −lr·scale is fused into the final foreach add (``group_alpha``)
    if not need_flags:
        return update, new_second, None, factor
    # |O| ≲ 1.3 entrywise (a Newton–Schulz output), so the sum cannot overflow: it is non-finite iff some entry
    # is. With a deferred factor f the update is O·f: with |O| ≤ 2 an entry can overflow only where |f| exceeds
    # half the largest float, so O's sum plus 2‖f‖₁ is finite iff every entry of O·f is (a factor beyond 2⁻¹ of
    # the range skips the step even if O·f would just fit: never met at real learning rates).
    if factor is None:
        return update, new_second, O.sum(), None
    size = torch.linalg.vector_norm(factor, ord=1, dtype=torch.promote_types(factor.dtype, torch.float32))
    return update, new_second, torch.add(O.sum(), size, alpha=2.0), factor
