"""Newton–Schulz coefficient schedules as data, and their validation.

A schedule is a list of odd quintic steps ``p(x) = a·x + b·x³ + c·x⁵`` applied to the singular values
of a normalized matrix (``X ← aX + b(XXᵀ)X + c(XXᵀ)²X``), an iteration mode that says what happens past
the end of the list, and an input *margin*: the matrix is divided by ``margin·‖X‖`` before the first
step so that the schedule only ever sees singular values in ``[0, (1 + rounding)/margin]``.

Every shipped schedule is validated (:func:`validate_schedule`) on ``σ ∈ [lower, 1 + 2⁻⁸]``: the upper end
covers the worst case of rounding a normalized matrix to bfloat16 (each entry moves by at most 2⁻⁹ of
itself, so ``σmax`` moves by at most ``2⁻⁹·‖X‖_F = 2⁻⁹``), with a factor of two to spare. It is also checked
with every step's input perturbed by ``1 ± 2⁻⁸`` (rounding between steps), which is what catches lists whose
later polynomials have no headroom above their design intervals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import torch

Triple: TypeAlias = tuple[float, float, float]
IterationMode: TypeAlias = Literal["cycle", "repeat_last"]

#: Upper end of the validated singular-value interval (see the module docstring).
ROUNDING_UPPER = 1.0 + 2.0**-8
#: Default lower end: the interval Polar Express and CANS were designed for (arXiv 2505.16932).
DEFAULT_LOWER = 1e-3
#: Largest gain a schedule may produce anywhere on its interval before we call it unbounded.
DEFAULT_BOUND = 1.5
#: Unit of the per-step rounding model used by validation: twice the bfloat16 unit roundoff 2⁻⁹.
STEP_ROUNDING = 2.0**-8
#: The same for each compute precision (twice its unit roundoff), by torch dtype name.
STEP_ROUNDING_BY_PRECISION: dict[str, float] = {
    "bfloat16": 2.0**-8,
    "float16": 2.0**-10,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}


@dataclass(frozen=True)
class Schedule:
    """A named Newton–Schulz coefficient schedule.

    Attributes:
        name: registry name (``"custom"`` for user lists).
        coefficients: the ``(a, b, c)`` triples, one per step.
        mode: ``"cycle"`` restarts the list after its end, ``"repeat_last"`` keeps applying the last triple.
        margin: the input is divided by ``margin·‖X‖`` (≥ 1) so that rounding cannot push σ past what the
            polynomials tolerate.
        default_steps: steps used when the caller gives none.
        lower: lower end of the interval the schedule was designed for and is validated on.
        source: where the numbers come from.
        note: what orthoptim changed relative to the source, and why.
        trusted: skip the per-compute-dtype safety check in ``orthogonalize`` (you own the risk).
    """

    name: str
    coefficients: tuple[Triple, ...]
    mode: IterationMode = "cycle"
    margin: float = 1.0
    default_steps: int = 5
    lower: float = DEFAULT_LOWER
    source: str = ""
    note: str = field(default="", compare=False)
    trusted: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Schedule name must be a str, got {self.name!r}")
        # Stored as a tuple of float triples whatever sequence was given (lists, numpy arrays): the schedule is
        # hashed by the validation cache and compared by value.
        try:
            triples = tuple(tuple(_number(v) for v in t) for t in self.coefficients)
        except (TypeError, ValueError):
            raise TypeError(
                f"schedule {self.name!r}: coefficients must be a sequence of (a, b, c) triples of numbers, "
                f"got {self.coefficients!r}"
            ) from None
        object.__setattr__(self, "coefficients", triples)
        if not triples:
            raise ValueError(f"schedule {self.name!r}: the coefficient list is empty")
        for i, triple in enumerate(triples):
            if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
                raise ValueError(
                    f"schedule {self.name!r}: step {i} must be three finite numbers (a, b, c), got {triple!r}"
                )
        if not isinstance(self.trusted, bool):
            raise TypeError(f"schedule {self.name!r}: trusted must be a bool, got {self.trusted!r}")
        if self.mode not in ("cycle", "repeat_last"):
            raise ValueError(f"schedule {self.name!r}: mode must be 'cycle' or 'repeat_last', got {self.mode!r}")
        if not (math.isfinite(self.margin) and self.margin >= 1.0):
            raise ValueError(f"schedule {self.name!r}: margin must be a finite number ≥ 1, got {self.margin!r}")
        steps = self.default_steps
        if isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"schedule {self.name!r}: default_steps must be a positive int")
        if not (0.0 < self.lower < 1.0):
            raise ValueError(f"schedule {self.name!r}: lower must lie in (0, 1), got {self.lower!r}")

    def steps_coefficients(self, steps: int | None = None) -> tuple[Triple, ...]:
        """The triples actually applied for ``steps`` iterations (the schedule's default if None)."""
        n = self.default_steps if steps is None else steps
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"steps must be a positive int, got {type(steps).__name__} {steps!r}")
        if n < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        k = len(self.coefficients)
        if self.mode == "cycle":
            return tuple(self.coefficients[i % k] for i in range(n))
        return tuple(self.coefficients[min(i, k - 1)] for i in range(n))

    def matmuls(self, steps: int | None = None) -> int:
        """Matrix products for ``steps`` iterations: 3 per quintic step, 2 per cubic (c = 0) step."""
        return sum(2 if c == 0.0 else 3 for (_, _, c) in self.steps_coefficients(steps))


# A Schedule object passed as ``schedule=`` lives in the param groups, so it is in ``state_dict()``: allowed for
# ``torch.load``'s default ``weights_only=True`` unpickler (torch ≥ 2.6), which refuses unlisted classes. Its
# fields are plain numbers, strings and tuples, so nothing executable comes with it.
torch.serialization.add_safe_globals([Schedule])


def _number(v: Any) -> float:
    """``v`` as a float if it is a real number (Python, numpy or a 0-d tensor), else ``TypeError``: no strings or
    bools, which ``float()`` would take."""
    if isinstance(v, (str, bytes, bool)) or not isinstance(v, (int, float, np.number, torch.Tensor)):
        raise TypeError(f"not a number: {v!r}")
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise TypeError(f"not a number: {v!r}")
    return float(v)


def _with_safety(triples: Sequence[Triple], factor: float) -> tuple[Triple, ...]:
    """Fold a Polar Express safety factor into each triple (arXiv 2505.16932, Alg. 1).

    Dividing (a, b, c) by (f, f³, f⁵) turns the step p(x) into p(x/f): it tolerates inputs up to f times its
    design upper end, at the price of pulling small σ up slightly less.
    """
    return tuple((a / factor, b / factor**3, c / factor**5) for (a, b, c) in triples)


# --- the numbers, each with its source -------------------------------------------------------------

# KellerJordan/Muon muon.py; torch.optim.Muon's default (torch/optim/_muon.py DEFAULT_A/B/C).
_JORDAN: tuple[Triple, ...] = ((3.4445, -4.7750, 2.0315),)

# modded-nanogpt train_gpt_medium.py (2025-02), by @YouJiacheng; optax calls it 'dion',
# NVIDIA Emerging-Optimizers muon_utils.py calls it 'quintic'.
_YOU: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express, arXiv 2505.16932 Algorithm 1 (ℓ = 1e-3, degree 5, 8 iterations; the last triple repeats).
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# modded-nanogpt train_gpt.py: PolarExpress optimal_composition(l=1e-3, num_iters=5,
# safety_factor_eps=0.02, cushion=0.02); input ÷ (1.02‖X‖_F + 1e-6) there.
_POLAR_EXPRESS_5: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# CANS, arXiv 2506.10935, as tabulated in NVIDIA Emerging-Optimizers
# emerging_optimizers/orthogonalized_optimizers/muon_utils.py ("cans").
_CANS: tuple[Triple, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)

# AOL list from thib-s/flash-newton-schulz newton_schulz_triton.py (2025-09 version); stays positive on (0, 1.05].
_AOL: tuple[Triple, ...] = (
    (4.6051, -9.6552, 5.6769),
    (4.7505, -6.0861, 2.1790),
    (2.7763, -2.3190, 0.5523),
    (2.4231, -2.2861, 0.8193),
)

# The later AOL list as copied into NVIDIA Emerging-Optimizers muon_utils.py ("aol"); designed for
# AOL-preconditioned input (arXiv 2512.04632). Its 4-step composite maps σ ∈ (0.884, 1] to negative
# values, so an input with any singular value near σmax gets that direction's sign flipped. Refused.
_AOL_EMERGING: tuple[Triple, ...] = (
    (4.0098, -7.0585, 2.4635),
    (3.4585, -5.5479, 2.5959),
    (2.7573, -3.2939, 1.4254),
    (2.7215, -3.0494, 1.3169),
)

# DeepSeek-V4 report, as encoded in NVIDIA Emerging-Optimizers muon_utils.py ("deepseekv4"):
# 8 Jordan steps to pull σ up fast, then 2 steps of (2, −1.5, 0.5) that converge to 1.
_DEEPSEEKV4: tuple[Triple, ...] = _JORDAN * 8 + ((2.0, -1.5, 0.5),) * 2

# Relaxed cubic schedule, arXiv 2606.00371 (u = 1.3, ℓ₀ = 7e-3): c = 0, two matmuls per step.
_CUBIC5: tuple[Triple, ...] = (
    (3.3656576, -3.3420992, 0.0),
    (2.5744352, -1.4957376, 0.0),
    (2.5368962, -1.4312570, 0.0),
    (2.4418906, -1.2764040, 0.0),
    (2.2230472, -0.9630650, 0.0),
)

# orthoptim's own list: design_schedule(8, 1e-3, safety=0.01, cushion=0.015) (polar/design.py, greedy minimax
# composition as in arXiv 2505.16932). Chosen by measurement (README, "Choosing the default"): the cushion keeps
# the first step's dip near σ ≈ 0.8 away from zero (bfloat16-safe, unlike CANS); the 1% safety gives every step
# headroom for rounding — with 0.5% the stress test found bfloat16 blow-ups under Schatten-4/AOL normalization
# (σ(O) up to 1e4 at 5 steps), with 1% none in 20,400 matrices at 5, 6 and 8 steps.
# 5 steps: [0.860, 1.128] on σ ∈ [1e-3, 1 + 2⁻⁸]; 6 steps: [0.997, 1.002].
_ORTHOPTIM: tuple[Triple, ...] = (
    (8.276707351358956, -23.473800803940783, 16.952498756118825),
    (4.101458807279575, -2.9322848355826885, 0.5338244309400783),
    (3.9340903290647242, -2.8751017591380585, 0.5365369203067876),
    (3.2901017835373843, -2.4186167282256585, 0.4856621149378494),
    (2.2898618760158174, -1.6303460890727641, 0.39959648891953137),
    (1.8755669496457705, -1.2339170986663195, 0.3588328253588218),
    (1.8564416867848468, -1.2132442672768486, 0.35680027812001225),
    (1.875000000020969, -1.250000000023299, 0.37500000000232986),
)

_SHIPPED: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("jordan", _JORDAN, "cycle", 1.0, 5, source="KellerJordan/Muon muon.py; torch.optim.Muon default"),
        Schedule(
            "orthoptim",
            _ORTHOPTIM,
            "repeat_last",
            1.01,
            5,
            source="orthoptim design_schedule(8, 1e-3, safety=0.01, cushion=0.015); method of arXiv 2505.16932",
        ),
        Schedule("you", _YOU, "cycle", 1.0, 5, source="modded-nanogpt train_gpt_medium.py (2025-02)"),
        Schedule(
            "polar_express",
            # Every triple but the last, the classical Padé step (1.875, −1.25, 0.375), which needs none.
            (*_with_safety(_POLAR_EXPRESS_RAW[:-1], 1.01), _POLAR_EXPRESS_RAW[-1]),
            "repeat_last",
            1.01,
            5,
            source="arXiv 2505.16932 Algorithm 1; safety factor 1.01 folded in, input ÷ 1.01‖X‖",
        ),
        Schedule(
            "polar_express_5",
            _POLAR_EXPRESS_5,
            "repeat_last",
            1.02,
            5,
            source="modded-nanogpt train_gpt.py (ℓ=1e-3, safety 0.02, cushion 0.02), input ÷ 1.02‖X‖",
        ),
        Schedule(
            "cans",
            _with_safety(_CANS, 1.01),
            "repeat_last",
            1.0,
            5,
            source="arXiv 2506.10935 via NVIDIA Emerging-Optimizers muon_utils.py; safety 1.01 folded into every step",
            # The published list has no room above its design intervals: σ = 1 + 4e-6 already leaves (0, 1.3],
            # and a 2⁻⁸ rounding between steps drives it to ~1e10 (bfloat16 runs produced σ ~ 1e15 outputs in
            # the stress test). Folding the Polar Express safety factor 1.01 into every step (p(x) → p(x/1.01))
            # gives each step 1% of headroom; the exact-arithmetic worst gain drops from 0.884 to 0.857.
            note="safety factor 1.01 folded into every step by orthoptim: the published list blows up under rounding",
        ),
        Schedule("aol", _AOL, "cycle", 1.0, 4, source="thib-s/flash-newton-schulz newton_schulz_triton.py"),
        Schedule(
            "deepseekv4",
            _DEEPSEEKV4,
            "repeat_last",
            1.0,
            10,
            source="DeepSeek-V4 report via NVIDIA Emerging-Optimizers muon_utils.py",
        ),
        Schedule(
            "cubic5",
            _CUBIC5,
            "cycle",
            1.01,
            5,
            source="arXiv 2606.00371 (relaxed cubic, c = 0)",
            # The composite turns negative for σ > 1.0035: bf16 rounding of a normalized matrix alone can
            # reach σ = 1 + 2⁻⁹. Dividing the input by 1.01‖X‖ keeps σ ≤ 0.994 after rounding.
            note="input margin 1.01 added by orthoptim: the published list flips sign for σ > 1.0035",
        ),
        Schedule("newton_schulz", ((1.5, -0.5, 0.0),), "cycle", 1.0, 12, source="classical cubic Newton–Schulz"),
        Schedule(
            "pade5",
            ((1.875, -1.25, 0.375),),
            "cycle",
            1.0,
            10,
            source="classical quintic (Padé) Newton–Schulz step",
        ),
    )
}

_ALIASES: dict[str, str] = {"quintic": "you", "simple": "jordan", "pe": "polar_express"}

_REFUSED: dict[str, str] = {
    "aol_emerging": (
        "the 4-step 'aol' list copied into NVIDIA Emerging-Optimizers (4.0098, -7.0585, 2.4635), ... maps "
        "singular values above ~0.884 to negative values, flipping the sign of the update along the leading "
        "directions after any normalization that guarantees σ ≤ 1; use schedule='aol' "
        "(thib-s/flash-newton-schulz's list, which stays positive)"
    ),
}

ScheduleSpec: TypeAlias = str | Schedule | Triple | Sequence[Triple]


def list_schedules() -> list[str]:
    """Names of the shipped schedules (aliases not included)."""
    return sorted(_SHIPPED)


def get_schedule(name: str) -> Schedule:
    """Look up a shipped schedule by name (``"quintic"`` and ``"simple"`` are aliases).

    Raises ``ValueError`` for unknown names and for lists that orthoptim refuses to run (see
    ``validate_schedule``), naming why.
    """
    if not isinstance(name, str):
        raise TypeError(f"schedule name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key in _REFUSED:
        raise ValueError(f"schedule {name!r} is refused: {_REFUSED[key]}")
    if key not in _SHIPPED:
        raise ValueError(f"unknown schedule {name!r}; shipped schedules: {', '.join(list_schedules())}")
    return _SHIPPED[key]


def raw_coefficients(name: str) -> tuple[Triple, ...]:
    """The coefficients of a shipped *or refused* list, for inspection and for tests of the refusal."""
    if name in _SHIPPED:
        return _SHIPPED[name].coefficients
    if name == "aol_emerging":
        return _AOL_EMERGING
    if name == "polar_express_raw":
        return _POLAR_EXPRESS_RAW
    if name == "cans_published":
        return _CANS
    if name == "cubic5_published":
        return _CUBIC5
    raise ValueError(f"no coefficient list named {name!r}")


@dataclass(frozen=True)
class ScheduleReport:
    """What :func:`validate_schedule` found, on the interval ``σ ∈ [lower, upper]`` of *input* singular
    values (before the schedule's margin is applied).

    ``min_gain``/``max_gain`` are the exact-arithmetic composite's extremes; ``perturbed_min``/``perturbed_max``
    those of the rounding model of :func:`rounded_composite` with unit ``step_rounding`` per step (0 turns it
    off). A schedule can be fine in exact arithmetic and still blow up, or flip signs, in low precision.
    """

    lower: float
    upper: float
    steps: int
    min_gain: float
    max_gain: float
    argmin: float
    argmax: float
    perturbed_min: float
    perturbed_max: float
    step_rounding: float
    bound: float

    @property
    def positive(self) -> bool:
        """No direction's sign flips, with or without per-step rounding."""
        return self.min_gain > 0.0 and self.perturbed_min > 0.0

    @property
    def bounded(self) -> bool:
        """Every output stays ≤ ``bound``, with or without per-step rounding."""
        return self.max_gain <= self.bound and self.perturbed_max <= self.bound

    @property
    def ok(self) -> bool:
        return self.positive and self.bounded

    def describe(self) -> str:
        return (
            f"{self.steps} steps on σ ∈ [{self.lower:g}, {self.upper:.6g}]: output ∈ "
            f"[{self.min_gain:.4g} (at σ={self.argmin:.6g}), {self.max_gain:.4g} (at σ={self.argmax:.6g})]; "
            f"with rounding {self.step_rounding:.3g} per step ∈ [{self.perturbed_min:.4g}, {self.perturbed_max:.4g}]"
        )


def composite(coeffs: Sequence[Triple], x: np.ndarray) -> np.ndarray:
    """Apply the steps ``coeffs`` to scalars ``x`` in float64 (the scalar picture of the iteration).

    Values that overflow come out as ±inf or nan.
    """
    y = np.asarray(x, dtype=np.float64).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b, c in coeffs:
            y2 = y * y
            y = y * (a + y2 * (b + c * y2))
    return y


def rounded_composite(coeffs: Sequence[Triple], x: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The composite along a pessimistic low and high path of a rounding model with unit ``delta`` per step.

    Each step ``X ← aX + BX`` with ``B = bA + cA²`` rounds (i) its input matrix, moving σ by a relative
    ``±delta``, and (ii) the m×m factor ``B``, relative to the size of its terms, which moves the step's output
    by up to ``delta·(|b|σ³ + |c|σ⁵)``. The high path takes (i) upwards (a step whose polynomial has no room
    above its design interval blows up); the low path takes (i) downwards and subtracts (ii) (a step whose
    output is a small difference of large terms — CANS's first step maps σ ≈ 0.82 to 0.008 from terms ~20 —
    can cross zero and flip that direction's sign, which no later odd step undoes).
    """
    lo = np.asarray(x, dtype=np.float64).copy()
    hi = lo.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b, c in coeffs:
            y = lo * (1.0 - delta)
            y3 = y * y * y
            lo = a * y + b * y3 + c * y3 * y * y - delta * (abs(b) * y3 + abs(c) * y3 * y * y)
            y = hi * (1.0 + delta)
            y3 = y * y * y
            hi = a * y + b * y3 + c * y3 * y * y
    return lo, hi


def _grid(lower: float, upper: float, points: int) -> np.ndarray:
    # Log-spaced over [lower, 1] (where the small σ live) plus linear just above 1 (where blow-ups live).
    parts = [np.geomspace(lower, min(upper, 1.0), points)]
    if upper > 1.0:
        parts.append(np.linspace(1.0, upper, max(points // 10, 2)))
    return np.concatenate(parts)


def _extremes(y: np.ndarray) -> tuple[float, float]:
    """(min, max) where any non-finite value counts as −inf for the min and +inf for the max."""
    finite = np.isfinite(y)
    return float(np.where(finite, y, -np.inf).min()), float(np.where(finite, y, np.inf).max())


def validate_schedule(
    coeffs: ScheduleSpec,
    *,
    steps: int | None = None,
    lower: float | None = None,
    upper: float = ROUNDING_UPPER,
    margin: float | None = None,
    bound: float = DEFAULT_BOUND,
    step_rounding: float = STEP_ROUNDING,
    points: int = 20001,
) -> ScheduleReport:
    """Evaluate a schedule's composite scalar polynomial in float64 on a dense grid over ``[lower, upper]``.

    ``coeffs`` is a schedule name, a :class:`Schedule`, one ``(a, b, c)`` triple, or a list of triples.
    The grid runs over *input* singular values after normalization by ``‖X‖`` (so ``σ ≤ 1`` in exact
    arithmetic; ``upper`` > 1 models rounding of the normalized matrix); each is divided by the schedule's
    ``margin`` before the first step, as :func:`orthoptim.orthogonalize` does. The composite is evaluated
    exactly and under the rounding model of :func:`rounded_composite` with unit ``step_rounding`` (default
    2⁻⁸, twice bfloat16's unit roundoff; :data:`STEP_ROUNDING_BY_PRECISION` lists the others). The report says
    the extremes, whether the output stays positive (no sign flip of any direction) and ``≤ bound``.
    """
    sched = as_schedule(coeffs, validate=False)
    lo = sched.lower if lower is None else float(lower)
    mg = sched.margin if margin is None else float(margin)
    if not (0.0 < lo < 1.0 and lo < upper and math.isfinite(upper)):
        raise ValueError(f"need 0 < lower < 1, lower < upper < ∞, got lower={lo!r}, upper={upper!r}")
    if not (math.isfinite(mg) and mg > 0):
        raise ValueError(f"margin must be a positive finite number, got {mg!r}")
    if not (0.0 <= step_rounding < 0.5):
        raise ValueError(f"step_rounding must be in [0, 0.5), got {step_rounding!r}")
    if not (math.isfinite(bound) and bound > 1.0):
        raise ValueError(f"bound must be a finite number > 1, got {bound!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int ≥ 2, got {points!r}")
    triples = sched.steps_coefficients(steps)
    x = _grid(lo, upper, points) / mg
    y = composite(triples, x)
    min_gain, max_gain = _extremes(y)
    low, high = rounded_composite(triples, x, step_rounding)
    (low_min, low_max), (high_min, high_max) = _extremes(low), _extremes(high)
    finite = np.isfinite(y)
    return ScheduleReport(
        lower=lo,
        upper=float(upper),
        steps=len(triples),
        min_gain=min_gain,
        max_gain=max_gain,
        argmin=float(x[int(np.argmin(np.where(finite, y, -np.inf)))] * mg),
        argmax=float(x[int(np.argmax(np.where(finite, y, np.inf)))] * mg),
        perturbed_min=min(low_min, high_min),
        perturbed_max=max(low_max, high_max),
        step_rounding=float(step_rounding),
        bound=bound,
    )


@functools.lru_cache(maxsize=256)
def _checked_custom(triples: tuple[Triple, ...]) -> Schedule:
    sched = _custom(triples)
    # Exact arithmetic here; orthogonalize checks the rounding model for the compute dtype it runs in.
    report = validate_schedule(sched, step_rounding=0.0)
    if not report.ok:
        raise ValueError(
            "custom schedule rejected: "
            + report.describe()
            + f"; it must stay in (0, {report.bound}] for σ up to {report.upper:.6g} (rounding slack). "
            "Build a Schedule(..., margin=...) if it needs headroom, or Schedule(..., trusted=True) at your own risk."
        )
    return sched


def as_schedule(spec: ScheduleSpec, *, validate: bool = True) -> Schedule:
    """Turn a schedule name, a :class:`Schedule`, one triple or a list of triples into a :class:`Schedule`.

    Custom lists are validated in exact arithmetic (cached per list) unless ``validate=False``; a ``Schedule``
    object is taken as given. ``orthogonalize`` additionally checks the schedule for its compute dtype.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        return get_schedule(spec)
    try:
        items: list[Any] = list(spec)  # type: ignore[arg-type,call-overload,attr-defined]
    except TypeError:
        raise TypeError(
            f"schedule must be a name, a Schedule, an (a, b, c) triple or a list of triples; got {spec!r}"
        ) from None
    if isinstance(spec, torch.Tensor):
        items = [spec] if spec.dim() == 1 else list(spec)
    elif items and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
        items = [tuple(items)]
    try:
        triples = tuple(tuple(_number(v) for v in t) for t in items)
    except (TypeError, ValueError):
        raise TypeError(f"schedule list must hold (a, b, c) triples of numbers; got {spec!r}") from None
    for t in triples:
        if len(t) != 3:
            raise ValueError(f"each schedule step must be an (a, b, c) triple; got {t!r}")
    if not triples:
        raise ValueError("schedule list is empty")
    if validate:
        return _checked_custom(triples)  # type: ignore[arg-type]
    return _custom(triples)  # type: ignore[arg-type]


#: Steps a single custom triple runs by default: it is applied every step, as torch.optim.Muon applies its one
#: triple (torch/optim/_muon.py DEFAULT_NS_STEPS = 5). A list of several triples runs once through the list.
SINGLE_TRIPLE_STEPS = 5


def _custom(triples: tuple[Triple, ...]) -> Schedule:
    steps = SINGLE_TRIPLE_STEPS if len(triples) == 1 else len(triples)
    return Schedule("custom", triples, "cycle", 1.0, steps, source="user")


@functools.lru_cache(maxsize=1024)
def check_precision(sched: Schedule, steps: int | None, precision: str) -> None:
    """Raise ``ValueError`` if ``sched`` (at ``steps``) fails validation under ``precision``'s rounding model.

    ``precision`` is a torch dtype name (``"bfloat16"``, ...). Cached: a dictionary lookup after the first call.
    """
    if sched.trusted:
        return
    delta = STEP_ROUNDING_BY_PRECISION.get(precision)
    if delta is None:
        raise ValueError(f"no rounding model for compute precision {precision!r}")
    report = validate_schedule(sched, steps=steps, step_rounding=delta)
    if not report.ok:
        n = report.steps
        exact = validate_schedule(sched, steps=steps, step_rounding=0.0)
        if not exact.ok:  # no precision helps: the polynomials themselves leave (0, bound] at this step count
            if n != sched.default_steps:
                advice = (
                    f"Its polynomials are designed as a {sched.default_steps}-step sequence: run that many "
                    "(steps=None), or a schedule made for any step count such as 'jordan' (torch.optim.Muon's one "
                    "triple)"
                )
            else:  # its own step count: it fails on the inputs normalization can hand it (σ slightly above 1)
                advice = (
                    f"The check covers the σ ≤ {exact.upper:.6g} that normalization can hand it (1 plus rounding, "
                    f"over its input margin {sched.margin:g}): give it headroom with a larger margin "
                    "(Schedule(..., margin=1.01)), or pick a validated schedule (orthoptim.list_schedules())"
                )
            raise ValueError(
                f"schedule {sched.name!r} at {n} steps is refused in every compute dtype: even in exact arithmetic "
                f"{exact.describe()} (it must stay in (0, {exact.bound:g}]). {advice}"
            )
        safe = [
            p
            for p, d in STEP_ROUNDING_BY_PRECISION.items()
            if validate_schedule(sched, steps=steps, step_rounding=d).ok
        ]
        raise ValueError(
            f"schedule {sched.name!r} at {n} steps is refused in {precision}: {report.describe()} — it flips signs "
            f"or blows up under {precision} rounding. Use compute_dtype in {safe} or another schedule "
            "(or Schedule(..., trusted=True) at your own risk)."
        )
