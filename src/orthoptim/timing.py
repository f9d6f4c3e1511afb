"""Timers and plain-text tables shared by ``orthoptim doctor``, ``orthoptim bench`` and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` in ms: CUDA events around it on a GPU (the device synced before, so earlier work
    is not counted, and after, to read the events), ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> float:
    """Median of ``repeats`` (at least one) ``call_ms(fn)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn, device) for _ in range(max(1, repeats)))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
