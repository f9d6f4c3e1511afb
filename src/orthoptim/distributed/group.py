"""Which process group an optimizer works over: the default, an explicit group, or none (local)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


class _DefaultGroup:
    """Sentinel for "not given": the world group when torch.distributed is initialized with world size > 1."""

    _instance: _DefaultGroup | None = None

    def __new__(cls) -> _DefaultGroup:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT_PROCESS_GROUP"

    def __reduce__(self) -> str:  # a singleton survives copy/pickle as itself
        return "DEFAULT_PROCESS_GROUP"


#: ``process_group=`` default: the world group if torch.distributed is initialized and has more than one rank.
DEFAULT_PROCESS_GROUP: Any = _DefaultGroup()


@dataclass(frozen=True)
class GroupRef:
    """The process group an optimizer works over, as the optimizer keeps it.

    ``group`` is ``None`` for the default (world) group — passed as ``group=None`` to each collective, which looks
    it up at call time — so the optimizer holds no reference to it: with gloo (torch 2.13) a ProcessGroup object
    that outlives ``destroy_process_group()`` until interpreter exit aborts the process ("terminate called
    without an active exception"). An explicit group is kept as given (its owner holds it anyway).
    """

    group: Any
    ranks: tuple[int, ...]  # global ranks of the members, in group-rank order
    rank: int  # this process's rank in the group

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupRef:
        return self  # a deep-copied optimizer works over the same group (immutable; a handle, not data)

    def __reduce__(self) -> Any:
        raise TypeError(
            "an optimizer with a process group cannot be pickled (its group and rank belong to this process): "
            "save opt.state_dict() instead, or copy.deepcopy it within the process"
        )


def resolve_process_group(process_group: Any) -> GroupRef | None:
    """The group the optimizer splits work over and agrees on skips with, or ``None`` to run locally.

    * :data:`DEFAULT_PROCESS_GROUP`: the world group when ``torch.distributed`` is initialized with more than one
      rank, else ``None``;
    * ``None``: local (every rank does all the work, no collective);
    * a ``ProcessGroup``: that group; a group of one rank is the same as ``None``.

    Raises ``ValueError`` if a group is given while torch.distributed is not initialized, ``TypeError`` for
    anything else.
    """
    available = dist.is_available() and dist.is_initialized()
    if process_group is DEFAULT_PROCESS_GROUP:
        if not (available and dist.get_world_size() > 1):
            return None
        process_group = dist.group.WORLD
    if process_group is None:
        return None
    if not available:
        raise ValueError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first, or pass process_group=None to run locally"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process_group")
    if dist.get_world_size(process_group) == 1:
        return None
    ranks = tuple(int(r) for r in dist.get_process_group_ranks(process_group))
    return GroupRef(None if process_group is dist.group.WORLD else process_group, ranks, rank)
