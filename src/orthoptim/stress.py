"""Stress test for "never unstable": many random and adversarial matrices through every configuration.

For each (schedule, normalization, compute dtype) every matrix of a large adversarial set is orthogonalized and
checked against a float64 SVD of the matrix the iteration actually sees (``X_eff``: the input after its
normalization, see ``orthoptim.polar.normalize``):

* no non-finite output;
* no output singular value above ``bound`` (default: 1.25, or the schedule's validated maximum + 0.1 for
  schedules designed to overshoot further, e.g. ``cubic5``);
* no negative gain ``uᵢᵀ O vᵢ`` along a singular direction of ``X_eff`` whose σᵢ lies inside the interval the
  schedule was validated on (``[lower, 1 + 2⁻⁸]``) — a negative gain would flip that direction of the update.

Configurations orthoptim refuses up front (``cans`` in bfloat16/float16) are reported as refused, not run.

Used by the test suite (≥ 10,000 matrices) and by ``benchmarks/stress.py`` (more, with a table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import get_schedule, list_schedules, orthogonalize, validate_schedule
from .polar.schedules import check_precision

SPECTRA: tuple[str, ...] = (
    "gaussian",
    "rank1",
    "orthogonal",
    "cluster_at_max",
    "dominant",
    "harmonic",
    "sqrt_decay",
    "geometric",
    "two_level",
    "tiny_tail",
)
SHAPES: tuple[tuple[int, int], ...] = ((8, 8), (6, 24), (24, 6), (1, 16), (16, 1), (12, 40))
#: Input scales (float32 input: every scaled matrix stays finite and nonzero).
SCALES: tuple[float, ...] = (1e-35, 1e-12, 1.0, 1e12, 1e35)
NORMALIZATIONS: tuple[str, ...] = ("frobenius", "schatten4", "aol")
DEFAULT_BOUND = 1.25


def _spectrum(kind: str, batch: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, k) nonnegative singular values, largest ~1, with a little random jitter."""
    i = torch.arange(1, k + 1, dtype=torch.float64).expand(batch, k)
    jitter = 1.0 + 0.05 * torch.rand(batch, k, dtype=torch.float64, generator=gen)
    if kind == "rank1":
        s = (i == 1).to(torch.float64)
    elif kind == "orthogonal":
        return torch.ones(batch, k, dtype=torch.float64)  # exactly flat: the fixed point σ = 1
    elif kind == "cluster_at_max":
        s = torch.where(i <= max(1, k // 2), 1.0, 1e-2).to(torch.float64)
    elif kind == "dominant":
        s = torch.where(i == 1, 1.0, 1e-4).to(torch.float64)
    elif kind == "harmonic":
        s = 1.0 / i
    elif kind == "sqrt_decay":
        s = i.rsqrt()
    elif kind == "geometric":
        s = torch.pow(0.5, i - 1)
    elif kind == "two_level":
        s = torch.where(i % 2 == 1, 1.0, 0.3).to(torch.float64)
    elif kind == "tiny_tail":
        s = torch.where(i == 1, 1.0, 1e-3 * torch.rand(batch, k, dtype=torch.float64, generator=gen))
    else:
        raise ValueError(f"unknown spectrum {kind!r}")
    return s * jitter


def adversarial_batch(shape: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` float32 matrices of ``shape``, cycling through :data:`SPECTRA` and :data:`SCALES`."""
    m, n = shape
    k = min(m, n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + m * 1009 + n)
    per = -(-count // len(SPECTRA))
    parts = []
    for kind in SPECTRA:
        if kind == "gaussian":
            parts.append(torch.randn(per, m, n, dtype=torch.float64, generator=gen))
            continue
        u, _ = torch.linalg.qr(torch.randn(per, m, k, dtype=torch.float64, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(per, n, k, dtype=torch.float64, generator=gen))
        parts.append((u * _spectrum(kind, per, k, gen).unsqueeze(-2)) @ v.mT)
    X = torch.cat(parts)[:count]
    X = X / X.abs().amax(dim=(-2, -1), keepdim=True)
    scales = torch.tensor(SCALES, dtype=torch.float64)[torch.arange(count) % len(SCALES)]
    return (X * scales.view(-1, 1, 1)).to(torch.float32)


def effective_input(X: torch.Tensor, normalization: str, margin: float) -> torch.Tensor:
    """The matrix the iteration runs on, computed independently in float64 (wide orientation)."""
    W = X.to(torch.float64)
    W = W / W.abs().amax(dim=(-2, -1), keepdim=True)  # exact-enough float64 rescale; σ ratios unchanged
    W = W / torch.linalg.matrix_norm(W).view(-1, 1, 1)
    A = W @ W.mT
    if normalization == "frobenius":
        return W / margin
    if normalization == "schatten4":
        return W / (margin * torch.linalg.matrix_norm(A).sqrt().view(-1, 1, 1))
    if normalization == "aol":
        return W * A.abs().sum(-1, keepdim=True).rsqrt() / margin
    raise ValueError(f"unknown normalization {normalization!r}")


@dataclass(frozen=True)
class StressResult:
    """Worst cases for one configuration over all matrices."""

    schedule: str
    normalization: str
    compute_dtype: str
    matrices: int
    nonfinite: int
    max_singular_value: float
    bound: float
    negative_gains: int
    min_covered_gain: float
    refused: str = ""
    iteration: str = "auto"

    @property
    def ok(self) -> bool:
        """Passed, or refused up front by orthoptim (so it can never run unsafely)."""
        if self.refused:
            return True
        return self.nonfinite == 0 and self.max_singular_value <= self.bound and self.negative_gains == 0


def schedule_bound(name: str) -> float:
    """The stated bound on output singular values for a schedule (see module docstring)."""
    return max(DEFAULT_BOUND, validate_schedule(name).max_gain + 0.1)


def run_stress(
    matrices_per_shape: int = 1700,
    *,
    schedules: Sequence[str] | None = None,
    normalizations: Sequence[str] = NORMALIZATIONS,
    compute_dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    shapes: Sequence[tuple[int, int]] = SHAPES,
    steps: int | None = None,
    iteration: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> list[StressResult]:
    """Run every configuration over ``matrices_per_shape × len(shapes)`` matrices; return one result each.

    ``steps`` overrides every schedule's default step count (validation and bound use the same count).
    ``iteration`` is passed to ``orthogonalize`` (``"standard"``/``"gram"`` force one form of the iteration).
    """
    names = list(schedules) if schedules is not None else list_schedules()
    batches = []
    for shape in shapes:
        X = adversarial_batch(shape, matrices_per_shape, seed)
        wide = X if shape[0] <= shape[1] else X.mT
        batches.append((X, wide))
    configs = [(s, nz, dt) for s in names for nz in normalizations for dt in compute_dtypes]
    from tqdm import tqdm  # type: ignore[import-untyped]

    results = []
    for name, norm, dtype in tqdm(configs, desc="stress", unit="config", disable=not progress, leave=False):
        sched = get_schedule(name)
        report = validate_schedule(name, steps=steps)
        bound = max(DEFAULT_BOUND, report.max_gain + 0.1)
        precision = str(dtype).replace("torch.", "")
        total = sum(x.shape[0] for x, _ in batches)
        try:
            check_precision(sched, steps, precision)
        except ValueError:
            results.append(
                StressResult(name, norm, precision, total, 0, 0.0, bound, 0, float("nan"), "refused", iteration)
            )
            continue
        nonfinite = negative = 0
        worst_sigma, worst_gain = 0.0, float("inf")
        for X, wide in batches:
            O = orthogonalize(
                X,
                schedule=name,
                steps=steps,
                normalization=norm,  # type: ignore[arg-type]
                compute_dtype=dtype,
                iteration=iteration,  # type: ignore[arg-type]
            )
            Ow = (O if O.shape == wide.shape else O.mT).to(torch.float64)
            bad = ~torch.isfinite(Ow).flatten(1).all(-1)
            nonfinite += int(bad.sum())
            Ow = Ow[~bad]
            if Ow.shape[0] == 0:
                continue
            worst_sigma = max(worst_sigma, float(torch.linalg.matrix_norm(Ow, ord=2).max()))
            U, S, Vh = torch.linalg.svd(effective_input(wide[~bad], norm, sched.margin), full_matrices=False)
            g = torch.einsum("bik,bij,bkj->bk", U, Ow, Vh)
            covered = (S >= report.lower) & (S <= report.upper)
            negative += int(((g <= 0) & covered).sum())
            if bool(covered.any()):
                worst_gain = min(worst_gain, float(g[covered].min()))
        results.append(
            StressResult(
                name,
                norm,
                precision,
                total,
                nonfinite,
                worst_sigma,
                bound,
                negative,
                worst_gain,
                iteration=iteration,
            )
        )
    return results
