"""The ``reference`` backend: each optimizer's update in float64, one parameter at a time, the formulas as the
papers print them — no stacking, no fusion, no buffers kept, no device-specific choices. It shares nothing with
the other backends but the options record, so the tests can hold those to it (``backend="reference"`` and
``backend="torch"`` agree within float32 rounding after several steps), and the class docstrings cite it.

For a parameter θ with gradient G and momentum B (each matrix of it, in its (out, in) = (m, n) view):

    B ← μB + (1 − μ)G                               momentum (torch.optim.Muon's ``lerp``)
    M ← μB + (1 − μ)G   (Nesterov)   or   M ← B      the optimizer's input (each matrix (out, in); a group with
                                                     weight_layout="in_out" stores them (in, out): transposed)
    X₀ ← M / (margin·‖M‖_F)                          "frobenius"
       ← M / (margin·‖M̂M̂ᵀ‖_F^{1/2}·‖M‖_F),  M̂ = M/‖M‖_F          "schatten4"
       ← D M̂,  Dᵢᵢ = (Σⱼ|(M̂M̂ᵀ)ᵢⱼ|)^{-1/2} / margin               "aol"
    X ← aX + (bA + cA²)X,  A = XXᵀ, for each (a, b, c) of the schedule (m ≤ n; a tall matrix is transposed);
    with split=k each matrix's rows are cut into k blocks first (split=(s₁, s₂, …): blocks of those sizes),
    each block its own M from here on
    O ← X
    NorMuon (arXiv 2510.05491):  v ← β₂v + (1 − β₂)·meanⱼ Oᵢⱼ²;  Ô = O / √(v + ε) (rows);  O ← Ô·‖O‖_F/‖Ô‖_F
    PolarGrad (arXiv 2505.21799): U = ⟨O, M⟩·O (≈ ‖M‖_*·polar(M));  otherwise U = scale(m, n)·O
    θ ← θ·(1 − lr·wd) − lr·U

The zero matrix gives a zero update. Nothing is written before the step-wide decision (``ReferenceUpdate.commit``);
the results are rounded once, into the parameters' and state's own dtypes. ``compute_dtype`` and ``iteration``
do not apply (float64, the standard iteration); DTensor parameters are refused (``base``'s validation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...polar.workspace import Workspace
from ..options import MatrixOptions, block_ranges, lr_scale


def prepare(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    second: list[Tensor] | None,
    steps: list[Tensor],
    layouts: list[tuple[int, int, int]],
    opts: MatrixOptions,
) -> ReferenceUpdate:
    """Every parameter's new value, momentum and second moment, in float64; nothing written."""
    new_params, new_bufs, new_second = [], [], []
    finite = torch.ones((), dtype=torch.bool, device=params[0].device if params else "cpu")
    transposed = opts.weight_layout == "in_out"  # stored (..., in, out): computed on the (out, in) view

    def matrices(t: Tensor, count: int, m: int, n: int) -> Tensor:
        """``t`` as its (out, in) matrices, each cut into ``opts.split`` blocks of rows: (count, m, n)."""
        return (t.double().mT if transposed else t.double()).reshape(count, m, n)

    for i, (p, g, b, (count, m, n)) in enumerate(zip(params, grads, bufs, layouts, strict=True)):
        G, B = matrices(g, count, m, n), matrices(b, count, m, n)
        mu = opts.momentum
        B = mu * B + (1.0 - mu) * G
        M = mu * B + (1.0 - mu) * G if opts.nesterov else B
        U = torch.empty_like(M)
        rows_v = []
        # Unequal blocks (split=(s₁, s₂, …)) are cut here; equal ones are already matrices of their own.
        for a, z in block_ranges(opts.blocks) if opts.blocks is not None else [(0, m)]:
            Mb = M[:, a:z]
            O = torch.stack([_orthogonalize(Mb[k], opts) for k in range(count)])
            if opts.row_norm:
                assert second is not None
                v_old = second[i].double().reshape(count, m)[:, a:z]
                v = opts.beta2 * v_old + (1.0 - opts.beta2) * O.square().mean(dim=-1)
                normed = O / (v + opts.row_eps).sqrt().unsqueeze(-1)
                size = torch.linalg.matrix_norm(O) / torch.linalg.matrix_norm(normed).clamp_min(1e-300)
                O = normed * size.view(-1, 1, 1)
                rows_v.append(v)
            if opts.nuclear:
                U[:, a:z] = (O * Mb).sum(dim=(-2, -1), keepdim=True) * O
            else:
                U[:, a:z] = lr_scale(opts.scale_mode, z - a, n) * O
        if opts.row_norm:
            new_second.append(torch.cat(rows_v, dim=1))
        lr, wd = float(opts.lr), float(opts.weight_decay)
        theta = matrices(p, count, m, n) * (1.0 - lr * wd) - lr * U
        finite &= torch.isfinite(U).all()
        new_params.append(theta)
        new_bufs.append(B)
    if transposed:  # back to whole (out, in) matrices, then to the stored (in, out)
        rows = [(m * opts.split, n) for _, m, n in layouts]
        new_params = [t.reshape(-1, *r).mT for t, r in zip(new_params, rows, strict=True)]
        new_bufs = [t.reshape(-1, *r).mT for t, r in zip(new_bufs, rows, strict=True)]
    return ReferenceUpdate(params, bufs, second, steps, new_params, new_bufs, new_second, finite)


def _orthogonalize(M: Tensor, opts: MatrixOptions) -> Tensor:
    """The schedule's Newton–Schulz iteration on one m×n float64 matrix, after the group's normalization."""
    tall = M.shape[0] > M.shape[1]
    X = M.mT if tall else M
    fro = torch.linalg.matrix_norm(X)
    if fro == 0:
        return torch.zeros_like(M)
    margin = opts.schedule.margin
    if opts.normalization == "frobenius":
        X = X / (margin * fro)
    else:
        X = X / fro
        A = X @ X.mT
        if opts.normalization == "schatten4":
            X = X / (margin * torch.linalg.matrix_norm(A).sqrt())
        else:  # "aol"; a zero row has a zero row sum and stays zero
            rows = A.abs().sum(dim=-1, keepdim=True)
            X = torch.where(rows > 0, X / rows.clamp_min(1e-300).sqrt(), 0.0) / margin
    for a, b, c in opts.coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


@dataclass
class ReferenceUpdate:
    """One group's computed step (float64), written by ``commit`` where the step-wide flag allows."""

    params: list[Tensor]
    bufs: list[Tensor]
    second: list[Tensor] | None
    step_counters: list[Tensor]
    new_params: list[Tensor]
    new_bufs: list[Tensor]
    new_second: list[Tensor]
    finite: Tensor

    @property
    def out_sum(self) -> Tensor:
        """A number that is finite iff every update is (the step's finite check)."""
        return torch.where(self.finite, 0.0, torch.nan)

    def commit(self, flag: object, scratch: Workspace | None = None) -> None:
        ok = getattr(flag, "ok", None)
        if ok is not None and not bool(ok):
            return
        for t, new in (*zip(self.params, self.new_params, strict=True), *zip(self.bufs, self.new_bufs, strict=True)):
            t.copy_(new.reshape(t.shape))
        if self.second is not None:
            for s, new in zip(self.second, self.new_second, strict=True):
                s.copy_(new.view_as(s))
