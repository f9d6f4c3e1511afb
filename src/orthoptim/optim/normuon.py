"""``orthoptim.NorMuon``: Muon with per-neuron second-moment normalization of the orthogonalized update."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .muon import Muon


class NorMuon(Muon):
    """NorMuon (arXiv 2510.05491; as in microsoft/dion ``normuon.py`` and modded-nanogpt).

    After orthogonalization ``O`` (m×n per matrix; rows are output neurons), a per-row second moment
    ``v ← β₂v + (1−β₂)·mean_j O_ij²`` is kept in optimizer state, ``O ← O / √(v + ε)`` row-wise, and ``O`` is
    rescaled so its Frobenius norm equals that before the row normalization — the update keeps Muon's size,
    so Muon's learning rate carries over. Every other argument is :class:`orthoptim.Muon`'s, ``process_group``
    included; with FSDP2 the owner of each matrix computes the row statistics on whole rows and the rescale over
    the whole matrix (exact, not per shard), and the second moments stay sharded like the rows.

    Args:
        beta2: decay of the per-row second moment (default 0.95, as dion and modded-nanogpt).
        row_eps: added to ``v`` before the square root (default 1e-8).
    """

    def __init__(
        self, params: Iterable[Any], *args: Any, beta2: float = 0.95, row_eps: float = 1e-8, **kw: Any
    ) -> None:
        self._row_options = {"row_norm": True, "beta2": beta2, "row_eps": row_eps}
        super().__init__(params, *args, **kw)
