"""``import orthoptim`` costs little beyond ``import torch``: torch._dynamo and triton load when first needed.

Timing is for benchmarks (README, "The step"); what is tested is the cause of the cost: the modules that
``import orthoptim`` would otherwise pull in (torch._dynamo alone took 1.3–1.5 s on a 2-core CPU, as much as torch).
"""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_neither_dynamo_nor_triton() -> None:
    code = (
        "import sys, torch, torch.optim\n"
        "before = {m for m in ('torch._dynamo', 'triton') if m in sys.modules}\n"
        "import orthoptim, orthoptim.cli\n"
        "after = {m for m in ('torch._dynamo', 'triton') if m in sys.modules}\n"
        "print(sorted(after - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
