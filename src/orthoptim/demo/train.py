"""Train the demo GPT once per optimizer under identical conditions; tabulate and plot validation loss.

Every run starts from the same initialization (``torch.manual_seed(seed)`` before building the model), draws the
same training batches in the same order (a private generator seeded with ``seed``), runs the same number of steps
under the same learning-rate shape (linear warmup, then linear decay to zero; a ``LambdaLR`` per optimizer) and is
scored on the same fixed validation windows every ``eval_every`` steps. Weight decay is 0 for everyone (short runs).

Optimizers compared (``OPTIMIZERS``):

- ``hybrid``: ``orthoptim.Hybrid`` — orthoptim.Muon on the hidden matrices, AdamW on embeddings, ``lm_head`` and
  RMSNorm gains (``orthoptim.split_params``);
- ``adamw``: ``torch.optim.AdamW`` on everything;
- ``torch_muon``: ``torch.optim.Muon`` on the same hidden matrices plus ``torch.optim.AdamW`` on the rest, two
  optimizers stepped together.

The learning rates in ``TUNED_LRS`` are tuned defaults, chosen once by the small sweep recorded next to them; they
are not swept at run time. Pass ``lrs=`` to :func:`train_one` to try others.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

import orthoptim

from .data import Corpus, TrainBatches, val_batches
from .model import GPT, GPTConfig

OPTIMIZERS: tuple[str, ...] = ("hybrid", "adamw", "torch_muon")
REFERENCE = "adamw"  # "steps to reach" is measured against this optimizer's final validation loss
# Every AdamW (alone or beside Muon) uses the same betas: beta2 = 0.95 as in karpathy/nanoGPT train.py, Hybrid too.
ADAM_BETAS = (0.9, 0.95)

# Tuned defaults: lr for the hidden matrices ("lr") and for AdamW's parameters ("adamw_lr"; plain AdamW has one lr
# for everything). Chosen by a small sweep at the default demo size (GPT 4×128, 4 heads, context 128, batch 16,
# 300 steps, 5% warmup + linear decay, seed 0) on 2026-11-23, 2-core AMD EPYC CPU, torch 2.13.0+cpu.
# Final validation loss (nats/byte; deterministic, so one run per point):
#   adamw       lr 1e-3: 2.146   1.5e-3: 2.161   2e-3: 2.116*  3e-3: 2.314   4e-3: 2.568   8e-3: 2.466
#   hybrid      lr 0.01: 1.776   0.02: 1.525   0.03: 1.477*  0.04: 1.592   0.08: 2.124          (adamw_lr 4e-3)
#               adamw_lr at lr 0.02: 2e-3: 1.520   4e-3: 1.525   8e-3: 1.548 — a tie; 4e-3 kept, the lr sweep's
#   torch_muon  lr 0.01: 1.823   0.02: 1.546   0.03: 1.487*  0.04: 1.489   0.06: 1.908   0.08: 2.089  (adamw_lr 4e-3)
# (* = chosen.) Both Muon variants peak at lr 0.03; torch.optim.Muon's coefficients (KellerJordan/Muon's) leave
# singular values in [0.68, 1.13] vs polar_express's [0.87, 1.12] (README doctor table, 128×512), so its steps are
# a little smaller at equal lr and it tolerates 0.04 better.
TUNED_LRS: dict[str, dict[str, float]] = {
    "hybrid": {"lr": 0.03, "adamw_lr": 4e-3},
    "adamw": {"lr": 2e-3},
    "torch_muon": {"lr": 0.03, "adamw_lr": 4e-3},
}
# Fraction of the steps spent in linear warmup, per optimizer (then linear decay to zero).
TUNED_WARMUP: dict[str, float] = {"hybrid": 0.05, "adamw": 0.05, "torch_muon": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a comparison besides the optimizer (defaults: the ``orthoptim demo`` size)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    steps: int = 300
    batch: int = 16
    eval_every: int = 10
    eval_batches: int = 4  # fixed validation windows: eval_batches × batch of them
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")

    def warmup_steps(self, warmup: float) -> int:
        """The number of warmup steps for a warmup ``fraction`` of this config's steps."""
        check_warmup(warmup)
        return round(warmup * self.steps)


def check_warmup(warmup: float) -> None:
    """Refuse a warmup fraction outside [0, 1) (a run must have at least one step after warmup)."""
    if not 0 <= warmup < 1:
        raise ValueError(f"--warmup must lie in [0, 1), got {warmup:g}")


@dataclass
class RunResult:
    """One optimizer's run: validation loss at each evaluated step, and the training time (s) spent to get there."""

    name: str
    lrs: dict[str, float]
    warmup: float = 0.0  # fraction of the steps in linear warmup
    seed: int = 0
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training time only: evaluation is not counted
    ms_per_step: float = math.nan

    @property
    def final(self) -> float:
        return self.val_loss[-1]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup, then linear decay to zero."""
    warmup = min(warmup, steps - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return (steps - step) / (steps - warmup)


def build_optimizers(name: str, model: nn.Module, lrs: dict[str, float]) -> list[torch.optim.Optimizer]:
    """The optimizer(s) for ``name``, stepped together; hidden matrices as ``orthoptim.split_params`` finds them."""
    if name == "hybrid":
        return [orthoptim.Hybrid(model, lr=lrs["lr"], adamw_lr=lrs["adamw_lr"], adamw_betas=ADAM_BETAS)]
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lrs["lr"], betas=ADAM_BETAS, weight_decay=0.0)]
    if name == "torch_muon":
        matrices, others = orthoptim.split_params(model)
        return [
            torch.optim.Muon(matrices, lr=lrs["lr"], weight_decay=0.0),
            torch.optim.AdamW(others, lr=lrs["adamw_lr"], betas=ADAM_BETAS, weight_decay=0.0),
        ]
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _autocast(device: torch.device) -> AbstractContextManager[object]:
    # bfloat16 autocast on GPUs (as GPT speedruns train); float32 on the CPU, where the demo's small matmuls gain
    # little and float32 keeps runs bit-reproducible.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: GPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean validation loss over the fixed ``batches`` (nats per byte)."""
    total = torch.zeros((), device=device)
    for x, y in batches:
        with _autocast(device):
            total += model(x.to(device), y.to(device))
    return float(total) / len(batches)


def train_one(
    name: str,
    cfg: TrainConfig,
    corpus: Corpus,
    *,
    lrs: dict[str, float] | None = None,
    warmup: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Train a fresh model (seeded init) with optimizer ``name`` for ``cfg.steps`` steps; evaluate as it goes.

    ``lrs`` and ``warmup`` (a fraction of the steps) default to the tuned ``TUNED_LRS[name]``, ``TUNED_WARMUP[name]``.
    """
    device = torch.device(cfg.device)
    lrs = dict(TUNED_LRS[name] if lrs is None else lrs)
    warmup = TUNED_WARMUP[name] if warmup is None else warmup
    warmup_steps = cfg.warmup_steps(warmup)
    torch.manual_seed(cfg.seed)  # identical initialization for every optimizer
    model = GPT(cfg.model).to(device)
    optimizers = build_optimizers(name, model, lrs)
    factor: Callable[[int], float] = lambda step: lr_factor(step, cfg.steps, warmup_steps)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]
    batches = TrainBatches(corpus.train, cfg.batch, cfg.model.context, cfg.seed)
    val = val_batches(corpus.val, cfg.eval_batches, cfg.batch, cfg.model.context)
    result = RunResult(name=name, lrs=lrs, warmup=warmup, seed=cfg.seed)

    def record(step: int, seconds: float) -> float:
        model.eval()
        loss = evaluate(model, val, device)
        model.train()
        result.steps.append(step)
        result.val_loss.append(loss)
        result.seconds.append(seconds)
        return loss

    trained = 0.0
    val_loss = record(0, 0.0)
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{name:>10}", disable=not progress, leave=True, dynamic_ncols=True)
    _sync(device)
    start = time.perf_counter()
    for step in bar:
        x, y = batches.next()
        with _autocast(device):
            loss = model(x.to(device), y.to(device))
        loss.backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _sync(device)
            trained += time.perf_counter() - start
            val_loss = record(step, trained)
            bar.set_postfix_str(f"loss {float(loss.detach()):.3f}  val {val_loss:.3f}", refresh=False)
            start = time.perf_counter()
        elif progress and step % 5 == 0:  # reading the loss syncs a GPU: not on every step
            bar.set_postfix_str(f"loss {float(loss.detach()):.3f}  val {val_loss:.3f}", refresh=False)
    bar.close()
    result.ms_per_step = 1000 * trained / cfg.steps
    return result


def compare(names: Sequence[str], cfg: TrainConfig, corpus: Corpus, *, progress: bool = True) -> list[RunResult]:
    """One :func:`train_one` per optimizer name, in order, with the tuned default learning rates."""
    return [train_one(name, cfg, corpus, progress=progress) for name in names]


def steps_to_reach(result: RunResult, target: float) -> int | None:
    """The first evaluated step whose validation loss is ≤ ``target`` (None if none; resolution ``eval_every``)."""
    return next((s for s, v in zip(result.steps, result.val_loss, strict=True) if v <= target), None)


def _format_lrs(lrs: dict[str, float]) -> str:
    return " / ".join(f"{v:g}" for v in lrs.values())


def format_table(results: Sequence[RunResult]) -> str:
    """Markdown table: final validation loss, steps to reach the reference's final loss (AdamW's, or the first
    run's when AdamW did not run) with the percentage of the reference's own steps, and training ms per step."""
    ref = next((r for r in results if r.name == REFERENCE), results[0])
    ref_steps = steps_to_reach(ref, ref.final)
    header = [
        "optimizer",
        "lr (matrices / AdamW)",
        "final val loss",
        f"steps to {ref.name}'s final ({ref.final:.4f})",
        "ms/step",
    ]
    rows = []
    for r in results:
        reached = steps_to_reach(r, ref.final)
        if reached is None:
            to_ref = "—"
        elif ref_steps:
            to_ref = f"{reached} ({100 * reached / ref_steps:.0f}%)"
        else:
            to_ref = str(reached)
        rows.append([r.name, _format_lrs(r.lrs), f"{r.final:.4f}", to_ref, f"{r.ms_per_step:.1f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def describe(cfg: TrainConfig, corpus: Corpus) -> str:
    """One line naming the corpus, model size and budget (printed above the table and used as the plot title)."""
    m = cfg.model
    with torch.device("meta"):  # count parameters without allocating them or touching the global RNG
        params = sum(p.numel() for p in GPT(m).parameters())
    return (
        f"{corpus.name}: {len(corpus.train):,} train / {len(corpus.val):,} val bytes; GPT {m.layers}×{m.width} "
        f"({m.heads} heads, context {m.context}, {params / 1e6:.2f}M params); {cfg.steps} steps × batch {cfg.batch}; "
        f"{cfg.device}, seed {cfg.seed}"
    )


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> Path | None:
    """Validation loss vs step and vs training time, two panels, to a PNG; None if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend switch and no display needed.
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for r in results:
        label = f"{r.name} ({r.final:.3f})"
        by_step.plot(r.steps, r.val_loss, label=label)
        by_time.plot(r.seconds, r.val_loss, label=label)
    ref = next((r for r in results if r.name == REFERENCE), results[0])
    for ax, xlabel in ((by_step, "step"), (by_time, "training time (s, evaluation excluded)")):
        ax.axhline(ref.final, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    # Skip step 0 when setting the y-range: the initial loss (≈ ln 256) would flatten the curves that matter.
    tail = [v for r in results for v in r.val_loss[1:] if math.isfinite(v)]
    if tail:
        lo, hi = min(tail), max(tail)
        by_step.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    by_step.set_ylabel("validation loss (nats/byte)")
    by_step.legend()
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_results(results: Sequence[RunResult], cfg: TrainConfig, path: Path) -> Path:
    """Every curve and the configuration as JSON, for re-plotting or quoting exact numbers."""
    payload = {"config": asdict(cfg), "runs": [asdict(r) for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
