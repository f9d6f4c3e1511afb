"""The integrations without their frameworks: importing one raises an ImportError that names the extra. Runs in the
regular suite (no framework needed: the test hides them), next to a check that `import orthoptim` loads none."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "hidden"),
    [
        ("orthoptim.integrations.transformers", ["transformers"]),
        ("orthoptim.integrations.lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"]),
    ],
)
def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, hidden: list[str]) -> None:
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import name` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[integrations\]"'):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)  # leave no half-imported module behind


def test_import_orthoptim_loads_no_framework() -> None:
    code = "import sys, orthoptim; print(any(m in sys.modules for m in ('transformers', 'lightning', 'accelerate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
