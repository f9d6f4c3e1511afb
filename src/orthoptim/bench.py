"""``orthoptim bench``: how long one optimizer step takes on this machine, against torch.optim.Muon, same process.

Every optimizer gets its own copy of the same matrices (GPT-2 small's hidden matrices by default, or ``shapes``),
with the same seeded random gradients, kept for every step (the step's cost does not depend on the values). Each
takes one untimed first step (state allocation) and ``warmup`` more, then the optimizers are timed in turns, one
step each per round for ``repeats`` rounds, so that a slow phase of a shared machine falls on all of them alike.
Per call: CUDA events around the step on a GPU (the device synced after each), ``time.perf_counter`` elsewhere.
Reported: the median and the interquartile range of the ms per step, the ratio of the median to torch.optim.Muon's
measured in the same run, and how far each optimizer's first update is from torch.optim.Muon's (relative Frobenius
difference over all matrices): orthoptim.Muon with torch's coefficients should agree up to bfloat16 rounding,
the defaults differ by design (another schedule and normalization).

Uses only the public API (and torch.optim.Muon, torch ≥ 2.9).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import Muon, NorMuon, PolarGrad, __version__
from .timing import call_ms, resolve_device, text_table

#: GPT-2 small's hidden matrices per layer (d = 768, fused QKV, 4·d MLP), as the speed issue and
#: microsoft/dion's benchmarks count them: attention in/out, MLP in/out.
GPT2_SMALL_LAYER: tuple[tuple[int, int], ...] = ((768, 2304), (768, 768), (3072, 768), (768, 3072))
#: torch.optim.Muon's coefficients and step count (torch/optim/_muon.py DEFAULT_A/B/C, DEFAULT_NS_STEPS).
TORCH_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
TORCH_STEPS = 5
LR = 0.02

Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Candidate:
    """One optimizer configuration the bench can time."""

    label: str
    make: Maker
    graph: bool = False  # time the replay of a CUDA graph that captured the step (CUDA only)


def _torch_muon(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon (it came with torch 2.9)")
    return torch.optim.Muon(ps, lr=LR)


CANDIDATES: dict[str, Candidate] = {
    "torch_muon": Candidate(f"torch.optim.Muon(lr={LR})", _torch_muon),
    "muon": Candidate(f"orthoptim.Muon(lr={LR})", lambda ps: Muon(ps, lr=LR)),
    "muon_no_sync": Candidate(
        f"orthoptim.Muon(lr={LR}, warn_nonfinite=False)", lambda ps: Muon(ps, lr=LR, warn_nonfinite=False)
    ),
    "muon_torch_math": Candidate(
        f"orthoptim.Muon(lr={LR}, ns_coefficients=torch's, ns_steps={TORCH_STEPS})",
        lambda ps: Muon(ps, lr=LR, ns_coefficients=TORCH_COEFFICIENTS, ns_steps=TORCH_STEPS, compute_dtype="bfloat16"),
    ),
    "normuon": Candidate(f"orthoptim.NorMuon(lr={LR})", lambda ps: NorMuon(ps, lr=LR)),
    "polargrad": Candidate("orthoptim.PolarGrad(lr=1e-4)", lambda ps: PolarGrad(ps, lr=1e-4)),
    "muon_graph": Candidate(
        f"orthoptim.Muon(lr={LR}, warn_nonfinite=False), CUDA graph replay",
        lambda ps: Muon(ps, lr=LR, warn_nonfinite=False),
        graph=True,
    ),
}
DEFAULT_CANDIDATES = ("torch_muon", "muon", "muon_no_sync", "muon_torch_math", "normuon")
BASELINE = "torch_muon"


@dataclass
class BenchRow:
    """One optimizer's times (ms per step, one per round) and its first update's distance to the baseline's."""

    name: str
    label: str
    times_ms: list[float] = field(default_factory=list)
    update_vs_baseline: float = float("nan")

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> tuple[float, float]:
        if len(self.times_ms) < 2:
            return self.median_ms, self.median_ms
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[0], q[2]


@dataclass
class BenchReport:
    device: str
    device_name: str
    torch_version: str
    dtype: str
    shapes: list[tuple[int, int]]
    rows: list[BenchRow]

    def ratio(self, row: BenchRow) -> float:
        """``row``'s median over the baseline's (NaN when the baseline did not run)."""
        base = next((r for r in self.rows if r.name == BASELINE), None)
        return float("nan") if base is None else row.median_ms / base.median_ms

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for d, row in zip(out["rows"], self.rows, strict=True):
            d.update(median_ms=row.median_ms, iqr_ms=row.iqr_ms, vs_torch_muon=self.ratio(row))
        return out


def gpt2_small_shapes(layers: int) -> list[tuple[int, int]]:
    """The hidden matrices of ``layers`` GPT-2-small layers (4 per layer)."""
    return [shape for _ in range(layers) for shape in GPT2_SMALL_LAYER]


def matrix_params(
    shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> list[nn.Parameter]:
    """Parameters of ``shapes`` (0.02·N(0,1)) with N(0,1) gradients, the same for the same seed on one device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(0.02 * torch.randn(shape, device=device, dtype=dtype, generator=gen))
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        params.append(p)
    return params


def captured(step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` captured in a CUDA graph, after three warm-up calls on a side stream as torch's CUDA-graph notes
    ask; returns the graph's replay (which re-runs the step on the same gradient tensors). A step that reads a
    device value on the host or allocates differently per call fails here."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def run_bench(
    shapes: Sequence[tuple[int, int]],
    names: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 10,
    progress: bool = True,
) -> BenchReport:
    """Time one step of each named optimizer (``CANDIDATES``) on ``shapes``; see the module docstring."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    dev = resolve_device(device)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"an optimizer is named twice in {list(names)}")
    if any(CANDIDATES[n].graph for n in names) and dev.type != "cuda":
        raise ValueError("CUDA graph replay (muon_graph) needs a CUDA device")
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of (m, n) with m, n ≥ 1, got {list(shapes)!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup ≥ 0 and repeats ≥ 1, got warmup={warmup}, repeats={repeats}")
    rows, steps = [], []
    updates: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names) * (1 + warmup) + len(names) * repeats, desc="orthoptim bench", unit="step",
               disable=not progress, leave=False)  # fmt: skip
    for name in names:
        candidate = CANDIDATES[name]
        params = matrix_params(shapes, dev, dtype)
        before = _flat(params)
        opt = candidate.make(params)
        opt.step()  # the first step allocates the state; its update is compared below
        updates[name] = _flat(params) - before
        for _ in range(warmup):
            opt.step()
        steps.append(captured(opt.step) if candidate.graph else opt.step)
        rows.append(BenchRow(name, candidate.label))
        bar.update(1 + warmup)
    baseline = updates.get(BASELINE)
    for row in rows:
        if baseline is not None:
            row.update_vs_baseline = float((updates[row.name] - baseline).norm() / baseline.norm())
    del updates
    for _ in range(repeats):  # in turns: one step of each optimizer per round
        for row, step in zip(rows, steps, strict=True):
            row.times_ms.append(call_ms(step, dev))
            bar.update(1)
    bar.close()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return BenchReport(str(dev), name, torch.__version__, str(dtype).replace("torch.", ""), list(shapes), rows)


def _fmt_shapes(shapes: Sequence[tuple[int, int]]) -> str:
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{c} × {m}×{n}" for (m, n), c in counts.items())


def format_bench(report: BenchReport) -> str:
    """The report as a plain-text table (what ``orthoptim bench`` prints)."""
    n = len(report.rows[0].times_ms) if report.rows else 0
    head = [
        f"orthoptim {__version__} bench — torch {report.torch_version}, device {report.device} "
        f"({report.device_name}), parameters {report.dtype}",
        f"{len(report.shapes)} {'matrix' if len(report.shapes) == 1 else 'matrices'}: {_fmt_shapes(report.shapes)}; "
        "ms per step, median and interquartile "
        f"range of {n} steps each, timed in turns",
        "",
    ]
    header = ["optimizer", "ms/step", "IQR", "× torch.optim.Muon", "1st update vs torch's"]
    rows = [
        [r.label, f"{r.median_ms:.2f}", f"{r.iqr_ms[0]:.2f}–{r.iqr_ms[1]:.2f}", f"{report.ratio(r):.2f}",
         f"{r.update_vs_baseline:.2e}"]
        for r in report.rows
    ]  # fmt: skip
    return "\n".join(head) + "\n" + text_table(header, rows)
