"""The accelerator step path launches no kernel per parameter and reads nothing back to the host.

Counted on the ``meta`` device (shapes only), where the step takes the same path as on CUDA: every aten operation
it dispatches is recorded. Two properties, each a reason the GPU step would be slow if broken:

- the number of launches does not grow with the number of matrices of a shape (no per-parameter kernels: with 48
  matrices a per-parameter op is 48 launches, each several microseconds of host time);
- no host reads (``_local_scalar_dense``: a GPU sync) unless the documented skip warning asks for its one read.

``benchmarks/step_launches.py`` prints the counts for GPT-2 small. As there, ``_foreach_add_(tensors, 0-d tensor)``
is counted as one launch rather than run: the meta device decomposes it into a host read, CUDA has a kernel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import orthoptim

SHAPES = ((48, 144), (48, 48), (192, 48), (48, 192))  # GPT-2 small's per-layer shapes, 16× smaller
NO_LAUNCH = frozenset(
    "view _unsafe_view view_as reshape permute transpose t expand unsqueeze squeeze select slice narrow as_strided"
    " alias detach split split_with_sizes unbind diagonal empty empty_strided empty_like"
    " _record_function_enter_new _record_function_exit".split()
)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "_local_scalar_dense":
            return True  # a host read; on meta there is no value: answer "finite"
        return func(*args, **(kwargs or {}))


def _count_step(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], layers: int, mp: Any) -> Counter[str]:
    params = [nn.Parameter(torch.empty(s, device="meta")) for _ in range(layers) for s in SHAPES]
    params += [nn.Parameter(torch.empty(48, device="meta")) for _ in range(layers)]  # biases (Hybrid's AdamW)
    for p in params:
        p.grad = torch.empty_like(p)
    opt = make(params)
    counter = _Count()
    real_add_ = torch._foreach_add_

    def foreach_add_(tensors: Any, other: Any, **kw: Any) -> None:
        if isinstance(other, torch.Tensor) and other.dim() == 0 and other.is_meta:
            counter.ops["_foreach_add_"] += 1  # one kernel on CUDA, no host read
            return
        real_add_(tensors, other, **kw)

    mp.setattr(torch, "_foreach_add_", foreach_add_)
    with counter:
        opt.step()  # state initialized
        opt.step()
        counter.ops.clear()
        opt.step()
    return counter.ops


def _split(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    return [p for p in params if p.dim() == 2], [p for p in params if p.dim() < 2]


MAKERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "muon": lambda ps: orthoptim.Muon(_split(ps)[0], lr=0.02, weight_decay=0.01, warn_nonfinite=False),
    "muon-propagate": lambda ps: orthoptim.Muon(_split(ps)[0], lr=0.02, nonfinite="propagate"),
    "muon-plain-fp32": lambda ps: orthoptim.Muon(
        _split(ps)[0], lr=0.02, nesterov=False, compute_dtype="float32", warn_nonfinite=False
    ),
    "normuon": lambda ps: orthoptim.NorMuon(_split(ps)[0], lr=0.02, warn_nonfinite=False),
    "polargrad": lambda ps: orthoptim.PolarGrad(_split(ps)[0], lr=0.02, warn_nonfinite=False),
    "hybrid": lambda ps: orthoptim.Hybrid(_split(ps), lr=0.02, adamw_weight_decay=0.01, warn_nonfinite=False),
    "hybrid-propagate": lambda ps: orthoptim.Hybrid(_split(ps), lr=0.02, nonfinite="propagate"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_device_step_launches_do_not_grow_with_the_number_of_parameters(name: str, monkeypatch: Any) -> None:
    make = MAKERS[name]
    small, large = _count_step(make, 2, monkeypatch), _count_step(make, 5, monkeypatch)

    def launches(ops: Counter[str]) -> dict[str, int]:
        return {op: n for op, n in ops.items() if op not in NO_LAUNCH}

    assert launches(small) == launches(large), {
        op: (small[op], large[op]) for op in set(small) | set(large) if small[op] != large[op]
    }
    assert small["_local_scalar_dense"] == 0, "the device step reads a value back to the host (a GPU sync)"
    assert sum(launches(small).values()) > 0  # the counter saw the step at all


def test_the_skip_warning_is_the_one_host_read(monkeypatch: Any) -> None:
    """With the default ``warn_nonfinite=True`` the skip policy reads its flag once per step (documented)."""
    ops = _count_step(lambda ps: orthoptim.Muon(_split(ps)[0], lr=0.02), 3, monkeypatch)
    assert ops["_local_scalar_dense"] == 1


@pytest.mark.parametrize("name", ["muon", "normuon", "polargrad", "hybrid"])
def test_a_tensor_lr_on_the_device_is_never_read_back(name: str, monkeypatch: Any) -> None:
    """A tensor learning rate on the parameters' device (as a captured CUDA graph needs it: schedulers ``fill_`` it
    in place) is used on the device — the update factor (PolarGrad: the ⟨O, M⟩ factor), the weight decay — with no
    host read. (Hybrid's AdamW groups keep a float lr here: torch's fused AdamW with a tensor lr has no meta
    kernel; on CUDA it takes the tensor itself.)"""
    make = MAKERS[name]

    def with_tensor_lr(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = make(ps)
        for group in opt.param_groups:
            if group.get("algorithm") != "adamw":
                group["lr"] = torch.tensor(group["lr"], device="meta")
                group["weight_decay"] = 0.01
        return opt

    ops = _count_step(with_tensor_lr, 2, monkeypatch)
    assert ops["_local_scalar_dense"] == 0
    if name != "polargrad":
        assert ops["addcmul_"] > 0  # the update was added with the tensor factor
