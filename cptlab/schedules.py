"""Learning-rate schedules as pure functions of the step (so resuming a run is exact).

A schedule is described by a spec: the YAML ``schedule`` mapping of a stage, a ``ScheduleConfig``:

    kind         constant | cosine | linear | infinite_cosine | infinite_inv_sqrt | wsd
    max_lr       peak learning rate (> 0)
    min_lr       final learning rate (0 <= min_lr <= max_lr)
    warmup       linear warmup from 0 to max_lr, as a fraction of the stage (all kinds)
    const_lr     infinite_*: the constant phase (default (max_lr + min_lr) / 2)
    cooldown     infinite_*: fraction spent going from max_lr down to const_lr
    anneal       infinite_*: final fraction spent annealing exponentially from const_lr to min_lr
    alpha        infinite_inv_sqrt: timescale of the inverse-sqrt cooldown (default 10)
    decay        wsd: final fraction spent decaying from max_lr to min_lr
    decay_shape  wsd: linear | 1-sqrt

Keys a kind does not use are ignored (a cosine spec may carry ``decay``). Missing keys take the
``ScheduleConfig`` defaults.

Conventions, for a stage of T = total_steps steps numbered t = 0 .. T-1:
- Lengths stay floats: T_w = warmup * T, T_cd = cooldown * T, so the formulas are exact.
- Warmup (PAPER.md): lr(t) = max_lr * t / T_w for t < T_w, so lr(0) = 0 whenever warmup > 0.
- ``linear`` decays linearly from max_lr after the warmup to min_lr at the last step; with ``min_lr: 0``
  it is decay to zero (D2Z, Bergsma et al. 2025, arXiv 2502.15938).
- A phase that ends the stage (the cosine or linear decay, the annealing, the wsd decay) starts at
  T_s = T - length * T (the cosine and linear at T_s = T_w) and runs its progress
  p = (t - T_s) / (T_end - T_s) from 0 to 1 with T_end = T - 1, the last step: the schedule reaches
  min_lr exactly at t = T - 1.
  A final phase shorter than one step still covers the last step (T_s is at most T - 1).
  Where several phases claim a step, the later phase wins.
- Steps past the end of the stage hold the value of its last step; negative steps raise.

Several stages compose into one function of the global step (``compose``): each stage is
evaluated on its own local step. A stage whose spec has a warmup re-warms from 0 at its first step.
An infinite (or wsd, or constant) schedule *continues* across a boundary when the next stage's
spec has no warmup and no cooldown: it then sits at its constant LR from its first step and may
anneal (decay) at its end. ``continuation`` builds such a spec and ``multi_stage`` builds the
usual plans (repeated cosine, one infinite schedule over N stages, ...).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ScheduleConfig:
    """Learning-rate schedule of one stage (the module docstring says what each field does). Lengths are
    fractions of the stage's steps."""

    kind: str = "cosine"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: float = 0.01
    const_lr: float | None = None  # infinite_*: the constant phase (default: ``default_const_lr``)
    cooldown: float = 0.0  # infinite_*: from max_lr down to const_lr
    anneal: float = 0.0  # infinite_*: exponential annealing to min_lr over the final fraction
    alpha: float = 10.0  # infinite_inv_sqrt timescale
    decay: float = 0.1  # wsd: final fraction decaying to min_lr
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt

    def to_spec(self) -> dict[str, Any]:
        """The spec as a plain mapping (what ``build`` and the YAML file hold)."""
        return asdict(self)

    def resolved(self) -> ScheduleConfig:
        """A copy with the defaults that depend on other fields filled in (``const_lr``)."""
        return ScheduleConfig(**resolve_spec(self))

    def validate(self) -> None:
        """Raise ``ValueError`` for a bad schedule; the message starts with the field name."""
        validate_spec(self)


KINDS = ("constant", "cosine", "linear", "infinite_cosine", "infinite_inv_sqrt", "wsd")
DECAYING_KINDS = ("cosine", "linear")  # re-warm and re-decay every stage: they cannot continue
INFINITE_KINDS = ("infinite_cosine", "infinite_inv_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt")
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ScheduleConfig)}
FRACTIONS = ("warmup", "cooldown", "anneal", "decay")

Spec = Mapping[str, Any] | ScheduleConfig
StagePlan = Sequence[tuple[Spec, int]]

# -- specs -----------------------------------------------------------------------------------------

def _merged(spec: Spec) -> dict[str, Any]:
    if isinstance(spec, ScheduleConfig):
        spec = spec.to_spec()
    if not isinstance(spec, Mapping):
        raise ValueError(f"schedule: expected a mapping, got {type(spec).__name__}")
    return {**DEFAULTS, **spec}


def default_const_lr(max_lr: float, min_lr: float) -> float:
    """The constant phase of an infinite schedule when its spec sets none: midway between max and min."""
    return (max_lr + min_lr) / 2


def resolve_spec(spec: Spec) -> dict[str, Any]:
    """A full spec dict: defaults filled in, ``const_lr`` set for infinite kinds. Not validated."""
    s = _merged(spec)
    if s["const_lr"] is None and s["kind"] in INFINITE_KINDS:
        s["const_lr"] = default_const_lr(s["max_lr"], s["min_lr"])
    return s


def validate_spec(spec: Spec) -> None:
    """Raise ``ValueError`` for a bad spec; the message starts with the field name."""
    s = _merged(spec)
    for key in s:
        if key not in DEFAULTS:
            raise ValueError(f"{key}: unknown key; allowed: {', '.join(DEFAULTS)}")
    if s["kind"] not in KINDS:
        raise ValueError(f"kind: {s['kind']!r} not allowed; allowed: {', '.join(KINDS)}")
    if s["decay_shape"] not in DECAY_SHAPES:
        raise ValueError(f"decay_shape: {s['decay_shape']!r} not allowed; allowed: {', '.join(DECAY_SHAPES)}")
    for key in ("max_lr", "min_lr", "const_lr", "alpha", *FRACTIONS):
        value = s[key]
        if key == "const_lr" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
    s = resolve_spec(s)
    if not s["max_lr"] > 0:
        raise ValueError(f"max_lr: must be > 0, got {s['max_lr']}")
    if s["min_lr"] < 0:
        raise ValueError(f"min_lr: must be >= 0, got {s['min_lr']}")
    if s["min_lr"] > s["max_lr"]:
        raise ValueError(f"min_lr: {s['min_lr']} is larger than max_lr ({s['max_lr']})")
    if not s["alpha"] > 0:
        raise ValueError(f"alpha: must be > 0, got {s['alpha']}")
    for key in FRACTIONS:
        if not 0 <= s[key] <= 1:
            raise ValueError(f"{key}: must be in [0, 1], got {s[key]}")
    kind = s["kind"]
    if kind in INFINITE_KINDS:
        if not s["min_lr"] <= s["const_lr"] <= s["max_lr"]:
            raise ValueError(f"const_lr: must be in [min_lr, max_lr] = [{s['min_lr']}, {s['max_lr']}], "
                             f"got {s['const_lr']}")
        total = s["warmup"] + s["cooldown"] + s["anneal"]
        if total > 1 + 1e-9:
            raise ValueError(
                f"warmup + cooldown + anneal: must add up to at most 1 (the whole stage), got "
                f"{s['warmup']} + {s['cooldown']} + {s['anneal']} = {total:g}")
        if s["anneal"] > 0 and s["min_lr"] == 0:
            raise ValueError("min_lr: must be > 0 when anneal > 0 (exponential annealing to min_lr)")
    if kind == "wsd" and s["warmup"] + s["decay"] > 1 + 1e-9:
        raise ValueError(
            f"warmup + decay: must add up to at most 1 (the whole stage), got "
            f"{s['warmup']} + {s['decay']} = {s['warmup'] + s['decay']:g}")


def continuation(spec: Spec, end: float = 0.0) -> dict[str, Any]:
    """The spec of a next stage that continues ``spec`` without re-warming.

    infinite_*: warmup 0, cooldown 0 (it sits at const_lr) and ``anneal = end``;
    wsd: warmup 0 (stable at max_lr) and ``decay = end``; constant: warmup 0.
    A cosine (or linear) cannot continue: each such stage re-warms and re-decays.
    """
    s = resolve_spec(spec)
    if s["kind"] in INFINITE_KINDS:
        return {**s, "warmup": 0.0, "cooldown": 0.0, "anneal": end}
    if s["kind"] == "wsd":
        return {**s, "warmup": 0.0, "decay": end}
    if s["kind"] == "constant":
        return {**s, "warmup": 0.0}
    raise ValueError(f"kind: {s['kind']!r} cannot continue across stages; allowed: "
                     f"{', '.join(k for k in KINDS if k not in DECAYING_KINDS)}")


def is_continuation(spec: Spec) -> bool:
    """True when a stage with this spec continues the previous one (no warmup, no cooldown)."""
    s = resolve_spec(spec)
    no_cooldown = s["kind"] not in INFINITE_KINDS or s["cooldown"] == 0
    return s["kind"] not in DECAYING_KINDS and s["warmup"] == 0 and no_cooldown


def multi_stage(spec: Spec, n_stages: int, steps: int | Sequence[int]) -> list[tuple[dict[str, Any], int]]:
    """A plan of ``n_stages`` stages for one spec, as (spec, steps) pairs.

    cosine, linear: repeated (re-warm and re-decay every stage). constant: warmup once, then flat.
    infinite_* and wsd: warmup (and cooldown) in the first stage, continued without re-warming,
    annealing (decaying) only at the end of the last stage, over its ``anneal`` (``decay``) fraction.
    ``wsd_s`` is WSD-S's plan instead: every stage decays and the next resumes from the decayed model.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages: must be >= 1, got {n_stages}")
    steps = list(steps) if isinstance(steps, Sequence) else [steps] * n_stages
    if len(steps) != n_stages:
        raise ValueError(f"steps: expected {n_stages} stage lengths, got {len(steps)}")
    s = resolve_spec(spec)
    kind = s["kind"]
    if kind in DECAYING_KINDS or n_stages == 1:
        return [(dict(s), n) for n in steps]
    if kind == "constant":
        return [(dict(s), steps[0])] + [(continuation(s), n) for n in steps[1:]]
    end_key = "decay" if kind == "wsd" else "anneal"
    plan = [({**s, end_key: 0.0}, steps[0])]
    plan += [(continuation(s, 0.0), n) for n in steps[1:-1]]
    plan.append((continuation(s, s[end_key]), steps[-1]))
    return plan


def wsd_s(spec: Spec, n_stages: int, steps: int | Sequence[int]) -> list[tuple[dict[str, Any], int]]:
    """WSD-S (Wen et al. 2024, arXiv 2410.05192) over ``n_stages`` stages: a wsd spec that decays at the end
    of every stage (over its ``decay`` fraction), the next stage resuming from the decayed model at
    max_lr without re-warming (warmup only in the first stage)."""
    s = resolve_spec(spec)
    if s["kind"] != "wsd":
        raise ValueError(f"kind: WSD-S takes a wsd spec, got {s['kind']!r}")
    plan = multi_stage({**s, "kind": "cosine"}, n_stages, steps)  # one (spec, steps) per stage
    return [({**s, "warmup": s["warmup"] if i == 0 else 0.0}, n) for i, (_, n) in enumerate(plan)]


# -- one stage -------------------------------------------------------------------------------------

def _progress(t: float, start: float, end: float) -> float:
    """0 at ``start``, 1 at ``end`` (a phase of zero length is already done)."""
    return 1.0 if end <= start else min(max((t - start) / (end - start), 0.0), 1.0)


def build(spec: Spec, total_steps: int) -> Callable[[int], float]:
    """The LR of one stage of ``total_steps`` steps as a function of its local step."""
    validate_spec(spec)
    try:
        T = operator.index(total_steps)
    except TypeError:
        raise ValueError(f"total_steps: must be an integer >= 1, got {total_steps!r}") from None
    if T < 1:
        raise ValueError(f"total_steps: must be an integer >= 1, got {T}")
    s = resolve_spec(spec)
    shapes = {"constant": _constant, "cosine": _cosine, "linear": _linear, "wsd": _wsd}
    shape = shapes.get(s["kind"], _infinite)
    f = shape(s, T, _Warmup(float(s["max_lr"]), s["warmup"] * T))
    last = T - 1

    def lr(step: int) -> float:
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        return f(min(step, last))

    return lr


class _Warmup:
    """Linear warmup from 0 to ``lr_max`` over ``length`` steps (a float: exact)."""

    def __init__(self, lr_max: float, length: float):
        self.lr_max, self.length = lr_max, length

    def covers(self, t: int) -> bool:
        return t < self.length

    def __call__(self, t: int) -> float:
        return self.lr_max * t / self.length


def _constant(s: dict[str, Any], T: int, warm: _Warmup) -> Callable[[int], float]:
    return lambda t: warm(t) if warm.covers(t) else warm.lr_max


def _cosine(s: dict[str, Any], T: int, warm: _Warmup) -> Callable[[int], float]:
    lr_max, lr_min, last = warm.lr_max, float(s["min_lr"]), T - 1

    def f(t: int) -> float:
        if warm.covers(t):
            return warm(t)
        p = _progress(t, warm.length, last)
        return lr_min + (lr_max - lr_min) / 2 * (1 + math.cos(math.pi * p))

    return f


def _linear(s: dict[str, Any], T: int, warm: _Warmup) -> Callable[[int], float]:
    lr_max, lr_min, last = warm.lr_max, float(s["min_lr"]), T - 1

    def f(t: int) -> float:
        if warm.covers(t):
            return warm(t)
        return lr_max + (lr_min - lr_max) * _progress(t, warm.length, last)

    return f


def _infinite(s: dict[str, Any], T: int, warm: _Warmup) -> Callable[[int], float]:
    lr_max, lr_min, last = warm.lr_max, float(s["min_lr"]), T - 1
    c, alpha, anneal = float(s["const_lr"]), s["alpha"], s["anneal"]
    t_cd = s["cooldown"] * T
    t_anneal = min(T - anneal * T, last)  # a final phase always covers the last step
    h1 = 1 / math.sqrt(1 + alpha) - 1

    def f(t: int) -> float:
        if anneal > 0 and t >= t_anneal:
            return c * (lr_min / c) ** _progress(t, t_anneal, last)
        if warm.covers(t):
            return warm(t)
        if t < warm.length + t_cd:
            tau = (t - warm.length) / t_cd
            if s["kind"] == "infinite_cosine":
                return c + (lr_max - c) / 2 * (1 + math.cos(math.pi * tau))
            return lr_max + (c - lr_max) * (1 / math.sqrt(1 + alpha * tau) - 1) / h1
        return c

    return f


def _wsd(s: dict[str, Any], T: int, warm: _Warmup) -> Callable[[int], float]:
    lr_max, lr_min, last = warm.lr_max, float(s["min_lr"]), T - 1
    decay, shape = s["decay"], s["decay_shape"]
    t_decay = min(T - decay * T, last)

    def f(t: int) -> float:
        if decay > 0 and t >= t_decay:
            p = _progress(t, t_decay, last)
            if shape == "linear":
                return lr_max + (lr_min - lr_max) * p
            return lr_min + (lr_max - lr_min) * (1 - math.sqrt(p))
        if warm.covers(t):
            return warm(t)
        return lr_max

    return f


# -- several stages --------------------------------------------------------------------------------

def stage_boundaries(stages: StagePlan) -> list[int]:
    """Global first step of every stage, then the total: [0, n0, n0 + n1, ..., total]."""
    bounds = [0]
    for _, steps in stages:
        bounds.append(bounds[-1] + steps)
    return bounds


def compose(stages: StagePlan) -> Callable[[int], float]:
    """One LR function over the whole run (global step) from a list of (spec, steps).

    Each stage is evaluated on its local step (global step - the stage's first step); whether a
    stage re-warms or continues is decided by its own spec (see ``continuation``). Steps past the
    last stage hold the run's final LR.
    """
    if not stages:
        raise ValueError("stages: at least one (spec, steps) stage is required")
    fns = []
    for i, (spec, steps) in enumerate(stages):
        try:
            fns.append(build(spec, steps))
        except ValueError as exc:
            raise ValueError(f"stages[{i}].{exc}") from None
    starts = stage_boundaries(stages)[:-1]

    def lr(step: int) -> float:
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        i = bisect.bisect_right(starts, step) - 1
        return fns[i](step - starts[i])

    return lr


def lr_values(stages: StagePlan) -> list[float]:
    """The LR at every global step of a plan (for plots and tests)."""
    fn = compose(stages)
    return [fn(step) for step in range(stage_boundaries(stages)[-1])]


# -- optimizer -------------------------------------------------------------------------------------

def set_lr(optimizer: Any, lr: float) -> float:
    """Set the learning rate of every parameter group of a torch optimizer; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def attach(optimizer: Any, fn: Callable[[int], float]) -> Callable[[int], float]:
    """A per-step updater: ``update(step)`` sets the optimizer's LR to ``fn(step)`` and returns it.

    Call it before each optimizer step. Since ``fn`` depends only on the step, a resumed run sets
    exactly the LR the uninterrupted run would have.
    """
    def update(step: int) -> float:
        return set_lr(optimizer, fn(step))

    return update
