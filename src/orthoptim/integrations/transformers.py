"""orthoptim in 🤗 transformers' ``Trainer``: group-aware gradient clipping and skip counts in Trainer's logs.

Trainer (5.x, ``Trainer._clip_grad_norm``) clips with ``accelerator.clip_grad_norm_(model.parameters(),
max_grad_norm)``: one norm over every parameter, the orthogonalized matrices included. One huge layer then shrinks
the coefficient applied to everything, and the AdamW half of a ``Hybrid`` is clipped by the wrong norm. The
recipe: turn Trainer's clip off (``max_grad_norm=0``) and let :class:`OrthoptimCallback` clip in
``on_pre_optimizer_step`` (after Trainer has unscaled fp16 gradients, before ``optimizer.step()``) with
``orthoptim.clip_grad_norm_``, which clips AdamW groups and PolarGrad's nuclear-scaled groups by their own norm and
leaves the scale-invariant matrices alone::

    import orthoptim
    from orthoptim.integrations.transformers import OrthoptimCallback
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="out", max_grad_norm=0.0)  # Trainer's global clip off
    trainer = Trainer(
        model=model, args=args, train_dataset=ds,
        optimizer_cls_and_kwargs=(orthoptim.Hybrid, {"lr": 0.02, "adamw_lr": 3e-4, "module": model}),
        callbacks=[OrthoptimCallback(max_grad_norm=1.0)],
    )

Each training log then carries ``clip_norm`` (the last step's pre-clip norm of the clipped groups; Trainer's own
``grad_norm`` stays the norm over all parameters) and ``nonfinite_skips`` (steps the optimizer skipped for a
non-finite value, in total). A callback runs after Trainer's reporters (TensorBoard, W&B, ...), so it can add
them only to ``trainer.state.log_history`` and to the callbacks after it (the progress bar / printer); to have
every reporter see them, mix :class:`OrthoptimTrainerMixin` into the Trainer class.

transformers 5.x has no public way to register an optimizer name for ``TrainingArguments.optim`` (its handler table
is private and ``optim`` must be an ``OptimizerNames`` member), so the class goes in through Trainer's
``optimizer_cls_and_kwargs`` (or an instance through ``optimizers=(opt, None)``).

Not covered: a skipped step still advances Trainer's lr scheduler (Trainer holds it back only for accelerate's
fp16 loss-scaler skips); DeepSpeed, which clips inside its engine.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import orthoptim

from . import missing_framework, unwrap_orthoptim

try:
    from transformers import (  # type: ignore[import-not-found, unused-ignore]
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as exc:  # pragma: no cover - exercised by a test that hides transformers
    raise missing_framework("transformers", "transformers and accelerate") from exc

__all__ = ["OrthoptimCallback", "OrthoptimTrainerMixin"]

#: The keys added to Trainer's training logs.
CLIP_NORM_KEY = "clip_norm"
SKIPS_KEY = "nonfinite_skips"


class OrthoptimCallback(TrainerCallback):  # type: ignore[misc, unused-ignore]
    """Applies ``max_grad_norm`` the orthoptim way and logs ``clip_norm`` and ``nonfinite_skips``.

    Args:
        max_grad_norm: clip the gradients of the groups whose update depends on the gradient's scale (AdamW,
            PolarGrad) to this total norm, computed over those groups only (``orthoptim.clip_grad_norm_``). ``None``
            or 0: no clipping, the callback only logs.
        norm_type: the norm's order, as in ``torch.nn.utils.clip_grad_norm_``.

    Trainer's own clip must be off (``TrainingArguments(max_grad_norm=0)``): it would clip over all parameters
    before this callback runs. Training stops with a ``ValueError`` at its start otherwise, and with a
    ``TypeError`` if the Trainer's optimizer is not one of orthoptim's.

    Values are read from the device only when Trainer logs (the clip norm is kept as a tensor; the skip count is a
    host sync), so a step costs no extra synchronization.
    """

    def __init__(self, max_grad_norm: float | None = None, *, norm_type: float = 2.0) -> None:
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (or None), got {max_grad_norm!r}")
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.norm_type = float(norm_type)
        self.last_clip_norm: torch.Tensor | None = None
        self._optimizer: orthoptim.Muon | None = None

    def _orthoptim_optimizer(self, optimizer: Any) -> orthoptim.Muon:
        if self._optimizer is None or optimizer is not None:
            self._optimizer = unwrap_orthoptim(optimizer, "OrthoptimCallback")
        return self._optimizer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Check the set-up before the first step: Trainer's global clip off, an orthoptim optimizer."""
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"OrthoptimCallback: TrainingArguments(max_grad_norm={args.max_grad_norm}) makes Trainer clip over "
                "every parameter, orthogonalized matrices included, before this callback runs; set "
                "max_grad_norm=0 in TrainingArguments and pass the value to OrthoptimCallback(max_grad_norm=...)"
            )
        self._optimizer = None
        self._orthoptim_optimizer(kwargs.get("optimizer"))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Clip the scale-dependent groups (Trainer calls this after unscaling, right before ``step()``)."""
        if self.max_grad_norm > 0:
            opt = self._orthoptim_optimizer(kwargs.get("optimizer"))
            self.last_clip_norm = orthoptim.clip_grad_norm_(opt, self.max_grad_norm, norm_type=self.norm_type)

    def stats(self, optimizer: Any = None) -> dict[str, float]:
        """``clip_norm`` (when clipping) and ``nonfinite_skips``, as Python numbers (reading them syncs)."""
        opt = self._orthoptim_optimizer(optimizer)
        out: dict[str, float] = {}
        if self.last_clip_norm is not None:
            out[CLIP_NORM_KEY] = float(self.last_clip_norm)
        out[SKIPS_KEY] = opt.nonfinite_skips
        return out

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the stats to a training log (one with ``loss``) unless :class:`OrthoptimTrainerMixin` already did."""
        if logs is None or "loss" not in logs or SKIPS_KEY in logs:
            return
        stats = self.stats(kwargs.get("optimizer"))
        # Trainer.log appended a copy of `logs` (plus "step") to the history before calling the callbacks:
        # amend that entry too, so trainer_state.json and log_history carry the values.
        # (Compared by identity first: the copy holds the same objects, and a NaN loss equals nothing.)
        last = state.log_history[-1] if state.log_history else {}
        if last and all(last.get(k) is v or last.get(k) == v for k, v in logs.items()):
            last.update(stats)
        logs.update(stats)


class OrthoptimTrainerMixin:
    """Put before ``Trainer`` in a subclass's bases (``class MyTrainer(OrthoptimTrainerMixin, Trainer)``) to have
    :class:`OrthoptimCallback`'s values in every training log before any callback or reporter sees it.

    Overrides only ``Trainer.log``, the method transformers documents for overriding ("Subclass and override this
    method to inject custom behavior"). Without an :class:`OrthoptimCallback` in the Trainer's callbacks it adds
    nothing.
    """

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``clip_norm`` and ``nonfinite_skips`` to a training log, then log it as Trainer does."""
        if "loss" in logs:
            trainer: Any = self
            for callback in trainer.callback_handler.callbacks:
                if isinstance(callback, OrthoptimCallback):
                    logs.update(callback.stats(trainer.optimizer))
                    break
        super().log(logs, start_time)  # type: ignore[misc]
