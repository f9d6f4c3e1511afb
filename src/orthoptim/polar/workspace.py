"""Reusable buffers: ``orthogonalize(..., workspace=)``, the CPU's per-matrix Newton–Schulz loop, and the
optimizers, which keep one per optimizer on the CPU for the step's temporaries and held updates.

Why: those loops would otherwise allocate the same temporaries afresh for every matrix and every step; reusing one
buffer per role keeps the memory in cache and off the allocator — on the CPU, large blocks freed at the end of a
step are handed back to the OS by glibc and page-faulted in again on the next one (``optim/backends/torch.py``,
``prepare``; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch


class Workspace:
    """One flat buffer per (role, dtype, device), grown when a request needs more; requests get views of it.

    A view is valid until the next request for the same role: callers use one role per live temporary.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        # The views handed out, by request: the CPU loops ask for the same few shapes thousands of times a step,
        # and a cached view saves the slicing (no memory: views share the flat buffer).
        self._views: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape`` in the role's buffer."""
        request = (role, tuple(shape), dtype, device)
        view = self._views.get(request)
        if view is not None:
            return view
        numel = 1
        for size in shape:
            numel *= size
        key = (role, dtype, device)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self._flat[key] = torch.empty(numel, dtype=dtype, device=device)
            # Views of the old buffer must not be handed out again.
            self._views = {k: v for k, v in self._views.items() if k[0] != role or k[2:] != key[1:]}
        view = self._views[request] = flat[:numel].view(shape)
        return view

    def like(self, role: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``get`` with ``t``'s shape and device (and dtype unless given)."""
        return self.get(role, tuple(t.shape), t.dtype if dtype is None else dtype, t.device)


def scratch(
    workspace: Workspace | None, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialized contiguous tensor: the role's buffer in ``workspace``, or a fresh one without."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(role, shape, dtype, device)


def scratch_like(
    workspace: Workspace | None, role: str, t: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``scratch`` with ``t``'s shape and device (and dtype unless given), laid out as ``t`` when ``t`` is a
    transposed view of a contiguous tensor (a tall matrix iterated wide): copies between them stay plain."""
    dtype = t.dtype if dtype is None else dtype
    if not t.is_contiguous() and t.mT.is_contiguous():
        return scratch(workspace, role, tuple(t.mT.shape), dtype, t.device).mT
    return scratch(workspace, role, tuple(t.shape), dtype, t.device)
