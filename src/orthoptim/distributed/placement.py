"""Where each rank's part of a DTensor parameter lies in the whole tensor, on any device mesh.

A DTensor on an N-D ``DeviceMesh`` with placements such as ``(Replicate(), Shard(0))`` (HSDP), ``(Shard(0),)`` /
``(Shard(1),)`` (FSDP2, tensor parallel's colwise / rowwise), ``(_StridedShard(0), Shard(0))`` (tensor parallel
× FSDP) or ``(Shard(0), Shard(1))`` gives every rank of the mesh one rectangular *block* of the global tensor:
an offset and a size per tensor dimension. Ranks whose mesh coordinates differ only along ``Replicate`` mesh
dimensions hold the same block (replicas).

:func:`block_layout` computes every rank's block (indexed by the optimizer's group rank) and checks that the
distinct blocks tile the tensor exactly; the executor then moves each parameter's blocks to one owner — one
source per distinct block: replicas do not all send — and the owner's update blocks back to every holder.

``Shard`` and ``Replicate`` follow ``torch.chunk`` semantics from the first mesh dimension to the last (as
DTensor lays them out); ``_StridedShard`` (which reorders that sharding) is laid out by torch's own helper,
and whatever it gives must still be rectangular blocks that tile the tensor, else the parameter is refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SUPPORTED = (
    "supported: DTensor parameters whose mesh holds exactly the optimizer's process group's ranks (pass "
    "process_group=<the mesh's group> otherwise), placed with Replicate() and Shard(d) on any mesh dimension "
    "(FSDP2, HSDP, tensor parallel, expert parallel and their 2-D combinations), each rank's part a "
    "rectangular block as torch.chunk cuts it"
)


@dataclass(frozen=True)
class Block:
    """One rank's part of a tensor: ``starts[d] : starts[d] + sizes[d]`` along every dimension d."""

    starts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def index(self) -> tuple[slice, ...]:
        """The block as an index into the whole tensor."""
        return tuple(slice(s, s + n) for s, n in zip(self.starts, self.sizes, strict=True))


@dataclass(frozen=True)
class BlockLayout:
    """A DTensor's blocks over the optimizer's process group: ``blocks[r]`` is what group rank r holds."""

    shape: tuple[int, ...]
    blocks: tuple[Block, ...]

    @property
    def world(self) -> int:
        return len(self.blocks)

    def holders(self) -> list[list[int]]:
        """Ranks holding each distinct non-empty block (replicas together), blocks in order of first holder."""
        by_block: dict[Block, list[int]] = {}
        for r, b in enumerate(self.blocks):
            if b.numel:
                by_block.setdefault(b, []).append(r)
        return list(by_block.values())

    def sources(self, owner: int) -> tuple[int, ...]:
        """One rank per distinct block that sends it to ``owner``: the owner itself where it holds the block,
        else a replica picked by the owner's rank (so replicas share the sending over parameters). Kept per
        owner: the step asks for it every time."""
        cache: dict[int, tuple[int, ...]] = self.__dict__.setdefault("_sources", {})  # not a field: frozen
        if owner not in cache:
            cache[owner] = tuple(owner if owner in rs else rs[owner % len(rs)] for rs in self.holders())
        return cache[owner]

    def whole_along(self, dims: Sequence[int]) -> bool:
        """Whether every block spans the whole tensor along each of ``dims``."""
        return all(b.starts[d] == 0 and b.sizes[d] == self.shape[d] for b in self.blocks if b.numel for d in dims)

    def replicated(self) -> bool:
        """Whether every rank holds the whole tensor."""
        return all(b.sizes == self.shape for b in self.blocks)

    def local_matrices(self) -> bool:
        """Whether every rank holds a non-empty stack of whole matrices (the last two dims: experts sharded over
        the leading ones), so each can orthogonalize its own and nothing needs to move; not when every rank holds
        everything (replicated matrices are better split among owners, as DDP's)."""
        last = (len(self.shape) - 2, len(self.shape) - 1)
        return (
            len(self.shape) >= 3
            and all(b.numel for b in self.blocks)
            and self.whole_along(last)
            and not self.replicated()
        )

    @classmethod
    def of(cls, shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any]) -> BlockLayout:
        """The blocks of a tensor of ``shape`` placed ``placements`` on a mesh of ``mesh_shape`` whose ranks are
        its coordinates in row-major order (``init_device_mesh``'s); raises ``ValueError`` if they do not tile
        it. Plain data: what :func:`block_layout` computes for a DTensor, without one (the benchmarks' plans)."""
        from torch.distributed.tensor.placement_types import _StridedShard

        strided = any(isinstance(p, _StridedShard) for p in placements)
        where = _strided_block if strided else chunk_block
        coords = itertools.product(*(range(k) for k in mesh_shape))
        layout = cls(tuple(shape), tuple(where(shape, mesh_shape, c, placements) for c in coords))
        if not _tiles(layout.shape, layout.blocks):
            raise ValueError(f"placements {tuple(placements)} on a {tuple(mesh_shape)} mesh do not tile {shape}")
        return layout

    def exchange_bytes(self, owner: int, element_size: int) -> list[int]:
        """Bytes each rank sends plus receives in one step for this parameter (the executor's exchange): its
        distinct blocks to ``owner`` (one source each), the owner's update blocks back to every holder, copies
        within a rank not counted."""
        moved = [0] * self.world
        for r in self.sources(owner):
            if r != owner:
                moved[r] += self.blocks[r].numel * element_size
                moved[owner] += self.blocks[r].numel * element_size
        for r, block in enumerate(self.blocks):
            if r != owner and block.numel:
                moved[r] += block.numel * element_size
                moved[owner] += block.numel * element_size
        return moved


def _describe(p: Any) -> str:
    return f"DTensor parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)} on {p.device_mesh}"


def chunk_block(shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], placements: Any) -> Block:
    """The block of mesh coordinate ``coord`` under ``Shard(d)`` / ``Replicate()`` placements, applied from the
    first mesh dimension to the last, each a ``torch.chunk`` of what the previous ones left (DTensor's layout)."""
    starts, sizes = [0] * len(shape), list(shape)
    for k, placement in enumerate(placements):
        d = getattr(placement, "dim", None)
        if d is None:  # Replicate
            continue
        parts, have = mesh_shape[k], sizes[d]
        chunk = -(-have // parts)
        lo = min(have, coord[k] * chunk)
        starts[d] += lo
        sizes[d] = max(0, min(have, lo + chunk) - lo)
    return Block(tuple(starts), tuple(sizes))


def _strided_block(shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], placements: Any) -> Block:
    """The block of ``coord`` where a placement is ``_StridedShard`` (tensor parallel × FSDP): torch's own layout
    helper (private, so imported here only); the tiling check in :func:`block_layout` refuses non-rectangular
    results."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    local, offset = _compute_local_shape_and_global_offset(tuple(shape), tuple(mesh_shape), list(coord), placements)
    return Block(tuple(int(x) for x in offset), tuple(int(x) for x in local))


def _tiles(shape: tuple[int, ...], blocks: Sequence[Block]) -> bool:
    """Whether the distinct non-empty blocks tile the tensor exactly: along every dimension their intervals
    partition it, and every combination of those intervals is one block (so no overlap, no gap)."""
    distinct = {b for b in blocks if b.numel}
    if math.prod(shape) == 0:
        return True
    per_dim: list[set[tuple[int, int]]] = [set() for _ in shape]
    for b in distinct:
        for d, (s, n) in enumerate(zip(b.starts, b.sizes, strict=True)):
            per_dim[d].add((s, n))
    for d, intervals in enumerate(per_dim):
        at = 0
        for s, n in sorted(intervals):
            if s != at:
                return False
            at = s + n
        if at != shape[d]:
            return False
    return len(distinct) == math.prod(len(i) for i in per_dim)


def block_layout(p: Any, group_ranks: Sequence[int] | None, rank: int) -> BlockLayout:
    """Every group rank's block of DTensor ``p`` (``group_ranks``: the optimizer's process group as global ranks
    in group order; ``None`` when it runs locally, which needs a one-rank mesh). ``rank``: this process's group
    rank, whose local shard must have its block's shape.

    Raises ``ValueError`` naming the shape, the placements and what is supported when the placements are not
    ``Shard``/``Replicate`` (``_StridedShard`` where it still gives rectangular blocks), the mesh's ranks are
    not the group's, or the blocks do not tile the tensor. Depends only on the mesh and placements, which every
    rank sees alike, so every rank raises the same error (no collective, no hang).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    shape = tuple(int(x) for x in p.shape)
    mesh = p.device_mesh
    placements = tuple(p.placements)
    for placement in placements:
        if not isinstance(placement, (Shard, Replicate, _StridedShard)):
            raise ValueError(f"{_describe(p)}: placement {placement} is not supported; {SUPPORTED}")
    mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if group_ranks is None:
        if len(mesh_ranks) != 1:
            raise ValueError(
                f"{_describe(p)}: it is spread over {len(mesh_ranks)} ranks but the optimizer runs locally "
                "(process_group=None, or torch.distributed not initialized): pass the mesh's group, or leave "
                f"the default; {SUPPORTED}"
            )
        group_ranks = mesh_ranks
    elif sorted(mesh_ranks) != sorted(group_ranks):
        raise ValueError(
            f"{_describe(p)}: its mesh holds ranks {sorted(mesh_ranks)} but the optimizer's process group is "
            f"ranks {list(group_ranks)}; {SUPPORTED}"
        )
    mesh_shape = tuple(int(x) for x in mesh.mesh.shape)
    try:
        in_mesh_order = BlockLayout.of(shape, mesh_shape, placements)
    except ValueError:
        raise ValueError(f"{_describe(p)}: its shards are not rectangular blocks that tile it; {SUPPORTED}") from None
    at = {g: k for k, g in enumerate(mesh_ranks)}  # mesh order (row-major coordinates) → the group's order
    done = tuple(in_mesh_order.blocks[at[g]] for g in group_ranks)
    local = tuple(int(x) for x in p.to_local().shape)
    if local != done[rank].sizes:
        raise ValueError(
            f"{_describe(p)}: this rank holds a shard of shape {local}, expected {done[rank].sizes} "
            f"(torch.chunk along each sharded dimension); {SUPPORTED}"
        )
    return BlockLayout(shape, done)


def row_state_placements(placements: Sequence[Any]) -> list[Any]:
    """Placements of NorMuon's row statistics ``(d0, rows // d0)`` of a parameter placed ``placements``: sharded
    where the parameter's dim 0 is (so each rank holds the statistics of the rows it holds, as with FSDP2),
    replicated on every other mesh dimension (a column shard's rank needs all of its rows' statistics)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out: list[Any] = []
    for placement in placements:
        if isinstance(placement, (Shard, _StridedShard)) and placement.dim == 0:
            out.append(placement)  # a _StridedShard on dim 0 stays one: the rows are cut as the parameter's
        else:
            out.append(Replicate())
    return out
