"""Triton kernels for the optimizer step's elementwise work around the orthogonalization, one launch per megabatch.

Without them a GPU step moves every momentum entry many times: the input ``M`` is built by a copy and two
``lerp`` passes (32 bytes per float32 entry), and the commit recomputes the buffers' ``lerp``, applies the
weight decay and adds the update in three more (30 bytes) — ``benchmarks/step_launches.py`` counts them. Here:

- ``momentum_input_kernel`` reads the buffer ``B`` and the gradient ``G`` once and writes ``M``:
  ``new = lerp(B, G, 1−μ)`` rounded to the buffer's dtype, then ``M = lerp(G, new, μ)`` (Nesterov) or ``new``.
  Nothing of the optimizer's state is written (12 bytes per float32 entry).
- ``commit_kernel`` reads ``B``, ``G``, the parameter ``θ`` and the update ``U`` once and writes ``B`` and ``θ``:
  ``B ← lerp(B, G, 1−μ)``, ``θ ← round(θ·decay) + α·U`` (NorMuon, PolarGrad: ``U`` first scaled by its rows' or
  its matrix's factor, which saves that in-place pass over ``U``) — only where the step's device-side flag is
  true: a
  skipped step loads and stores nothing (masked), so no select pass and no NaN can leak (22 bytes per entry with
  a bfloat16 update).

Each is bit for bit what the torch ops they replace compute (``backends.torch.momentum_input``,
``backends.torch.Pending.commit``): the same roundings in the same order, and ``lerp`` and the update's add written as
the single fused multiply-adds that torch's CPU kernels (``vec::fmadd``) and CUDA kernels (contracted by nvcc)
evaluate — tested on the CPU under Triton's interpreter, which evaluates ``tl.fma`` with one rounding.

The parameters, buffers and gradients of a megabatch are separate tensors: each kernel takes a table of their
matrices' addresses (int64, one row per role, one column per stacked matrix) built by ``backends/triton.py``, and a
program handles one tile of one matrix. The stacked ``M`` and ``U`` are addressed through their strides (a tall
matrix's update is a transposed view). This module imports triton at import time: import it only where
``orthoptim.polar.kernels.triton_available()`` is true.
"""

from __future__ import annotations

import os

import triton  # type: ignore[import-untyped]  # triton ships no type information
import triton.language as tl  # type: ignore[import-untyped]

#: Whether this import runs under Triton's interpreter (TRITON_INTERPRET=1 when the kernels are decorated): the
#: launch shapes below are then small, so tests cover several tiles per matrix on small matrices.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: Elements per program of the momentum input (flat over one matrix) and the commit's (rows × columns) tile:
#: 4096 entries, enough per program to hide the address-table load; not autotuned (an elementwise pass has no
#: tile-size trade-off worth a first-call autotune).
INPUT_BLOCK = 1024 if INTERPRETED else 4096
COMMIT_ROWS, COMMIT_COLS = (32, 64) if INTERPRETED else (32, 128)
NUM_WARPS = 4 if INTERPRETED else 8


@triton.jit
def _lerp(start, end, weight, complement):  # type: ignore[no-untyped-def]
    """torch's ``lerp`` with a scalar weight (ATen Lerp.h): ``start + w·(end − start)`` for |w| < 0.5, else
    ``end − (end − start)·(1 − w)``, each one fused multiply-add, all in float32. ``complement`` is ``1 − w`` as
    torch forms it (``w`` rounded to float32, then the float32 difference), given by the host: the interpreter
    keeps a float argument in double precision, so ``1 − w`` formed here would differ there."""
    diff = end - start
    small = tl.abs(weight) < 0.5
    return tl.where(small, tl.fma(diff, weight, start), tl.fma(-diff, complement, end))


@triton.jit
def _round(x, DTYPE: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 ``x`` rounded to nearest-even in ``DTYPE``, as torch rounds. bfloat16 by its bits: Triton's
    interpreter truncates a float32 → bfloat16 cast (triton 3.9, ``interpreter._convert_float``), and the tests run
    this very code there; on a GPU these few integer ops are free in a memory-bound pass. A NaN stays a NaN with
    its sign and top payload bits (torch's conversions may give another NaN pattern: NaNs are equal only as NaNs)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = bits + 0x7FFF + ((bits >> 16) & 1)  # carries into the exponent: overflow rounds to ±inf
        up = tl.where(x != x, bits | 0x400000, up)  # a NaN stays a (quiet) NaN
        return (up >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _matrix_address(table, role, matrices, j, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):  # type: ignore[no-untyped-def]
    """Matrix ``j``'s address in role ``role`` (0 θ, 1 B, 2 G) of the table, as a ``DTYPE`` pointer; ``ALIGNED``:
    the host checked every address of the table to be a multiple of 16 bytes, which lets loads vectorize."""
    ptr = tl.load(table + role * matrices + j).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# Both kernels run on a 1-D grid, program p taking tile p % tiles of matrix p // tiles: CUDA's second and third
# grid dimensions stop at 65535, the first at 2³¹ − 1. ``matrices`` only offsets the address table (scalar loads):
# not specialized, so a model with another number of matrices of a shape reuses the compiled kernel. Sizes and
# strides stay specialized (their divisibility by 16 lets the loads and stores vectorize).
@triton.jit(do_not_specialize=["matrices"])
def momentum_input_kernel(  # type: ignore[no-untyped-def]
    table,  # int64 (3, matrices): addresses of each matrix of θ (unused here), B, G
    out_ptr,  # M, (matrices, rows, cols) contiguous, in the buffers' dtype
    matrices,
    numel,  # rows · cols
    keep,  # 1 − μ, the weight of G in the new momentum (each weight as float32, with its complement)
    keep_c,
    mu,  # μ, the Nesterov weight of the new momentum
    mu_c,
    NESTEROV: tl.constexpr,
    STATE_DTYPE: tl.constexpr,  # B's, G's and M's dtype
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tiles = tl.cdiv(numel, BLOCK)
    j = tl.program_id(0) // tiles
    offs = (tl.program_id(0) - j * tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b_ptr = _matrix_address(table, 1, matrices, j, STATE_DTYPE, ALIGNED)
    g_ptr = _matrix_address(table, 2, matrices, j, STATE_DTYPE, ALIGNED)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    new = _round(_lerp(b, g, keep, keep_c), STATE_DTYPE)  # rounded as the buffer will hold it
    if NESTEROV:
        new = _round(_lerp(g, new.to(tl.float32), mu, mu_c), STATE_DTYPE)
    tl.store(out_ptr + j.to(tl.int64) * numel + offs, new, mask=mask)


@triton.jit(do_not_specialize=["matrices", "tiles_c", "tiles"])
def commit_kernel(  # type: ignore[no-untyped-def]
    table,  # int64 (3, matrices): addresses of each matrix of θ, B, G
    upd_ptr,  # U, (matrices, rows, cols), any strides
    stride_ub,
    stride_ur,
    stride_uc,
    ok_ptr,  # 0-d bool: commit where true (read only if HAS_FLAG)
    decay_ptr,  # 0-d float32: θ's factor 1 − lr·wd (read only if HAS_DECAY)
    factor_ptr,  # U's factor per row or per matrix (stride_fr 0) (read only if HAS_FACTOR)
    stride_fb,
    stride_fr,
    alpha_ptr,  # 0-d: the update's factor −lr·scale (read only if ALPHA_TENSOR)
    alpha,  # the update's factor as a float32 number (used unless ALPHA_TENSOR)
    matrices,
    rows,
    cols,
    keep,  # 1 − μ as float32, and its complement
    keep_c,
    tiles_c,  # column tiles per matrix
    tiles,  # tiles per matrix
    HAS_FLAG: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    ALPHA_TENSOR: tl.constexpr,
    STATE_DTYPE: tl.constexpr,  # θ's, B's and G's dtype
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    j = tl.program_id(0) // tiles
    tile = tl.program_id(0) - j * tiles
    tile_r = tile // tiles_c
    tile_c = tile - tile_r * tiles_c
    if HAS_FLAG:  # a skipped step: no rows, so every load and store is masked off
        rows = tl.where(tl.load(ok_ptr) != 0, rows, 0)
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < cols)
    p_ptr = _matrix_address(table, 0, matrices, j, STATE_DTYPE, ALIGNED)
    b_ptr = _matrix_address(table, 1, matrices, j, STATE_DTYPE, ALIGNED)
    g_ptr = _matrix_address(table, 2, matrices, j, STATE_DTYPE, ALIGNED)
    at = r * cols + c
    b = tl.load(b_ptr + at, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + at, mask=mask).to(tl.float32)
    tl.store(b_ptr + at, _round(_lerp(b, g, keep, keep_c), STATE_DTYPE), mask=mask)
    u_at = j.to(tl.int64) * stride_ub + r.to(tl.int64) * stride_ur + c.to(tl.int64) * stride_uc
    u = tl.load(upd_ptr + u_at, mask=mask).to(tl.float32)
    if HAS_FACTOR:  # U·factor in float32, rounded to U's dtype: torch's U.mul_(factor)
        f = tl.load(factor_ptr + j.to(tl.int64) * stride_fb + r.to(tl.int64) * stride_fr, mask=r < rows)
        u = _round(u * f.to(tl.float32), upd_ptr.dtype.element_ty).to(tl.float32)
    p = tl.load(p_ptr + at, mask=mask).to(tl.float32)
    if HAS_DECAY:
        p = _round(p * tl.load(decay_ptr), STATE_DTYPE).to(tl.float32)  # torch's mul_ rounds before the add
    if ALPHA_TENSOR:
        a = tl.load(alpha_ptr).to(tl.float32)
    else:
        a = alpha
    tl.store(p_ptr + at, _round(tl.fma(u, a, p), STATE_DTYPE), mask=mask)
