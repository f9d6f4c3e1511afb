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
from orthoptim.demo import train
from orthoptim.demo.cli import _warmups, add_demo_parser, run_demo
from orthoptim.demo.data import DataError, TrainBatches, builtin_text, load_corpus, split
from orthoptim.demo.model import GPT, GPTConfig
from orthoptim.demo.train import (
    OPTIMIZERS,
    TUNED_LRS,
    TUNED_WARMUP,
    TrainConfig,
    compare,
    format_table,
    lr_factor,
    plot_curves,
    summarize,
)

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
        (["--seeds", "0"], "--seeds must be a whole number ≥ 1, got 0"),
        (["--seeds", "-2"], "--seeds must be a whole number ≥ 1, got -2"),
        (["--seeds", "2.5"], "--seeds must be a whole number ≥ 1, got '2.5'"),
        (["--seeds", "three"], "--seeds must be a whole number ≥ 1, got 'three'"),
        (["--warmup", "1"], "--warmup must lie in [0, 1), got 1"),
        (["--warmup", "adamw=-0.1"], "--warmup must lie in [0, 1), got -0.1"),
        (["--warmup", "adamw=nan"], "--warmup must lie in [0, 1), got nan"),
        (["--warmup", "sgd=0.1"], "--warmup: unknown optimizer 'sgd'"),
        (["--warmup", "adamw=0.1,hybrid"], "'hybrid' is not NAME=FRACTION"),
        (["--warmup", "lots"], "'lots' is not a number"),
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
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="--seeds must be a whole number"):
            TrainConfig(seeds=bad)  # type: ignore[arg-type]


def test_seeds_runs_equal_single_seed_runs_and_are_aggregated_per_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [*TINY, "--steps", "6", "--eval-every", "2", "--optimizers", "hybrid,adamw"]
    assert run_demo(parse(*common, "--seed", "3", "--seeds", "2", "--out", str(tmp_path / "both"))) == 0
    table = capsys.readouterr().out
    payload = json.loads((tmp_path / "both" / "results.json").read_text())
    singles = []
    for seed in (3, 4):
        assert run_demo(parse(*common, "--seed", str(seed), "--out", str(tmp_path / str(seed)))) == 0
        singles += json.loads((tmp_path / str(seed) / "results.json").read_text())["runs"]
    capsys.readouterr()
    runs = payload["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("hybrid", 3), ("adamw", 3), ("hybrid", 4), ("adamw", 4)]
    for multi, single in zip(runs, singles, strict=True):  # the same seed gives the same run, alone or not
        assert (multi["name"], multi["seed"], multi["steps"]) == (single["name"], single["seed"], single["steps"])
        assert multi["val_loss"] == single["val_loss"]
    assert payload["runs"][0]["val_loss"] != payload["runs"][2]["val_loss"]  # the seeds differ

    # Independent aggregation: per seed, the first evaluated step at or below that seed's AdamW final, over the
    # AdamW run's own such step; then mean and range over the seeds.
    def first_at_or_below(run: dict[str, list[float]], target: float) -> int:
        return next(int(s) for s, v in zip(run["steps"], run["val_loss"], strict=True) if v <= target)

    adamw = {r["seed"]: r for r in runs if r["name"] == "adamw"}
    summary = {s["name"]: s for s in payload["summary"]}
    assert "ms/step" in table and "seeds 3–4" in table
    for name in ("hybrid", "adamw"):
        mine = [r for r in runs if r["name"] == name]
        finals = [r["val_loss"][-1] for r in mine]
        fractions = [
            first_at_or_below(r, adamw[r["seed"]]["val_loss"][-1])
            / first_at_or_below(adamw[r["seed"]], adamw[r["seed"]]["val_loss"][-1])
            for r in mine
        ]
        s = summary[name]
        assert s["seeds"] == [3, 4] and s["final"] == finals
        assert s["final_mean"] == pytest.approx(sum(finals) / 2)
        assert (s["final_min"], s["final_max"]) == (min(finals), max(finals))
        assert s["fraction_of_reference_steps"] == pytest.approx(fractions)
        assert s["fraction_mean"] == pytest.approx(sum(fractions) / 2)
        loss_cell = f"{sum(finals) / 2:.4f} ({min(finals):.4f}–{max(finals):.4f})"
        steps_cell = f"{50 * sum(fractions):.0f}% ({100 * min(fractions):.0f}–{100 * max(fractions):.0f}%)"
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert loss_cell in row and steps_cell in row, (row, loss_cell, steps_cell)
    assert summary["adamw"]["fraction_of_reference_steps"] == [1.0, 1.0]


def test_seeds_summary_counts_seeds_that_never_reach_the_reference() -> None:
    def run(name: str, seed: int, losses: list[float]) -> train.RunResult:
        return train.RunResult(name, {"lr": 1.0}, 0.1, seed, [0, 10, 20], losses, [0.0, 1.0, 2.0], 5.0)

    results = [
        run("hybrid", 0, [5.0, 2.0, 1.5]),  # reaches AdamW's 2.0 at step 10 of AdamW's 20: 50%
        run("adamw", 0, [5.0, 3.0, 2.0]),
        run("hybrid", 1, [5.0, 4.0, 3.5]),  # never reaches AdamW's 3.0
        run("adamw", 1, [5.0, 3.0, 3.0]),  # reaches its own final at step 10
    ]
    hybrid = summarize(results)[0]
    assert hybrid.reached == [10, None] and hybrid.reference_steps == [20, 10]
    assert hybrid.fraction == [0.5, None]
    row = next(line for line in format_table(results).splitlines() if line.startswith("| hybrid "))
    assert "50%, reached on 1 of 2 seeds" in row and "2.5000 (1.5000–3.5000)" in row


def test_warmup_flag_sets_each_optimizers_lr_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 8
    seen: dict[str, list[list[tuple[float, float]]]] = {}
    build = train.build_optimizers

    def recording_build(name: str, model: torch.nn.Module, lrs: dict[str, float]) -> list[torch.optim.Optimizer]:
        optimizers = build(name, model, lrs)
        log = seen.setdefault(name, [])

        def hook(opt: torch.optim.Optimizer, *_: object) -> None:
            log.append([(g["lr"], g["initial_lr"]) for g in opt.param_groups])

        optimizers[0].register_step_pre_hook(hook)
        return optimizers

    monkeypatch.setattr(train, "build_optimizers", recording_build)
    argv = [
        *TINY,
        "--steps",
        str(steps),
        "--optimizers",
        "adamw,hybrid",
        "--warmup",
        "adamw=0.25",
        "--out",
        str(tmp_path),
    ]
    assert run_demo(parse(*argv)) == 0
    runs = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    for name in ("adamw", "hybrid"):
        fraction = {"adamw": 0.25}.get(name, TUNED_WARMUP[name])  # hybrid keeps its tuned warmup
        assert runs[name]["warmup"] == fraction
        w = round(fraction * steps)
        assert len(seen[name]) == steps
        for k, groups in enumerate(seen[name]):
            # Closed form: linear warmup over w steps to the full lr, then linear decay that would reach 0 at `steps`.
            factor = (k + 1) / (w + 1) if k < w else (steps - k) / (steps - w)
            for lr, base in groups:
                assert base in TUNED_LRS[name].values()
                assert lr == pytest.approx(base * factor, rel=1e-12), (name, k, w)


def test_warmup_flag_forms() -> None:
    assert _warmups(None, ["adamw", "hybrid"]) == {}
    assert _warmups("0.5", ["adamw", "hybrid"]) == {"adamw": 0.5, "hybrid": 0.5}
    assert _warmups(" torch_muon = 0.1, adamw=0 ", ["adamw"]) == {"torch_muon": 0.1, "adamw": 0.0}
