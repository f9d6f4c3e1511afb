"""Kernel launches and host reads of one optimizer step on the accelerator code path, counted without a GPU.

    .venv/bin/python benchmarks/step_launches.py [--layers 12] [--where CONFIG] [--model]

Why: on an H100 a Muon step over GPT-2-small's 48 hidden matrices is ~2 ms of arithmetic (the GPU speed issue),
while every launched kernel costs the host several microseconds of dispatch and launch. A step that launches
hundreds of kernels is bound by the host, whatever its kernels; one that reads a device value on the host
(``.item()``, ``bool(t)``) waits for the GPU. Both are properties of the code path, not of the machine, so they can
be counted here.

How: the parameters and gradients live on the ``meta`` device (shapes only: no memory, no arithmetic). The step
takes the same path there as on CUDA (everything not on the CPU does), and a ``TorchDispatchMode`` counts every
aten operation it dispatches. Printed per configuration:

- *launches*: operations other than views, allocations and profiler markers — on CUDA each launches at least one
  kernel (a foreach operation one per chunk of tensors, so a few for 48 tensors);
- *products*: of those, the matrix products (``mm``/``bmm``/``addmm``/``baddbmm``). With Triton on a CUDA GPU
  the symmetric ones become ``orthoptim.polar.kernels`` launches, one for one (counted here as the torch product);
- *host reads*: values read back to the host (``_local_scalar_dense``) from the device: each one a GPU sync.
  Operations on CPU tensors alone (torch.optim.AdamW's step counters) are neither launches nor reads;
- *other GB*: bytes the launches other than the products read and write (from each op's schema: arguments read,
  written ones written, fresh outputs written; no cache reuse) — the memory-bound part of the step (momentum,
  normalization, commit); *≥ ms*: those bytes at an H100's copy rate (3.0 TB/s, the device notes' reading): a
  lower bound on their time on such a GPU, not a timing;
- *per extra matrix*: how the launches grow when the model has more layers (the step is run at ``--layers`` and
  at twice that): 0 means no per-parameter kernel anywhere in the step (``--model``: per extra layer's matrices,
  with the layer's norms and biases).

``--model``: GPT-2 small's whole parameter set (embeddings, norms, biases, head: ``step_cpu.py``'s module), Hybrid
against torch.optim.Muon on the hidden matrices + torch.optim.AdamW (foreach) on the rest. (torch.optim.AdamW's
fused mode refuses meta tensors; it is the kernel Hybrid's AdamW half calls, counted in Hybrid's rows.)

torch.optim.Muon is counted the same way (a Python loop of per-matrix ops). One substitution: the meta device
decomposes ``_foreach_add_(tensors, 0-d tensor)`` into a host read, where CUDA has a kernel that reads the scalar
on the device; that call is counted as the one launch it is on CUDA (``CountOps``).

The ``triton`` backend's fused kernels (``orthoptim/optim/backends/triton.py``: the momentum input and the commit,
one launch each per megabatch) run on CUDA; on meta they are counted instead of run — one launch each, and the
bytes they read and write (B and G in, M out; θ, B, G and the update in, θ and B out). The other rows (the default
``torch`` backend) count the torch ops that replace them. Not a test; counts only (no timing).
"""

from __future__ import annotations

import argparse
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import orthoptim
from orthoptim.optim.backends import triton as fused

SHAPES = ((768, 2304), (768, 768), (3072, 768), (768, 3072))  # GPT-2 small, per layer
JORDAN = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon muon.py, torch.optim._muon DEFAULT_A/B/C

#: Operations that launch no kernel: views and metadata changes, allocations (the caching allocator's host cost is
#: small next to a launch), profiler markers.
NO_LAUNCH = frozenset(
    "view _unsafe_view view_as reshape permute transpose t expand unsqueeze squeeze select slice narrow as_strided"
    " alias detach split split_with_sizes unbind diagonal empty empty_strided empty_like"
    " _record_function_enter_new _record_function_exit".split()
)
PRODUCTS = frozenset({"mm", "bmm", "addmm", "baddbmm"})
#: An H100's device-to-device copy rate, bytes read plus written (the device notes' reading on this workplace's
#: H100, 2026-11-13: "about 3.0 TB/s"): turns bytes into a lower bound on time, not a timing.
COPY_RATE_TB_S = 3.0

Maker = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
CONFIGS: list[tuple[str, Maker]] = [
    ("torch.optim.Muon", lambda ps: torch.optim.Muon(ps, lr=0.02)),
    ("orthoptim.Muon defaults", lambda ps: orthoptim.Muon(ps, lr=0.02)),
    ("orthoptim.Muon(backend='triton')", lambda ps: orthoptim.Muon(ps, lr=0.02, backend="triton")),
    (
        "orthoptim.Muon(backend='triton', warn_nonfinite=False)",
        lambda ps: orthoptim.Muon(ps, lr=0.02, backend="triton", warn_nonfinite=False),
    ),
    ("orthoptim.Muon, warn_nonfinite=False", lambda ps: orthoptim.Muon(ps, lr=0.02, warn_nonfinite=False)),
    ("orthoptim.Muon, nonfinite='propagate'", lambda ps: orthoptim.Muon(ps, lr=0.02, nonfinite="propagate")),
    (
        "orthoptim.Muon, torch's math (Jordan NS5, bf16, Frobenius)",
        lambda ps: orthoptim.Muon(ps, lr=0.02, ns_coefficients=JORDAN, ns_steps=5, compute_dtype="bfloat16"),
    ),
    ("orthoptim.NorMuon defaults", lambda ps: orthoptim.NorMuon(ps, lr=0.02)),
    ("orthoptim.NorMuon(backend='triton')", lambda ps: orthoptim.NorMuon(ps, lr=0.02, backend="triton")),
    ("orthoptim.PolarGrad defaults", lambda ps: orthoptim.PolarGrad(ps, lr=0.02)),
]


@dataclass
class Counts:
    ops: Counter[str] = field(default_factory=Counter)
    host_reads: int = 0
    cpu_ops: int = 0  # operations on CPU tensors only: no launch, no sync
    product_bytes: int = 0  # bytes read and written by the matrix products (compute-bound on a GPU)
    other_bytes: int = 0  # by every other launch (memory-bound: normalization, momentum, commit)
    sites: Counter[tuple[str, str]] = field(default_factory=Counter)
    site_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_LAUNCH)

    @property
    def products(self) -> int:
        return sum(n for op, n in self.ops.items() if op in PRODUCTS)


class CountOps(TorchDispatchMode):
    """Counts dispatched aten operations; answers host reads with True (a finite flag) instead of failing on meta.

    ``torch._foreach_add_(tensors, 0-d tensor)`` is replaced while counting by one counted launch that changes
    nothing: the meta device would decompose it into a host read and a scalar add before any mode sees it, where
    CUDA runs one kernel reading the scalar on the device (torch's ForeachBinaryOpScalarTensor.cu)."""

    def __init__(self, sites: bool, kernels: bool = True) -> None:
        super().__init__()
        self.counts = Counts()
        self.sites = sites
        self.kernels = kernels  # count the fused Triton kernels (backend="triton") instead of running them
        self._foreach_add_ = torch._foreach_add_
        self._launch = fused._launch

    def __enter__(self) -> CountOps:
        def foreach_add_(tensors: Any, other: Any, **kwargs: Any) -> None:
            if isinstance(other, torch.Tensor) and other.dim() == 0 and other.is_meta:
                self._count("_foreach_add_")
                return
            self._foreach_add_(tensors, other, **kwargs)

        torch._foreach_add_ = foreach_add_
        if self.kernels:
            fused._launch = self._fused_launch
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        torch._foreach_add_ = self._foreach_add_
        fused._launch = self._launch
        super().__exit__(*exc)

    def _fused_launch(self, kernel: Any, grid: Any, device: Any, *args: Any, **meta: Any) -> None:
        """A fused kernel, counted instead of run: one launch; its bytes from the stacked tensor it is given
        (``M`` written for the input, the update read for the commit) and the state's dtype."""
        name = kernel.__name__
        stacked = args[1]
        state = stacked.numel() * meta["STATE_DTYPE"].primitive_bitwidth // 8
        moved = 2 * state + stacked.nbytes if name == "momentum_input_kernel" else 5 * state + stacked.nbytes
        self._count(name)
        self.counts.other_bytes += moved
        if self.sites:
            self.counts.site_bytes[(name, _site())] += moved

    def _count(self, name: str) -> None:
        if name == "_local_scalar_dense":
            self.counts.host_reads += 1
        else:
            self.counts.ops[name] += 1
        if self.sites and name not in NO_LAUNCH:
            self.counts.sites[(name, _site())] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "cpu" for t in tensors):
            self.counts.cpu_ops += 1  # host-side work (torch.optim.AdamW keeps its step counters on the CPU)
            return func(*args, **kwargs)
        self._count(name)
        if name == "_local_scalar_dense":
            return True
        out = func(*args, **kwargs)
        if name not in NO_LAUNCH:
            moved = _bytes_moved(func, args, kwargs, out)
            if self.sites:
                self.counts.site_bytes[(name, _site())] += moved
            if name in PRODUCTS:
                self.counts.product_bytes += moved
            else:
                self.counts.other_bytes += moved
        return out


def _bytes_moved(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> int:
    """Bytes an operation reads and writes, from its schema: every tensor argument is read, except the destination
    of ``copy_`` and ``out=`` arguments, which are only written; arguments the schema marks as written are written
    (in-place ops: read and written); fresh outputs are written. No cache reuse assumed: a DRAM traffic estimate."""
    total = 0
    schema_args = func._schema.arguments
    fresh = not any(r.alias_info is not None for r in func._schema.returns)
    for i, arg in enumerate(schema_args):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        size = sum(t.nbytes for t in values if isinstance(t, torch.Tensor))
        written = arg.alias_info is not None and arg.alias_info.is_write
        read = not (written and (arg.name == "out" or func.overloadpacket.__name__ in ("copy_", "_foreach_copy_")))
        total += size * (int(read) + int(written))
    if fresh:
        total += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    return total


def _site() -> str:
    """The innermost two orthoptim frames of the current call, for ``--where``."""
    frames = [f for f in traceback.extract_stack() if "orthoptim" in f.filename and "benchmarks" not in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-2:]))


ModelMaker = Callable[[nn.Module], list[torch.optim.Optimizer]]


def _torch_pair(model: nn.Module) -> list[torch.optim.Optimizer]:
    mats, rest = orthoptim.split_params(model)
    return [torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(rest, lr=3e-4, weight_decay=0.01, foreach=True)]


MODEL_CONFIGS: list[tuple[str, ModelMaker]] = [
    ("torch.optim.Muon + torch.optim.AdamW (foreach)", _torch_pair),
    ("orthoptim.Hybrid defaults", lambda m: [orthoptim.Hybrid(m, adamw_weight_decay=0.01)]),
    (
        "orthoptim.Hybrid(backend='triton')",
        lambda m: [orthoptim.Hybrid(m, adamw_weight_decay=0.01, backend="triton")],
    ),
    ("orthoptim.Hybrid, warn_nonfinite=False", lambda m: [orthoptim.Hybrid(m, warn_nonfinite=False)]),
    ("orthoptim.Hybrid, nonfinite='propagate'", lambda m: [orthoptim.Hybrid(m, nonfinite="propagate")]),
]


def gpt2_small(layers: int) -> nn.Module:
    """GPT-2 small's parameter set on the meta device (step_cpu.py's module: embeddings, norms, biases, head)."""
    from step_cpu import GPT2Small  # this directory is on sys.path when the script runs

    with torch.device("meta"):
        return GPT2Small(layers)


def count_step(make: Any, layers: int, sites: bool = False, model: bool = False, kernels: bool = True) -> Counts:
    """Counts for one steady-state step (after two untimed steps: state initialized, buffers kept). ``make``: a
    ``Maker``, or with ``model`` a ``ModelMaker`` given GPT-2 small's whole parameter set; ``kernels``: count
    the fused Triton kernels where CUDA with triton runs them (else the torch ops that replace them)."""
    if model:
        module = gpt2_small(layers)
        params = list(module.parameters())
        opts = make(module)
    else:
        params = [nn.Parameter(torch.empty(s, device="meta")) for _ in range(layers) for s in SHAPES]
        opts = [make(params)]
    for p in params:
        p.grad = torch.empty_like(p)
    with CountOps(sites, kernels) as mode:
        for _ in range(2):
            for opt in opts:
                opt.step()
        mode.counts = Counts()
        for opt in opts:
            opt.step()
    return mode.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2-small layers (4 matrices each)")
    parser.add_argument("--where", metavar="CONFIG", help="launches by call site for configurations containing this")
    parser.add_argument("--model", action="store_true", help="GPT-2 small's whole parameter set (Hybrid)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be ≥ 1, got {args.layers}")
    matrices = 4 * args.layers
    configs: list[tuple[str, Any]] = list(MODEL_CONFIGS if args.model else CONFIGS)
    what = "GPT-2 small's whole parameter set" if args.model else "GPT-2 small's 4 matrix shapes"
    print(f"One step, {args.layers} layers of {what} ({matrices} matrices), accelerator code path (meta)")
    header = f"{'configuration':60} {'launches':>9} {'products':>9} {'host reads':>11} {'per extra matrix':>17}"
    header += f" {'× row 0':>8} {'other GB':>9} {'≥ ms':>6}"
    print(header)
    print("-" * (len(header) + 9))
    base: int | None = None
    for name, make in configs:
        counts = count_step(make, args.layers, model=args.model)
        double = count_step(make, 2 * args.layers, model=args.model)
        base = counts.launches if base is None else base
        growth = (double.launches - counts.launches) / matrices
        gb = counts.other_bytes / 1e9
        print(
            f"{name:60} {counts.launches:9d} {counts.products:9d} {counts.host_reads:11d} {growth:17.2f}"
            f" {counts.launches / base:8.2f} {gb:9.2f} {gb / COPY_RATE_TB_S:6.2f}"
        )
    if args.where:
        for name, make in configs:
            if args.where in name:
                print(f"\n{name}: launches and host reads by call site")
                counts = count_step(make, args.layers, sites=True, model=args.model)
                print(f"{'count':>6}  {'MB moved':>9}  {'op':28} call site")
                for (op, where), n in counts.sites.most_common():
                    print(f"{n:6d}  {counts.site_bytes[(op, where)] / 1e6:9.0f}  {op:28} {where}")


if __name__ == "__main__":
    main()
