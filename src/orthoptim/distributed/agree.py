"""Agreement among ranks: the non-finite skip flag, and that every rank steps the same parameters.

Both are single small fixed-size all-reduces over the optimizer's whole process group, issued on every step by every
rank (whatever the data), so no rank can skip while another commits, and no rank can enter a collective another
rank never issues (microsoft/dion PR 79: the skip decision had to be synchronized over the full group). Only when
ranks disagree does a second collective follow (on every rank, decided from the all-reduced values), to name the
difference in the error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Digests are kept below 2**62 so that they and their negations fit an int64 (the MIN is taken as −MAX(−x)).
_DIGEST_MASK = (1 << 62) - 1


def agree_ok(ok: Tensor, process_group: Any) -> Tensor:
    """All-reduce ``not ok`` with MAX: the returned 0-d bool is true only if ``ok`` is true on every rank.

    Stays on the device (no host sync); float32 because every backend reduces it (NCCL has no bool MAX).
    """
    flag = (~ok).to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
    return flag[0] == 0


def _digest(data: bytes) -> int:
    """A 62-bit digest that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _DIGEST_MASK


@dataclass(frozen=True)
class ParamLayout:
    """What every rank's optimizer must agree on about its parameters: per parameter, in order over all param
    groups, ``(param group index, shape, dtype name)``. Encoded once per parameter set (the optimizer caches it),
    not per step."""

    count: int
    data: bytes  # the entries as JSON: exchanged, only when ranks disagree, to name the difference
    digest: int

    @classmethod
    def of(cls, entries: Sequence[tuple[int, tuple[int, ...], str]]) -> ParamLayout:
        data = json.dumps([[g, list(shape), dtype] for g, shape, dtype in entries], separators=(",", ":")).encode()
        return cls(len(entries), data, _digest(data))


def agree_params(
    layout: ParamLayout, present: Sequence[bool], device: torch.device | None, process_group: Any
) -> list[int]:
    """Check that every rank holds the same parameters and has gradients for the same ones.

    Raises ``RuntimeError`` on every rank, naming each rank's parameter count and the first position whose param
    group, shape or dtype differs (with both), if the layouts differ; otherwise returns the positions whose
    ``present`` (has a gradient) differs between ranks (empty when all agree).

    Ranks that disagree about their parameters would issue collectives of different sizes — gloo aborts the
    process (``EnforceNotMet``), others hang — so the one collective every step issues first has a fixed size
    whatever the parameters: an int64 all-reduce (MAX over ``[x, −x]``: each value's max and min) of the count,
    the encoded layout's length and digest, and a digest of the presence flags (a 2⁻⁶² chance per step that a
    presence mismatch goes unseen). One host read. Every rank sees the same reduced values, so every rank takes
    the same branch after it: on a layout mismatch one all-gather of the encoded layouts (padded to the longest),
    on a presence mismatch one all-reduce of the flags (the counts are then known equal), else nothing.
    ``device``: where collectives run (the parameters' device); ``None`` (no parameters) picks the group's.
    """
    if device is None:
        device = _group_device(process_group)
    local = [layout.count, len(layout.data), layout.digest, _digest(bytes(present))]
    both = torch.tensor([*local, *(-x for x in local)], dtype=torch.int64).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=process_group)
    reduced = both.tolist()
    k = len(local)
    differs = [hi != -neg_lo for hi, neg_lo in zip(reduced[:k], reduced[k:], strict=True)]
    if any(differs[:3]):
        raise RuntimeError(_layout_message(_gather_layouts(layout, reduced[1], device, process_group)))
    if not differs[3]:
        return []
    return presence_mismatch(present, device, process_group)  # the counts are equal: same-size flags


def _group_device(process_group: Any) -> torch.device:
    """A device the group's backend reduces on, for a rank without parameters (NCCL: this rank's GPU)."""
    if "gloo" in str(dist.get_backend(process_group)) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _gather_layouts(layout: ParamLayout, longest: int, device: torch.device, process_group: Any) -> list[list[Any]]:
    """Every rank's layout entries (error path only): one all-gather of the encodings padded to the longest."""
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(layout.data)] = torch.frombuffer(bytearray(layout.data), dtype=torch.uint8)
    out = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(out, mine.to(device), group=process_group)
    # JSON never contains a NUL byte: the padding is cut at the first one.
    return [json.loads(bytes(t.cpu().tolist()).split(b"\0", 1)[0]) for t in out]


def _layout_message(layouts: list[list[Any]]) -> str:
    """Each rank's parameter count and the first position where the ranks' entries differ, rank 0's against the
    first rank that differs from it there."""
    by_count: dict[int, list[int]] = {}
    for r, entries in enumerate(layouts):
        by_count.setdefault(len(entries), []).append(r)
    counts = "; ".join(f"{c} on {_ranks(rs)}" for c, rs in by_count.items())
    text = f"orthoptim: the ranks' optimizers hold different parameters (parameter count: {counts})"
    for pos in range(max(by_count)):
        at = [entries[pos] if pos < len(entries) else None for entries in layouts]
        other = next((r for r, entry in enumerate(at) if entry != at[0]), None)
        if other is not None:
            text += (
                f"; the first difference is at position {pos} over all param groups: rank 0 has "
                f"{_describe(at[0])}, rank {other} has {_describe(at[other])}"
            )
            break
    return (
        f"{text}. Every rank must build its optimizer over the same parameters, in the same order and param groups, "
        "with the same shapes and dtypes (as DistributedDataParallel replicates the model)"
    )


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"ranks 0-2, 5"`` (a long list of ranks stays one line)."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _describe(entry: list[Any] | None) -> str:
    if entry is None:
        return "no parameter there"
    group, shape, dtype = entry
    return f"shape {tuple(shape)} {dtype} (param group {group})"


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
