"""Distributed orthoptim on CPU: gloo, 2 and 4 spawned ranks on 127.0.0.1, against the single-process optimizer.

The scenarios live in ``tests/_dist_worker.py``; all of them run in one launch per world size (process start-up
and ``import torch`` dominate), cached for the module, and each becomes one test here. A launch has a wall-clock
limit (``LAUNCH_TIMEOUT``) and every collective a 60 s gloo timeout, so a deadlock fails the tests instead of
hanging CI. A rank that dies after it recorded every scenario (torch's teardown has been seen to abort at exit
on a busy machine) does not fail them: each scenario's outcome is what every rank recorded for it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import orthoptim
from orthoptim.distributed import (
    DEFAULT_PROCESS_GROUP,
    assign_owners,
    matrix_flops,
    rank_counts,
    resolve_process_group,
    shard_sizes,
)

from ._dist_worker import SCENARIOS, run_rank
from ._dist_worker_nd import SCENARIOS as ND_SCENARIOS
from .conftest import require_interpreted_fused_kernels

#: (ranks, which step paths): the CPU's own, CUDA's forced on the CPU, and CUDA's with the fused elementwise
#: kernels under Triton's interpreter (see ``_dist_worker.run_rank``).
LAUNCHES = ((2, "cpu"), (4, "cpu"), (2, "cuda"), (2, "fused"))
LAUNCH_TIMEOUT = 300.0  # seconds for all scenarios at one world size (about 10-20 s on an idle 2-core machine)

_cache: dict[tuple[int, str], dict[str, list[str]] | str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(world: int, paths: str) -> dict[str, list[str]] | str:
    """Run every scenario on ``world`` ranks; per scenario the per-rank outcomes, or why the launch failed."""
    outdir = tempfile.mkdtemp(prefix=f"orthoptim-dist{world}-{paths}-")
    names = list(ND_SCENARIOS if paths == "nd" else SCENARIOS)
    args = (world, _free_port(), names, outdir, paths)
    ctx = mp.start_processes(run_rank, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    failure = ""
    while True:
        try:
            if ctx.join(timeout=1.0):
                break
        except Exception as e:  # a rank exited abnormally; the recorded results decide below
            failure = f"{type(e).__name__}: {e}"
            break
        if time.monotonic() > deadline:
            failure = f"timed out after {LAUNCH_TIMEOUT:.0f} s (deadlock?)"
            break
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join(5)
    per_rank = []
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.json")
        if not os.path.exists(path):
            return f"rank {r} recorded nothing; {failure or 'no error reported'}"
        with open(path) as f:
            per_rank.append(json.load(f))
    results = {name: [res.get(name, f"not reached ({failure})") for res in per_rank] for name in names}
    return results


def _results(world: int, paths: str) -> dict[str, list[str]] | str:
    if (world, paths) not in _cache:
        _cache[(world, paths)] = _launch(world, paths)
    return _cache[(world, paths)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize(("world", "paths"), LAUNCHES)
@pytest.mark.slow  # spawned ranks; `make test-fast` leaves them out
def test_scenario(world: int, paths: str, scenario: str) -> None:
    """One scenario of ``_dist_worker`` (see its docstring) on every rank of a ``world``-rank gloo group."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if paths == "fused":
        require_interpreted_fused_kernels()  # and TRITON_INTERPRET=1 in this process's environment, which ranks inherit
    results = _results(world, paths)
    assert not isinstance(results, str), results
    failed = {r: out for r, out in enumerate(results[scenario]) if out != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{out}" for r, out in failed.items())


@pytest.mark.parametrize("scenario", list(ND_SCENARIOS))
@pytest.mark.slow  # spawned ranks; `make test-fast` leaves them out
def test_beyond_one_mesh_dimension(scenario: str) -> None:
    """One scenario of ``_dist_worker_nd`` (HSDP, tensor parallel, TP × FSDP, expert parallel, refusals, DCP
    across mesh shapes) on every rank of a 4-rank gloo group: all of them in one launch."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    results = _results(4, "nd")
    assert not isinstance(results, str), results
    failed = {r: out for r, out in enumerate(results[scenario]) if out != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{out}" for r, out in failed.items())


# ---------------------------------------------------------------- single-process checks of the building blocks


def test_owners_balance_flops_within_one_matrix() -> None:
    """GPT-2-small's 48 matrices: the busiest rank's FLOPs are within one (largest) matrix of the mean."""
    shapes = [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12
    costs = [matrix_flops(m, n) for m, n in shapes]
    for world in (1, 2, 3, 4, 8, 64):
        owners, loads = assign_owners(costs, world)
        assert sum(loads) == sum(costs) and len(owners) == len(costs)
        assert max(loads) <= sum(costs) / world + max(costs), (world, loads)
        assert owners == assign_owners(costs, world)[0]  # deterministic
    assert rank_counts([0, 2, 2, 1], 4) == (1, 1, 2, 0)


def test_shard_sizes_match_torch_chunk() -> None:
    for d0 in range(1, 12):
        for world in (1, 2, 3, 4, 8):
            chunks = [c.shape[0] for c in torch.arange(d0).chunk(world)]
            assert shard_sizes(d0, world) == chunks + [0] * (world - len(chunks))


def test_process_group_resolution_without_torch_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    assert resolve_process_group(DEFAULT_PROCESS_GROUP) is None
    assert resolve_process_group(None) is None
    with pytest.raises(ValueError, match="not initialized"):
        resolve_process_group(object())
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = orthoptim.Muon([p], lr=0.02)
    assert opt.process_group is None
    assert "process_group" not in opt.param_groups[0] and "process_group" not in opt.state_dict()["param_groups"][0]
    with pytest.raises(ValueError, match="not initialized"):
        orthoptim.NorMuon([p], process_group=object())


def test_chunk_blocks_match_torch_layout() -> None:
    """orthoptim's block of every mesh coordinate against torch's layout helper (plain data, no processes), for
    1-D to 3-D meshes, every Shard/Replicate mix on 2-D and 3-D tensors, even and uneven sizes."""
    import itertools

    tensor = pytest.importorskip("torch.distributed.tensor")
    utils = pytest.importorskip("torch.distributed.tensor._utils")
    from orthoptim.distributed import chunk_block

    R, S = tensor.Replicate, tensor.Shard
    for shape in ((7, 5), (8, 12), (3, 10, 6)):
        choices = [R(), *(S(d) for d in range(len(shape)))]
        for mesh_shape in ((4,), (2, 2), (3, 2), (2, 1, 2)):
            for placements in itertools.product(choices, repeat=len(mesh_shape)):
                for coord in itertools.product(*(range(k) for k in mesh_shape)):
                    block = chunk_block(shape, mesh_shape, coord, placements)
                    local, offset = utils._compute_local_shape_and_global_offset(
                        shape, mesh_shape, list(coord), placements
                    )
                    assert block.sizes == tuple(local), (shape, mesh_shape, placements, coord)
                    assert not block.numel or block.starts == tuple(offset), (shape, mesh_shape, placements, coord)


def test_blocks_that_do_not_tile_are_refused() -> None:
    from orthoptim.distributed.placement import Block, _tiles

    two = [Block((0, 0), (4, 6)), Block((4, 0), (4, 6))]
    assert _tiles((8, 6), two) and _tiles((8, 6), [*two, *two])  # replicas repeat a block
    assert _tiles((8, 6), [Block((0, 0), (8, 6)), Block((0, 0), (0, 6))])  # empty blocks are ignored
    assert not _tiles((8, 6), [Block((0, 0), (5, 6)), Block((4, 0), (4, 6))])  # overlap
    assert not _tiles((8, 6), [Block((0, 0), (3, 6)), Block((4, 0), (4, 6))])  # gap
    assert not _tiles((8, 6), [Block((0, 0), (4, 3)), Block((4, 3), (4, 3))])  # a checkerboard's half


def test_exchange_bytes_count_one_source_per_block() -> None:
    """HSDP (Replicate, Shard(0)) on a (2, 2) mesh, an (8, 6) parameter owned by rank 0: rank 1 sends rows 4-7
    (its replica rank 3 does not), rank 0 sends 24 entries back to each of ranks 1, 2, 3 (hand count)."""
    tensor = pytest.importorskip("torch.distributed.tensor")
    from orthoptim.distributed import BlockLayout

    layout = BlockLayout.of((8, 6), (2, 2), [tensor.Replicate(), tensor.Shard(0)])
    assert layout.holders() == [[0, 2], [1, 3]] and layout.sources(0) == (0, 1)
    assert layout.exchange_bytes(0, 4) == [4 * (24 + 3 * 24), 4 * (24 + 24), 4 * 24, 4 * 24]
    assert not layout.local_matrices()
    experts = BlockLayout.of((4, 8, 6), (2, 2), [tensor.Replicate(), tensor.Shard(0)])
    assert experts.local_matrices() and not BlockLayout.of((4, 8, 6), (4,), [tensor.Shard(1)]).local_matrices()
