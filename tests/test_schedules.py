"""Schedules as data: every shipped list validated, refusals and fixes explained, iteration modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import orthoptim
from orthoptim.polar import Schedule, as_schedule, get_schedule, list_schedules, validate_schedule
from orthoptim.polar.schedules import ROUNDING_UPPER, STEP_ROUNDING_BY_PRECISION, raw_coefficients

EXPECTED = {
    "orthoptim",
    "jordan",
    "you",
    "polar_express",
    "polar_express_5",
    "cans",
    "aol",
    "deepseekv4",
    "cubic5",
    "newton_schulz",
    "pade5",
}


def test_shipped_names_and_aliases() -> None:
    assert set(list_schedules()) == EXPECTED
    assert get_schedule("quintic") is get_schedule("you")
    assert get_schedule("simple") is get_schedule("jordan")
    assert orthoptim.list_schedules() == list_schedules()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_schedule_validates(name: str) -> None:
    sched = get_schedule(name)
    assert sched.source, "every schedule names its source"
    fp32 = validate_schedule(name, step_rounding=STEP_ROUNDING_BY_PRECISION["float32"])
    assert fp32.ok, fp32.describe()
    assert fp32.upper == ROUNDING_UPPER and fp32.lower == sched.lower
    # Independent check of the report on a grid of our own (plain numpy polynomial evaluation).
    x = np.geomspace(sched.lower, ROUNDING_UPPER, 4001) / sched.margin
    y = x.copy()
    for a, b, c in sched.steps_coefficients():
        y = np.polyval([c, 0, b, 0, a, 0], y)
    assert fp32.min_gain <= y.min() + 1e-9 and fp32.max_gain >= y.max() - 1e-9
    assert y.min() > 0
    # bfloat16: every shipped schedule but cans survives the rounding model.
    assert validate_schedule(name).ok == (name != "cans"), validate_schedule(name).describe()


def test_cans_is_refused_in_low_precision_with_a_clear_error() -> None:
    """CANS's first step maps σ ≈ 0.82 to 0.008 from terms ~20: bf16 rounding flips those directions."""
    a, b, c = get_schedule("cans").coefficients[0]
    x = np.linspace(0.5, 1.0, 5001)
    p1 = a * x + b * x**3 + c * x**5
    assert p1.min() < 0.02 and (abs(b) * x**3 + abs(c) * x**5)[p1.argmin()] > 15  # the cancellation
    G = torch.randn(6, 10)
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match=rf"'cans' at 5 steps is refused in {dtype}.*float32"):
            orthoptim.orthogonalize(G, schedule="cans", compute_dtype=dtype)
    assert torch.isfinite(orthoptim.orthogonalize(G, schedule="cans", compute_dtype="float32")).all()
    trusted = Schedule("cans_anyway", get_schedule("cans").coefficients, trusted=True)
    assert orthoptim.orthogonalize(G, schedule=trusted, compute_dtype="bfloat16").shape == G.shape


def test_exact_arithmetic_anchors_from_references() -> None:
    """Worst cases over σ ∈ [1e-3, 1] quoted in REFERENCES.md (float64, no margin)."""
    anchors = {"jordan": (0.47, 1.20), "you": (0.48, 1.15), "cans_published": (0.88, 1.12)}
    for name, (lo, hi) in anchors.items():
        spec = list(raw_coefficients(name)) if name == "cans_published" else name
        r = validate_schedule(spec, upper=1.0, margin=1.0, step_rounding=0.0)
        assert abs(r.min_gain - lo) < 0.01 and abs(r.max_gain - hi) < 0.01, (name, r.describe())
    r5 = validate_schedule("polar_express", upper=1.0, margin=1.0, step_rounding=0.0)
    assert 0.84 < r5.min_gain < 0.86 and 1.11 < r5.max_gain < 1.13
    r6 = validate_schedule("polar_express", steps=6, upper=1.0, margin=1.0, step_rounding=0.0)
    assert r6.min_gain > 0.99 and r6.max_gain < 1.002


def test_polar_express_safety_factor_matches_published_rounded_list() -> None:
    """Our 1.01-safety list, rounded to 4 digits, equals NVIDIA Emerging-Optimizers' (muon_utils.py)."""
    published = [
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ]
    ours = get_schedule("polar_express").coefficients
    assert len(ours) == 8
    for mine, theirs in zip(ours, published, strict=True):
        assert np.allclose(mine, theirs, atol=6e-5), (mine, theirs)


def test_refused_aol_list_flips_sign_and_is_refused() -> None:
    report = validate_schedule(list(raw_coefficients("aol_emerging")), upper=1.0)
    assert not report.positive
    assert 0.85 < report.argmin <= 1.0  # the sign flip lives near σmax
    with pytest.raises(ValueError, match=r"refused.*negative"):
        get_schedule("aol_emerging")


def test_fixed_lists_fail_as_published_and_pass_as_shipped() -> None:
    """cubic5 as published flips sign within bf16 rounding of σ = 1 (fix: input margin 1.01); cans as published
    blows up once rounding between steps pushes σ above a step's design interval (fix: safety 1.01 per step)."""
    cubic = validate_schedule(list(raw_coefficients("cubic5_published")))
    assert not cubic.positive and cubic.min_gain < 0, cubic.describe()
    assert get_schedule("cubic5").margin == 1.01 and validate_schedule("cubic5").ok  # bf16 model included
    cans = validate_schedule(list(raw_coefficients("cans_published")), upper=1.0, step_rounding=0.0)
    assert cans.ok  # fine in exact arithmetic on [1e-3, 1] ...
    cans = validate_schedule(list(raw_coefficients("cans_published")), upper=1.0)
    assert not cans.bounded and cans.perturbed_max > 1e6, cans.describe()  # ... not under rounding
    shipped = validate_schedule("cans", step_rounding=STEP_ROUNDING_BY_PRECISION["float32"])
    assert shipped.ok, shipped.describe()
    assert get_schedule("cans").coefficients[0] == pytest.approx((8.4703 / 1.01, -25.1081 / 1.01**3, 18.6293 / 1.01**5))
    raw_pe = validate_schedule(list(raw_coefficients("polar_express_raw")), upper=1.01, margin=1.0)
    assert not raw_pe.bounded  # why Polar Express ships with a safety factor


def test_iteration_modes() -> None:
    pe = get_schedule("polar_express")
    c = pe.steps_coefficients(10)
    assert c[:8] == pe.coefficients and c[8] == c[9] == pe.coefficients[-1]
    you = get_schedule("you")
    c = you.steps_coefficients(7)
    assert c[5] == you.coefficients[0] and c[6] == you.coefficients[1]
    assert get_schedule("deepseekv4").steps_coefficients() == ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
    assert get_schedule("cubic5").matmuls() == 10 and get_schedule("jordan").matmuls() == 15


def test_custom_lists() -> None:
    triple = (3.4445, -4.7750, 2.0315)
    s = as_schedule(triple)
    assert s.coefficients == (triple,) and s.name == "custom"
    assert as_schedule([triple, triple]).coefficients == (triple, triple)
    with pytest.raises(ValueError, match="custom schedule rejected"):
        as_schedule(list(raw_coefficients("aol_emerging")))
    with pytest.raises(TypeError):
        as_schedule(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="triple"):
        as_schedule([(1.0, 2.0)])  # type: ignore[list-item]
    # A Schedule object is the escape hatch: taken as given.
    own = Schedule("mine", ((1.5, -0.5, 0.0),), margin=1.0, default_steps=3)
    assert as_schedule(own) is own


def test_schedule_dataclass_validates_fields() -> None:
    with pytest.raises(ValueError, match="empty"):
        Schedule("x", ())
    with pytest.raises(ValueError, match="mode"):
        Schedule("x", ((1.0, 0.0, 0.0),), mode="loop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        Schedule("x", ((1.0, 0.0, 0.0),), margin=0.5)
    with pytest.raises(ValueError, match="finite"):
        Schedule("x", ((float("nan"), 0.0, 0.0),))


def test_orthoptim_schedule_is_the_designers_output_and_meets_its_bounds() -> None:
    from orthoptim.polar import design_schedule

    shipped = get_schedule("orthoptim")
    designed = design_schedule(8, 1e-3, safety=0.01, cushion=0.015)
    assert np.allclose(np.array(shipped.coefficients), np.array(designed.coefficients), rtol=1e-12, atol=0)
    assert shipped.margin == designed.margin == 1.01
    five, six = validate_schedule("orthoptim"), validate_schedule("orthoptim", steps=6)
    assert five.ok and 0.859 < five.min_gain and five.max_gain < 1.129, five.describe()
    assert six.ok and 0.996 < six.min_gain and six.max_gain < 1.0016, six.describe()


JORDAN_TRIPLE = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon muon.py, torch.optim._muon DEFAULT_A/B/C


def test_a_single_custom_triple_runs_five_steps_like_torch() -> None:
    """One triple is applied every step for torch.optim.Muon's 5 steps (torch/optim/_muon.py), whether bare or
    in a one-element list; a longer list runs once through."""
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    named = orthoptim.orthogonalize(G, schedule="jordan", compute_dtype="float32")
    for spec in (JORDAN_TRIPLE, [JORDAN_TRIPLE], np.array(JORDAN_TRIPLE), torch.tensor(JORDAN_TRIPLE)):
        assert as_schedule(spec).default_steps == 5  # type: ignore[arg-type]
        assert torch.equal(orthoptim.orthogonalize(G, schedule=spec, compute_dtype="float32"), named)  # type: ignore[arg-type]
    assert as_schedule([JORDAN_TRIPLE, JORDAN_TRIPLE]).default_steps == 2
    p, q = torch.nn.Parameter(G.clone()), torch.nn.Parameter(G.clone())
    a = orthoptim.Muon([p], lr=0.1, schedule=JORDAN_TRIPLE, normalization="frobenius", compute_dtype="float32")
    b = orthoptim.Muon([q], lr=0.1, ns_coefficients=JORDAN_TRIPLE, compute_dtype="float32")
    p.grad, q.grad = G.clone(), G.clone()
    a.step()
    b.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize(("steps", "lower"), [(9, 1e-3), (10, 1e-3), (40, 1e-3), (6, 0.1)])
def test_design_past_convergence_ends_in_the_classical_quintic(steps: int, lower: float) -> None:
    """Once the interval has shrunk to σ = 1, the optimal step is the degree-5 Newton–Schulz polynomial
    (15x − 10x³ + 3x⁵)/8, flat to second order at 1; rounding used to push p(l) one ulp past 1 and crash."""
    sched = orthoptim.design_schedule(steps, lower)
    assert sched.coefficients[-1] == pytest.approx((15 / 8, -10 / 8, 3 / 8), abs=1e-9)
    assert validate_schedule(orthoptim.design_schedule(steps, lower, safety=0.02, cushion=0.02)).ok


def test_schedule_objects_take_any_sequence_and_refuse_non_numbers() -> None:
    G = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    as_tuples = Schedule("mine", (JORDAN_TRIPLE,), default_steps=5)
    want = orthoptim.orthogonalize(G, schedule=as_tuples, compute_dtype="float32")
    for coefficients in ([list(JORDAN_TRIPLE)], np.array([JORDAN_TRIPLE])):
        sched = Schedule("mine", coefficients, default_steps=5)  # type: ignore[arg-type]
        assert sched == as_tuples and hash(sched) == hash(as_tuples)
        assert torch.equal(orthoptim.orthogonalize(G, schedule=sched, compute_dtype="float32"), want)
    bad: list[dict[str, object]] = [
        {"coefficients": (("3.4", -4.7, 2.0),)},
        {"coefficients": (JORDAN_TRIPLE,), "trusted": "no"},
        {"coefficients": (JORDAN_TRIPLE,), "name": 3},
    ]
    for kw in bad:
        with pytest.raises(TypeError):
            Schedule(**{"name": "x", **kw})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_steps"):
        Schedule("x", (JORDAN_TRIPLE,), default_steps=True)
    with pytest.raises(ValueError, match="degree"):
        orthoptim.design_schedule(5, degree=5.0)  # type: ignore[arg-type]


def test_a_step_count_no_precision_can_save_says_so() -> None:
    with pytest.raises(ValueError, match=r"refused in every compute dtype: even in exact arithmetic.*'jordan'"):
        orthoptim.Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_steps=4)


def test_a_schedule_refused_at_its_own_step_count_is_told_about_its_margin() -> None:
    """The published cubic5 list without orthoptim's 1.01 margin flips sign just above σ = 1 (where normalization
    can put the top singular value): the error names that point, unrounded, and the margin — not the step count,
    which is already the list's own."""
    coefficients = get_schedule("cubic5").coefficients
    bare = Schedule("bare_cubic5", coefficients, "cycle", 1.0, len(coefficients))
    with pytest.raises(ValueError, match=r"\(at σ=1\.00\d+\).*larger margin") as err:
        orthoptim.orthogonalize(torch.randn(8, 8), schedule=bare)
    assert "run that many" not in str(err.value)
    orthoptim.orthogonalize(torch.randn(8, 8), schedule=Schedule("m", coefficients, "cycle", 1.01, len(coefficients)))


@pytest.mark.parametrize(
    "kw", [{"points": 0}, {"points": 1}, {"upper": float("inf")}, {"lower": 1.002}, {"bound": float("nan")}]
)
def test_validate_schedule_refuses_meaningless_arguments(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        validate_schedule("jordan", **kw)  # type: ignore[arg-type]
