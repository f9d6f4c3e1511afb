"""Who orthogonalizes what: a deterministic owner per unit of work, balancing FLOPs over ranks.

Every rank computes the same assignment from the same shapes (no collective): greedy "largest first onto the
least-loaded rank" (LPT scheduling; Graham 1969), ties broken by position and by lowest rank. The busiest rank's
load is at most the mean plus one unit, so per-rank work falls as 1/world up to one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence


def matrix_flops(m: int, n: int, steps: int = 1) -> int:
    """Multiply-add FLOPs of ``steps`` quintic Newton–Schulz steps on one m×n matrix (2 FLOPs per multiply-add).

    With s = min(m, n), l = max(m, n): ``A = XXᵀ`` (s²l), ``A·A`` (s³), ``(bA + cA²)·X`` (s²l) per step.
    """
    s, long = min(m, n), max(m, n)
    return steps * 2 * (2 * s * s * long + s * s * s)


def assign_owners(costs: Sequence[int], world: int) -> tuple[list[int], list[int]]:
    """``(owner per item, load per rank)``: each item goes, largest first, to the currently least-loaded rank."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    loads = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners, loads


def rank_counts(owners: Sequence[int], world: int) -> tuple[int, ...]:
    """How many of a batch's (equal-cost) items each rank owns; rank r then takes the r-th contiguous slice."""
    counts = [0] * world
    for r in owners:
        counts[r] += 1
    return tuple(counts)
