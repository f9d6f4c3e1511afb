"""The demo's corpus and batches: bytes in, ``(inputs, targets)`` windows out, the same on every machine.

The default corpus ships with CPython itself — the English help texts of ``pydoc_data.topics`` (what ``help("if")``
prints), concatenated in sorted key order — so the demo needs no download. Any file can replace it (``--data``);
it is read as bytes, so any encoding (or none) works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VAL_FRACTION = 0.1  # the last 10% of the bytes are held out for validation


class DataError(ValueError):
    """Bad corpus input (missing, empty or too small a file); its message is one line meant for the user."""


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into a training part and the held-out validation part that follows it."""

    name: str
    train: Tensor  # 1-D int64 byte values
    val: Tensor


def builtin_text() -> bytes:
    """CPython's pydoc help topics (about 0.5 MB of English), joined in sorted key order for a fixed byte stream."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def read_file(path: str | Path) -> bytes:
    """The bytes of ``path``; :class:`DataError` if it is missing, not a regular file, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file")
    if not p.is_file():
        raise DataError(f"--data {path}: not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    if not data:
        raise DataError(f"--data {path}: the file is empty")
    return data


def split(data: bytes, context: int, name: str) -> Corpus:
    """Split ``data`` into train (first 90%) and validation (last 10%, but at least one window of ``context + 1``).

    Raises :class:`DataError` when the data cannot give both parts a full window (``context + 1`` bytes: inputs
    plus the next-byte targets).
    """
    need = context + 1
    if len(data) < need:
        raise DataError(f"{name} has {len(data)} bytes, fewer than one context window + 1 ({need}); pass a bigger file")
    n_val = max(need, round(len(data) * VAL_FRACTION))
    if len(data) - n_val < need:
        raise DataError(
            f"{name} has {len(data)} bytes, too few for a training and a validation window of {need} bytes each "
            f"(need ≥ {2 * need}); pass a bigger file or a smaller --context"
        )
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    return Corpus(name=name, train=tokens[: len(data) - n_val], val=tokens[len(data) - n_val :])


def load_corpus(path: str | Path | None, context: int) -> Corpus:
    """The built-in corpus (``path=None``) or the file at ``path``, split for a model with this context length."""
    if path is None:
        return split(builtin_text(), context, "pydoc_data.topics")
    return split(read_file(path), context, f"--data {path}")


def windows(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs ``tokens[s : s + context]`` and targets shifted by one, stacked for each start ``s``."""
    idx = starts.unsqueeze(1) + torch.arange(context + 1)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


class TrainBatches:
    """Random training windows from a private generator: the same sequence for the same seed, whatever else runs.

    Every optimizer of a comparison draws from its own ``TrainBatches(seed)``, so all see identical data in
    identical order.
    """

    def __init__(self, tokens: Tensor, batch: int, context: int, seed: int) -> None:
        self.tokens, self.batch, self.context = tokens, batch, context
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        high = len(self.tokens) - self.context  # the last start that still has a target after the window
        starts = torch.randint(0, high, (self.batch,), generator=self.gen)
        return windows(self.tokens, starts, self.context)


def val_batches(tokens: Tensor, n_batches: int, batch: int, context: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: ``n_batches × batch`` windows at evenly spaced starts over the held-out part.

    No randomness, so every optimizer (and every run) is scored on exactly the same bytes.
    """
    last = len(tokens) - context - 1
    count = n_batches * batch
    starts = torch.linspace(0, last, count).round().to(torch.int64) if count > 1 else torch.zeros(1, dtype=torch.int64)
    return [windows(tokens, chunk, context) for chunk in starts.split(batch)]
