"""Group parameters' matrices by (matrix shape, dtype, device) so each group is orthogonalized in one call.

A parameter contributes ``count`` matrices of shape (m, n) (see ``options.matrix_layout``); parameters whose
matrices share shape, dtype and device are stacked into one batch. The same plan is what the distributed path
splits among ranks (issue "Distributed"), so it is computed once per set of parameters and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Megabatch:
    """Positions (into the step's parameter list) of parameters stacked together, and their matrix shape."""

    indices: tuple[int, ...]
    matrix_shape: tuple[int, int]
    counts: tuple[int, ...]  # matrices per parameter, in the order of ``indices``
    matrices: int = field(init=False)  # their total

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrices", sum(self.counts))


#: On the CPU a megabatch's stacked tensors stay below this size. Why: the step's temporaries are sized by the
#: largest megabatch, and the optimizer keeps them between steps on the CPU (``backends.torch.prepare``: fresh
#: large blocks would be page-faulted in on every step), so this bounds that memory (~70 MiB for GPT-2 small's 48
#: matrices). Nothing is lost: the iteration runs matrix by matrix on the CPU anyway (polar/newton_schulz.py), and
#: 16, 32, 64 and 128 MiB gave the same step time within noise (±3%, GPT-2-small step, 2-core CPU, 2026-11-23).
CPU_MEGABATCH_BYTES = 16 * 2**20


def plan_megabatches(
    layouts: Sequence[tuple[int, int, int]],
    dtypes: Sequence[torch.dtype],
    devices: Sequence[torch.device],
    *,
    max_bytes: int | None = None,
) -> list[Megabatch]:
    """Group parameter positions by (m, n, dtype, device); ``layouts[i] = (count, m, n)``. Order is stable.

    ``max_bytes`` splits a group into consecutive megabatches whose stacked size stays within it (a parameter larger
    than the budget gets a megabatch of its own; parameters are never split).
    """
    groups: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
    for i, ((_, m, n), dtype, device) in enumerate(zip(layouts, dtypes, devices, strict=True)):
        groups.setdefault((m, n, dtype, device), []).append(i)
    plan = []
    for (m, n, dtype, _), idx in groups.items():
        per_matrix = m * n * torch.empty((), dtype=dtype).element_size()
        chunk: list[int] = []
        size = 0
        for i in idx:
            size_i = layouts[i][0] * per_matrix
            if chunk and max_bytes is not None and size + size_i > max_bytes:
                plan.append(Megabatch(tuple(chunk), (m, n), tuple(layouts[j][0] for j in chunk)))
                chunk, size = [], 0
            chunk.append(i)
            size += size_i
        plan.append(Megabatch(tuple(chunk), (m, n), tuple(layouts[j][0] for j in chunk)))
    return plan
