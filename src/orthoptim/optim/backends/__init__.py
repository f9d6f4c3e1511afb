"""The ways of executing one orthogonalized update, chosen once per param group and step (``select_backend``), as
torch's optimizers choose between their foreach and fused implementations.

- ``reference`` (``reference.py``): float64, one parameter at a time, the papers' formulas as printed, no
  fusion, no buffers. The oracle the tests compare the others with, and the text the class docstrings cite.
- ``torch`` (``torch.py``): megabatches of same-shape matrices stacked, torch ops on any device. Which ops is
  measured per device type: on the CPU (``host_ways``) the momentum input is written per parameter into a buffer
  kept between steps and the skip flag is read on the host; elsewhere foreach/stacked ops and a device-side
  select (no host sync, capturable in a CUDA graph). Same values either way.
- ``triton`` (``triton.py``): the torch backend with its two elementwise passes per megabatch (momentum input,
  commit) as fused Triton kernels: the same bits, a third of the memory traffic on a GPU.

``"auto"``: ``torch`` on every device. The fused kernels are opt-in (``backend="triton"``) until a GPU run has
shown them correct and faster there (benchmarks/RESULTS.md, "GPU").
"""

from __future__ import annotations

import os as _os
from dataclasses import dataclass

import torch as _torch  # not bound as ``torch``: that name is this package's ``torch`` backend module

from ...polar.kernels import triton_available


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name and the measured choices it makes (see the module docstring)."""

    name: str
    host_ways: bool = False  # the CPU's choices: per-parameter momentum input into a kept buffer, host-read flag
    fused: bool = False  # Triton's fused momentum input and commit

    @property
    def reference(self) -> bool:
        return self.name == "reference"


REFERENCE = Backend("reference", host_ways=True)


def select_backend(name: str, device: _torch.device) -> Backend:
    """The backend ``name`` (an option value, ``options.BACKENDS``) resolves to for parameters on ``device``.

    ``"torch@cpu"`` and ``"torch@cuda"`` take the torch backend with that device type's choices on any device
    (tests run the GPU's choices on the CPU this way). ``"triton"`` needs triton installed (``ValueError``
    otherwise); on the CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which tests use.
    """
    if name == "reference":
        return REFERENCE
    if name == "triton":
        if not triton_available():
            raise ValueError('backend="triton" needs triton installed (pip install triton); use backend="torch"')
        if device.type != "cuda" and _os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f'backend="triton" runs its kernels on CUDA devices; the parameters are on {device} (Triton\'s '
                'interpreter, TRITON_INTERPRET=1, runs them on the CPU, slowly: for tests); use backend="torch"'
            )
        return Backend("triton", host_ways=False, fused=True)
    if name in ("auto", "torch"):
        return Backend("torch", host_ways=device.type == "cpu")
    if name == "torch@cpu":
        return Backend("torch", host_ways=True)
    if name == "torch@cuda":
        return Backend("torch", host_ways=False)
    raise ValueError(f"unknown backend {name!r}")
