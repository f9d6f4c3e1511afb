"""Which elementwise arithmetic runs around the Newton–Schulz products: an option, resolved per call.

The optimizers' normalization and the Gram form's scalings can be computed two ways, equal up to the last bit:
through float32 copies (the prescaled five-pass ``normalize``, ``gram_scale``'s float32 work copy, the first Gram
step's float32 factor), or in one or two passes with a float64 per-matrix factor, rounded once
(``normalize.normalize_by_float64_norm``, ``normalize._schatten4_scale_in_place``,
``newton_schulz._plus_identity``). The second moves ~3–5× fewer bytes, which is what a GPU's step is bound by
(``benchmarks/step_launches.py``); on the CPU torch runs mixed-dtype elementwise ops as unvectorized loops and the
first is faster (measured 2026-11-23: 68–129 vs 131–483 ms for 12 × 768×3072).

``orthogonalize(elementwise=...)`` chooses: ``"auto"`` (the CPU copies, every other device takes the factors),
``"float32_copies"`` or ``"float64_factors"``; the optimizers' backends pass their device choices down. A float64
tensor keeps the copy way everywhere: its per-matrix factors are float64 already, and the float32 reductions of
the other way would narrow it. The callers test ``dtype != float64 and not copies`` where they stand (one
expression, no call per product).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

Elementwise: TypeAlias = Literal["auto", "float32_copies", "float64_factors"]
ELEMENTWISE: tuple[str, ...] = ("auto", "float32_copies", "float64_factors")


def float32_copies(device: torch.device, elementwise: str = "auto") -> bool:
    """Whether the float32-copy way is taken (``"auto"``: on the CPU)."""
    if elementwise == "auto":
        return device.type == "cpu"
    return elementwise == "float32_copies"
