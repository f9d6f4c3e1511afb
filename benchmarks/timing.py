"""Timing shared by the benchmark scripts: median ms per call, CUDA events on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` untimed calls: CUDA events on the GPU (each call
    bracketed, device synced before reading), ``time.perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
