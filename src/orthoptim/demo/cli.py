"""``orthoptim demo``: the argparse subcommand and its runner (wired into ``orthoptim.cli`` by the main parser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..timing import resolve_device
from .data import load_corpus
from .model import GPTConfig
from .train import (
    KNOWN_OPTIMIZERS,
    OPTIMIZERS,
    REFERENCE,
    TUNED_WARMUP,
    TrainConfig,
    check_warmup,
    compare,
    describe,
    format_table,
    plot_curves,
    write_results,
)

_DEFAULT_MODEL = GPTConfig()
_DEFAULT_TRAIN = TrainConfig()


def add_demo_parser(subparsers: Any) -> None:
    """Add the ``demo`` subcommand and its flags to an argparse ``add_subparsers()`` object.

    Flags are plain strings and ints here; their meaning is checked in :func:`run_demo`, so that every bad value
    gets one clear line on stderr rather than argparse's usage block.
    """
    p = subparsers.add_parser(
        "demo",
        help="train a small GPT on a built-in corpus with Hybrid, AdamW and torch.optim.Muon; table + plot",
        description=(
            "Train a small byte-level GPT once per optimizer (same init, data order and step budget) on CPython's "
            "pydoc help texts (or --data FILE), then print a table of validation losses and write a PNG of the "
            "curves. Learning rates and warmup fractions are per-optimizer tuned defaults "
            "(orthoptim.demo.train.TUNED_LRS, TUNED_WARMUP)."
        ),
    )
    p.add_argument(
        "--steps", type=int, default=_DEFAULT_TRAIN.steps, help="optimizer steps per run (default: %(default)s)"
    )
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated, from {', '.join(KNOWN_OPTIMIZERS)} (default: %(default)s; hybrid_qkv and "
        "hybrid_heads: hybrid with the fused qkv weight orthogonalized as q, k, v blocks or per head)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--seed", type=int, default=_DEFAULT_TRAIN.seed, help="init and data-order seed (default: %(default)s)"
    )
    p.add_argument(
        "--seeds",
        default="1",
        help="run every optimizer on seeds SEED .. SEED+N-1 and report mean and min–max over them (default: 1)",
    )
    tuned = ", ".join(f"{k} {v:g}" for k, v in TUNED_WARMUP.items())
    p.add_argument(
        "--warmup",
        default=None,
        help=f"warmup fraction of the steps: one value for every optimizer, or NAME=FRACTION,... for some "
        f"(default: tuned per optimizer: {tuned})",
    )
    p.add_argument(
        "--out", default="orthoptim-demo", help="folder for the plot and results.json (default: %(default)s)"
    )
    p.add_argument("--data", default=None, help="train on this file's bytes instead of the built-in corpus")
    p.add_argument(
        "--layers", type=int, default=_DEFAULT_MODEL.layers, help="transformer blocks (default: %(default)s)"
    )
    p.add_argument("--width", type=int, default=_DEFAULT_MODEL.width, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=_DEFAULT_MODEL.heads, help="attention heads (default: %(default)s)")
    p.add_argument("--context", type=int, default=_DEFAULT_MODEL.context, help="context bytes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=_DEFAULT_TRAIN.batch, help="sequences per step (default: %(default)s)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=_DEFAULT_TRAIN.eval_every,
        help="steps between evaluations (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _optimizer_names(text: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))  # order kept, repeats dropped
    if not names:
        raise ValueError(f"--optimizers is empty; choose from {', '.join(OPTIMIZERS)}")
    unknown = [n for n in names if n not in KNOWN_OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer {unknown[0]!r} in --optimizers; choose from {', '.join(KNOWN_OPTIMIZERS)}")
    return names


def _seeds(text: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        raise ValueError(f"--seeds must be a whole number ≥ 1, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--seeds must be a whole number ≥ 1, got {n}")
    return n


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--warmup: {text.strip()!r} is not a number (a fraction of the steps in [0, 1))") from None
    check_warmup(value)
    return value


def _warmups(text: str | None, names: list[str]) -> dict[str, float]:
    """``--warmup``: none (the tuned defaults), one fraction for every optimizer, or ``NAME=FRACTION`` pairs."""
    if text is None:
        return {}
    if "=" not in text:
        value = _fraction(text)
        return dict.fromkeys(names, value)
    warmups: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, fraction = (x.strip() for x in item.partition("="))
        if not sep:
            raise ValueError(f"--warmup: {item!r} is not NAME=FRACTION (or pass one fraction for all)")
        if name not in KNOWN_OPTIMIZERS:
            raise ValueError(f"--warmup: unknown optimizer {name!r}; choose from {', '.join(KNOWN_OPTIMIZERS)}")
        warmups[name] = _fraction(fraction)
    return warmups


def run_demo(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args`` (from :func:`add_demo_parser`); return the exit code.

    Bad input (unknown optimizer, steps < 1, seeds not a whole number ≥ 1, a warmup outside [0, 1), a missing,
    empty or too small ``--data`` file, an impossible model size, an unusable device or output folder) prints one
    line on stderr and returns 2.
    """
    try:
        names = _optimizer_names(args.optimizers)
        warmups = _warmups(args.warmup, names)
        model = GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context)
        cfg = TrainConfig(
            model=model,
            steps=args.steps,
            batch=args.batch,
            eval_every=args.eval_every,
            seed=args.seed,
            seeds=_seeds(args.seeds),
            device=str(resolve_device(args.device)),
        )
        corpus = load_corpus(args.data, model.context)
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {args.out}: cannot create the folder ({exc.strerror or exc})") from None
    except ValueError as exc:
        print(f"orthoptim demo: {exc}", file=sys.stderr)
        return 2

    title = describe(cfg, corpus)
    print(title, flush=True)
    results = compare(names, cfg, corpus, warmups=warmups, progress=not args.no_progress)
    print()
    print(format_table(results))
    if REFERENCE not in names:
        print(f"({REFERENCE} did not run: steps are measured against {names[0]}'s final loss)")
    print(f"(steps to reach: first evaluation at or below the loss, every {cfg.eval_every} steps)")
    if cfg.seeds > 1:
        print(
            f"({cfg.seeds} seeds: mean (min–max) over the seeds; steps to reach are counted per seed against that "
            "seed's reference run, then averaged)"
        )
    write_results(results, cfg, out / "results.json")
    png = plot_curves(results, out / "demo.png", title)
    if png is None:
        print("matplotlib is not installed, so no plot was drawn (pip install 'orthoptim[plot]')")
    else:
        print(f"plot: {png}")
    return 0
