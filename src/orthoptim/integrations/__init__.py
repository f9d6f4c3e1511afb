"""Glue for the trainers people already use; each submodule needs its framework (the ``integrations`` extra).

- :mod:`orthoptim.integrations.transformers`: ``OrthoptimCallback`` (and ``OrthoptimTrainerMixin``) for 🤗
  transformers' ``Trainer``: ``max_grad_norm`` applied the orthoptim way, ``nonfinite_skips`` and the clip norm in
  Trainer's logs.
- :mod:`orthoptim.integrations.lightning`: ``OrthoptimClippingMixin`` for a ``LightningModule``: the same through
  ``configure_gradient_clipping``.

Nothing here is imported by ``import orthoptim``; importing a submodule without its framework raises an
``ImportError`` that names the extra (``pip install -e ".[integrations]"`` in a checkout). Both use orthoptim's
public API only (``orthoptim.clip_grad_norm_``, ``opt.nonfinite_skips``).
"""

from __future__ import annotations

from typing import Any

import orthoptim

EXTRA_HINT = 'pip install -e ".[integrations]" in a checkout of orthoptim (the "integrations" extra)'


def missing_framework(module: str, packages: str) -> ImportError:
    """The error an integration raises when its framework is not installed: it names the extra to install."""
    return ImportError(f"orthoptim.integrations.{module} needs {packages}; install them with: {EXTRA_HINT}")


def unwrap_orthoptim(optimizer: Any, where: str) -> orthoptim.Muon:
    """The orthoptim optimizer inside ``optimizer``, looking through trainers' wrappers.

    accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` keep the wrapped optimizer as
    ``.optimizer`` (and Lightning also as ``._optimizer``); anything that is not one of orthoptim's optimizers once
    unwrapped is a ``TypeError``, since its groups carry none of the information the group-aware clip needs.
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest at most a few deep; a bound keeps a self-referencing wrapper from looping
        if isinstance(seen, orthoptim.Muon):
            return seen
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise TypeError(
        f"{where} needs one of orthoptim's optimizers (orthoptim.Muon, NorMuon, PolarGrad, Hybrid), "
        f"got {type(seen).__name__}; for another optimizer use the framework's own gradient clipping"
    )
