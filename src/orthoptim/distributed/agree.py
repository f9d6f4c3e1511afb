"""Agreement among ranks: the non-finite skip flag and the set of parameters that have gradients.

Both are single small all-reduces over the optimizer's whole process group, issued on every step by every rank
(whatever the data), so no rank can skip while another commits, and no rank can enter a collective another
rank never issues (microsoft/dion PR 79: the skip decision had to be synchronized over the full group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def agree_ok(ok: Tensor, process_group: Any) -> Tensor:
    """All-reduce ``not ok`` with MAX: the returned 0-d bool is true only if ``ok`` is true on every rank.

    Stays on the device (no host sync); float32 because every backend reduces it (NCCL has no bool MAX).
    """
    flag = (~ok).to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
    return flag[0] == 0


def presence_mismatch(present: Sequence[bool], device: torch.device, process_group: Any) -> list[int]:
    """Positions whose ``present`` differs between ranks (one all-reduce of 2·len(present) bytes, one host read).

    A parameter with a gradient on one rank and ``None`` on another would make the ranks build different
    megabatches and issue collectives of different sizes: a hang. Each rank contributes ``[p, 1−p]``; after a MAX
    both halves are 1 exactly where the ranks disagree.
    """
    flags = torch.tensor([*present, *(not p for p in present)], dtype=torch.uint8).to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=process_group)
    k = len(present)
    bad = (flags[:k] & flags[k:]).nonzero().flatten()
    return [int(i) for i in bad.tolist()]
