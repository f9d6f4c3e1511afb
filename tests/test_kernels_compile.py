"""orthoptim's Triton kernels compile for NVIDIA GPUs (sm_90, H100), checked without a GPU.

The CPU suite runs the kernels under Triton's interpreter, which accepts code the compiler may reject and says
nothing about the machine code. ``benchmarks/compile_kernels.py --quick`` compiles one variant of each kernel
with Triton's bundled ptxas, in a subprocess (this process has TRITON_INTERPRET=1). Checked from its table: no
failure, the fused kernels' multiply-adds are fused (``fma.rn.f32``: the bit-for-bit contract with torch's
kernels), their loads vectorize when the address table is aligned, and the symmetric products use the tensor
cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiling; `make test-fast` leaves it out

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_kernels.py"


def test_the_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--arch", "90"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] == "sm_90":
            rows[cells[1]] = cells
    assert set(rows) == {"momentum_input_kernel", "commit_kernel", "_sym_product_kernel"}, done.stdout
    for name in ("momentum_input_kernel", "commit_kernel"):
        _, _, variants, fma, loads, _ = rows[name]
        vector, _ = (int(x) for x in loads.split(" / "))
        assert int(variants) == 1 and int(fma) > 0 and vector > 0, rows[name]
    assert int(rows["_sym_product_kernel"][5]) > 0, rows["_sym_product_kernel"]  # wgmma on sm_90
