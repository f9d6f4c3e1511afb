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
  optimizers stepped together;
- on request (``SPLIT_VARIANTS``): ``hybrid_qkv`` and ``hybrid_heads``, ``hybrid`` with the fused ``qkv`` weight
  orthogonalized as q, k and v blocks (``split=3``) or per head (``split=3·heads``), at hybrid's lrs and warmup.

The learning rates (``TUNED_LRS``) and warmup fractions (``TUNED_WARMUP``) are per-optimizer tuned defaults,
chosen once by the sweep recorded next to them; they are not swept at run time. Pass ``lrs=`` / ``warmup=`` to
:func:`train_one` (or ``warmups=`` to :func:`compare`) to try others.

With ``TrainConfig.seeds = N`` every optimizer runs on seeds ``seed .. seed + N - 1``; each seed fixes the
initialization and data order shared by all optimizers. "Steps to reach the reference's final loss" is measured per
seed against that seed's reference run, then aggregated (:func:`summarize`): mean and min–max over the seeds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

import orthoptim

from .data import Corpus, TrainBatches, val_batches
from .model import GPT, GPTConfig

OPTIMIZERS: tuple[str, ...] = ("hybrid", "adamw", "torch_muon")
#: Hybrid with the fused ``qkv`` weight cut into blocks (``split=``), run on request (``--optimizers``), with
#: hybrid's learning rates and warmup: q, k and v each orthogonalized on its own, or each head's q, k and v.
SPLIT_VARIANTS: dict[str, str] = {"hybrid_qkv": "q, k, v", "hybrid_heads": "per head"}
KNOWN_OPTIMIZERS: tuple[str, ...] = (*OPTIMIZERS, *SPLIT_VARIANTS)
REFERENCE = "adamw"  # "steps to reach" is measured against this optimizer's final validation loss
# Every AdamW (alone or beside Muon) uses the same betas: beta2 = 0.95 as in karpathy/nanoGPT train.py, Hybrid too.
ADAM_BETAS = (0.9, 0.95)

# Tuned defaults, per optimizer: lr for the hidden matrices ("lr"), lr for AdamW's parameters ("adamw_lr"; plain
# AdamW has one lr for everything) and the warmup fraction. Each optimizer gets its own because they differ: AdamW
# gains from a long warmup at this size (2.116 with the earlier 2e-3 and 5%, 2.051 with 4e-3 and 30%), the Muon
# variants much less (≤ 0.04 nats/byte between 5% and 20% at their best lr). A baseline tuned less than the
# optimizers compared with it would flatter them.
# Chosen by benchmarks/demo_sweep.py on 2026-12-07 (report: benchmarks/demo_sweep_2026-12-07_cpu.md): the default
# demo (GPT 4×128, batch 16, 300 steps), lr × warmup on seed 0, stepping past the grid's edges, then the AdamW
# half's lr, the best point confirmed on seeds 1–2. Final validation loss (nats/byte), seed 0 unless marked:
#   adamw       lr 2e-3 / 3e-3 / 4e-3 at warmup 5%: 2.116 / 2.316 / 2.547; at 20%: 2.085 / 2.062 / 2.062;
#               4e-3 at 30%: 2.051* (seeds 1, 2: 2.062, 2.077); 6e-3 at 30%: 2.078; 4e-3 at 40%: 2.076
#   hybrid      lr 0.02 / 0.03 / 0.04 at 20% (adamw_lr 4e-3): 1.516 / 1.462 / 1.479; 0.03 at 5%: 1.465, 30%: 1.489;
#               adamw_lr 2e-3 / 8e-3 / 1.6e-2 at 0.03, 20%: 1.480 / 1.459* / 1.497 (seeds 1, 2: 1.486, 1.497)
#   torch_muon  lr 0.02 / 0.03 / 0.04 / 0.06 at 10% (adamw_lr 4e-3): 1.568 / 1.495 / 1.459* / 1.726; 0.04 at 5%:
#               1.498, 20%: 1.487; adamw_lr 2e-3 / 8e-3: 1.513 / 1.517 (seeds 1, 2 at the chosen: 1.524, 1.477)
# (* = chosen.) The sweep ran with 1 CPU thread; the demo's default 2 threads sum some reductions in another order,
# so its losses differ from these in the last digits, more for the Muon variants (AdamW on seed 0: 2.0510 here,
# 2.0509 with 2 threads; hybrid: 1.4589 here, 1.4705).
TUNED_LRS: dict[str, dict[str, float]] = {
    "hybrid": {"lr": 0.03, "adamw_lr": 8e-3},
    "adamw": {"lr": 4e-3},
    "torch_muon": {"lr": 0.04, "adamw_lr": 4e-3},
}
# Fraction of the steps spent in linear warmup, per optimizer (then linear decay to zero); same sweep.
TUNED_WARMUP: dict[str, float] = {"hybrid": 0.2, "adamw": 0.3, "torch_muon": 0.1}
for _variant in SPLIT_VARIANTS:  # not tuned on their own: the comparison holds everything but the split fixed
    TUNED_LRS[_variant], TUNED_WARMUP[_variant] = TUNED_LRS["hybrid"], TUNED_WARMUP["hybrid"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a comparison besides the optimizer (defaults: the ``orthoptim demo`` size)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    steps: int = 300
    batch: int = 16
    eval_every: int = 10
    eval_batches: int = 4  # fixed validation windows: eval_batches × batch of them
    seed: int = 0
    seeds: int = 1  # every optimizer runs on seeds seed .. seed + seeds - 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"--seeds must be a whole number ≥ 1, got {self.seeds!r}")
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
    if name == "hybrid" or name in SPLIT_VARIANTS:
        heads = model.cfg.heads if isinstance(model, GPT) else 1
        splits: dict[str, int | dict[str, Any]] = {
            "hybrid": 1,
            "hybrid_qkv": {"qkv": 3},
            "hybrid_heads": {"qkv": 3 * heads},
        }
        split = splits[name]
        return [orthoptim.Hybrid(model, lr=lrs["lr"], adamw_lr=lrs["adamw_lr"], adamw_betas=ADAM_BETAS, split=split)]
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lrs["lr"], betas=ADAM_BETAS, weight_decay=0.0)]
    if name == "torch_muon":
        matrices, others = orthoptim.split_params(model)
        return [
            torch.optim.Muon(matrices, lr=lrs["lr"], weight_decay=0.0),
            torch.optim.AdamW(others, lr=lrs["adamw_lr"], betas=ADAM_BETAS, weight_decay=0.0),
        ]
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(KNOWN_OPTIMIZERS)}")


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
    label: str | None = None,
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
    bar = tqdm(
        range(1, cfg.steps + 1), desc=f"{label or name:>10}", disable=not progress, leave=True, dynamic_ncols=True
    )
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


def compare(
    names: Sequence[str],
    cfg: TrainConfig,
    corpus: Corpus,
    *,
    warmups: Mapping[str, float] | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """One :func:`train_one` per seed (``cfg.seed`` .. ``cfg.seed + cfg.seeds - 1``) and optimizer name, seed by
    seed, with the tuned learning rates and the tuned warmup unless ``warmups`` names the optimizer."""
    warmups = warmups or {}
    results = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        run_cfg = replace(cfg, seed=seed, seeds=1)
        for name in names:
            label = f"{name} s{seed}" if cfg.seeds > 1 else name
            results.append(train_one(name, run_cfg, corpus, warmup=warmups.get(name), progress=progress, label=label))
    return results


def steps_to_reach(result: RunResult, target: float) -> int | None:
    """The first evaluated step whose validation loss is ≤ ``target`` (None if none; resolution ``eval_every``)."""
    return next((s for s, v in zip(result.steps, result.val_loss, strict=True) if v <= target), None)


@dataclass
class Summary:
    """One optimizer over the seeds: per-seed numbers (in seed order) from which the table's mean and range come."""

    name: str
    lrs: dict[str, float]
    warmup: float
    reference: str  # the optimizer whose final loss the "steps to reach" columns aim at
    seeds: list[int] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    reached: list[int | None] = field(default_factory=list)  # first step at or below that seed's reference final
    reference_steps: list[int | None] = field(default_factory=list)  # the same for the reference run itself
    ms_per_step: list[float] = field(default_factory=list)

    @property
    def fraction(self) -> list[float | None]:
        """Per seed: steps to reach the reference's final loss over the reference's own steps (None: not reached)."""
        return [
            None if r is None or not ref else r / ref for r, ref in zip(self.reached, self.reference_steps, strict=True)
        ]


def reference_name(names: Sequence[str]) -> str:
    """AdamW when it ran, else the first optimizer."""
    return REFERENCE if REFERENCE in names else names[0]


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """Group per-seed runs by optimizer (first-seen order); "steps to reach" compares each run with its own seed's
    reference run."""
    names = list(dict.fromkeys(r.name for r in results))
    ref_name = reference_name(names)
    refs = {r.seed: r for r in results if r.name == ref_name}
    summaries: dict[str, Summary] = {}
    for r in results:
        s = summaries.setdefault(r.name, Summary(r.name, r.lrs, r.warmup, ref_name))
        ref = refs[r.seed]
        s.seeds.append(r.seed)
        s.final.append(r.final)
        s.reached.append(steps_to_reach(r, ref.final))
        s.reference_steps.append(steps_to_reach(ref, ref.final))
        s.ms_per_step.append(r.ms_per_step)
    return list(summaries.values())


def spread(values: Sequence[float], fmt: str, unit: str = "") -> str:
    """``mean`` for one value, ``mean (min–max)`` for several, each formatted with ``fmt`` and followed by ``unit``."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}}{unit}"
    return f"{mean:{fmt}}{unit} ({min(values):{fmt}}–{max(values):{fmt}}{unit})"


def _format_lrs(lrs: dict[str, float]) -> str:
    return " / ".join(f"{v:g}" for v in lrs.values())


def format_table(results: Sequence[RunResult]) -> str:
    """Markdown table: final validation loss, steps to reach the reference's final loss (AdamW's, or the first
    run's when AdamW did not run) as a share of the reference's own steps, and training ms per step.

    One seed: the values themselves, steps as ``110 (37%)``. Several seeds: ``mean (min–max)`` over the seeds,
    the share computed per seed against that seed's reference run before aggregating.
    """
    summaries = summarize(results)
    ref = next(s for s in summaries if s.name == summaries[0].reference)
    n = len(ref.seeds)
    if n == 1:
        to_ref_header = f"steps to {ref.name}'s final ({ref.final[0]:.4f})"
    else:
        to_ref_header = f"steps to {ref.name}'s final, % of {ref.name}'s steps"
    header = ["optimizer", "lr (matrices / AdamW)", "warmup", "final val loss", to_ref_header, "ms/step"]
    rows = []
    for s in summaries:
        fractions = [f for f in s.fraction if f is not None]
        if n == 1:
            reached, ref_steps = s.reached[0], s.reference_steps[0]
            if reached is None:
                to_ref = "—"
            elif ref_steps:
                to_ref = f"{reached} ({100 * reached / ref_steps:.0f}%)"
            else:
                to_ref = str(reached)
        elif not fractions:
            to_ref = "—"
        else:
            to_ref = spread([100 * f for f in fractions], ".0f", "%")
            if len(fractions) < n:  # the mean is over the seeds that got there: say how many did
                to_ref += f", reached on {len(fractions)} of {n} seeds"
        rows.append(
            [
                s.name,
                _format_lrs(s.lrs),
                f"{100 * s.warmup:g}%",
                spread(s.final, ".4f"),
                to_ref,
                spread(s.ms_per_step, ".1f"),
            ]
        )
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
        f"{cfg.device}, {seed_range(cfg)}"
    )


def seed_range(cfg: TrainConfig) -> str:
    """``seed 0`` or ``seeds 0–2``."""
    return f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}–{cfg.seed + cfg.seeds - 1}"


def _curve_band(runs: Sequence[RunResult]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max validation loss at each evaluated step over ``runs`` (same steps), and the mean time."""
    losses = list(zip(*(r.val_loss for r in runs), strict=True))
    times = list(zip(*(r.seconds for r in runs), strict=True))
    mean = [math.fsum(v) / len(v) for v in losses]
    return mean, [min(v) for v in losses], [max(v) for v in losses], [math.fsum(t) / len(t) for t in times]


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> Path | None:
    """Validation loss vs step and vs training time, two panels, to a PNG; None if matplotlib is missing.

    With several seeds each optimizer is drawn as its mean curve over the seeds with a shaded min–max band; the
    time axis is the mean training time at each evaluated step.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend switch and no display needed.
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.name, []).append(r)
    ref_final = math.nan
    tail: list[float] = []
    for name, runs in groups.items():
        mean, lo, hi, seconds = _curve_band(runs)
        finals = math.fsum(r.final for r in runs) / len(runs)
        label = f"{name} ({finals:.3f})" if len(runs) == 1 else f"{name} (mean {finals:.3f}, {len(runs)} seeds)"
        (line,) = by_step.plot(runs[0].steps, mean, label=label)
        by_time.plot(seconds, mean, label=label, color=line.get_color())
        if len(runs) > 1:
            by_step.fill_between(runs[0].steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            by_time.fill_between(seconds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if name == reference_name(list(groups)):
            ref_final = finals
        tail += [v for v in hi[1:] + lo[1:] if math.isfinite(v)]
    for ax, xlabel in ((by_step, "step"), (by_time, "training time (s, evaluation excluded)")):
        if math.isfinite(ref_final):
            ax.axhline(ref_final, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    # Skip step 0 when setting the y-range: the initial loss (≈ ln 256) would flatten the curves that matter.
    if tail:
        lo_y, hi_y = min(tail), max(tail)
        by_step.set_ylim(lo_y - 0.05 * (hi_y - lo_y + 1e-9), hi_y + 0.05 * (hi_y - lo_y + 1e-9))
    ylabel = "validation loss (nats/byte)"
    if any(len(runs) > 1 for runs in groups.values()):
        ylabel += "; mean over seeds, band min–max"
    by_step.set_ylabel(ylabel)
    if groups:
        by_step.legend()
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_results(results: Sequence[RunResult], cfg: TrainConfig, path: Path) -> Path:
    """Every per-seed curve, the per-optimizer summary over the seeds and the configuration as JSON."""
    summary = []
    for s in summarize(results):
        fractions = [f for f in s.fraction if f is not None]
        summary.append(
            {
                **asdict(s),
                "fraction_of_reference_steps": s.fraction,
                "final_mean": math.fsum(s.final) / len(s.final),
                "final_min": min(s.final),
                "final_max": max(s.final),
                "fraction_mean": math.fsum(fractions) / len(fractions) if fractions else None,
                "fraction_min": min(fractions, default=None),
                "fraction_max": max(fractions, default=None),
                "ms_per_step_mean": math.fsum(s.ms_per_step) / len(s.ms_per_step),
            }
        )
    payload = {"config": asdict(cfg), "runs": [asdict(r) for r in results], "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
