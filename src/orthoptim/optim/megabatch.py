"""Group parameters' matrices by (matrix shape, dtype, device) so each group is orthogonalized in one call.

A parameter contributes ``count`` matrices of shape (m, n) (see ``shapes.matrix_layout``); parameters whose
matrices share shape, dtype and device are stacked into one batch. The same plan is what the distributed path
splits among ranks (issue "Distributed"), so it is computed once per set of parameters and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Megabatch:
    """Positions (into the step's parameter list) of parameters stacked together, and their matrix shape."""

    indices: tuple[int, ...]
    matrix_shape: tuple[int, int]
    counts: tuple[int, ...]  # matrices per parameter, in the order of ``indices``

    @property
    def matrices(self) -> int:
        return sum(self.counts)


def plan_megabatches(
    layouts: Sequence[tuple[int, int, int]], dtypes: Sequence[torch.dtype], devices: Sequence[torch.device]
) -> list[Megabatch]:
    """Group parameter positions by (m, n, dtype, device); ``layouts[i] = (count, m, n)``. Order is stable."""
    groups: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
    for i, ((_, m, n), dtype, device) in enumerate(zip(layouts, dtypes, devices, strict=True)):
        groups.setdefault((m, n, dtype, device), []).append(i)
    return [Megabatch(tuple(idx), (m, n), tuple(layouts[i][0] for i in idx)) for (m, n, _, _), idx in groups.items()]
