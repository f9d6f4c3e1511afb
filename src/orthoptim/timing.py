"""What ``orthoptim doctor``, ``orthoptim bench``, ``orthoptim demo`` and the benchmark scripts share: the device they
run on, timers, plain-text tables."""

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


#: Device types the commands can run on: ``meta`` holds no data, and the others need builds this project does not
#: test.
RUNNABLE_DEVICES = ("cpu", "cuda")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A command's ``--device``: None → cuda if available, else cpu; otherwise a torch device that exists here
    (``ValueError`` naming the problem, not a traceback from the first tensor put there)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in RUNNABLE_DEVICES:
        raise ValueError(f"--device {spec}: choose a device of type {' or '.join(RUNNABLE_DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available in this torch build or on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
