"""Command line: ``orthoptim demo | doctor | bench | coeffs`` (also ``python -m orthoptim``). Uses the public API
only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .timing import resolve_device


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            m, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected MxN, e.g. 256x1024") from None
        if m < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: both sides must be ≥ 1")
        shapes.append((m, n))
    return shapes


def _parse_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no names in {text!r}: expected a comma-separated list")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthoptim", description="orthogonalized optimizers and their polar engine")
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo.cli import add_demo_parser

    add_demo_parser(sub)
    doc = sub.add_parser(
        "doctor",
        help="scale sweep 1e-38..1e38, accuracy vs float64 SVD and speed, per schedule and for torch.optim.Muon",
    )
    doc.add_argument(
        "--shapes", type=_parse_shapes, default=None, help="comma-separated MxN (default: 256x256,128x512,768x768)"
    )
    doc.add_argument(
        "--schedules", type=_parse_names, default=None, help="comma-separated names (default: all shipped)"
    )
    doc.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    doc.add_argument("--compute-dtype", default=None, help="float32, bfloat16, float16, float64 (default: auto)")
    doc.add_argument(
        "--normalization", default="schatten4", choices=("frobenius", "schatten4", "aol"), help="(default: schatten4)"
    )
    doc.add_argument("--repeats", type=int, default=5, help="timed calls per routine (median reported)")
    doc.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    be = sub.add_parser(
        "bench", help="ms per optimizer step vs torch.optim.Muon on GPT-2 small's matrices (or yours), same process"
    )
    be.add_argument("--shapes", type=_parse_shapes, default=None, help="comma-separated MxN (default: GPT-2 small's 4)")
    be.add_argument(
        "--layers",
        type=int,
        default=None,
        help="copies of the shape list (default: 12 on CUDA, 2 elsewhere; 1 with --shapes)",
    )
    be.add_argument("--optimizers", type=_parse_names, default=None, help="comma-separated (default: see --list)")
    be.add_argument("--list", action="store_true", help="list the optimizers the bench can time, and exit")
    be.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    be.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    be.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer after the first")
    be.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer, taken in turns")
    be.add_argument("--json", default=None, help="also write the report (every time) as JSON here")
    be.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    co = sub.add_parser("coeffs", help="design a Newton–Schulz schedule, print it as Python, optionally plot it")
    co.add_argument("--steps", type=int, required=True, help="number of steps")
    co.add_argument("--lower", type=float, default=1e-3, help="smallest σ (after normalization) to bring to ~1")
    co.add_argument("--degree", type=int, default=5, choices=(3, 5), help="odd polynomial degree per step")
    co.add_argument("--safety", type=float, default=0.0, help="Polar Express safety (e.g. 0.02)")
    co.add_argument("--cushion", type=float, default=0.0, help="Polar Express cushion (e.g. 0.02)")
    co.add_argument("--plot", default=None, help="write a PNG of the composite vs the named schedules here")
    co.add_argument(
        "--compare", type=_parse_names, default=["jordan", "polar_express", "orthoptim"], help="schedules to plot"
    )
    ex = sub.add_parser(
        "explain",
        help="per parameter of a model: orientation, algorithm, row blocks, lr factor and why (orthoptim.explain)",
    )
    ex.add_argument(
        "model",
        help="a callable that builds the model, as module.path:name (a class or function called with no arguments)",
    )
    ex.add_argument(
        "--split",
        default=None,
        help='"auto" (fused projections cut into their parts), a block count (3), block sizes (32+16+16), or '
        "name=count/sizes pairs, comma-separated (c_attn=3,qkv_proj=32+16+16): Hybrid's split=",
    )
    ex.add_argument("--row-norm", action="store_true", help="NorMuon on the matrices (Hybrid's row_norm=True)")
    return parser


def _explain(args: argparse.Namespace) -> int:
    """Build the model from its import path and print ``orthoptim.explain``'s table for ``Hybrid(model)``."""
    import importlib

    from . import explain

    target = args.model
    if ":" not in target:
        raise ValueError(f"model {target!r}: give module.path:name, e.g. torchvision.models:resnet18")
    module_name, _, attr = target.partition(":")
    # The current directory first, as `python -m` has it: the installed console script's sys.path[0] is its own
    # bin directory, so a user's `mymodels.py` next to them would not import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {target!r}: cannot import {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {target!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model {target!r}: {attr!r} is not callable")
    model = factory()
    options: dict[str, Any] = {"row_norm": args.row_norm}
    if args.split is not None:
        options["split"] = parse_split(args.split)
    print(explain(model, **options))
    return 0


def parse_split(text: str) -> int | tuple[int, ...] | str | dict[str, int | tuple[int, ...]]:
    """``--split``'s value as Hybrid's ``split=``: ``auto``; ``3`` (equal blocks); ``32+16+16`` (block sizes);
    ``c_attn=3,qkv_proj=32+16+16`` (a name → count or sizes mapping)."""

    def one(spec: str, what: str) -> int | tuple[int, ...]:
        parts = spec.split("+")
        if not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"--split {what}{spec!r}: give a block count (3) or block sizes joined by '+' (32+16+16)")
        sizes = tuple(int(part) for part in parts)
        return sizes if len(sizes) > 1 else sizes[0]

    text = text.strip()
    if text == "auto":
        return "auto"
    if "=" not in text:
        return one(text, "")
    mapping: dict[str, int | tuple[int, ...]] = {}
    for entry in text.split(","):
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--split: entry {entry!r} is not name=count or name=sizes (e.g. c_attn=3)")
        if name in mapping:
            raise ValueError(f"--split: {name!r} is given twice")
        mapping[name] = one(spec.strip(), f"{name}=")
    return mapping


def _failed(command: str, exc: Exception) -> int:
    """A command's expected failure (bad input, missing device or folder): one line on stderr, exit code 2."""
    print(f"orthoptim {command}: {exc}", file=sys.stderr)
    return 2


def _coeffs(args: argparse.Namespace) -> int:
    from . import design_schedule, get_schedule, validate_schedule
    from .polar.schedules import STEP_ROUNDING_BY_PRECISION

    sched = design_schedule(
        args.steps, args.lower, degree=args.degree, safety=args.safety, cushion=args.cushion, name="designed"
    )
    report = validate_schedule(sched)
    print(f"# orthoptim coeffs --steps {args.steps} --lower {args.lower:g} --degree {args.degree}"
          f" --safety {args.safety:g} --cushion {args.cushion:g}")  # fmt: skip
    print(f"# {report.describe()}; input margin {sched.margin:g}")
    usable = [p for p, d in STEP_ROUNDING_BY_PRECISION.items() if validate_schedule(sched, step_rounding=d).ok]
    exact = validate_schedule(sched, step_rounding=0.0)
    if usable:
        print(f"# usable in compute dtypes: {', '.join(usable)}")
    elif not exact.ok:
        print(
            "# WARNING: refused in every compute dtype (orthogonalize and the optimizers would raise): even in "
            f"exact arithmetic the composite leaves (0, {exact.bound:g}]: {exact.describe()}"
        )
    else:
        print(
            "# WARNING: refused in every compute dtype (orthogonalize and the optimizers would raise): rounding "
            "pushes σ past the range the polynomials were designed for; add a --safety margin (e.g. 0.02)"
        )
    print("coefficients = [")
    for a, b, c in sched.coefficients:
        print(f"    ({a!r}, {b!r}, {c!r}),")
    print("]")
    if args.plot:
        from .plots import plot_schedules

        named = {f"designed ℓ={args.lower:g}": sched, **{n: get_schedule(n) for n in args.compare}}
        print(f"# plot: {plot_schedules(named, args.plot, lower=min(1e-4, args.lower / 10))}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import CANDIDATES, DEFAULT_CANDIDATES, format_bench, gpt2_small_shapes, run_bench

    if args.list:
        for name, candidate in CANDIDATES.items():
            print(f"{name:16} {candidate.label}{' (default)' if name in DEFAULT_CANDIDATES else ''}")
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        return _failed("bench", exc)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"orthoptim bench: --json {args.json}: its folder does not exist", file=sys.stderr)
        return 2
    layers = args.layers if args.layers is not None else (1 if args.shapes else 12 if device.type == "cuda" else 2)
    if layers < 1:
        print(f"orthoptim bench: --layers must be ≥ 1, got {layers}", file=sys.stderr)
        return 2
    shapes = args.shapes * layers if args.shapes else gpt2_small_shapes(layers)
    names = args.optimizers or [*DEFAULT_CANDIDATES, *(["muon_graph"] if device.type == "cuda" else [])]
    try:
        report = run_bench(
            shapes,
            names,
            device=device,
            dtype=getattr(torch, args.dtype),
            warmup=args.warmup,
            repeats=args.repeats,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        return _failed("bench", exc)
    print(format_bench(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
        print(f"# report: {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo.cli import run_demo

        return run_demo(args)
    if args.command == "coeffs":
        try:
            return _coeffs(args)
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            return _failed("coeffs", exc)
    if args.command == "bench":
        return _bench(args)
    if args.command == "explain":
        try:
            return _explain(args)
        except (ValueError, TypeError, RuntimeError) as exc:
            return _failed("explain", exc)
    if args.command == "doctor":
        from .doctor import DEFAULT_SHAPES, format_report, run_doctor

        if args.repeats < 1:
            print("orthoptim doctor: --repeats must be ≥ 1", file=sys.stderr)
            return 2
        try:
            report = run_doctor(
                args.shapes or DEFAULT_SHAPES,
                args.schedules,
                device=resolve_device(args.device),
                compute_dtype=args.compute_dtype,
                normalization=args.normalization,
                repeats=args.repeats,
                progress=not args.no_progress,
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            return _failed("doctor", exc)
        print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
