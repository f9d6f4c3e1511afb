"""``orthoptim demo`` on a tiny config: table, plot, finite decreasing losses, determinism and bad input."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import orthoptim
from orthoptim.demo.cli import add_demo_parser, run_demo
from orthoptim.demo.data import DataError, TrainBatches, builtin_text, load_corpus, split
from orthoptim.demo.model import GPT, GPTConfig
from orthoptim.demo.train import OPTIMIZERS, TrainConfig, compare, format_table, lr_factor, plot_curves

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--context", "32", "--batch", "8", "--no-progress"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orthoptim")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["demo", *argv])


def tiny_config(steps: int = 20) -> TrainConfig:
    return TrainConfig(model=GPTConfig(layers=1, width=32, heads=2, context=32), steps=steps, batch=8, eval_every=5)


def test_demo_prints_table_writes_plot_and_losses_decrease(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(parse(*TINY, "--steps", "20", "--eval-every", "5", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "steps to adamw's final" in out and "ms/step" in out
    for name in OPTIMIZERS:
        assert f"| {name} " in out
    png = tmp_path / "demo.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["name"] for r in runs] == list(OPTIMIZERS)
    for r in runs:
        assert r["steps"] == [0, 5, 10, 15, 20]
        assert all(math.isfinite(v) for v in r["val_loss"])
        assert r["val_loss"][-1] < r["val_loss"][0] - 0.5, r  # starts near ln 256 ≈ 5.55 nats/byte
        assert r["ms_per_step"] > 0


def test_runs_are_deterministic_and_share_init_and_data() -> None:
    cfg = tiny_config(steps=6)
    corpus = load_corpus(None, cfg.model.context)
    first = compare(OPTIMIZERS, cfg, corpus, progress=False)
    second = compare(OPTIMIZERS, cfg, corpus, progress=False)
    for a, b in zip(first, second, strict=True):
        assert a.val_loss == b.val_loss and a.steps == b.steps
    # Same seed → same initial model, so every optimizer starts from the same validation loss.
    assert len({r.val_loss[0] for r in first}) == 1
    a, b = TrainBatches(corpus.train, 4, 32, seed=3), TrainBatches(corpus.train, 4, 32, seed=3)
    for _ in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next(), strict=True))
    assert "hybrid" in format_table(first)


def test_builtin_corpus_and_split() -> None:
    text = builtin_text()
    assert text == builtin_text() and len(text) > 100_000
    corpus = load_corpus(None, 128)
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert abs(len(corpus.val) / len(text) - 0.1) < 0.001
    assert bytes(corpus.val[:64].tolist()) == text[len(corpus.train) : len(corpus.train) + 64]
    small = split(b"x" * 10, 4, "tiny")  # validation gets at least one window + 1 even when 10% is less
    assert (len(small.train), len(small.val)) == (5, 5)


def test_non_utf8_data_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bytes.bin"
    data.write_bytes(bytes(range(256)) * 8 + b"\xff\xfe\x80")
    args = parse(*TINY, "--steps", "3", "--optimizers", "adamw", "--data", str(data), "--out", str(tmp_path))
    assert run_demo(args) == 0
    assert "--data" in capsys.readouterr().out


def test_split_params_sends_exactly_the_block_matrices_to_muon() -> None:
    model = GPT(GPTConfig(layers=2, width=16, heads=2, context=8))
    matrices, others = orthoptim.split_params(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in matrices) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "attn_out", "mlp_in", "mlp_out")
    )
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight"} <= {named[id(p)] for p in others}


def test_lr_schedule_warms_up_then_decays_to_near_zero() -> None:
    f = [lr_factor(s, 100, 5) for s in range(100)]
    assert f[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert f[5] == 1.0 and f[-1] == pytest.approx(1 / 95) and f == sorted(f[:6]) + sorted(f[6:], reverse=True)
    assert lr_factor(0, 1, 5) == 1.0  # a one-step run has no room for warmup


def test_missing_matplotlib_gives_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    assert plot_curves([], tmp_path / "x.png", "t") is None
    assert run_demo(parse(*TINY, "--steps", "2", "--optimizers", "adamw", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and not (tmp_path / "demo.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{tmp}/missing.txt"], "no such file"),
        (["--data", "{tmp}/empty.txt"], "empty"),
        (["--data", "{tmp}/small.txt"], "fewer than one context window"),
        (["--data", "{tmp}/two_windows.txt"], "too few for a training and a validation window"),
        (["--data", "{tmp}"], "not a regular file"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
        (["--optimizers", " , "], "--optimizers is empty"),
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--width", "33"], "divisible"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "small.txt").write_bytes(b"a" * 32)  # context 32 needs 33 bytes per window
    (tmp_path / "two_windows.txt").write_bytes(b"a" * 40)
    args = parse(*TINY, "--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in argv))
    assert run_demo(args) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("orthoptim demo: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert captured.out == ""


def test_errors_are_value_errors() -> None:
    with pytest.raises(DataError, match="fewer than one context window"):
        split(b"abc", 8, "x")
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(steps=0)
