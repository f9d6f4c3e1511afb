"""``orthoptim bench``: the report's numbers and the command line, on tiny matrices on the CPU (times are only
checked to exist: timing assertions do not belong in tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import orthoptim
from orthoptim.bench import (
    BASELINE,
    CANDIDATES,
    GPT2_SMALL_LAYER,
    format_bench,
    gpt2_small_shapes,
    matrix_params,
    run_bench,
)
from orthoptim.cli import main

SHAPES = [(16, 40), (40, 16), (24, 24)]
CPU = torch.device("cpu")


def _first_update(make: type | object, **kw: object) -> torch.Tensor:
    params = matrix_params(SHAPES, CPU, torch.float32)
    before = torch.cat([p.detach().reshape(-1).double() for p in params])
    opt = make(params, **kw)  # type: ignore[operator]
    opt.step()
    return torch.cat([p.detach().reshape(-1).double() for p in params]) - before


def test_report_rows_ratios_and_update_distance_against_an_independent_run() -> None:
    names = ["torch_muon", "muon_torch_math", "muon", "normuon", "polargrad"]
    report = run_bench(SHAPES, names, device="cpu", warmup=1, repeats=3, progress=False)
    assert [r.name for r in report.rows] == names
    assert all(len(r.times_ms) == 3 and all(t > 0 for t in r.times_ms) for r in report.rows)
    rows = {r.name: r for r in report.rows}
    assert report.ratio(rows[BASELINE]) == 1.0
    assert rows[BASELINE].update_vs_baseline == 0.0
    # The distance column, recomputed here from torch.optim.Muon and orthoptim.Muon run outside the bench.
    theirs = _first_update(torch.optim.Muon, lr=0.02)
    ours = _first_update(orthoptim.Muon, lr=0.02, ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5,
                         compute_dtype="bfloat16")  # fmt: skip
    want = float((ours - theirs).norm() / theirs.norm())
    assert rows["muon_torch_math"].update_vs_baseline == pytest.approx(want, rel=1e-12)
    assert want < 3e-2  # the same math: bfloat16 rounding apart
    assert 3e-2 < rows["muon"].update_vs_baseline < 1.0  # another schedule and normalization: different by design
    text = format_bench(report)
    for r in report.rows:
        assert r.label in text
    assert "× torch.optim.Muon" in text and "3 matrices" in text


def test_report_without_the_baseline_has_no_ratio() -> None:
    report = run_bench(SHAPES[:1], ["muon"], device="cpu", warmup=0, repeats=1, progress=False)
    assert math.isnan(report.ratio(report.rows[0])) and math.isnan(report.rows[0].update_vs_baseline)


def test_matrix_params_are_seeded_and_gpt2_shapes_counted() -> None:
    a, b = matrix_params(SHAPES, CPU, torch.float32), matrix_params(SHAPES, CPU, torch.float32)
    assert all(torch.equal(x, y) and torch.equal(x.grad, y.grad) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    assert gpt2_small_shapes(12) == list(GPT2_SMALL_LAYER) * 12 and len(gpt2_small_shapes(12)) == 48


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["adam"]}, "unknown optimizer"),
        ({"names": []}, "unknown optimizer"),
        ({"names": ["muon", "muon"]}, "named twice"),
        ({"names": ["muon_graph"]}, "needs a CUDA device"),
        ({"shapes": []}, "shapes"),
        ({"shapes": [(0, 4)]}, "shapes"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"shapes": SHAPES, "names": ["muon"], "device": "cpu", "progress": False}
    args.update(kwargs)
    shapes, names = args.pop("shapes"), args.pop("names")
    with pytest.raises(ValueError, match=message):
        run_bench(shapes, names, **args)  # type: ignore[arg-type]


def test_cli_bench_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "16x40,24x24", "--layers", "2", "--optimizers", "torch_muon,muon", "--repeats", "2",
            "--warmup", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert CANDIDATES["muon"].label in text and "4 matrices: 2 × 16×40, 2 × 24×24" in text
    data = json.loads(out.read_text())
    assert data["shapes"] == [[16, 40], [24, 24], [16, 40], [24, 24]]
    assert [r["name"] for r in data["rows"]] == ["torch_muon", "muon"]
    assert data["rows"][0]["vs_torch_muon"] == 1.0 and len(data["rows"][1]["times_ms"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "sgd"], "unknown optimizer"),
        (["--optimizers", "muon_graph", "--device", "cpu"], "needs a CUDA device"),
        (["--layers", "0"], "--layers must be ≥ 1"),
        (["--repeats", "0"], "repeats"),
    ],
)
def test_cli_bench_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "8x12", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cli_bench_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "8x12", "--device", "cuda", "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_bench_lists_the_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CANDIDATES)
