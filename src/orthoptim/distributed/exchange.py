"""Replicated parameters (DDP): each rank orthogonalizes its share of a megabatch, then the results are exchanged.

A megabatch is a stacked ``(B, m, n)`` tensor that every rank holds whole (DDP all-reduced the gradients, so the
momentum is identical everywhere). Rank r owns the r-th contiguous slice of ``counts[r]`` matrices (from
``owners.rank_counts``); it runs the caller's function on that slice only, and the exchange (asynchronous: the
next megabatch is orthogonalized while this one travels) gives every rank all results in the original order:

* one ``all_gather_single`` when the counts are even enough — slices are padded with zeros to the largest
  count so the gather is one dense collective (padding is never orthogonalized);
* one ``broadcast`` per owning rank when padding would cost more than ``PAD_LIMIT`` of the payload (fewer
  matrices than ranks, e.g. one matrix of a shape: an all-gather would move world× its size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: ``all_gather_single`` (torch ≥ 2.13, where ``all_gather_into_tensor`` is deprecated), else the older name.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: Largest padding, relative to the megabatch's size, for which one padded all-gather is used.
PAD_LIMIT = 0.25


class GatherHandle:
    """An in-flight exchange of one megabatch's results; :meth:`wait` returns the full ``(B, m, n)`` tensor."""

    def __init__(self, works: list[Any], out: Tensor, counts: tuple[int, ...], width: int | None) -> None:
        # ``width``: the padded per-rank count of an all-gather; None when ``out`` is already in order.
        self._works, self._out, self._counts, self._width = works, out, counts, width

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        out, counts, width = self._out, self._counts, self._width
        if width is None or all(c == width for c in counts):  # broadcasts, or an all-gather without padding
            return out
        return torch.cat([out[r * width : r * width + c] for r, c in enumerate(counts) if c])


def uses_all_gather(counts: Sequence[int]) -> bool:
    """Whether a megabatch with these per-rank counts is exchanged by one padded all-gather (else broadcasts)."""
    return len(counts) * max(counts) <= (1.0 + PAD_LIMIT) * sum(counts)


def orthogonalize_split(
    M: Tensor, counts: Sequence[int], rank: int, process_group: Any, fn: Callable[[Tensor], Tensor]
) -> GatherHandle:
    """Apply ``fn`` (shape-preserving, per matrix) to this rank's slice of ``M`` and start exchanging all slices.

    ``counts[r]`` matrices belong to rank r (group rank), in rank order; ``sum(counts) == M.shape[0]``. Every rank
    of the group (``None``: the default group) must call this with the same ``counts`` and shapes, in order.
    """
    counts = tuple(counts)
    if sum(counts) != M.shape[0]:
        raise ValueError(f"counts {counts} do not add up to the megabatch's {M.shape[0]} matrices")
    start = sum(counts[:rank])
    mine = counts[rank]
    if not uses_all_gather(counts):
        out = M.new_empty(M.shape)
        if mine:
            out[start : start + mine] = fn(M[start : start + mine])
        works, offset = [], 0
        for r, c in enumerate(counts):
            if c:  # a slice along dim 0 of a contiguous tensor is contiguous, as broadcast needs
                works.append(dist.broadcast(out[offset : offset + c], group=process_group, group_src=r, async_op=True))
            offset += c
        return GatherHandle(works, out, counts, None)
    width = max(counts)
    if mine == width:
        send = fn(M[start : start + mine]).contiguous()
    else:  # pad to the common width; the padding is zeros, never orthogonalized
        send = M.new_zeros((width, *M.shape[1:]))
        if mine:
            send[:mine] = fn(M[start : start + mine])
    out = M.new_empty((len(counts) * width, *M.shape[1:]))
    work = _ALL_GATHER(out, send, group=process_group, async_op=True)
    return GatherHandle([work], out, counts, width)


def gather_bytes(counts: Sequence[int], rank: int, matrix_numel: int, element_size: int) -> int:
    """Bytes rank ``rank`` receives from the others for one megabatch (what the benchmark reports)."""
    if uses_all_gather(counts):
        return (len(counts) - 1) * max(counts) * matrix_numel * element_size
    return (sum(counts) - counts[rank]) * matrix_numel * element_size
