"""orthoptim in transformers' Trainer: class form, group-aware clipping, resume, skipped steps in the logs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

import orthoptim  # noqa: E402
from orthoptim.integrations.transformers import OrthoptimCallback, OrthoptimTrainerMixin  # noqa: E402

VOCAB = 64


def tiny_llama(seed: int = 0) -> Any:
    """A 2-layer Llama (0.03M parameters) with an untied head, built from a config: no download."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def dataset(n: int = 64, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Sequences with a learnable rule (each token is the previous + 1 mod VOCAB), so the loss can fall fast."""
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (n, 1), generator=gen)
    ids = (starts + torch.arange(length)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def args(tmp_path: Path, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_grad_norm=0.0, max_steps=6, per_device_train_batch_size=8,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant",
    )  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


def class_form(model: Any, **kw: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return orthoptim.Hybrid, {"lr": 0.02, "adamw_lr": 3e-3, "module": model, **kw}


class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
    """Copies every parameter's gradient in on_pre_optimizer_step, and every log it sees."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.logs: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs))


def adamw_names(model: Any) -> set[str]:
    """What clipping means something for in a Llama, written out from the architecture (not from orthoptim):
    the embedding table, the untied head, and every 1-D gain (RMSNorm weights; Llama's linears have no bias)."""
    names = {"model.embed_tokens.weight", "lm_head.weight"}
    names |= {n for n, p in model.named_parameters() if p.dim() == 1}
    return names


def test_class_form_trains_and_splits_by_module(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=30), train_dataset=dataset(),
        optimizer_cls_and_kwargs=class_form(model), callbacks=[OrthoptimCallback(max_grad_norm=1.0)],
    )  # fmt: skip
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.6 * losses[0], losses
    # Trainer's decay/no-decay groups were sorted with module=: embedding and head on AdamW, hidden linears not.
    names = {id(p): n for n, p in model.named_parameters()}
    on_adamw = {names[id(p)] for g in trainer.optimizer.param_groups if g["algorithm"] == "adamw" for p in g["params"]}
    assert on_adamw == adamw_names(model)


def test_clip_uses_the_adamw_groups_norm_only(tmp_path: Path) -> None:
    model = tiny_llama()
    before, after = Recorder(), Recorder()
    clip = OrthoptimCallback(max_grad_norm=0.1)  # below the AdamW half's norm (~0.7 here): the clip acts
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=2), train_dataset=dataset(),
        optimizer_cls_and_kwargs=class_form(model), callbacks=[before, clip, after],
    )  # fmt: skip
    trainer.train()
    adamw = adamw_names(model)
    for pre, post in zip(before.grads, after.grads, strict=True):
        # Hand-computed in float64: the 2-norm over the AdamW parameters' gradients only.
        norm = math.sqrt(sum(float(g.double().square().sum()) for n, g in pre.items() if n in adamw))
        coef = min(1.0, 0.1 / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
        assert coef < 0.5
        for name, g in pre.items():
            if name in adamw:
                torch.testing.assert_close(post[name], g * coef, rtol=1e-5, atol=0)
            else:
                assert torch.equal(post[name], g), name  # orthogonalized matrices: untouched
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    assert last["clip_norm"] == pytest.approx(norm, rel=1e-5)
    assert last["nonfinite_skips"] == 0
    assert last["grad_norm"] > last["clip_norm"]  # Trainer's own grad_norm stays the norm over all parameters


def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None, max_steps: int = 6) -> Any:
        model = tiny_llama()
        trainer = transformers.Trainer(
            model=model, train_dataset=dataset(), optimizer_cls_and_kwargs=class_form(model),
            args=args(out, max_steps=max_steps, save_strategy="steps", save_steps=3),
            callbacks=[OrthoptimCallback(max_grad_norm=0.5)],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=6)  # writes checkpoint-3 on the way
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "out" / "checkpoint-3"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


class Poison(transformers.TrainerCallback):  # type: ignore[misc]
    """Puts a NaN into one hidden matrix's gradient at one step, before the clip and the optimizer see it."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step == self.at_step:
            model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")


def test_skipped_step_shows_in_the_logs(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=4), train_dataset=dataset(),
        optimizer_cls_and_kwargs=class_form(model), callbacks=[Poison(at_step=1), OrthoptimCallback(1.0)],
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="step skipped"):
        trainer.train()
    skips = [e["nonfinite_skips"] for e in trainer.state.log_history if "loss" in e]
    assert skips == [0, 1, 1, 1]  # the second step (global_step 1 -> 2) was skipped, and it stays counted
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mixin_logs_before_every_callback(tmp_path: Path) -> None:
    class OrthoptimTrainer(OrthoptimTrainerMixin, transformers.Trainer):  # type: ignore[misc]
        pass

    model = tiny_llama()
    first = Recorder()  # runs before OrthoptimCallback, as Trainer's reporters do
    trainer = OrthoptimTrainer(
        model=model, args=args(tmp_path, max_steps=2), train_dataset=dataset(),
        optimizer_cls_and_kwargs=class_form(model), callbacks=[first, OrthoptimCallback(max_grad_norm=1.0)],
    )  # fmt: skip
    trainer.train()
    training_logs = [e for e in first.logs if "loss" in e]
    assert len(training_logs) == 2 and all("clip_norm" in e and e["nonfinite_skips"] == 0 for e in training_logs)


def test_global_clip_in_trainer_args_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_grad_norm=1.0), train_dataset=dataset(),
        optimizer_cls_and_kwargs=class_form(model), callbacks=[OrthoptimCallback(max_grad_norm=1.0)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer.train()


def test_callback_refuses_an_optimizer_that_is_not_orthoptims(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path), train_dataset=dataset(), callbacks=[OrthoptimCallback(max_grad_norm=1.0)]
    )  # Trainer's default optimizer: torch's AdamW
    with pytest.raises(TypeError, match=r"orthoptim's optimizers.*AdamW"):
        trainer.train()
