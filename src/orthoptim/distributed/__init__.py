"""Every collective of orthoptim: owner assignment, exchanges for DDP and FSDP2, agreement among ranks.

This package imports nothing of orthoptim's, only torch and torch.distributed: it moves tensors and decides who
computes what; the optimizer (``orthoptim.optim.base``) hands it the computation to run on each share.

* ``owners``   — which rank orthogonalizes which matrix (greedy largest-first, balancing FLOPs; deterministic).
* ``exchange`` — replicated parameters (DDP): orthogonalize the owned slice, ``all_gather_into_tensor`` (async).
* ``placement`` — which block of a DTensor parameter each rank holds, on any mesh (FSDP2, HSDP, TP, EP).
* ``fsdp``     — DTensor parameters: blocks to the owner, update blocks back to every holder (asynchronous
  ``all_to_all``, pipelined per megabatch by the executor).
* ``agree``    — the non-finite skip flag (one MAX all-reduce) and the check that all ranks hold the same
  parameters (count, shapes, dtypes) and have gradients for the same ones (one fixed-size all-reduce).
* ``group``    — the ``process_group=`` default and its validation.
"""

from .agree import ParamLayout, agree_ok, agree_params, presence_mismatch
from .exchange import GatherHandle, gather_bytes, orthogonalize_split
from .fsdp import (
    check_sharded,
    is_dtensor,
    shard_sizes,
    start_gather_to_owners,
    start_scatter_from_owners,
    zeros_row_state,
)
from .group import DEFAULT_PROCESS_GROUP, GroupRef, resolve_process_group
from .owners import assign_owners, matrix_flops, rank_counts
from .placement import Block, BlockLayout, block_layout, chunk_block, row_state_placements

__all__ = [
    "DEFAULT_PROCESS_GROUP",
    "Block",
    "BlockLayout",
    "GatherHandle",
    "GroupRef",
    "ParamLayout",
    "agree_ok",
    "agree_params",
    "assign_owners",
    "block_layout",
    "check_sharded",
    "chunk_block",
    "gather_bytes",
    "is_dtensor",
    "matrix_flops",
    "orthogonalize_split",
    "presence_mismatch",
    "rank_counts",
    "resolve_process_group",
    "row_state_placements",
    "shard_sizes",
    "start_gather_to_owners",
    "start_scatter_from_owners",
    "zeros_row_state",
]
