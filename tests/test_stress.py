"""'Never unstable': random and adversarial matrices × every schedule × normalization × {fp32, bf16}.

2,400 matrices per configuration here (400 per shape; bfloat16 products are emulated, and slow, on CPUs without
native ones), every spectrum, shape and scale of the set; ``benchmarks/stress.py`` runs 60,000 per configuration
(``--per-shape``) and prints the table."""

from __future__ import annotations

import pytest
import torch

from orthoptim import list_schedules
from orthoptim.stress import NORMALIZATIONS, SHAPES, SPECTRA, adversarial_batch, run_stress

pytestmark = pytest.mark.slow  # thousands of matrices per configuration; `make test-fast` leaves it out


def test_adversarial_batch_covers_what_it_claims() -> None:
    X = adversarial_batch((6, 24), 100)
    assert X.shape == (100, 6, 24) and X.dtype == torch.float32
    assert torch.isfinite(X).all() and bool((X.abs().amax(dim=(-2, -1)) > 0).all())
    amax = X.abs().amax(dim=(-2, -1)).double()
    assert amax.min() < 1e-30 and amax.max() > 1e30  # tiny and huge scales
    s = torch.linalg.svdvals(X.double() / amax.view(-1, 1, 1))
    assert bool((s[:, 1] < 1e-6 * s[:, 0]).any())  # rank-1 members
    assert bool(((s[:, 0] - s[:, -1]) < 1e-5 * s[:, 0]).any())  # orthogonal (flat, up to fp32 rounding) members


def test_stress_no_configuration_is_unstable() -> None:
    results = run_stress(400)  # 6 shapes × 400 = 2,400 matrices per configuration
    assert len(results) == len(list_schedules()) * len(NORMALIZATIONS) * 2
    assert all(r.matrices >= 2_400 for r in results if not r.refused)
    failures = [r for r in results if not r.ok]
    assert not failures, "\n".join(str(r) for r in failures)
    refused = {(r.schedule, r.compute_dtype) for r in results if r.refused}
    assert refused == {("cans", "bfloat16")}  # refused up front, never run unsafely
    assert len(SPECTRA) >= 10


def test_stress_default_schedules_at_more_steps() -> None:
    """Users run 6 or 8 steps for accuracy: the default and Polar Express stay stable there too."""
    for steps in (6, 8):
        results = run_stress(200, schedules=["orthoptim", "polar_express"], steps=steps)
        failures = [r for r in results if not r.ok]
        assert not failures, "\n".join(str(r) for r in failures)


def test_stress_both_iteration_forms_on_rectangular_matrices() -> None:
    """The standard and the Gram form (newton_schulz.py), each forced, where "auto" would pick one of them:
    the Gram form carries R from step to step, so its restart rule is what keeps it stable (measured: without
    restarts this test fails with output σ ~1e34 for deepseekv4 in float32 and ~1e32 for orthoptim in bf16)."""
    rectangular = [s for s in SHAPES if max(s) >= 2 * min(s) and min(s) > 1]
    assert len(rectangular) >= 3
    for iteration in ("standard", "gram"):
        results = run_stress(200, shapes=rectangular, iteration=iteration)
        failures = [r for r in results if not r.ok]
        assert not failures, "\n".join(str(r) for r in failures)
