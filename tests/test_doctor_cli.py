"""The doctor report and the command line, on a tiny shape."""

from __future__ import annotations

import pytest
import torch

import orthoptim
from orthoptim.cli import main
from orthoptim.doctor import SCALES, TORCH_MUON, format_report, run_doctor


def test_doctor_shows_our_invariance_and_torch_muon_failures() -> None:
    report = run_doctor([(16, 40)], ["polar_express", "jordan"], repeats=1, progress=False)
    rows = {r.routine: r for r in report.shapes[0].rows}
    for name in ("polar_express", "jordan"):
        assert rows[name].scale_failures == []
        assert set(rows[name].ratios) == set(SCALES)
        lo, hi = rows[name].gain_heavy
        assert 0.4 < lo <= hi < 1.25  # 5-step schedules on σ ≥ 1e-3·σmax
    if TORCH_MUON in rows:  # torch ≥ 2.9 ships the routine
        fails = rows[TORCH_MUON].scale_failures
        assert 1e-20 in fails and 1e20 in fails and 1e38 in fails
    text = format_report(report)
    assert "16×40" in text and "polar_express" in text and "scale failures" in text


def test_cli_doctor_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--shapes", "8x12", "--schedules", "jordan", "--repeats", "1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "8×12" in out and "jordan" in out


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--schedules", "nope", "--shapes", "4x4", "--no-progress"]) == 2
    assert "unknown schedule" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["doctor", "--shapes", "4by4"])
    assert "bad shape" in capsys.readouterr().err


def test_doctor_reports_refused_configurations() -> None:
    report = run_doctor([(8, 12)], ["cans"], compute_dtype="bfloat16", repeats=1, progress=False)
    row = next(r for r in report.shapes[0].rows if r.routine == "cans")
    assert row.refused == "refused in bfloat16" and not row.ratios
    assert "refused in bfloat16" in format_report(report)


def test_cli_coeffs_prints_a_pasteable_list_and_plots(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    import ast
    from pathlib import Path

    png = Path(str(tmp_path)) / "coeffs.png"
    assert main(["coeffs", "--steps", "5", "--lower", "1e-3", "--safety", "0.02", "--cushion", "0.02",
                 "--plot", str(png)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    start = out.index("coefficients = [") + len("coefficients = ")
    body = out[start : out.index("]", start) + 1]
    triples = ast.literal_eval(body)
    # modded-nanogpt train_gpt.py's list (ℓ=1e-3, 5 steps, safety 0.02, cushion 0.02), first triple:
    assert triples[0] == pytest.approx((8.156554524902461, -22.48329292557795, 15.878769915207462), rel=1e-12)
    assert len(triples) == 5 and png.stat().st_size > 10_000
    assert "# usable in compute dtypes: bfloat16, float16, float32, float64" in out
    assert main(["coeffs", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


def test_cli_coeffs_warns_when_the_design_is_refused_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a safety margin the first polynomial maps σ just above 1 past what the later ones tolerate: the
    library refuses the list in every compute dtype, and the command says so next to it."""
    assert main(["coeffs", "--steps", "5", "--lower", "1e-3"]) == 0
    assert "WARNING: refused in every compute dtype" in capsys.readouterr().out
    unsafe = orthoptim.design_schedule(5, 1e-3)
    for dtype in ("float32", "float64"):
        with pytest.raises(ValueError, match="refused"):
            orthoptim.orthogonalize(torch.randn(8, 16), schedule=unsafe, compute_dtype=dtype)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["coeffs", "--steps", "5", "--safety", "0.02", "--plot", "/nonexistent-dir/c.png"], "No such file"),
        (["bench", "--shapes", "8x8", "--json", "/nonexistent-dir/b.json"], "folder does not exist"),
        (["bench", "--device", "meta"], "cpu or cuda"),
        (["doctor", "--device", "meta"], "cpu or cuda"),
        (["demo", "--device", "meta", "--steps", "1"], "cpu or cuda"),
        (["doctor", "--device", "cpu:banana"], "not a torch device"),
    ],
)
def test_cli_errors_are_one_line_on_stderr_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cli_doctor_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--device", "cuda", "--shapes", "8x8"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_name_lists_must_name_something() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--schedules", ","])
    assert exit_info.value.code == 2


def test_cli_coeffs_says_when_exact_arithmetic_already_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """A 5-step cubic design overshoots 1.5 in exact arithmetic: no safety margin helps, and the warning says so."""
    assert main(["coeffs", "--steps", "5", "--degree", "3", "--safety", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "even in exact arithmetic" in out and "--safety" not in out.split("WARNING")[1]
