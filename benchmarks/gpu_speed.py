"""GPU speed of orthoptim's polar engine and optimizer step against torch.optim.Muon, in one run.

    .venv/bin/python benchmarks/gpu_speed.py [--repeats 20] [--warmup 5] [--dtype float32] [--json out.json]
                                             [--dion-path /path/to/dion] [--shapes 1024x1024,16x1024x1024]
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --repeats 1 --warmup 0 --quick   # smoke test, no GPU

What it measures (median ms per call over ``--repeats`` after ``--warmup`` untimed calls; CUDA events around
each call on the GPU, ``time.perf_counter`` on the CPU):

1. A bf16 ``torch.mm`` of ``--ceiling-size``³ (8192 by default): the TFLOP/s ceiling the other rows are read
   against.
2. Orthogonalizing one input per shape (1024², 4096², 2048×8192, 8192×2048, 768×3072, 16×1024², 12×768×3072):
   ``orthoptim.orthogonalize`` with its defaults; the same call with torch's math (Jordan coefficients,
   Frobenius normalization, 5 steps, bf16 compute); a plain batched-torch NS5 written here (bf16, ``bmm``); and
   torch.optim.Muon's own routine (``torch.optim._muon._zeropower_via_newtonschulz``, looped over the batch).
   Each row also gives the relative Frobenius difference of its output to the plain NS5 output and to the float64
   SVD polar factor (``orthoptim.polar``) — a sanity column: NS5 with Jordan's coefficients does not converge to
   the polar factor (singular values land in about [0.7, 1.2]), so ~0.1–0.3 against the polar factor is expected.
3. On CUDA only, the Triton symmetric kernels (``orthoptim.polar.kernels.sym_gram``/``sym_poly``) against the
   torch products they replace (``bmm(X, Xᵀ)``, ``baddbmm(A, A, A)``), bf16.
4. The optimizer step on GPT-2-small's 48 hidden matrices (12 × {768×2304, 768×768, 3072×768, 768×3072},
   ``nn.Parameter`` with random gradients): ``orthoptim.Muon(params, lr=0.02)`` (defaults; without the skip
   warning's host read, eagerly and, on CUDA, as a captured CUDA graph's replay; torch's math; with the fused
   elementwise kernels, ``backend="triton"``; and with ``ORTHOPTIM_TRITON=0``, no Triton at all) vs
   ``torch.optim.Muon(params, lr=0.02)``, and microsoft/dion's Muon when ``--dion-path`` points at a checkout
   that imports (never vendored here).

FLOPs are naive and count full products (the symmetric kernels' halving is not credited): one quintic NS step on
the wide orientation X (m×n, m ≤ n) is A = XXᵀ (2m²n) + A² (2m³) + (bA + cA²)X (2m²n) = 2·(2m²n + m³); a routine
is credited steps × batch × that, steps = 5 for every row (orthoptim's default schedule also runs 5). The
normalization's work is not counted. TFLOP/s = FLOPs / time; "% ceiling" divides by the measured bf16 mm rate.

Without CUDA the default ``--device cuda`` prints "no CUDA device: nothing measured" and exits 0. ``--device cpu``
runs everything on the CPU (for smoke-testing the script; CPU numbers say nothing about a GPU). Ratios are only
meaningful within one run: the × torch.optim.Muon column divides by the torch.optim.Muon row measured in the same
process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import orthoptim
from orthoptim.bench import captured, gpt2_small_shapes, matrix_params
from orthoptim.polar import kernels
from orthoptim.timing import median_ms

# KellerJordan/Muon muon.py (and torch.optim._muon DEFAULT_A/B/C): the quintic torch.optim.Muon runs 5 times.
JORDAN = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
TORCH_EPS = 1e-7  # torch.optim._muon.EPS

Shape = tuple[int, int, int]  # (batch, m, n)
SHAPES: tuple[Shape, ...] = (
    (1, 1024, 1024),
    (1, 4096, 4096),
    (1, 2048, 8192),
    (1, 8192, 2048),
    (1, 768, 3072),
    (16, 1024, 1024),
    (12, 768, 3072),
)
# --quick: the two small single shapes and a small batch (a stand-in for the batched rows) — for smoke tests.
QUICK_SHAPES: tuple[Shape, ...] = ((1, 1024, 1024), (1, 768, 3072), (4, 256, 512))

Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    section: str
    shape: str
    routine: str
    ms: float
    tflops: float | None = None
    pct_ceiling: float | None = None
    vs_torch_muon: float | None = None
    diff_plain_ns5: float | None = None
    diff_polar: float | None = None


# ---------------------------------------------------------------------------------------------------- timing


def ns_flops(shape: Shape, steps: int = NS_STEPS) -> float:
    """Naive FLOPs of ``steps`` quintic NS steps on a (batch, m, n) input, full products: 2·(2m²n + m³) a step
    on the wide orientation (m ≤ n)."""
    batch, m, n = shape
    s, big = min(m, n), max(m, n)
    return float(batch * steps * 2 * (2 * s * s * big + s**3))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------------- routines


def plain_ns5(G: torch.Tensor) -> torch.Tensor:
    """Batched torch NS5 as most libraries write it: bf16, Frobenius normalization, Jordan coefficients, bmm."""
    a, b, c = JORDAN
    X = G.to(torch.bfloat16)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(TORCH_EPS)
    for _ in range(NS_STEPS):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


def torch_muon_routine() -> Callable[[torch.Tensor, tuple[float, float, float], int, float], torch.Tensor] | None:
    """torch.optim.Muon's private NS routine, if this torch has it (checked in torch 2.13's torch/optim/_muon.py)."""
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    return _zeropower_via_newtonschulz  # type: ignore[no-any-return]


def orthogonalize_routines() -> list[tuple[str, Callable[[torch.Tensor], Any]]]:
    routines: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
        ("orthoptim.orthogonalize (defaults)", lambda G: orthoptim.orthogonalize(G)),
        (
            "orthoptim.orthogonalize (jordan, frobenius, 5 steps, bf16)",
            lambda G: orthoptim.orthogonalize(
                G, schedule="jordan", normalization="frobenius", steps=NS_STEPS, compute_dtype="bfloat16"
            ),
        ),
        ("plain torch NS5 (bf16, bmm)", plain_ns5),
    ]
    zp = torch_muon_routine()
    if zp is not None:
        # A list of per-matrix outputs: torch.optim.Muon loops over its parameters one matrix at a time.
        routines.append(
            ("torch.optim.Muon routine (per-matrix loop)", lambda G: [zp(g, JORDAN, NS_STEPS, TORCH_EPS) for g in G])
        )
    return routines


def as_batch(out: Any) -> torch.Tensor:
    return torch.stack(out) if isinstance(out, list) else out


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.to(torch.float64)
    return float((out.to(torch.float64) - ref64).norm() / ref64.norm())


# ---------------------------------------------------------------------------------------------------- sections


def ceiling(args: argparse.Namespace, device: torch.device) -> float:
    n = args.ceiling_size
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    ms = median_ms(lambda: torch.mm(a, b), device, args.warmup, args.repeats)
    rate = tflops(2.0 * n**3, ms)
    print(f"bf16 torch.mm {n}×{n}×{n}: {ms:.3f} ms, {rate:.1f} TFLOP/s (the ceiling below)\n", flush=True)
    return rate


def fmt_shape(shape: Shape) -> str:
    batch, m, n = shape
    return f"{m}×{n}" if batch == 1 else f"{batch}×{m}×{n}"


def bench_shapes(args: argparse.Namespace, device: torch.device, peak: float, shapes: Sequence[Shape]) -> list[Result]:
    print("| shape | routine | ms | TFLOP/s | % ceiling | × torch.optim.Muon | vs plain NS5 | vs SVD polar |")
    print("|---|---|---|---|---|---|---|---|")
    results: list[Result] = []
    for shape in shapes:
        gen = torch.Generator(device=device).manual_seed(1)
        G = torch.randn(*shape, device=device, dtype=args.dtype, generator=gen)
        polar = orthoptim.polar(G, dtype=torch.float64)  # float64 SVD, once per shape, not timed
        plain = plain_ns5(G)
        rows: list[Result] = []
        for name, fn in orthogonalize_routines():
            ms = median_ms(functools.partial(fn, G), device, args.warmup, args.repeats)
            out = as_batch(fn(G))
            rate = tflops(ns_flops(shape), ms)
            rows.append(
                Result(
                    "orthogonalize",
                    fmt_shape(shape),
                    name,
                    ms,
                    rate,
                    100.0 * rate / peak,
                    None,
                    rel_diff(out, plain),
                    rel_diff(out, polar),
                )
            )
        base = next((r.ms for r in rows if r.routine.startswith("torch.optim.Muon")), None)
        for r in rows:
            r.vs_torch_muon = None if base is None else r.ms / base
            print(
                f"| {r.shape} | {r.routine} | {r.ms:.3f} | {r.tflops:.1f} | {r.pct_ceiling:.0f}% | "
                f"{_opt(r.vs_torch_muon)} | {r.diff_plain_ns5:.2e} | {r.diff_polar:.2e} |",
                flush=True,
            )
        results += rows
    return results


def bench_kernels(args: argparse.Namespace, device: torch.device, peak: float, shapes: Sequence[Shape]) -> list[Result]:
    """sym_gram / sym_poly against the torch products they replace, bf16, on the wide orientation."""
    if device.type != "cuda" or not kernels.triton_available():
        why = "needs CUDA" if device.type != "cuda" else "triton not installed"
        print(f"\nTriton symmetric kernels: not measured ({why})\n")
        return []
    print(
        "\n| shape | product | torch ms | Triton ms | torch / Triton | Triton TFLOP/s (full-product FLOPs) "
        "| rel. diff Triton vs torch |"
    )
    print("|---|---|---|---|---|---|---|")
    results: list[Result] = []
    b, c = JORDAN[1], JORDAN[2]
    for shape in shapes:
        batch, m, n = shape
        s, big = min(m, n), max(m, n)
        gen = torch.Generator(device=device).manual_seed(2)
        X = torch.randn(batch, s, big, device=device, dtype=torch.bfloat16, generator=gen)
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        A = kernels.sym_gram(X)
        cases: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], float]] = [
            (
                "XXᵀ",
                functools.partial(torch.bmm, X, X.mT),
                functools.partial(kernels.sym_gram, X),
                2.0 * batch * s * s * big,
            ),
            (
                "bA + cA²",
                functools.partial(torch.baddbmm, A, A, A, beta=b, alpha=c),
                functools.partial(kernels.sym_poly, A, b, c),
                2.0 * batch * s**3,
            ),
        ]
        for name, torch_fn, triton_fn, flops in cases:
            diff = rel_diff(triton_fn(), torch_fn())  # also the untimed first call: autotuning, compilation
            t_ms = median_ms(torch_fn, device, args.warmup, args.repeats)
            k_ms = median_ms(triton_fn, device, args.warmup, args.repeats)
            rate = tflops(flops, k_ms)
            print(
                f"| {fmt_shape(shape)} | {name} | {t_ms:.3f} | {k_ms:.3f} | {t_ms / k_ms:.2f} | {rate:.1f} "
                f"| {diff:.1e} |"
            )
            results.append(Result("kernels", fmt_shape(shape), f"torch {name}", t_ms, tflops(flops, t_ms)))
            results.append(Result("kernels", fmt_shape(shape), f"triton {name}", k_ms, rate, 100.0 * rate / peak))
    return results


def gpt2_params(layers: int, device: torch.device, dtype: torch.dtype) -> list[nn.Parameter]:
    """GPT-2 small's hidden matrices for ``layers`` layers, with random gradients (``orthoptim bench``'s)."""
    return matrix_params(gpt2_small_shapes(layers), device, dtype, seed=3)


def dion_muon(path: str | None) -> tuple[Callable[..., torch.optim.Optimizer] | None, str]:
    """microsoft/dion's Muon from a local checkout, imported from ``path`` (nothing of it lives in this repo)."""
    if path is None:
        return None, "not requested (--dion-path)"
    sys.path.insert(0, path)
    try:
        from dion import Muon as DionMuon  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or anything its import raises here
        return None, f"not available ({type(exc).__name__}: {exc})"
    return DionMuon, "ok"


def bench_step(args: argparse.Namespace, device: torch.device) -> list[Result]:
    no_sync: Maker = lambda ps: orthoptim.Muon(ps, lr=0.02, warn_nonfinite=False)  # noqa: E731
    configs: list[tuple[str, Maker, bool]] = [  # (name, maker, replay a captured CUDA graph of the step)
        ("torch.optim.Muon(lr=0.02)", lambda ps: torch.optim.Muon(ps, lr=0.02), False),
        (
            "orthoptim.Muon(lr=0.02) defaults (skip flag read once per step)",
            lambda ps: orthoptim.Muon(ps, lr=0.02),
            False,
        ),
        ("orthoptim.Muon(lr=0.02, warn_nonfinite=False) (no host sync)", no_sync, False),
        (
            "orthoptim.Muon(lr=0.02, ns_coefficients=jordan, ns_steps=5, bf16)",
            lambda ps: orthoptim.Muon(ps, lr=0.02, ns_coefficients=JORDAN, ns_steps=NS_STEPS, compute_dtype="bfloat16"),
            False,
        ),
    ]
    if device.type == "cuda" and kernels.triton_available():
        # The fused elementwise kernels (backend="triton": their gain over the default torch backend), then no
        # Triton at all (cuBLAS for the symmetric products too).
        triton: Maker = lambda ps: orthoptim.Muon(ps, lr=0.02, backend="triton")  # noqa: E731
        configs.append(("orthoptim.Muon(lr=0.02, backend='triton')", triton, False))
        configs.append(
            ("orthoptim.Muon(lr=0.02) defaults, ORTHOPTIM_TRITON=0", lambda ps: orthoptim.Muon(ps, lr=0.02), False)
        )
    DionMuon, dion_status = dion_muon(args.dion_path)
    dion_triton: Maker | None = None
    if DionMuon is not None:
        configs.append(("dion.Muon(lr=0.02)", lambda ps: DionMuon(ps, lr=0.02), False))
        if device.type == "cuda":
            dion_triton = lambda ps: DionMuon(ps, lr=0.02, use_triton=True)  # noqa: E731
            configs.append(("dion.Muon(lr=0.02, use_triton=True)", dion_triton, False))
    if device.type == "cuda":  # captures last: a failed capture can leave the stream unusable for later rows
        configs.append(("orthoptim.Muon(lr=0.02, warn_nonfinite=False), CUDA graph replay", no_sync, True))
        live_lr: Maker = lambda ps: orthoptim.Muon(  # noqa: E731
            ps, lr=torch.tensor(0.02, device=device), warn_nonfinite=False
        )
        configs.append(("orthoptim.Muon(lr=cuda tensor, warn_nonfinite=False), CUDA graph replay", live_lr, True))
        if dion_triton is not None:
            # dion's own answer to launch overhead is a CUDA-graph wrapper (dion/cuda_graph.py); the same capture here.
            configs.append(("dion.Muon(lr=0.02, use_triton=True), CUDA graph replay", dion_triton, True))
    label = f"{4 * args.layers} matrices ({args.layers} × GPT-2 small layer), {str(args.dtype).replace('torch.', '')}"
    print(f"\nOptimizer step, {label}; microsoft/dion: {dion_status}\n")
    print("| optimizer | ms / step | × torch.optim.Muon |\n|---|---|---|")
    results: list[Result] = []
    base: float | None = None
    for name, make, graph in configs:
        params = gpt2_params(args.layers, device, args.dtype)
        no_triton, before = "ORTHOPTIM_TRITON=0" in name, os.environ.get("ORTHOPTIM_TRITON")
        try:
            if no_triton:
                os.environ["ORTHOPTIM_TRITON"] = "0"  # read by kernels.use_triton at every call
            opt = make(params)
            opt.step()  # state allocation (momentum buffers), untimed whatever --warmup says
            ms = median_ms(captured(opt.step) if graph else opt.step, device, args.warmup, args.repeats)
        except Exception as exc:  # a third-party optimizer failing here must not hide the other rows
            print(f"| {name} | failed: {type(exc).__name__}: {exc} | |", flush=True)
            continue
        finally:
            if no_triton and before is None:
                os.environ.pop("ORTHOPTIM_TRITON", None)
            elif no_triton and before is not None:
                os.environ["ORTHOPTIM_TRITON"] = before
        base = base if base is not None else ms
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |", flush=True)
        results.append(Result("step", label, name, ms, vs_torch_muon=ms / base))
        del opt, params
    return results


def _opt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def parse_shape(text: str) -> Shape:
    dims = [int(d) for d in text.lower().replace("×", "x").split("x")]
    if len(dims) == 2:
        return (1, dims[0], dims[1])
    if len(dims) == 3:
        return (dims[0], dims[1], dims[2])
    raise argparse.ArgumentTypeError(f"shape {text!r}: expected MxN or BxMxN")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of inputs and parameters")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 GPU, 1 CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 layer, a 2048³ ceiling")
    parser.add_argument("--shapes", type=lambda s: [parse_shape(t) for t in s.split(",")], default=None)
    parser.add_argument("--layers", type=int, default=None, help="GPT-2 layers in the step (default 12; quick 1)")
    parser.add_argument("--ceiling-size", type=int, default=None, help="n of the n³ bf16 mm (default 8192)")
    parser.add_argument("--dion-path", default=None, help="a microsoft/dion checkout to import dion.Muon from")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.dtype = DTYPES[args.dtype]
    args.repeats = args.repeats if args.repeats is not None else (2 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    args.layers = args.layers if args.layers is not None else (1 if args.quick else 12)
    args.ceiling_size = args.ceiling_size or (2048 if args.quick else 8192)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu to smoke-test the script)")
        return 0
    if device.type not in ("cuda", "cpu"):
        print(f"device {args.device!r}: only cuda and cpu are supported")
        return 2
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        probe = torch.empty(1, device=device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        probe = torch.empty(1)
    print(
        f"# orthoptim GPU speed — {where}, torch {torch.__version__}, triton available: {kernels.triton_available()},"
        f" Triton dispatch for this device: {kernels.use_triton(probe)}; median of {args.repeats} after"
        f" {args.warmup} warm-up; inputs {str(args.dtype).replace('torch.', '')}\n"
    )
    if device.type == "cpu":
        print("(CPU run: a smoke test of this script; these numbers say nothing about a GPU)\n")
    peak = ceiling(args, device)
    results = bench_shapes(args, device, peak, args.shapes)
    results += bench_kernels(args, device, peak, args.shapes)
    results += bench_step(args, device)
    if args.json:
        meta = {"device": where, "torch": torch.__version__, "ceiling_tflops": peak, "argv": sys.argv[1:]}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": [asdict(r) for r in results]}, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
