"""orthoptim in Lightning: the clipping mixin against a hand-computed norm, resume, skipped steps in the logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

import orthoptim  # noqa: E402
from orthoptim.integrations.lightning import OrthoptimClippingMixin  # noqa: E402


def loader(n: int = 64, batch: int = 16) -> torch.utils.data.DataLoader[Any]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 2, generator=gen))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class Net(OrthoptimClippingMixin, L.LightningModule):  # type: ignore[misc, name-defined]
    """An MLP: two hidden matrices (orthogonalized), biases and the head (AdamW, `head` by split_params' rules)."""

    def __init__(self, poison_step: int | None = None, optimizer: str = "hybrid") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 2)
        self.poison_step, self.optimizer_name = poison_step, optimizer
        self.pre: list[dict[str, torch.Tensor]] = []
        self.post: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)), y, reduction="sum")
        self.log("loss", loss, on_step=True)
        return loss

    def on_after_backward(self) -> None:
        if self.global_step == self.poison_step:
            self.body[2].weight.grad[0, 0] = float("nan")  # type: ignore[index]

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self.pre.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})
        super().configure_gradient_clipping(optimizer, *args, **kwargs)
        self.post.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
        return orthoptim.Hybrid(self, lr=0.02, adamw_lr=1e-2)


def trainer(tmp_path: Path, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=8, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, logger=False, default_root_dir=str(tmp_path),
        deterministic=True,
    )  # fmt: skip
    base.update(kw)
    return L.Trainer(**base)


ADAMW = {"body.0.bias", "body.2.bias", "head.weight", "head.bias"}  # by hand: biases and the head


def test_mixin_clips_the_adamw_half_by_its_own_norm(tmp_path: Path) -> None:
    net = Net()
    trainer(tmp_path, gradient_clip_val=1.0, max_steps=12).fit(net, loader())
    hidden = {n for n, p in net.named_parameters() if p.dim() == 2} - {"head.weight"}
    assert hidden == {"body.0.weight", "body.2.weight"}
    clipped = 0
    for pre, post in zip(net.pre, net.post, strict=True):
        norm = math.sqrt(sum(float(g.double().square().sum()) for n, g in pre.items() if n in ADAMW))
        coef = min(1.0, 1.0 / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
        clipped += coef < 1.0
        for name, g in pre.items():
            if name in ADAMW:
                torch.testing.assert_close(post[name], g * coef, rtol=1e-5, atol=0)
            else:
                assert torch.equal(post[name], g), name
    assert clipped >= 6, clipped  # the summed loss keeps the AdamW half's norm above 1: the clip acted
    metrics = net.trainer.logged_metrics  # the last step's values
    assert float(metrics["clip_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(metrics["nonfinite_skips"]) == 0


def test_loss_falls(tmp_path: Path) -> None:
    net = Net()
    t = trainer(tmp_path, gradient_clip_val=1.0, max_steps=40)
    with torch.no_grad():
        x, y = next(iter(loader(batch=64)))
        before = float(nn.functional.mse_loss(net.head(net.body(x)), y))
    t.fit(net, loader())
    with torch.no_grad():
        after = float(nn.functional.mse_loss(net.head(net.body(x)), y))
    assert after < 0.5 * before, (before, after)


def test_resume_through_a_lightning_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    straight = Net()
    trainer(tmp_path / "a", gradient_clip_val=1.0).fit(straight, loader())
    first = Net()
    # At an epoch's end (4 batches of 16): Lightning resumes a plain DataLoader mid-epoch by starting the epoch
    # over (its "not resumable" warning), which no optimizer could make bit-exact.
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path / "b", gradient_clip_val=1.0, max_steps=4, callbacks=[ckpt], enable_checkpointing=True).fit(
        first, loader()
    )
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = Net()
    trainer(tmp_path / "c", gradient_clip_val=1.0).fit(resumed, loader(), ckpt_path=str(path))
    assert resumed.trainer.global_step == 8
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_skipped_step_shows_in_the_csv_log(tmp_path: Path) -> None:
    net = Net(poison_step=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        trainer(tmp_path, gradient_clip_val=1.0, max_steps=5, logger=logger).fit(net, loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("nonfinite_skips")]
    assert [(int(r["step"]), float(r["nonfinite_skips"])) for r in rows] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_optimizer_that_is_not_orthoptims_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="orthoptim's optimizers"):
        trainer(tmp_path, max_steps=1).fit(Net(optimizer="adamw"), loader())


def test_clipping_by_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="by norm only"):
        trainer(tmp_path, gradient_clip_val=1.0, gradient_clip_algorithm="value", max_steps=1).fit(Net(), loader())
