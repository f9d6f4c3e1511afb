"""Which elementwise arithmetic each device gets around the Newton–Schulz products.

The optimizers' normalization and the Gram form's scalings can be computed two ways, equal up to the last bit:
through float32 copies (the prescaled five-pass ``normalize``, ``gram_scale``'s float32 work copy, the first Gram
step's float32 factor), or in one or two passes with a float64 per-matrix factor, rounded once
(``normalize.normalize_by_float64_norm``, ``normalize._schatten4_scale_in_place``,
``newton_schulz._plus_identity``). The second moves ~3–5× fewer bytes, which is what a GPU's step is bound by
(``benchmarks/step_launches.py``); on the CPU torch runs mixed-dtype elementwise ops as unvectorized loops and the
first is faster (measured 2026-11-23: 68–129 vs 131–483 ms for 12 × 768×3072).
"""

from __future__ import annotations

import torch

#: Devices that take the float32-copy way. Tests empty it to run the GPUs' way on the CPU.
FLOAT32_COPY_DEVICES: tuple[str, ...] = ("cpu",)


def float32_copies(device: torch.device) -> bool:
    """Whether ``device`` takes the float32-copy way (read at call time, so tests can switch it)."""
    return device.type in FLOAT32_COPY_DEVICES


def float64_factors(t: torch.Tensor) -> bool:
    """Whether ``t``'s elementwise work takes the float64-factor way: off ``FLOAT32_COPY_DEVICES`` and narrower
    than float64 (a float64 tensor keeps the copy way everywhere: its per-matrix factors are already float64, and
    the float32 reductions of the other way would narrow it)."""
    return t.dtype != torch.float64 and not float32_copies(t.device)
