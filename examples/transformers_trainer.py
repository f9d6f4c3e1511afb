"""A tiny Llama trained with transformers' Trainer and orthoptim.Hybrid, clipped the orthoptim way.

    pip install -e ".[integrations]"     (in a checkout; `make test-integrations` does it for .venv)
    python examples/transformers_trainer.py                  # ~200 steps, well under a minute on 2 CPU cores
    python examples/transformers_trainer.py --max-steps 20

The model is built from a ``LlamaConfig`` in code (2 layers × 64, 0.1M parameters; nothing is downloaded) and
trained byte-level on CPython's own help texts (``pydoc_data.topics``). Three lines make it orthoptim's:

- ``optimizer_cls_and_kwargs=(orthoptim.Hybrid, {..., "module": model})``: Trainer builds its decay/no-decay
  param groups as usual; Hybrid sorts them, with ``module=`` by ``orthoptim.split_params``'s rules (hidden matrices
  orthogonalized; embeddings, head and gains on AdamW);
- ``TrainingArguments(max_grad_norm=0)``: Trainer's global clip (over every parameter) off;
- ``callbacks=[OrthoptimCallback(max_grad_norm=1.0)]``: the AdamW half clipped by its own norm, and ``clip_norm``
  and ``nonfinite_skips`` in every training log (``OrthoptimTrainerMixin`` puts them there before Trainer's
  reporters run too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pydoc_data.topics import topics
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import orthoptim
from orthoptim.integrations.transformers import OrthoptimCallback, OrthoptimTrainerMixin


class OrthoptimTrainer(OrthoptimTrainerMixin, Trainer):  # type: ignore[misc]
    """Trainer whose logs carry clip_norm and nonfinite_skips for every reporter (TensorBoard, W&B, ...)."""


def byte_dataset(context: int, samples: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random windows of ``context`` bytes of the help texts; labels are the inputs (the model shifts them)."""
    data = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context, (samples,), generator=gen)
    return [{"input_ids": data[s : s + context], "labels": data[s : s + context]} for s in starts.tolist()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.context, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.max_steps, per_device_train_batch_size=args.batch,
            logging_steps=max(1, min(20, args.max_steps // 5)),  # several rows: a first and a last loss
            max_grad_norm=0.0,  # Trainer's global clip off: the callback clips
            lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10), report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = OrthoptimTrainer(
            model=model,
            args=training_args,
            train_dataset=byte_dataset(args.context, args.max_steps * args.batch),
            optimizer_cls_and_kwargs=(orthoptim.Hybrid, {"lr": 0.02, "adamw_lr": 3e-3, "module": model}),
            callbacks=[OrthoptimCallback(max_grad_norm=1.0)],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:
        print(
            f"step {e['step']:4d}  loss {e['loss']:.3f}  grad_norm (all) {e['grad_norm']:.3f}  "
            f"clip_norm (AdamW half) {e['clip_norm']:.3f}  nonfinite_skips {e['nonfinite_skips']}"
        )
    print(f"{args.max_steps} steps in {seconds:.1f} s; loss {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f} nats/byte")
    return {"first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"], "logs": logs}


if __name__ == "__main__":
    main()
