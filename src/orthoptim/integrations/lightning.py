"""orthoptim in Lightning: ``configure_gradient_clipping`` that clips only what clipping means something for.

Lightning's default ``configure_gradient_clipping`` clips every parameter of the optimizer by one norm, the
orthogonalized matrices included: one huge layer shrinks the coefficient applied to everything, and the AdamW
half of a ``Hybrid`` is clipped by the wrong norm. :class:`OrthoptimClippingMixin` replaces it with
``orthoptim.clip_grad_norm_`` (AdamW groups and PolarGrad's nuclear-scaled groups, by their own norm) and logs
``clip_norm`` and ``nonfinite_skips`` with ``self.log``::

    import lightning as L
    import orthoptim
    from orthoptim.integrations.lightning import OrthoptimClippingMixin

    class Model(OrthoptimClippingMixin, L.LightningModule):  # the mixin first
        def configure_optimizers(self):
            return orthoptim.Hybrid(self, lr=0.02, adamw_lr=3e-4)

    L.Trainer(gradient_clip_val=1.0).fit(Model(), loader)  # the usual Trainer argument

Lightning calls ``configure_gradient_clipping`` inside the optimizer's closure, after backward (and after AMP's
unscale), before the update, so the clip runs where Lightning's own would. Checkpoints are Lightning's: the
optimizer's ``state_dict()`` is saved and loaded as for any torch optimizer, so ``fit(ckpt_path=...)`` resumes.
The mixin works with ``pytorch_lightning`` modules too (it calls only ``self.log`` and the hooks' ``super()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orthoptim

from . import missing_framework, unwrap_orthoptim

try:
    import lightning.pytorch  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
except ImportError:
    try:
        import pytorch_lightning  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised by a test that hides lightning
        raise missing_framework("lightning", "lightning") from exc

__all__ = ["OrthoptimClippingMixin"]

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as _Base  # type: ignore[import-not-found, unused-ignore]
else:
    _Base = object  # a plain mixin at run time: it goes before LightningModule (or pytorch_lightning's) in the bases


class OrthoptimClippingMixin(_Base):  # type: ignore[misc, valid-type, unused-ignore]
    """Group-aware gradient clipping and skip counts for a ``LightningModule`` whose optimizer is orthoptim's.

    ``Trainer(gradient_clip_val=v)`` clips the AdamW/PolarGrad groups to total norm ``v`` (only
    ``gradient_clip_algorithm="norm"``, the default: clipping by value would change an orthogonalized matrix's
    direction for nothing); without ``gradient_clip_val`` nothing is clipped. Logged each optimizer step:
    ``clip_norm`` (the pre-clip norm of the clipped groups, when clipping; a device tensor, no sync) and
    ``nonfinite_skips`` (steps skipped for a non-finite value so far; reading it is a host sync).
    An optimizer that is not orthoptim's is a ``TypeError``. Override ``optimizer_step`` only with a ``super()``
    call, which this mixin uses to read the skip count after the step.
    """

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip the scale-dependent groups by their own norm (Lightning calls this before the optimizer step)."""
        opt = unwrap_orthoptim(optimizer, "OrthoptimClippingMixin")
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm is not None and str(gradient_clip_algorithm).lower() != "norm":
            raise ValueError(
                f"OrthoptimClippingMixin clips by norm only, got gradient_clip_algorithm={gradient_clip_algorithm!r}"
            )
        norm = orthoptim.clip_grad_norm_(opt, float(gradient_clip_val))
        self.log("clip_norm", norm, on_step=True, on_epoch=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step as Lightning does, then log the optimizer's skip count."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        opt = unwrap_orthoptim(optimizer, "OrthoptimClippingMixin")
        self.log("nonfinite_skips", float(opt.nonfinite_skips), on_step=True, on_epoch=False)
