"""``orthoptim doctor``: does orthogonalization behave at every scale, how accurate is it, how fast?

For each shape it measures, for every orthoptim schedule and for torch.optim.Muon's built-in routine:

* **scale sweep** — ``‖O(t·G)‖_F / ‖O(G)‖_F`` for ``t`` from 1e-38 to 1e38 (float32 input with max-abs entry 1,
  so ``t·G`` stays finite). Orthogonalization is scale-invariant, so every ratio should be 1.
* **gains** — the output's gain ``uᵢᵀ O vᵢ`` along each singular direction of the input, against a float64 SVD,
  for a gaussian matrix and a heavy-tailed one (σᵢ = 1/i), counted where σᵢ ≥ 1e-3·σmax. 1 is exact.
* **time per call** (median; CUDA events on a GPU).

Uses only the public API (plus torch's own Muon routine, which is private to torch and optional).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import __version__, get_schedule, list_schedules, orthogonalize, resolve_compute_dtype
from .polar import DEFAULT_SCHEDULE
from .timing import median_ms, resolve_device, text_table

SCALES: tuple[float, ...] = (1e-38, 1e-30, 1e-20, 1e-10, 1e-5, 1.0, 1e5, 1e10, 1e20, 1e30, 1e38)
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((256, 256), (128, 512), (768, 768))
#: A ratio further than this from 1 counts as a scale failure.
SCALE_TOLERANCE = 0.01
#: Gains are counted along directions with σ ≥ this fraction of σmax.
GAIN_FLOOR = 1e-3
TORCH_MUON = "torch.optim.Muon"
TORCH_MUON_COEFFS = (3.4445, -4.7750, 2.0315)  # torch/optim/_muon.py DEFAULT_A/B/C


@dataclass
class Row:
    """One routine on one shape."""

    routine: str
    steps: int
    matmuls: int
    dtype: str
    ratios: dict[float, float] = field(default_factory=dict)
    gain_gaussian: tuple[float, float] = (float("nan"), float("nan"))
    gain_heavy: tuple[float, float] = (float("nan"), float("nan"))
    ms: float = float("nan")
    refused: str = ""

    @property
    def scale_failures(self) -> list[float]:
        return [t for t, r in self.ratios.items() if not abs(r - 1.0) <= SCALE_TOLERANCE]


@dataclass
class ShapeReport:
    shape: tuple[int, int]
    rows: list[Row]


@dataclass
class DoctorReport:
    device: str
    torch_version: str
    shapes: list[ShapeReport]
    normalization: str = "schatten4"


def _torch_muon_routine() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as ns
    except ImportError:  # torch < 2.9
        return None
    return lambda G: ns(G, TORCH_MUON_COEFFS, 5, 1e-7)


def _heavy_tailed(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    return (u * s) @ v.T


def _gain_range(
    fn: Callable[[torch.Tensor], torch.Tensor], G64: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    keep = S >= GAIN_FLOOR * S[0]
    O = fn(G64.to(device=device, dtype=torch.float32)).to(device="cpu", dtype=torch.float64)
    g = torch.einsum("ik,ij,kj->k", U[:, keep], O, Vh[keep])  # diagonal of UᵀOV on the kept directions
    return float(g.min()), float(g.max())


def _measure(
    row: Row, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int], device: torch.device, repeats: int
) -> Row:
    gen = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    G = torch.randn(*shape, generator=gen, dtype=torch.float64)
    base = (G / G.abs().max()).to(device=device, dtype=torch.float32)
    base = base / base.abs().max()  # max-abs exactly 1: t·base is finite for t ≤ 1e38
    ref_norm = float(fn(base).float().norm())
    for t in SCALES:
        row.ratios[t] = float(fn(base * t).float().norm()) / ref_norm
    row.gain_gaussian = _gain_range(fn, G, device)
    row.gain_heavy = _gain_range(fn, _heavy_tailed(*shape, gen), device)
    row.ms = median_ms(lambda: fn(base), device, warmup=1, repeats=repeats)
    return row


def run_doctor(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    schedules: Sequence[str] | None = None,
    *,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | str | None = None,
    normalization: str = "schatten4",
    repeats: int = 5,
    progress: bool = True,
) -> DoctorReport:
    """Measure every schedule (default: all shipped) and torch.optim.Muon's routine on each shape.

    A schedule that orthoptim refuses in the compute dtype (e.g. ``cans`` in bfloat16) gets a row saying so.
    """
    from tqdm import tqdm  # type: ignore[import-untyped]

    dev = resolve_device(device)
    names = list(schedules) if schedules is not None else list_schedules()
    for name in names:
        get_schedule(name)  # unknown names fail before any work
    for shape in shapes:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"doctor: shapes must be (m, n) with m, n ≥ 1, got {shape!r}")
    muon = _torch_muon_routine()
    dtype_label = str(resolve_compute_dtype(compute_dtype, dev)).replace("torch.", "")
    jobs = [(shape, name) for shape in shapes for name in [*names, *([TORCH_MUON] if muon else [])]]
    reports = {shape: ShapeReport((shape[0], shape[1]), []) for shape in shapes}
    for shape, name in tqdm(jobs, desc="orthoptim doctor", unit="run", disable=not progress, leave=False):
        if name == TORCH_MUON:
            assert muon is not None
            row = Row(TORCH_MUON, 5, 15, "bfloat16")
            fn = muon
        else:
            sched = get_schedule(name)
            row = Row(name, len(sched.steps_coefficients()), sched.matmuls(), dtype_label)

            def fn(G: torch.Tensor, _n: str = name) -> torch.Tensor:
                return orthogonalize(G, schedule=_n, compute_dtype=compute_dtype, normalization=normalization)  # type: ignore[arg-type]

            try:
                fn(torch.ones(2, 2, device=dev))
            except ValueError as exc:
                if "refused" not in str(exc):
                    raise
                row.refused = f"refused in {dtype_label}"
                reports[shape].rows.append(row)
                continue
        reports[shape].rows.append(_measure(row, fn, tuple(shape), dev, repeats))  # type: ignore[arg-type]
    return DoctorReport(str(dev), torch.__version__, list(reports.values()), normalization)


def _fmt_range(r: tuple[float, float]) -> str:
    return f"[{r[0]:.3f}, {r[1]:.3f}]"


def _fmt_failures(row: Row) -> str:
    bad = row.scale_failures
    return "none" if not bad else " ".join(f"{t:.0e}" for t in bad)


def format_report(report: DoctorReport) -> str:
    """The report as plain-text tables (what ``orthoptim doctor`` prints)."""
    out = [
        f"orthoptim {__version__} doctor — torch {report.torch_version}, device {report.device}, "
        f"normalization {report.normalization}",
        f"scale sweep: ‖O(t·G)‖/‖O(G)‖ for t in 1e-38..1e38 (fail: off by > {SCALE_TOLERANCE:g}); "
        f"gains uᵢᵀOvᵢ vs float64 SVD for σᵢ ≥ {GAIN_FLOOR:g}·σmax (1 = exact)",
    ]
    for sr in report.shapes:
        m, n = sr.shape
        out.append(f"\n== {m}×{n} ==")
        header = ["routine", "steps", "matmuls", "dtype", "scale ratio min..max", "scale failures",
                  "gain gaussian", "gain σᵢ=1/i", "ms/call"]  # fmt: skip
        rows = [
            [r.routine, str(r.steps), str(r.matmuls), r.dtype, r.refused, "", "", "", ""]
            if r.refused
            else [
                r.routine,
                str(r.steps),
                str(r.matmuls),
                r.dtype,
                f"{min(r.ratios.values()):.4f}..{max(r.ratios.values()):.4f}",
                _fmt_failures(r),
                _fmt_range(r.gain_gaussian),
                _fmt_range(r.gain_heavy),
                f"{r.ms:.2f}",
            ]
            for r in sr.rows
        ]
        out.append(text_table(header, rows))
        # The sweep itself for the default schedule and torch's routine, side by side.
        shown = [r for r in sr.rows if r.routine in (DEFAULT_SCHEDULE, TORCH_MUON)]
        if shown:
            out.append("")
            sweep_rows = [[f"{t:.0e}", *(f"{r.ratios[t]:.4f}" for r in shown)] for t in SCALES]
            out.append(text_table(["scale t", *(f"{r.routine} ‖O(tG)‖/‖O(G)‖" for r in shown)], sweep_rows))
    return "\n".join(out)
