"""Triton kernels for the two symmetric products of a Newton–Schulz step, and their launchers.

A quintic NS step ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` spends two of its three products on symmetric
m×m results: the Gram matrix ``A = XXᵀ`` and the polynomial ``bA + cA²`` (``A²`` is symmetric because ``A`` is).
Both kernels here compute only the lower-triangle output tiles (tile row ≥ tile column) and write each tile
twice, at (i, j) and mirrored at (j, i): about half the FLOPs of the full product.

Idea (symmetric Gram products in NS, triangle-only tiles with mirrored writes): microsoft/dion's Triton NS
kernels (dion/newton_schulz_triton.py) and the Polar Express paper (arXiv 2505.16932). Ideas only; the code is
ours.

One kernel serves both products. Its operand is a row-major view of a (B, m, k) tensor addressed through its
strides (no copy for transposed or batch-strided views); output tile (i, j) accumulates ``X_i X_jᵀ`` over k,
where ``X_i`` is the i-th block of BLOCK_M rows. For ``sym_poly`` the operand is ``A`` itself (k = m):
``A_i A_jᵀ = (AAᵀ)_ij = (A²)_ij`` because ``A`` is symmetric, and the epilogue adds ``b·A_ij``.

Precision: products accumulate in float32 (``tl.dot`` with a float32 accumulator), the epilogue runs in float32,
and the result is rounded once to the input dtype. float32 inputs use ``input_precision="ieee"`` (no TF32), so
their results match torch's float32 matmul with TF32 off to float32 rounding; bfloat16/float16 inputs use the
tensor cores' native 16-bit path. Without TF32 a float32 dot runs on the CUDA cores, not the tensor cores (seen
in the PTX compiled for sm_90: wgmma for 16-bit inputs, none for float32): the float32 kernels are there for
exactness, and whether they beat cuBLAS's float32 products despite the halved FLOPs is a measurement still to
make (benchmarks/gpu_speed.py measures the bf16 path).

These launchers expect already-validated (B, m, k) tensors; the public entry points are
``orthoptim.polar.kernels.sym_gram`` / ``sym_poly``. This module imports triton at import time: import it only
where ``triton_available()`` is true.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton  # type: ignore[import-untyped]  # triton ships no type information
import triton.language as tl  # type: ignore[import-untyped]

#: Per-matrix element offsets at or above this need 64-bit address arithmetic (int32 would overflow).
_INT32_LIMIT = 2**31 - 1


#: Whether this import runs under Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is decorated,
#: i.e. at this module's import). Fixed here so the launch config and the kernel agree even if the variable
#: changes later.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    """Launch configurations to autotune over, keyed on (M, K, POLY) and the dtype.

    Under Triton's interpreter (TRITON_INTERPRET=1, the CPU test path) autotuning would run every config and
    each costs seconds there, so a single small config is used: BLOCK_M = 32 keeps tests able to exercise
    several tile rows (mirrored off-diagonal tiles) on small matrices. The GPU configs are the usual
    Hopper/Ampere GEMM shapes (128/64-wide output tiles, 32/64-deep k slices, 4–8 warps, 3–5 pipeline stages);
    ones that do not fit in shared memory for float32 are skipped by the autotuner (OutOfResources → inf).
    """
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
    ]


@triton.autotune(configs=_configs(), key=["M", "K", "POLY"])
@triton.jit
def _sym_product_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    M,
    K,
    stride_xb,
    stride_xm,
    stride_xk,
    stride_ob,
    stride_om,
    stride_on,
    beta,
    alpha,
    POLY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    K_BOUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (batch element, lower-triangle output tile). A 1-D grid (no per-axis limit of 65535 on
    # the batch) enumerates the T(T+1)/2 lower tiles of each matrix row by row, so consecutive programs share
    # the row block X_i and a wave of programs reads only the first few row blocks (L2 reuse).
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK_M)
    n_tri = tiles * (tiles + 1) // 2
    batch = pid // n_tri
    p = pid - batch * n_tri
    # Triangle index p → (i, j), i ≥ j: i = ⌊(√(8p+1) − 1)/2⌋, j = p − i(i+1)/2. The float square root can be
    # one off near perfect squares (and tl.sqrt is approximate on GPUs); the two integer checks fix that.
    i = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)
    j = p - i * (i + 1) // 2

    # The batch offset alone can exceed int32 for large batches: always 64-bit.
    x_base = x_ptr + batch.to(tl.int64) * stride_xb
    o_base = out_ptr + batch.to(tl.int64) * stride_ob
    rows_i = i * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = j * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    if WIDE_OFFSETS:  # only when one matrix spans ≥ 2³¹ elements (decided by the launcher)
        rows_i = rows_i.to(tl.int64)
        rows_j = rows_j.to(tl.int64)
        ks = ks.to(tl.int64)
    in_i = rows_i < M
    in_j = rows_j < M

    # Both operands are loaded as (BLOCK_M, BLOCK_K) row blocks of X; the second is transposed in registers
    # (X_j^T), so both loads follow the same memory order, whatever X's strides are.
    a_ptrs = x_base + rows_i[:, None] * stride_xm + ks[None, :] * stride_xk
    b_ptrs = x_base + rows_j[:, None] * stride_xm + ks[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    # K_BOUND is 0 (the runtime K bounds the loop) except under the interpreter, where it is K as a Python int:
    # Triton 3.6's interpreter cannot take a runtime scalar as a loop bound (it holds it as a 1-element array).
    for k0 in range(0, K if K_BOUND == 0 else K_BOUND, BLOCK_K):
        in_k = ks[None, :] < K - k0  # ragged last k slice: masked to 0, adds nothing
        a = tl.load(a_ptrs, mask=in_i[:, None] & in_k, other=0.0)
        b = tl.load(b_ptrs, mask=in_j[:, None] & in_k, other=0.0)
        if INTERPRET_BF16:  # interpreter only, see _launch: bf16 → fp32 is exact, and so are bf16·bf16 products
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    in_tile = in_i[:, None] & in_j[None, :]
    if POLY:
        # Fused epilogue b·A_ij + c·(A²)_ij in float32, rounded once (as cuBLAS's baddbmm does with fp32 alpha/beta).
        # A_ij comes from the lower triangle (i ≥ j); the mirrored write reuses it for A_ji, exact when A is.
        a_ij = tl.load(x_base + rows_i[:, None] * stride_xm + rows_j[None, :] * stride_xk, mask=in_tile, other=0.0)
        acc = beta * a_ij.to(tl.float32) + alpha * acc
    if INTERPRET_BF16:
        # Interpreter only (see _launch): its float32 → bfloat16 cast truncates, where the GPU's rounds to
        # nearest even. Round in the bits first (ties to even: add 0x7FFF plus the lowest kept bit, clear the
        # 16 dropped bits); the cast then only drops zeros.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    out = acc.to(out_ptr.dtype.element_ty)

    # Each output element is written exactly once: (r, c) with r ≥ c from this tile, and its mirror (c, r)
    # with r > c from the same rounded value. So the result is symmetric bit for bit, also inside diagonal
    # tiles, whatever order the MMA hardware sums in.
    lower = rows_i[:, None] >= rows_j[None, :]
    strict = rows_i[:, None] > rows_j[None, :]
    tl.store(o_base + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on, out, mask=in_tile & lower)
    tl.store(o_base + rows_j[None, :] * stride_om + rows_i[:, None] * stride_on, out, mask=in_tile & strict)


def _span(t: torch.Tensor) -> int:
    """Largest element offset inside one matrix of the (B, m, k) tensor ``t``."""
    return (t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1))


def _launch(x: torch.Tensor, beta: float, alpha: float, poly: bool) -> torch.Tensor:
    if not (x.is_cuda or INTERPRETED):
        raise ValueError(
            f"the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tests); got device {x.device}"
        )
    batch, m, k = x.shape
    # A fresh output: sym_poly's programs read A while others write, so the output must never alias it.
    out = torch.empty((batch, m, m), dtype=x.dtype, device=x.device)
    wide = max(_span(x), _span(out)) > _INT32_LIMIT

    def grid(meta: dict[str, int]) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"])
        return (batch * (tiles * (tiles + 1) // 2),)

    # Triton 3.9's interpreter has no bfloat16 arithmetic (its debugging guide says so): tl.dot multiplies the
    # raw uint16 storage (triton-lang/triton#11584) and float32 → bfloat16 casts truncate. There, and only
    # there, bfloat16 operands are widened to float32 before the dot and the result is rounded to nearest even
    # by hand; on a GPU the native bf16 tensor-core path and the hardware's rounding run.
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    # "ieee": float32 operands without TF32 rounding. For 16-bit operands the precision flag has no effect;
    # they get the default ("tf32") like any Triton GEMM.
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _sym_product_kernel[grid](
            x,
            out,
            m,
            k,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            float(beta),
            float(alpha),
            POLY=poly,
            DOT_PRECISION=precision,
            WIDE_OFFSETS=wide,
            INTERPRET_BF16=upcast,
            K_BOUND=k if INTERPRETED else 0,
            # The epilogue's b·A + c·(A·A) contracted to one multiply-add, as has always been compiled; said
            # explicitly since Triton 3.10 changes the default (3.9 warns that it will).
            enable_fp_fusion=True,
        )
    return out


def gram(X: torch.Tensor) -> torch.Tensor:
    """``X @ X.mT`` for a validated (B, m, k) float32/bfloat16/float16 tensor with B, m, k ≥ 1."""
    return _launch(X, 0.0, 1.0, poly=False)


def poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``b·A + c·(A @ A)`` for a validated symmetric (B, m, m) float32/bfloat16/float16 tensor, B, m ≥ 1."""
    return _launch(A, b, c, poly=True)
