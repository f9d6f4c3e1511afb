"""The doctor report and the command line, on a tiny shape."""

from __future__ import annotations

import pytest

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
