"""``orthoptim.PolarGrad``: Muon whose update is scaled by the nuclear norm of its input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .muon import Muon

#: Polar Express steps PolarGrad runs by default: 8 steps (24 matmuls) bring every gain for σ ≥ 1e-3·σmax
#: within 1e-3 of 1 in exact arithmetic, so ⟨O, M⟩ is within 1% of ‖M‖_* (tests/test_optim.py checks it
#: against float64 SVD on ill-conditioned matrices).
POLARGRAD_STEPS = 8


class PolarGrad(Muon):
    """PolarGrad (arXiv 2505.21799): ``θ ← (1 − λγ)θ − γ·‖M‖_*·polar(M)`` with ``M`` the (Nesterov) momentum.

    This is :class:`orthoptim.Muon` with ``scale_mode="nuclear"``: the nuclear norm is computed as ``⟨O, M⟩`` from
    the same orthogonalization, which is why PolarGrad runs 8 Polar Express steps by default (with 5 steps the
    gains spread over [0.84, 1.12] and ``⟨O, M⟩ = Σgᵢσᵢ`` can be off by 10%).

    Learning rate: the update's size scales with ‖M‖_* instead of being fixed, so Muon's lr does not carry over.
    Rule of thumb — match the first steps' update size: ``lr_polargrad ≈ lr_muon · lr_scale(m, n) / ‖M₀‖_*``, with
    ‖M₀‖_* the typical nuclear norm of the momentum early in training (``orthoptim.nuclear_norm`` of a gradient
    times 1/(1 − momentum) gives it). PolarGrad is not scale-invariant: gradient clipping changes its steps, and
    ``orthoptim.clip_grad_norm_`` includes its groups. Distributed (``process_group``, as Muon): the owner of each
    matrix computes ``⟨O, M⟩`` on the whole matrix, also when FSDP2 shards it.
    """

    def __init__(self, params: Iterable[Any], *args: Any, **kw: Any) -> None:
        kw.setdefault("scale_mode", "nuclear")
        if kw.get("ns_coefficients") is None:
            kw.setdefault("ns_steps", POLARGRAD_STEPS)
        super().__init__(params, *args, **kw)
