"""The ``triton`` backend's fused elementwise kernels (optim/backends/triton.py, triton_kernels.py) under Triton's
interpreter.

References: torch's own ops for what torch computes exactly as a GPU does (``lerp``, float32 adds, the float32
decay factor), and a float64 emulation of one fused multiply-add where torch's CPU kernels differ from its CUDA
ones (a 16-bit parameter's add rounds ``alpha`` to 16 bits on the CPU only). The whole optimizer step with the
kernels against the same step without them: every parameter and state tensor bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import orthoptim
from orthoptim.optim.backends import torch as torch_backend
from orthoptim.optim.backends import triton as fused

from .conftest import require_interpreted_fused_kernels

pytestmark = pytest.mark.slow  # Triton's interpreter; `make test-fast` leaves it out

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def interpreted() -> Iterator[None]:
    require_interpreted_fused_kernels()
    with np.errstate(all="ignore"):  # the interpreter's numpy warns on Inf − Inf; a GPU computes NaN silently
        yield


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def megabatch(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], tuple[int, ...]]:
    """(θ, B, G, counts) of parameters with the same matrix shape (the last two dims)."""
    params = [randn(*s, dtype=dtype, seed=seed + i) for i, s in enumerate(shapes)]
    bufs = [randn(*s, dtype=dtype, seed=seed + 100 + i) for i, s in enumerate(shapes)]
    grads = [randn(*s, dtype=dtype, seed=seed + 200 + i) for i, s in enumerate(shapes)]
    counts = tuple(p.numel() // (s[-1] * s[-2]) for p, s in zip(params, shapes, strict=True))
    return params, bufs, grads, counts


def table_of(
    params: list[torch.Tensor], bufs: list[torch.Tensor], grads: list[torch.Tensor], counts: tuple[int, ...]
) -> fused.Table:
    """The megabatch's address table; the kernels must apply to it."""
    m, n = params[0].shape[-2:]
    table = fused.table(fused.PointerTables(), params, bufs, grads, counts, m * n)
    assert table is not None
    return table


def stacked(tensors: list[torch.Tensor], m: int, n: int) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).view(-1, m, n)


def fma_reference(p: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """``round(p + alpha·u)`` with ``alpha`` in float32 and one rounding into float32 (a fused multiply-add), then
    into ``p``'s dtype, evaluated in float64: exact here (a 16-bit ``u`` times a float32 ``alpha`` has ≤ 32
    significant bits, and the sum's exponents are close)."""
    a = torch.tensor(alpha, dtype=torch.float32).double()
    return (p.double() + u.double() * a).to(torch.float32).to(p.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("mu", [0.95, 0.3])
def test_momentum_input_is_torch_lerp_bit_for_bit(dtype: torch.dtype, nesterov: bool, mu: float) -> None:
    """M = lerp(G, lerp(B, G, 1−μ), μ) (or the new momentum), each lerp rounded to the state's dtype: against
    ``backends.torch._momentum_per_param`` (torch.lerp per parameter); 3-D parameters, ragged tiles; buffers
    untouched."""
    shapes = [(2, 37, 70), (37, 70), (3, 37, 70)]
    params, bufs, grads, counts = megabatch(shapes, dtype)
    before = [b.clone() for b in bufs]
    out = torch.empty(sum(counts), 37, 70, dtype=dtype)
    assert fused.momentum_input(table_of(params, bufs, grads, counts), mu, nesterov, out)
    want = torch_backend._momentum_per_param(bufs, grads, mu, nesterov, torch.empty_like(out))
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(bufs, before, strict=True))


def test_bfloat16_rounding_is_to_nearest_even() -> None:
    """The kernels round float32 → bfloat16 themselves (the interpreter's cast truncates): ties to even both ways,
    values just above and below a tie, negative values, against torch.lerp in bfloat16."""
    one = 1.0
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    starts = [one, one + ulp, -(one + ulp), one, 3.0, -3.0]
    ends = [one + ulp, one + 2 * ulp, -(one + 2 * ulp), one + 3 * ulp, 3.0 + 4 * ulp, -3.0 - 4 * ulp]
    b = torch.tensor(starts, dtype=torch.bfloat16).view(1, -1).repeat(4, 1).contiguous()
    g = torch.tensor(ends, dtype=torch.bfloat16).view(1, -1).repeat(4, 1).contiguous()
    for mu in (0.5, 0.25, 0.75, 0.6):  # weight 1 − μ: ties at 0.5, quarter steps, inexact
        out = torch.empty(1, *b.shape, dtype=torch.bfloat16)
        assert fused.momentum_input(table_of([b.clone()], [b], [g], (1,)), mu, False, out)
        assert torch.equal(out[0], torch.lerp(b, g, 1.0 - mu)), mu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tall", [False, True])
def test_commit_matches_torch_ops(dtype: torch.dtype, tall: bool) -> None:
    """B ← lerp(B, G, 1−μ), θ ← round(θ·decay) + α·U against torch's lerp, its mul by the float32 decay factor,
    and one fused multiply-add with α in float32 (torch's CUDA add; its CPU add rounds α to 16 bits first). The
    update in the compute dtype (bfloat16) and, for tall matrices, a transposed view as the iteration returns it."""
    m, n = (70, 37) if tall else (37, 70)
    shapes = [(2, m, n), (m, n)]
    params, bufs, grads, counts = megabatch(shapes, dtype, seed=1)
    U = randn(3, n, m, dtype=torch.bfloat16, seed=9).mT if tall else randn(3, m, n, dtype=torch.bfloat16, seed=9)
    decay = torch.tensor(1.0 - 0.05 * 0.2, dtype=torch.float32)
    alpha = -0.05 * 1.37
    want_b = [torch.lerp(b, g, 1.0 - 0.9) for b, g in zip(bufs, grads, strict=True)]
    decayed = [p * decay if dtype == torch.float32 else (p.float() * decay).to(dtype) for p in params]
    parts = [u.reshape(p.shape) for u, p in zip(U.split(counts), params, strict=True)]
    want_p = [fma_reference(d, u, alpha) for d, u in zip(decayed, parts, strict=True)]
    assert fused.commit(table_of(params, bufs, grads, counts), 0.9, U, alpha, decay, None)
    assert all(torch.equal(a, b) for a, b in zip(bufs, want_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params, want_p, strict=True))


@pytest.mark.parametrize("update_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tall", [False, True])
def test_commit_applies_a_deferred_factor_as_torchs_in_place_mul(update_dtype: torch.dtype, tall: bool) -> None:
    """NorMuon's row factor and PolarGrad's per-matrix one, deferred to the commit: U·factor in float32 rounded
    to U's dtype (torch's ``U.mul_(factor)``), then the update's fused multiply-add — the same bits as the two
    torch steps."""
    m, n = (70, 37) if tall else (37, 70)
    params, bufs, grads, counts = megabatch([(2, m, n), (m, n)], torch.float32, seed=6)
    U = randn(3, n, m, dtype=update_dtype, seed=7).mT if tall else randn(3, m, n, dtype=update_dtype, seed=7)
    factor = randn(3, m, 1, seed=8).abs() * 3.0 + 0.1
    scaled = U.clone().mul_(factor)
    parts = [u.reshape(p.shape) for u, p in zip(scaled.split(counts), params, strict=True)]
    want_p = [fma_reference(p, u, -0.01) for p, u in zip(params, parts, strict=True)]
    twin = [p.clone() for p in params]
    assert fused.commit(table_of(params, bufs, grads, counts), 0.9, U, -0.01, None, None, factor)
    assert all(torch.equal(a, b) for a, b in zip(params, want_p, strict=True))
    assert not fused.commit(table_of(params, bufs, grads, counts), 0.9, U, -0.01, None, None, factor[0])
    # PolarGrad's: one factor per matrix, in the update's dtype (−lr·⟨O, M⟩ rounded), broadcast over the rows
    per_matrix = (randn(3, 1, 1, seed=9) * 40.0).to(update_dtype)
    scaled = U.clone().mul_(per_matrix)
    parts = [u.reshape(p.shape) for u, p in zip(scaled.split(counts), twin, strict=True)]
    want_p = [fma_reference(p, u, 1.0) for p, u in zip(twin, parts, strict=True)]
    assert fused.commit(table_of(twin, bufs, grads, counts), 0.9, U, 1.0, None, None, per_matrix)
    assert all(torch.equal(a, b) for a, b in zip(twin, want_p, strict=True))


def test_commit_rounds_overflow_to_inf_and_a_tensor_alpha_gives_the_float_bits() -> None:
    """A sum beyond bfloat16's range rounds to ±inf (as torch's conversion does); α read from a 0-d tensor on
    the device gives the same bits as the number; no weight decay (decay None) leaves θ's factor out."""
    big = torch.finfo(torch.bfloat16).max
    params, bufs, grads, counts = megabatch([(8, 40)], torch.bfloat16, seed=2)
    params[0][0, :4] = torch.tensor([big, -big, big, 1.0], dtype=torch.bfloat16)
    U = randn(1, 8, 40, dtype=torch.bfloat16, seed=3)
    U[0, 0, :4] = torch.tensor([big, -big, -big, 2.0], dtype=torch.bfloat16)
    twin = [t.clone() for t in (*params, *bufs)]
    want = fma_reference(params[0], U[0], 0.75)
    assert fused.commit(table_of(params, bufs, grads, counts), 0.9, U, 0.75, None, None)
    assert torch.equal(params[0], want) and params[0][0, 0] == float("inf") and params[0][0, 1] == -float("inf")
    assert bool(torch.isfinite(params[0][0, 2]))  # big − 0.75·big: finite
    alpha = torch.tensor(0.75, dtype=torch.float64)  # a float64 lr tensor: read and used in float32
    assert fused.commit(table_of([twin[0]], [twin[1]], grads, counts), 0.9, U, alpha, None, None)
    assert torch.equal(twin[0], params[0]) and torch.equal(twin[1], bufs[0])


@pytest.mark.parametrize("ok", [True, False])
def test_commit_writes_nothing_where_the_flag_is_false(ok: bool) -> None:
    """A skipped step (device flag false) leaves θ and B bit for bit, even with NaN in the update and ±Inf in
    the gradients; a kept one commits."""
    params, bufs, grads, counts = megabatch([(2, 30, 50)], torch.float32, seed=4)
    grads[0][0, 0, 0], grads[0][1, 2, 3] = float("inf"), -float("inf")
    U = randn(2, 30, 50, seed=5)
    U[1, 4, 4] = float("nan")
    before = [params[0].clone(), bufs[0].clone()]
    flag = torch.tensor(ok)
    decay = torch.tensor(0.99, dtype=torch.float32)
    assert fused.commit(table_of(params, bufs, grads, counts), 0.95, U, -0.1, decay, flag)
    unchanged = torch.equal(params[0], before[0]) and torch.equal(bufs[0], before[1])
    assert unchanged is not ok


def test_what_the_kernels_do_not_take_goes_to_torch() -> None:
    """float64 state, empty matrices, a non-contiguous parameter, mixed dtypes,
    ORTHOPTIM_TRITON=0 and a float64 decay factor are refused (False, nothing written): the caller takes torch's
    ops."""
    tables = fused.PointerTables()
    p64, b64, g64, c = megabatch([(20, 30)], torch.float64)
    assert fused.table(tables, p64, b64, g64, c, 600) is None
    empty = [torch.empty(0, 4)]  # no programs to launch (the optimizers refuse empty parameters before this)
    assert fused.table(tables, empty, empty, empty, (1,), 0) is None
    p, b, g, c = megabatch([(30, 20)], torch.float32)
    pt = [p[0].mT]  # (20, 30), not contiguous
    assert fused.table(tables, pt, [b[0].mT], [g[0].mT], c, 600) is None
    assert fused.table(tables, p, b, [g[0].bfloat16()], c, 600) is None
    decay64 = torch.tensor(1.0, dtype=torch.float64)
    assert not fused.commit(table_of(p, b, g, c), 0.9, randn(1, 30, 20), 0.1, decay64, None)
    assert not fused.commit(table_of(p, b, g, c), 0.9, randn(2, 30, 20), 0.1, None, None)  # not its matrices
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORTHOPTIM_TRITON", "0")
        assert fused.table(tables, p, b, g, c, 600) is None
    assert torch.equal(p[0], megabatch([(30, 20)], torch.float32)[0][0])  # nothing written by the refusals


def test_address_tables_follow_moved_tensors() -> None:
    """A table is reused while the tensors stay put and rebuilt when one moves (a gradient reallocated); with
    too many stale tables the cache starts over."""
    tables = fused.PointerTables(limit=2)
    p, b, g, c = megabatch([(2, 4, 5), (4, 5)], torch.float32)
    first = tables.get(p, b, g, c)
    assert tables.get(p, b, g, c) is first
    want = [[t.data_ptr() + q * 20 * 4 for t, k in zip(role, c, strict=True) for q in range(k)] for role in (p, b, g)]
    assert first.addresses.tolist() == want
    assert first.aligned  # fresh tensors, 20 × 4 bytes per matrix: every address a multiple of 16
    g2 = [x.clone() for x in g]
    moved = tables.get(p, b, g2, c)
    assert moved is not first
    assert moved.addresses[2].tolist() == [x.data_ptr() + q * 80 for x, k in zip(g2, c, strict=True) for q in range(k)]
    tables.get(p, g, b, c)  # a third set: over the limit, the cache starts over
    assert tables.get(p, b, g, c) is not first
    flat = torch.zeros(1 + 2 * 20 + 20)  # a parameter 4 bytes into a flat buffer: no vectorized loads
    views = [flat[1:41].view(2, 4, 5), flat[41:61].view(4, 5)]
    assert not fused.PointerTables().get(views, b, g, c).aligned


SHAPES = [(32, 48), (64, 16), (3, 16, 40), (2, 16, 40), (8, 2, 2, 3), (40, 40)]  # wide, tall, 3-D, conv, square
OPTIMIZERS = ("Muon", "NorMuon", "PolarGrad")
#: (parameter dtype, compute dtype): the compute dtype is explicit, not the CPU's default (bfloat16 only with native
#: bfloat16 products), so every CPU runs the same cases: 16-bit parameters with an update of their own width, of
#: the other 16-bit dtype, and of float32 (wider than the parameter: summed in float32, rounded once).
DTYPE_PAIRS = [
    (torch.float32, "float32"),
    (torch.bfloat16, "bfloat16"),
    (torch.bfloat16, "float32"),
    (torch.float16, "bfloat16"),
    (torch.float16, "float32"),
]
CASES = [  # every dtype pair with the selecting commit (no host read), the other policies in float32
    *((cls, dtype, compute, "selects") for cls in OPTIMIZERS for dtype, compute in DTYPE_PAIRS),
    *((cls, torch.float32, "float32", policy) for cls in OPTIMIZERS for policy in ("reads flag", "propagate")),
]


@pytest.mark.parametrize(
    ("cls", "dtype", "compute", "policy"), CASES, ids=[f"{c}-{str(d)[6:]}-{x}-{p}" for c, d, x, p in CASES]
)
@pytest.mark.parametrize(("nesterov", "mu"), [(True, 0.95), (False, 0.95), (True, 0.3)])
def test_the_step_with_the_kernels_gives_the_same_bits(
    cls: str,
    dtype: torch.dtype,
    compute: str,
    policy: str,
    nesterov: bool,
    mu: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optimizer's device step with the fused kernels and without (torch's foreach and stacked ops), forced on
    the CPU: every parameter and state tensor bit for bit after four steps — one skipped by a NaN gradient
    (except under "propagate"), gradients reallocated every step (the address tables follow), weight decay on.

    Bit equality holds by construction on every CPU: both runs feed the same orthogonalization (the same torch
    products on the same inputs), and each elementwise operation around it is one IEEE float32 operation (or an
    exact one) rounded once into the stored dtype on both sides — no reduction order, no ISA-dependent rounding.
    lr 2⁻⁴ and √(m/n) ∈ {1, 2} keep α = −lr·√(m/n) exact in 16 bits, where torch's CPU add would round it, and
    make α·U exact, so a fused multiply-add and a multiply then add agree."""
    launches: list[str] = []
    real_launch = fused._launch

    def counted(kernel: object, *args: object, **meta: object) -> None:
        launches.append(str(kernel))
        real_launch(kernel, *args, **meta)

    monkeypatch.setattr(fused, "_launch", counted)

    def train(with_kernels: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
        backend = "triton" if with_kernels else "torch@cuda"
        options: dict[str, object] = {"warn_nonfinite": policy == "reads flag", "compute_dtype": compute}
        if policy == "propagate":
            options = {"nonfinite": "propagate", "compute_dtype": compute}
        options["backend"] = backend
        if cls != "PolarGrad":  # PolarGrad's update carries lr·‖M‖_* itself (α = 1)
            options["scale_mode"] = "original"
        opt = getattr(orthoptim, cls)(ps, lr=2.0**-4, weight_decay=0.2, momentum=mu, nesterov=nesterov, **options)
        for k in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)  # a fresh tensor: new addresses
            if k == 2 and policy != "propagate":
                ps[1].grad.view(-1)[5] = float("nan")  # type: ignore[union-attr]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning ("reads flag")
                opt.step()
        assert opt.nonfinite_skips == (0 if policy == "propagate" else 1)
        states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in ps] + [t.clone() for t in states]

    plain = train(False)
    assert not launches
    kernels = train(True)
    megabatches = 5  # (32, 48), (64, 16), (16, 40) ×2 parameters, (8, 6), (40, 40)
    commits = 3 if policy == "reads flag" else 4  # a skipped step whose flag is read first commits nothing
    assert len(launches) == megabatches * (4 + commits)
    assert all(torch.equal(a, b) for a, b in zip(plain, kernels, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_gradient_reaches_the_checked_update(bad: float) -> None:
    """In one process the matrices' gradients are not checked on their own under "skip": a NaN/±Inf entry must
    pass through the fused momentum input into the update, so the step is skipped with nothing changed — for
    each matrix of the step (a batch of two, a tall one, a ragged one), each optimizer."""
    shapes = [(24, 40), (24, 40), (40, 24), (33, 70)]
    for cls in (orthoptim.Muon, orthoptim.NorMuon, orthoptim.PolarGrad):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = cls(params, lr=0.02, weight_decay=0.1, warn_nonfinite=False, backend="triton")
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        before = [t.clone() for p in params for t in (p.detach(), opt.state[p]["momentum_buffer"])]
        for k in range(len(shapes)):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            params[k].grad.view(-1)[-7] = bad  # type: ignore[union-attr]
            opt.step()
            assert opt.nonfinite_skips == k + 1, (cls.__name__, k)
            after = [t for p in params for t in (p.detach(), opt.state[p]["momentum_buffer"])]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (cls.__name__, k)
