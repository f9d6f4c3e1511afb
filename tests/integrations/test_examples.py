"""The two trainer examples run (shortened) and learn."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformers_example() -> None:
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    out = load("transformers_trainer").main(["--max-steps", "40"])
    assert out["last_loss"] < 0.8 * out["first_loss"], out
    assert all(e["nonfinite_skips"] == 0 and e["clip_norm"] > 0 for e in out["logs"])


def test_lightning_example() -> None:
    pytest.importorskip("lightning")
    out = load("lightning_train").main(["--max-steps", "40"])
    assert out["last_loss"] < 0.8 * out["first_loss"], out
    assert out["resumed_step"] == 50
