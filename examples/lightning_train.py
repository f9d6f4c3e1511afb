"""A small byte-level language model trained with Lightning and orthoptim.Hybrid, clipped the orthoptim way.

    pip install -e ".[integrations]"     (in a checkout; `make test-integrations` does it for .venv)
    python examples/lightning_train.py                     # 300 steps, well under a minute on 2 CPU cores
    python examples/lightning_train.py --max-steps 30

The model (an embedding of the last 8 bytes, two hidden layers of 256, a head over 256 bytes; 0.2M parameters) is
built in code and trained on CPython's own help texts (``pydoc_data.topics``); nothing is downloaded. What makes
it orthoptim's: ``configure_optimizers`` returns ``orthoptim.Hybrid(self, ...)`` (hidden matrices orthogonalized,
embedding, head and biases on AdamW), and ``OrthoptimClippingMixin`` first in the bases turns the usual
``Trainer(gradient_clip_val=1.0)`` into a clip of the AdamW half by its own norm, with ``clip_norm`` and
``nonfinite_skips`` logged (here to a CSV file, printed at the end). A checkpoint is written at the end and
training resumes from it for a few more steps, as ``fit(ckpt_path=...)`` does for any Lightning run.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import lightning as L
import torch
from torch import nn

import orthoptim
from orthoptim.integrations.lightning import OrthoptimClippingMixin

CONTEXT = 8


class ByteMLP(OrthoptimClippingMixin, L.LightningModule):  # type: ignore[misc]
    """Predicts the next byte from the previous ``CONTEXT`` bytes."""

    def __init__(self, width: int = 256, lr: float = 0.02, adamw_lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(256, 32)
        self.body = nn.Sequential(nn.Linear(32 * CONTEXT, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x).flatten(1)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = orthoptim.Hybrid(self, lr=self.hparams["lr"], adamw_lr=self.hparams["adamw_lr"])
        steps = self.trainer.max_steps
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def loader(batch: int, samples: int, seed: int = 0) -> torch.utils.data.DataLoader[Any]:
    data = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - CONTEXT - 1, (samples,), generator=gen)
    x = torch.stack([data[s : s + CONTEXT] for s in starts.tolist()])
    y = data[starts + CONTEXT]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as out:
        data = loader(args.batch, args.batch * args.max_steps)  # one epoch: the checkpoint falls on its end
        common: dict[str, Any] = dict(
            accelerator="cpu", devices=1, gradient_clip_val=1.0, log_every_n_steps=10, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
        )  # fmt: skip
        model = ByteMLP()
        logger = L.pytorch.loggers.CSVLogger(out, name="run")
        start = time.perf_counter()
        trainer = L.Trainer(max_steps=args.max_steps, logger=logger, **common)
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        ckpt = Path(out) / "last.ckpt"
        trainer.save_checkpoint(ckpt)
        # Resume: a fresh module and Trainer continue from the checkpoint (weights, Hybrid's state, the scheduler).
        resumed = L.Trainer(max_steps=args.max_steps + 10, logger=False, **common)
        resumed.fit(ByteMLP(), data, ckpt_path=str(ckpt))
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("loss")]
    shown = rows[:: max(1, len(rows) // 10)]
    for r in shown + ([] if rows[-1] is shown[-1] else rows[-1:]):  # the last row once
        print(
            f"step {int(r['step']):4d}  loss {float(r['loss']):.3f}  clip_norm (AdamW half) {float(r['clip_norm']):.3f}"
            f"  nonfinite_skips {int(float(r['nonfinite_skips']))}"
        )
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    print(f"{args.max_steps} steps in {seconds:.1f} s; loss {first:.3f} -> {last:.3f} nats/byte; then resumed from "
          f"the checkpoint and trained on to step {resumed.global_step} (not logged)")  # fmt: skip
    return {"first_loss": first, "last_loss": last, "resumed_step": resumed.global_step}


if __name__ == "__main__":
    main()
