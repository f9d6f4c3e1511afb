"""The ``triton`` backend: the torch backend (``torch.py``) with its two elementwise passes per megabatch — the
momentum input and the commit — as fused Triton kernels (``triton_kernels.py``); here: when they apply, address
tables, launches. Opt-in (``backend="triton"``) until a GPU run shows them correct and faster there; on the CPU
they run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how they are tested.

``table`` says whether the kernels apply to a megabatch — ``kernels.triton_enabled()`` (``ORTHOPTIM_TRITON=0``
turns them off), float32/bfloat16/float16 state (one dtype for θ, B and G), contiguous plain tensors, non-empty
matrices below 2³¹ entries — by returning its address table, or None. The torch backend looks it up once per
megabatch and hands it to ``momentum_input`` and ``commit``, which return False when the tensors they are given
do not fit (the torch backend then takes its own ops, which compute the same bits).

Address tables: a megabatch's parameters, buffers and gradients are separate tensors; the kernels read each
matrix's address from an int64 table (3 × matrices) on the device. Tables are built on the host, copied without a
sync (pinned memory, non-blocking) and kept by ``PointerTables``, keyed by the addresses themselves, so a step
whose tensors did not move (the usual case: parameters and buffers never move, and gradients reuse their
storage) launches no copy — which also makes a warmed-up step capturable in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ...polar.kernels import triton_enabled

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_LIMIT = 2**31 - 1


@functools.cache
def _kernels() -> ModuleType:
    from . import triton_kernels

    return triton_kernels


def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl  # type: ignore[import-untyped]

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def applies(params: list[Tensor], bufs: list[Tensor], grads: list[Tensor], matrix_numel: int) -> bool:
    """Whether the fused kernels take this megabatch (see the module docstring)."""
    t = params[0]
    if t.dtype not in _STATE_DTYPES or not 0 < matrix_numel <= _INT32_LIMIT:
        return False
    if not triton_enabled():
        return False
    return all(
        type(x) in (Tensor, torch.nn.Parameter) and x.dtype == t.dtype and x.device == t.device and x.is_contiguous()
        for x in (*params, *bufs, *grads)
    )


@dataclass
class Table:
    """A megabatch's address table: (3, matrices) int64 on the device (row 0 θ, row 1 B, row 2 G), whether every
    address is a multiple of 16 bytes (the kernels then vectorize their loads), and, on CUDA, the stream its copy
    was queued on with an event after it (another stream waits for that before reading it)."""

    addresses: Tensor
    aligned: bool
    dtype: torch.dtype  # of θ, B and G
    host: Tensor  # the pinned source of the non-blocking copy (torch's host allocator also guards it)
    stream: Any = None
    copied: Any = None


class PointerTables:
    """Address tables for the kernels, one per set of (θ, B, G) addresses, kept across steps.

    A table is rebuilt only when some tensor moved. Tables looked up while a CUDA graph is being captured are
    kept for good (the graph reads them on every replay); the others are dropped when more than ``limit`` piled
    up (gradients reallocated at new addresses every step). Building one is a host-to-device copy, which a graph
    capture cannot contain: a capture needs the step run eagerly first (as torch's CUDA-graph notes ask anyway).
    """

    def __init__(self, limit: int = 256) -> None:
        self._tables: dict[tuple[int, ...], Table] = {}
        self._captured: dict[int, Table] = {}
        self._limit = limit

    def get(self, params: list[Tensor], bufs: list[Tensor], grads: list[Tensor], counts: tuple[int, ...]) -> Table:
        """The table of these tensors' matrices: a parameter with ``count`` matrices contributes ``count``
        consecutive columns (its matrices are consecutive in memory)."""
        key = (*(x.data_ptr() for x in (*params, *bufs, *grads)), *counts, params[0].numel(), params[0].element_size())
        entry = self._tables.get(key)
        capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
        if entry is None:
            if capturing:
                raise RuntimeError(
                    "orthoptim: the fused step kernels need their address tables built before a CUDA graph capture: "
                    "run the step eagerly first (with the same parameters and .grad tensors), then capture"
                )
            if len(self._tables) >= self._limit:
                self._tables.clear()
            entry = self._tables[key] = self._build(params, bufs, grads, counts)
        if capturing:
            self._captured[id(entry)] = entry
        elif entry.stream is not None:
            stream = torch.cuda.current_stream(params[0].device)
            if stream != entry.stream:  # built on another stream: wait for its copy, keep it alive for this one
                stream.wait_event(entry.copied)
                entry.addresses.record_stream(stream)
        return entry

    @staticmethod
    def _build(params: list[Tensor], bufs: list[Tensor], grads: list[Tensor], counts: tuple[int, ...]) -> Table:
        rows = []
        for role in (params, bufs, grads):
            row = []
            for x, count in zip(role, counts, strict=True):
                step = x.numel() // count * x.element_size()
                row += [x.data_ptr() + q * step for q in range(count)]
            rows.append(row)
        aligned = all(a % 16 == 0 for row in rows for a in row)
        device = params[0].device
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type != "cuda":  # the CPU under the interpreter; meta (benchmarks/step_launches.py)
            return Table(host.to(device), aligned, params[0].dtype, host)
        host = host.pin_memory()  # the copy is then asynchronous: no host sync
        addresses = host.to(device, non_blocking=True)
        stream = torch.cuda.current_stream(device)
        copied = torch.cuda.Event()
        copied.record(stream)
        return Table(addresses, aligned, params[0].dtype, host, stream, copied)


def _launch(kernel: Any, grid: tuple[int], device: torch.device, *args: Any, **meta: Any) -> None:
    """Every fused launch goes through here (``benchmarks/step_launches.py`` replaces it to count them).

    On the tensors' device: Triton launches on the current one. ``enable_fp_fusion=False``: the kernels spell out
    every fused multiply-add they mean (``tl.fma``, as torch's kernels evaluate ``lerp`` and the add); nothing
    else may be contracted, whatever Triton's default (which changes in 3.10)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def table(
    tables: PointerTables,
    params: list[Tensor],
    bufs: list[Tensor],
    grads: list[Tensor],
    counts: tuple[int, ...],
    matrix_numel: int,
) -> Table | None:
    """The megabatch's address table (from ``tables``) if the kernels apply to it (``applies``), else None."""
    return tables.get(params, bufs, grads, counts) if applies(params, bufs, grads, matrix_numel) else None


def _fits(table: Table, stacked: Tensor) -> bool:
    """Whether ``stacked`` (matrices, m, n) is a batch of the table's matrices, on its device."""
    return stacked.device == table.addresses.device and stacked.shape[0] == table.addresses.shape[1]


def momentum_input(table: Table, mu: float, nesterov: bool, out: Tensor) -> bool:
    """Write the optimizer's input ``M`` into ``out`` (matrices, m, n; contiguous, the state's dtype), as
    ``backends.torch.momentum_input`` does, in one launch; the buffers are not changed. False (nothing written) when
    ``out`` does not fit."""
    _, m, n = out.shape
    if out.dtype != table.dtype or not out.is_contiguous() or not _fits(table, out):
        return False
    k = _kernels()
    _launch(
        k.momentum_input_kernel,
        (out.shape[0] * _cdiv(m * n, k.INPUT_BLOCK),),
        out.device,
        table.addresses,
        out,
        out.shape[0],
        m * n,
        *_weight(1.0 - mu),
        *_weight(mu),
        NESTEROV=nesterov,
        STATE_DTYPE=_triton_dtype(out.dtype),
        ALIGNED=table.aligned,
        BLOCK=k.INPUT_BLOCK,
        num_warps=k.NUM_WARPS,
    )
    return True


def commit(
    table: Table,
    mu: float,
    update: Tensor,
    alpha: float | Tensor,
    decay: Tensor | None,
    ok: Tensor | None,
    factor: Tensor | None = None,
) -> bool:
    """``B ← lerp(B, G, 1−μ)``, ``θ ← round(θ·decay) + alpha·U`` for every matrix of the megabatch, where ``ok``
    (always when None), in one launch — ``backends.torch.Pending.commit``'s momentum, weight decay and update.
    ``update``: (matrices, m, n), any strides, float32/bfloat16/float16; ``decay``: the 0-d float32 factor or
    None (no weight decay); a tensor ``alpha`` is read on the device; ``factor``: (matrices, m, 1) or
    (matrices, 1, 1), float32 or U's dtype (NorMuon's rows', PolarGrad's −lr·⟨O, M⟩), applied to U first in
    float32 and rounded to U's dtype, as ``U.mul_(factor)`` does. Every tensor on the parameters' device. False
    (nothing written) when the tensors given do not fit."""
    _, m, n = update.shape
    if update.dtype not in _STATE_DTYPES or not _fits(table, update):
        return False
    device = update.device
    alpha_tensor = alpha if isinstance(alpha, Tensor) else None
    if any(t is not None and t.device != device for t in (alpha_tensor, decay, ok, factor)):
        return False
    if (alpha_tensor is not None and alpha_tensor.numel() != 1) or (decay is not None and decay.dtype != torch.float32):
        return False
    if factor is not None:
        per = ((update.shape[0], m, 1), (update.shape[0], 1, 1))  # per row, per matrix
        if factor.dtype not in (torch.float32, update.dtype) or tuple(factor.shape) not in per:
            return False
    k = _kernels()
    tiles_c = _cdiv(n, k.COMMIT_COLS)
    tiles = _cdiv(m, k.COMMIT_ROWS) * tiles_c
    placeholder = table.addresses  # for the pointers a kernel's flags say it does not read
    _launch(
        k.commit_kernel,
        (update.shape[0] * tiles,),
        device,
        table.addresses,
        update,
        *update.stride(),
        ok.view(torch.uint8) if ok is not None else placeholder,
        decay if decay is not None else placeholder,
        factor if factor is not None else placeholder,
        factor.stride(0) if factor is not None else 0,
        factor.stride(1) if factor is not None and factor.shape[1] > 1 else 0,  # one per matrix: broadcast
        alpha_tensor if alpha_tensor is not None else placeholder,
        0.0 if alpha_tensor is not None else float32(float(alpha)),
        update.shape[0],
        m,
        n,
        *_weight(1.0 - mu),
        tiles_c,
        tiles,
        HAS_FLAG=ok is not None,
        HAS_DECAY=decay is not None,
        HAS_FACTOR=factor is not None,
        ALPHA_TENSOR=alpha_tensor is not None,
        STATE_DTYPE=_triton_dtype(table.dtype),
        ALIGNED=table.aligned,
        BLOCK_R=k.COMMIT_ROWS,
        BLOCK_C=k.COMMIT_COLS,
        num_warps=k.NUM_WARPS,
    )
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a float scalar becomes in torch's float32 math (and a float argument
    on a GPU; Triton's interpreter would keep the double); ±inf beyond float32's range."""
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:  # struct refuses what rounds to ±inf
        return math.copysign(math.inf, x)


def _weight(w: float) -> tuple[float, float]:
    """A lerp weight as torch's kernels use it: ``w`` in float32 and ``1 − w`` formed in float32."""
    w32 = float32(w)
    return w32, float32(1.0 - w32)  # 1 − w32 is exact in double; one rounding to float32, as in float32
