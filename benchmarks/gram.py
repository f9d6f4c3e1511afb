"""Standard vs Gram form of Newton–Schulz: accuracy against float64 SVD, operation counts and time per call.

    .venv/bin/python benchmarks/gram.py [--repeats 3] [--steps 5] [--device cpu]

For each shape, a matrix with singular values σᵢ = 1/i (clipped at 1e-3) is orthogonalized by the default
schedule with ``iteration="standard"`` and ``iteration="gram"`` in float32 and bfloat16. Printed: the gain range
uᵢᵀOvᵢ (1 = the exact polar factor), the spectral distance to the float64 SVD polar factor, the restart steps the
Gram form used, multiply-adds relative to the standard form, and the median time per call. Not a test.
"""

from __future__ import annotations

import argparse

import torch

import orthoptim
from orthoptim.polar import get_schedule
from orthoptim.polar.newton_schulz import gram_restarts, iteration_cost
from orthoptim.timing import median_ms

SHAPES = ((768, 768), (768, 1536), (768, 2304), (768, 3072), (3072, 768), (512, 4096))


def harmonic(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    s = (1.0 / torch.arange(1, k + 1, dtype=torch.float64)).clamp_min(1e-3)
    return (U * s) @ V.T, U, V


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    coeffs = get_schedule("orthoptim").steps_coefficients(args.steps)
    print(
        f"# orthoptim schedule, {args.steps} steps, schatten4; σᵢ = 1/i ≥ 1e-3; device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("\n| shape | dtype | form | restarts | gain range | ‖O − polar‖₂ | multiply-adds | ms / call |")
    print("|---|---|---|---|---|---|---|---|")
    for m, n in SHAPES:
        G, U, V = harmonic(m, n)
        P = orthoptim.polar(G)
        X = G.float().to(args.device)
        short, long = min(m, n), max(m, n)
        for dtype in (torch.float32, torch.bfloat16):
            for form in ("standard", "gram"):
                restarts = gram_restarts(coeffs, dtype) if form == "gram" else None
                cost = iteration_cost(short, long, coeffs, restarts) / iteration_cost(short, long, coeffs, None)

                def run(X: torch.Tensor = X, form: str = form, dtype: torch.dtype = dtype) -> torch.Tensor:
                    return orthoptim.orthogonalize(
                        X,
                        steps=args.steps,
                        compute_dtype=dtype,
                        iteration=form,  # type: ignore[arg-type]
                    )

                O = run().cpu().double()
                g = torch.diagonal(U.T @ O @ V)
                err = float(torch.linalg.matrix_norm(O - P, ord=2))
                ms = median_ms(run, torch.device(args.device), 1, args.repeats)
                name = str(dtype).replace("torch.", "")
                shown = "—" if restarts is None else (str(list(restarts)) if restarts else "none")
                print(
                    f"| {m}×{n} | {name} | {form} | {shown} | [{g.min():.3f}, {g.max():.3f}] | {err:.3f} "
                    f"| {cost:.2f} | {ms:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
