"""Plots people would rather see than read (matplotlib, an optional dependency: ``pip install orthoptim[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .polar.schedules import ROUNDING_UPPER, Schedule, composite


def plot_schedules(
    schedules: Mapping[str, Schedule], path: str | Path, *, lower: float = 1e-4, upper: float = ROUNDING_UPPER
) -> Path:
    """Composite polynomial of each schedule (input σ after normalization → output gain), log-σ axis.

    Each curve applies the schedule's margin and default steps exactly as ``orthogonalize`` does; the grey band is
    ±5% around 1 and the dotted line marks each schedule's design lower bound. Writes a PNG and returns its path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install 'orthoptim[plot]'") from exc
    x = np.geomspace(lower, upper, 4000)
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.axhspan(0.95, 1.05, color="0.9", zorder=0)
    ax.axhline(1.0, color="0.5", lw=0.8)
    for name, sched in schedules.items():
        y = composite(sched.steps_coefficients(), x / sched.margin)
        (line,) = ax.plot(x, y, lw=1.4, label=f"{name} ({sched.default_steps} steps, {sched.matmuls()} matmuls)")
        ax.axvline(sched.lower, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.4)
    ax.set_xlabel("input singular value σ (after normalization)")
    ax.set_ylabel("output singular value")
    ax.set_title("Newton–Schulz composite polynomials (exact arithmetic)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
