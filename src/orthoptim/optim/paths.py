"""Which ways the optimizer step takes on which device: looked up at call time, so tests can switch them (an
empty ``CPU_PATH_DEVICES`` runs the GPUs' ways on the CPU)."""

from __future__ import annotations

import torch

#: Devices on which the step takes the CPU's ways, both measured faster there (benchmarks/RESULTS.md): the
#: momentum input is written per parameter and the new momentum recomputed at the commit
#: (``momentum.momentum_input``: nothing held across the step, no page faults), and ``"skip"`` reads its flag on
#: the host — free there — and commits without selects, or not at all. Elsewhere (CUDA) the momentum input is built
#: by one fused kernel or a few foreach/batched ops instead of two launches per parameter
#: (``momentum.momentum_stacks``), and the skip is a device-side select (no host sync, capturable in a CUDA graph)
#: unless the skip warning reads the flag anyway.
CPU_PATH_DEVICES: tuple[str, ...] = ("cpu",)


def cpu_path(device: torch.device) -> bool:
    """Whether the step takes the CPU's ways on ``device`` (``CPU_PATH_DEVICES``)."""
    return device.type in CPU_PATH_DEVICES
