"""Learning-rate × warmup sweep behind ``orthoptim demo``'s tuned defaults (``TUNED_LRS``, ``TUNED_WARMUP``).

    .venv/bin/python benchmarks/demo_sweep.py --threads 1 --cache /tmp/sweep.jsonl   # as recorded: 44 runs, ~1 h
    .venv/bin/python benchmarks/demo_sweep.py --confirm-seeds ""         # seed 0 only
    .venv/bin/python benchmarks/demo_sweep.py --steps 10 --quick         # a smoke run of the script (tiny model)

What it does, on the default demo configuration (GPT 4×128, context 128, batch 16, 300 steps, linear warmup then
linear decay to zero, weight decay 0; ``orthoptim.demo.train.train_one``, the demo's own training loop), picking
by final validation loss:

1. Seed 0, per optimizer: its learning rate × the warmup fraction (``LRS`` × ``WARMUPS``); hybrid and torch_muon
   sweep the hidden matrices' lr with their AdamW half at ``ADAMW_HALF_LR``. While the best point has the largest
   lr or the longest warmup tried, the next lr (× ``EDGE_LR_FACTOR``) or warmup (+ ``EDGE_WARMUP_STEP``) is run
   too (at most ``EDGE_ROUNDS`` rounds), so the chosen point is not merely the grid's edge.
2. Seed 0, hybrid and torch_muon: the AdamW half's lr at ``ADAMW_HALF_ALTERNATIVES`` around the best point of 1,
   doubled (or halved) again while the best AdamW-half lr is the largest (or smallest) tried, up to ``EDGE_ROUNDS``.
3. Confirmation (``--confirm-seeds``, default 1,2): the best ``--confirm-top`` points (default 1) per optimizer on
   seed 0 rerun on those seeds; with more than one, the one with the lowest mean over all its seeds is chosen.

The grid is staged rather than full (the AdamW half's lr came out nearly a tie in the demo's earlier sweep, of
2026-11-23) to keep it near 40 runs of 30–90 s each on two cores. Final validation loss is deterministic for a seed on
one machine, torch and thread count, so each point runs once. Wall times (ms/step) are not: they move with the
machine's load and are reported only as a rough guide.

Prints a line per run (and a progress bar over all runs) and writes a markdown report (``--out``, default
``benchmarks/demo_sweep_<date>_<device>.md``) with the date, commit, machine (CPU model and whether it has AVX-512,
from ``lscpu``) and torch version. ``--cache FILE`` keeps every finished run as one JSON line, so an interrupted
sweep restarts where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from orthoptim.demo.data import Corpus, load_corpus
from orthoptim.demo.model import GPTConfig
from orthoptim.demo.train import OPTIMIZERS, TrainConfig, train_one

WARMUPS = (0.05, 0.1, 0.2)
# Stage 1. AdamW's lrs bracket the 2026-11-23 choice (2e-3) and the 3e-3 that an independent sweep found best with
# 20% warmup; the Muon variants' matrix lrs bracket their 2026-11-23 optimum (0.03).
LRS: dict[str, tuple[float, ...]] = {
    "hybrid": (0.02, 0.03, 0.04),
    "adamw": (2e-3, 3e-3, 4e-3),
    "torch_muon": (0.02, 0.03, 0.04),
}
# Edges: when the best point so far has the largest lr tried (at its warmup), it is rerun at EDGE_LR_FACTOR × that lr;
# when it has the longest warmup tried (at its lr), at EDGE_WARMUP_STEP more; at most EDGE_ROUNDS times.
EDGE_LR_FACTOR = 1.5
EDGE_WARMUP_STEP = 0.1
EDGE_ROUNDS = 3
ADAMW_HALF_LR = 4e-3  # the 2026-11-23 default of the Muon variants' AdamW half
ADAMW_HALF_ALTERNATIVES = (2e-3, 8e-3)  # stage 2: half and twice the default
QUICK_LRS: dict[str, tuple[float, ...]] = {"hybrid": (0.03,), "adamw": (3e-3,), "torch_muon": (0.03,)}


@dataclass(frozen=True)
class Point:
    name: str
    lrs: tuple[tuple[str, float], ...]
    warmup: float

    @property
    def label(self) -> str:
        return " / ".join(f"{v:g}" for _, v in self.lrs)


@dataclass
class Run:
    point: Point
    seed: int
    final: float
    ms_per_step: float


def machine() -> str:
    """CPU model, AVX-512 (and its BF16 extension) yes/no, core count, from lscpu (or platform when it is absent)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()} (lscpu unavailable)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    cpus = fields.get("CPU(s)", "?").strip()
    avx512 = "AVX-512" + (" with BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags else "no AVX-512"
    return f"{model}, {cpus} CPUs, {avx512}"


def commit() -> str:
    """Short HEAD hash, marked ``+dirty`` when the library's source differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def edge_neighbours(p: Point, tried: Sequence[Point]) -> list[Point]:
    """The points one step past ``p`` along each axis on which ``p`` is the largest value tried."""
    lrs = dict(p.lrs)
    same_warmup = [
        dict(q.lrs)["lr"] for q in tried if q.name == p.name and q.warmup == p.warmup and q.lrs[1:] == p.lrs[1:]
    ]
    same_lr = [q.warmup for q in tried if q.name == p.name and q.lrs == p.lrs]
    out = []
    if lrs["lr"] >= max(same_warmup):
        lr = float(f"{lrs['lr'] * EDGE_LR_FACTOR:.3g}")  # 3 significant digits, so cache keys stay stable
        out.append(replace(p, lrs=tuple((k, lr if k == "lr" else v) for k, v in p.lrs)))
    if p.warmup >= max(same_lr) and p.warmup + EDGE_WARMUP_STEP < 1:
        out.append(replace(p, warmup=round(p.warmup + EDGE_WARMUP_STEP, 6)))
    return out


def lrs_of(name: str, lr: float, adamw_lr: float = ADAMW_HALF_LR) -> tuple[tuple[str, float], ...]:
    return (("lr", lr),) if name == "adamw" else (("lr", lr), ("adamw_lr", adamw_lr))


def key(p: Point, seed: int, cfg: TrainConfig) -> str:
    # The thread count is part of a run's identity: parallel reductions sum in a different order.
    config = [repr(cfg.model), cfg.steps, cfg.batch, cfg.device, torch.get_num_threads()]
    return json.dumps([p.name, p.lrs, p.warmup, seed, *config])


Cache = dict[str, dict[str, Any]]


def load_cache(path: Path | None) -> Cache:
    if path is None or not path.exists():
        return {}
    entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {e["key"]: e for e in entries}


def run_point(p: Point, seed: int, cfg: TrainConfig, corpus: Corpus, cache: Cache, cache_path: Path | None) -> Run:
    """The run of point ``p`` on ``seed``: from the cache, or trained now (and appended to the cache file)."""
    k = key(p, seed, cfg)
    if k not in cache:
        r = train_one(p.name, replace(cfg, seed=seed), corpus, lrs=dict(p.lrs), warmup=p.warmup, progress=False)
        cache[k] = {"key": k, "final": r.final, "ms_per_step": r.ms_per_step, "val_loss": r.val_loss}
        if cache_path is not None:
            with cache_path.open("a") as f:
                f.write(json.dumps(cache[k]) + "\n")
    return Run(p, seed, cache[k]["final"], cache[k]["ms_per_step"])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--confirm-seeds", default="1,2", help="seeds the best points are rerun on ('' to skip)")
    ap.add_argument("--confirm-top", type=int, default=1, help="how many of the best points per optimizer to rerun")
    ap.add_argument("--quick", action="store_true", help="one lr per optimizer on a tiny model (a smoke test)")
    ap.add_argument("--out", default=None, help="markdown report path (default: benchmarks/demo_sweep_<date>_cpu.md)")
    ap.add_argument("--cache", default=None, help="JSON-lines file of finished runs, reused when restarting")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a machine shared with other jobs, 1 thread is several times "
        "faster than oversubscribed cores; the Muon variants' losses then differ in the last bits from 2 threads",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZERS)}")
    confirm = [int(s) for s in args.confirm_seeds.split(",") if s.strip()]
    if args.confirm_top < 1:
        ap.error("--confirm-top must be ≥ 1")
    cfg = TrainConfig(steps=args.steps)
    lrs = LRS
    if args.quick:
        cfg = replace(cfg, model=GPTConfig(layers=1, width=32, heads=2, context=32), batch=8, eval_every=5)
        lrs = QUICK_LRS
    corpus = load_corpus(None, cfg.model.context)
    date = dt.date.today().isoformat()
    out = Path(args.out or f"benchmarks/demo_sweep_{date}_{cfg.device}.md")
    cache_path = Path(args.cache) if args.cache else None
    cache = load_cache(cache_path)
    env = f"{date}, commit {commit()}, {machine()}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}"
    print(env, flush=True)

    muons = [n for n in names if n != "adamw"]
    total = sum(len(lrs[n]) * len(WARMUPS) for n in names) + len(ADAMW_HALF_ALTERNATIVES) * len(muons)
    total += args.confirm_top * len(names) * len(confirm)
    bar = tqdm(total=total, desc="demo sweep", unit="run", dynamic_ncols=True)
    runs: dict[Point, list[Run]] = {}  # per point, its runs in seed order (seed 0 first)

    def run(p: Point, seed: int) -> None:
        r = run_point(p, seed, cfg, corpus, cache, cache_path)
        runs.setdefault(p, []).append(r)
        bar.write(f"{p.name:>10}  lr {p.label:<13} warmup {p.warmup:<5g} seed {seed}  final {r.final:.4f}")
        bar.update()

    def best(n: str) -> list[Point]:
        return sorted((p for p in runs if p.name == n), key=lambda p: runs[p][0].final)

    for n in names:  # stage 1
        for lr in lrs[n]:
            for w in WARMUPS:
                run(Point(n, lrs_of(n, lr), w), 0)
        for _ in range(EDGE_ROUNDS):  # a best point on the grid's upper edge: step past it before calling it best
            extra = [p for p in edge_neighbours(best(n)[0], list(runs)) if p not in runs]
            if not extra:
                break
            bar.total += len(extra)
            for p in extra:
                run(p, 0)
    for n in muons:  # stage 2
        first = best(n)[0]
        lr = dict(first.lrs)["lr"]
        for a in ADAMW_HALF_ALTERNATIVES:
            run(Point(n, lrs_of(n, lr, a), first.warmup), 0)
        for _ in range(EDGE_ROUNDS):  # the AdamW half's best lr on an edge of those tried: double (or halve) it
            line = [p for p in runs if p.name == n and p.warmup == first.warmup and dict(p.lrs)["lr"] == lr]
            halves = sorted(dict(p.lrs)["adamw_lr"] for p in line)
            half = dict(min(line, key=lambda p: runs[p][0].final).lrs)["adamw_lr"]
            if half not in (halves[0], halves[-1]):
                break
            bar.total += 1
            run(Point(n, lrs_of(n, lr, float(f"{half * 2 if half == halves[-1] else half / 2:.3g}")), first.warmup), 0)
    chosen: dict[str, Point] = {}
    for n in names:  # stage 3
        top = best(n)[: args.confirm_top]
        for p in top:
            for seed in confirm:
                run(p, seed)
        chosen[n] = min(top, key=lambda p: statistics.fmean(r.final for r in runs[p]))
    bar.close()

    rows = [
        [
            p.name,
            p.label,
            f"{p.warmup:g}",
            f"{rs[0].final:.4f}" + (" **" if p == chosen[p.name] else ""),
            f"{rs[0].ms_per_step:.0f}",
        ]
        for p, rs in runs.items()
    ]
    grid_md = table(["optimizer", "lr (matrices / AdamW)", "warmup", "final val loss, seed 0", "ms/step"], rows)
    seeds = [0, *confirm]
    conf_rows = []
    for n in names:
        for p in best(n)[: args.confirm_top]:
            finals = [r.final for r in runs[p]]
            per_seed = " / ".join(f"{v:.4f}" for v in finals)
            mark = "chosen" if p == chosen[n] else ""
            conf_rows.append([n, p.label, f"{p.warmup:g}", per_seed, f"{statistics.fmean(finals):.4f}", mark])
    conf_md = table(
        [
            "optimizer",
            "lr (matrices / AdamW)",
            "warmup",
            f"final val loss, seeds {', '.join(map(str, seeds))}",
            "mean",
            "",
        ],
        conf_rows,
    )
    m = cfg.model
    command = " ".join(["python benchmarks/demo_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    confirm_text = ", ".join(map(str, confirm)) or "(none)"
    report = f"""# `orthoptim demo` learning-rate × warmup sweep — {cfg.device}

{env}. `{command}`

Config: GPT {m.layers}×{m.width} ({m.heads} heads, context {m.context}), batch {cfg.batch}, {cfg.steps} steps, linear
warmup (the fraction below) then linear decay to zero, weight decay 0, validation every {cfg.eval_every} steps on
fixed windows. Final validation loss in nats/byte, deterministic for a seed on this machine, torch and thread
count. ms/step is training time only and noisy (a 2-core machine shared with other jobs while this ran): a rough
guide, not a measurement to quote.
Stages: lr × warmup (the Muon variants' AdamW half at {ADAMW_HALF_LR:g}), stepping past the best point while it
lies on the largest lr (× {EDGE_LR_FACTOR:g}) or warmup (+ {EDGE_WARMUP_STEP:g}) tried; then the AdamW half at
{" and ".join(f"{a:g}" for a in ADAMW_HALF_ALTERNATIVES)} around the best point (doubled or halved again while
its best is an edge); then the best {args.confirm_top} per optimizer on seeds {confirm_text}.

## Seed 0, every point run (** = chosen default)

{grid_md}

## The best per optimizer on seed 0, rerun on the other seeds (chosen: lowest mean)

{conf_md}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print()
    print(grid_md)
    print()
    print(conf_md)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
