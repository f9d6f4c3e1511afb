"""Where an optimizer step's time goes on a GPU: torch.profiler over steady-state steps, kernels grouped by kind.

    python benchmarks/step_profile.py [--device cuda] [--layers 12] [--steps 5] [--top 12] [--json FILE]

``gpu_speed.py`` says how long a step takes; this says why, so that the next change is chosen from a measurement:
for each optimizer on GPT-2 small's hidden matrices (``gpu_speed.gpt2_params``) — torch.optim.Muon, orthoptim.Muon
defaults, with ``warn_nonfinite=False``, and with the fused elementwise kernels off — it prints

- wall ms per step (CUDA events around all profiled steps, divided by their number),
- device-busy ms per step (the kernels' summed time; one stream, so they do not overlap) and the gap between the
  two (host-bound time: launches, Python, syncs),
- kernel launches per step, and the device time per kind: matrix products (cuBLAS gemm, orthoptim's symmetric
  Triton kernels), the fused elementwise kernels, other elementwise/reduction kernels, copies;
- the top kernels by device time.

On a CPU (a smoke test of the script) the same table comes from the CPU ops' self times, and "kernels" are ops.
Not a test; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

import orthoptim
from orthoptim.polar.kernels import triton_available

Maker = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
CONFIGS: list[tuple[str, Maker]] = [
    ("torch.optim.Muon(lr=0.02)", lambda ps: torch.optim.Muon(ps, lr=0.02)),
    ("orthoptim.Muon(lr=0.02) defaults", lambda ps: orthoptim.Muon(ps, lr=0.02)),
    ("orthoptim.Muon(lr=0.02, warn_nonfinite=False)", lambda ps: orthoptim.Muon(ps, lr=0.02, warn_nonfinite=False)),
    ("orthoptim.Muon(lr=0.02, backend='triton')", lambda ps: orthoptim.Muon(ps, lr=0.02, backend="triton")),
]


@dataclass
class StepProfile:
    name: str
    wall_ms: float
    busy_ms: float
    launches: float
    by_kind: dict[str, float] = field(default_factory=dict)  # ms per step
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (kernel, launches per step, ms per step)


def kind(kernel: str) -> str:
    """A kernel's kind from its name (cuBLAS/CUTLASS gemm names, our Triton kernels' function names)."""
    name = kernel.lower()
    if "momentum_input_kernel" in name or "commit_kernel" in name:
        return "fused elementwise (ours)"
    if "_sym_product_kernel" in name:
        return "symmetric products (ours)"
    if any(s in name for s in ("gemm", "cutlass", "sm90_xmma", "ampere_", "cublas", "bmm", "addmm", "::mm")):
        return "matrix products (cuBLAS)"
    if "memcpy" in name or "memset" in name or "copy" in name:
        return "copies"
    return "other elementwise / reductions"


def profile_step(name: str, make: Maker, device: torch.device, layers: int, steps: int, top: int) -> StepProfile:
    from gpu_speed import gpt2_params  # this directory is on sys.path when the script runs

    params = gpt2_params(layers, device, torch.float32)
    opt = make(params)
    for _ in range(3):  # state, autotuning, address tables
        opt.step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        if cuda:
            start.record()
        for _ in range(steps):
            opt.step()
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            wall = start.elapsed_time(end) / steps
        else:
            wall = (time.perf_counter() - t0) * 1e3 / steps
    events: list[tuple[str, int, float]] = []
    for avg in prof.key_averages():
        if cuda and avg.device_type == torch.autograd.DeviceType.CUDA:
            events.append((avg.key, avg.count, avg.self_device_time_total / 1e3))
        elif not cuda and avg.self_cpu_time_total > 0 and not avg.key.startswith(("Optimizer.step", "aten::empty")):
            events.append((avg.key, avg.count, avg.self_cpu_time_total / 1e3))
    events.sort(key=lambda e: -e[2])
    result = StepProfile(name, wall, sum(e[2] for e in events) / steps, sum(e[1] for e in events) / steps)
    for key, _, ms in events:
        result.by_kind[kind(key)] = result.by_kind.get(kind(key), 0.0) + ms / steps
    result.top = [(key[:90], round(count / steps), ms / steps) for key, count, ms in events[:top]]
    del opt, params
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2-small layers (4 matrices each)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per optimizer (after 3 untimed)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per optimizer")
    parser.add_argument("--json", help="also write the profiles here")
    args = parser.parse_args()
    if args.layers < 1 or args.steps < 1 or args.top < 0:
        parser.error("--layers and --steps must be ≥ 1, --top ≥ 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    what = "kernels" if device.type == "cuda" else "CPU ops (no GPU: a smoke test)"
    print(f"Step profile, {4 * args.layers} GPT-2-small matrices, float32 parameters, {device}: {what}\n")
    results = []
    for name, make in CONFIGS:
        if "triton" in name and not (device.type == "cuda" and triton_available()):
            continue  # the fused kernels run on CUDA only (the CPU takes them under Triton's interpreter alone)
        results.append(profile_step(name, make, device, args.layers, args.steps, args.top))
    kinds = sorted({k for r in results for k in r.by_kind})
    header = "| optimizer | wall ms | busy ms | gap ms | launches | " + " | ".join(kinds) + " |"
    print(header + "\n" + "|---" * (5 + len(kinds)) + "|")
    for r in results:
        cells = " | ".join(f"{r.by_kind.get(k, 0.0):.2f}" for k in kinds)
        gap = r.wall_ms - r.busy_ms
        print(f"| {r.name} | {r.wall_ms:.2f} | {r.busy_ms:.2f} | {gap:.2f} | {r.launches:.0f} | {cells} |")
    for r in results:
        print(f"\n{r.name}: top {what} by time per step\n| ms | launches | name |\n|---|---|---|")
        for key, count, ms in r.top:
            print(f"| {ms:.3f} | {count} | {key} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
