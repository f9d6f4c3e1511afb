"""Compile orthoptim's Triton kernels ahead of time for NVIDIA GPUs, without a GPU: do they lower, and to what.

    python benchmarks/compile_kernels.py [--arch 90 80] [--quick]

Triton's interpreter (what the CPU test suite runs) accepts code the compiler may reject, and says nothing about the
machine code. This compiles every variant the library launches — the step's fused elementwise kernels
(``optim/backends/triton_kernels.py``: state dtypes × flags) and the symmetric products (``polar/kernels/symmetric.py``:
dtypes × Gram/polynomial) — for each ``--arch`` (compute capability, e.g. 90 = H100, 80 = A100) with Triton's
bundled ptxas, and prints per kernel: variants compiled, fused multiply-adds (``fma.rn.f32``), vectorized
global loads (``.v2``/``.v4``), tensor-core instructions (``wgmma``/``mma``). ``--quick``: one variant per
kernel (``tests/test_kernels_compile.py`` runs that). Exit status 1 if any variant fails to compile.

Run it without ``TRITON_INTERPRET=1`` (under the interpreter there is nothing to compile).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections import Counter
from typing import Any


def _count(ptx: str) -> Counter[str]:
    return Counter(
        fma=ptx.count("fma.rn.f32"),
        vector_loads=sum(ptx.count(f"ld.global{c}.{v}") for c in ("", ".nc") for v in ("v2", "v4")),
        loads=ptx.count("ld.global"),
        tensor_cores=ptx.count("wgmma") + ptx.count("mma.sync"),
    )


#: (kernel name, jit function, signature, constexprs, attributes, compile options)
Variant = tuple[str, Any, dict[str, str], dict[str, Any], dict[Any, Any], dict[str, Any]]
#: The fused kernels are launched with these (``optim/backends/triton.py``).
FUSED_OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}


def fused_variants(quick: bool) -> list[Variant]:
    import triton.language as tl  # type: ignore[import-untyped]

    from orthoptim.optim.backends import triton_kernels as k

    states = [(tl.float32, "fp32"), (tl.bfloat16, "bf16"), (tl.float16, "fp16")]
    out = []
    for st, name in states[:1] if quick else states:
        for nesterov, aligned in [(True, True)] if quick else itertools.product((True, False), repeat=2):
            sig = {
                "table": "*i64", "out_ptr": f"*{name}", "matrices": "i32", "numel": "i32", "keep": "fp32",
                "keep_c": "fp32", "mu": "fp32", "mu_c": "fp32", "NESTEROV": "constexpr", "STATE_DTYPE": "constexpr",
                "ALIGNED": "constexpr", "BLOCK": "constexpr",
            }  # fmt: skip
            const = {"NESTEROV": nesterov, "STATE_DTYPE": st, "ALIGNED": aligned, "BLOCK": k.INPUT_BLOCK}
            # numel divisible by 16, as Triton specializes it at launch for such sizes
            attrs = {(3,): [["tt.divisibility", 16]]}
            out.append(("momentum_input_kernel", k.momentum_input_kernel, sig, const, attrs, FUSED_OPTIONS))
        for update in ["bf16"] if quick else ["bf16", "fp32"]:
            flags = [(True,) * 5] if quick else itertools.product((True, False), repeat=5)
            for flag, decay, factor, alpha_tensor, aligned in flags:
                sig = {
                    "table": "*i64", "upd_ptr": f"*{update}", "stride_ub": "i64", "stride_ur": "i32",
                    "stride_uc": "i32", "ok_ptr": "*u8", "decay_ptr": "*fp32", "factor_ptr": "*fp32",
                    "stride_fb": "i64", "stride_fr": "i32", "alpha_ptr": "*fp32", "alpha": "fp32", "matrices": "i32",
                    "rows": "i32", "cols": "i32", "keep": "fp32", "keep_c": "fp32", "tiles_c": "i32", "tiles": "i32",
                    "HAS_FLAG": "constexpr", "HAS_DECAY": "constexpr", "HAS_FACTOR": "constexpr",
                    "ALPHA_TENSOR": "constexpr", "STATE_DTYPE": "constexpr", "ALIGNED": "constexpr",
                    "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
                }  # fmt: skip
                const = {
                    "HAS_FLAG": flag, "HAS_DECAY": decay, "HAS_FACTOR": factor, "ALPHA_TENSOR": alpha_tensor,
                    "STATE_DTYPE": st, "ALIGNED": aligned, "BLOCK_R": k.COMMIT_ROWS, "BLOCK_C": k.COMMIT_COLS,
                }  # fmt: skip
                attrs = {(14,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}  # cols, stride_uc
                out.append(("commit_kernel", k.commit_kernel, sig, const, attrs, FUSED_OPTIONS))
    return out


def symmetric_variants(quick: bool) -> list[Variant]:
    from orthoptim.polar.kernels import symmetric as s

    kernel = s._sym_product_kernel.fn  # the autotuner's kernel; one config (the first GPU one)
    config = s._configs()[0]
    out = []
    for name, precision in [("bf16", "tf32")] if quick else [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")]:
        for poly in [False] if quick else [False, True]:
            sig = {
                "x_ptr": f"*{name}", "out_ptr": f"*{name}", "M": "i32", "K": "i32", "stride_xb": "i64",
                "stride_xm": "i32", "stride_xk": "i32", "stride_ob": "i64", "stride_om": "i32", "stride_on": "i32",
                "beta": "fp32", "alpha": "fp32", "POLY": "constexpr", "DOT_PRECISION": "constexpr",
                "WIDE_OFFSETS": "constexpr", "INTERPRET_BF16": "constexpr", "K_BOUND": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
            }  # fmt: skip
            const = {
                "POLY": poly, "DOT_PRECISION": precision, "WIDE_OFFSETS": False, "INTERPRET_BF16": False,
                "K_BOUND": 0, **config.kwargs,
            }  # fmt: skip
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
            out.append(("_sym_product_kernel", kernel, sig, const, {}, options))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90: H100)")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: under the interpreter there is nothing to compile")
    try:
        import triton  # type: ignore[import-untyped]
        from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped]
        from triton.compiler import ASTSource  # type: ignore[import-untyped]
    except ImportError as exc:
        parser.error(f"triton is needed: {exc}")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    variants = fused_variants(args.quick) + symmetric_variants(args.quick)
    print(f"triton {triton.__version__}")
    print("| arch | kernel | variants | fma.rn.f32 | vector loads / loads | tensor-core ops |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        totals: dict[str, Counter[str]] = {}
        for name, fn, sig, const, attrs, options in variants:
            try:
                source = ASTSource(fn, sig, constexprs=const, attrs=attrs)
                compiled = triton.compile(source, target=target, options=options)
            except Exception as exc:  # report every failure, then fail
                failed += 1
                print(f"| sm_{arch} | {name} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | |")
                continue
            counts = totals.setdefault(name, Counter())
            counts["variants"] += 1
            counts.update(_count(compiled.asm["ptx"]))
        for name, c in totals.items():
            print(
                f"| sm_{arch} | {name} | {c['variants']} | {c['fma']} | {c['vector_loads']} / {c['loads']} "
                f"| {c['tensor_cores']} |"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
