"""Accuracy per matmul: every schedule × normalization × step count against float64 SVD, in one run.

    .venv/bin/python benchmarks/accuracy.py [--size 2048] [--dtype bfloat16] [--steps 4,5,6,7,8]
                                            [--spectra harmonic,sqrt,exponential,gaussian] [--out accuracy.png]

For each spectrum a size×size matrix G = U diag(σ) Vᵀ is built in float64 from random orthogonal U, V (gaussian:
a plain gaussian matrix and its SVD). Each configuration orthogonalizes G (float32 input, the chosen compute
dtype) and the gains gᵢ = uᵢᵀ O vᵢ are measured for σᵢ ≥ floor·σmax (1 = exact polar factor). torch.optim.Muon's
built-in routine runs beside it. Prints one markdown table per spectrum (sorted by matmuls, then worst |g − 1|)
and writes a PNG: worst |g − 1| against matmuls for the first spectrum.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import orthoptim
from orthoptim.polar import get_schedule, list_schedules

SPECTRA = ("harmonic", "sqrt", "exponential", "gaussian")


def build(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, U, S, V) in float64 with G = U diag(S) Vᵀ."""
    if kind == "gaussian":
        G = torch.randn(n, n, dtype=torch.float64, generator=gen)
        U, S, Vh = torch.linalg.svd(G)
        return G, U, S, Vh.T
    i = torch.arange(1, n + 1, dtype=torch.float64)
    S = {"harmonic": 1.0 / i, "sqrt": i.rsqrt(), "exponential": torch.exp(-i * (math.log(1e4) / n))}[kind]
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (U * S) @ V.T, U, S, V


@dataclass
class Row:
    routine: str
    normalization: str
    steps: int
    matmuls: int
    lo: float
    hi: float

    @property
    def worst(self) -> float:
        return max(1.0 - self.lo, self.hi - 1.0)


def torch_muon(G: torch.Tensor) -> torch.Tensor | None:
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    return _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", default="4,5,6,7,8")
    parser.add_argument("--spectra", default=",".join(SPECTRA))
    parser.add_argument("--schedules", default=",".join(list_schedules()))
    parser.add_argument("--normalizations", default="frobenius,schatten4,aol")
    parser.add_argument("--floor", type=float, default=1e-3, help="count gains for σ ≥ floor·σmax")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="accuracy.png")
    args = parser.parse_args()
    steps_list = [int(s) for s in args.steps.split(",")]
    spectra = args.spectra.split(",")
    schedules = args.schedules.split(",")
    normalizations = args.normalizations.split(",")
    for s in spectra:
        if s not in SPECTRA:
            parser.error(f"unknown spectrum {s!r}; choose from {SPECTRA}")
    for name in schedules:
        get_schedule(name)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    plot_rows: list[Row] = []
    print(f"# accuracy vs float64 SVD — {args.size}×{args.size}, compute {args.dtype}, device {args.device}, "
          f"torch {torch.__version__}, gains for σ ≥ {args.floor:g}·σmax")  # fmt: skip
    for kind in spectra:
        G, U, S, V = build(kind, args.size, gen)
        keep = S >= args.floor * S[0]
        Uk, Vk = U[:, keep], V[:, keep]
        Gin = G.to(device=args.device, dtype=torch.float32)

        def gain_range(O: torch.Tensor, Uk: torch.Tensor = Uk, Vk: torch.Tensor = Vk) -> tuple[float, float]:
            g = (Uk * (O.to("cpu", torch.float64) @ Vk)).sum(0)
            return float(g.min()), float(g.max())

        rows: list[Row] = []
        configs = [(n, z, k) for n in schedules for z in normalizations for k in steps_list]
        for name, norm, steps in tqdm(configs, desc=kind, leave=False):
            try:
                O = orthoptim.orthogonalize(
                    Gin, schedule=name, steps=steps, normalization=norm, compute_dtype=args.dtype
                )  # type: ignore[arg-type]
            except ValueError as exc:
                if "refused" in str(exc):
                    continue
                raise
            rows.append(Row(name, norm, steps, get_schedule(name).matmuls(steps), *gain_range(O)))
        O = torch_muon(Gin)
        if O is not None:
            rows.append(Row("torch.optim.Muon", "frobenius+eps", 5, 15, *gain_range(O)))
        rows.sort(key=lambda r: (r.matmuls, r.worst))
        print(f"\n## spectrum {kind} ({int(keep.sum())} of {args.size} singular values counted)\n")
        print("| matmuls | schedule | normalization | steps | gain min | gain max | worst abs(g − 1) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [str(r.matmuls), r.routine, r.normalization, str(r.steps), f"{r.lo:.4f}", f"{r.hi:.4f}"]
            print("| " + " | ".join([*cells, f"{r.worst:.4f}"]) + " |")
        if not plot_rows:
            plot_rows = rows
    print(f"\n{time.perf_counter() - t0:.0f} s")
    plot(plot_rows, spectra[0], args)


def plot(rows: list[Row], kind: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"frobenius": "o", "schatten4": "s", "aol": "^", "frobenius+eps": "x"}
    for name in sorted({r.routine for r in rows}):
        for norm, marker in styles.items():
            pts = sorted((r.matmuls, r.worst) for r in rows if r.routine == name and r.normalization == norm)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, lw=0.8, label=f"{name} / {norm}")
    ax.set_yscale("log")
    ax.set_xlabel("matrix products")
    ax.set_ylabel(f"worst |gain − 1| (σ ≥ {args.floor:g}·σmax)")
    ax.set_title(f"Accuracy per matmul — {args.size}² {kind} spectrum, {args.dtype} compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
