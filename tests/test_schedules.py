"""LR schedules against PAPER.md's formulas, written out here independently, at exact points."""

import math
from types import SimpleNamespace

import pytest

from cptlab import schedules as S
from cptlab.config import ConfigError, RunConfig
from cptlab.schedules import ScheduleConfig
from cptlab.study import paper

MAX, MIN = 1.0, 0.1  # an LR of order 1 makes an absolute 1e-12 a strict check


def close(a: float, b: float, tol: float = 1e-12) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


# -- one stage, each kind --------------------------------------------------------------------------

def test_constant_warmup_then_max():
    f = S.build(dict(kind="constant", max_lr=MAX, min_lr=MIN, warmup=0.1), 100)  # T_w = 10
    assert f(0) == 0.0
    assert close(f(5), 0.5)
    assert close(f(9), 0.9)
    assert f(10) == MAX and f(99) == MAX and f(500) == MAX
    g = S.build(dict(kind="constant", max_lr=3e-5, min_lr=3e-5, warmup=0.0), 10)  # "constant at min"
    assert [g(t) for t in range(10)] == [3e-5] * 10


def test_cosine_points():
    # T = 1000, T_w = 10, T_end = 999 (the last step)
    f = S.build(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.01), 1000)
    assert f(0) == 0.0
    assert close(f(5), 0.5)
    assert close(f(10), MAX)
    assert close(f(300), 0.1 + 0.45 * (1 + math.cos(math.pi * 290 / 989)))
    assert close(f(999), MIN)
    assert close(f(5000), MIN)  # past the end: holds the last value
    # the cosine's midpoint lies halfway between max and min: (T_w + T_end) / 2 = 500 with T_w = 1
    g = S.build(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.001), 1000)
    assert close(g(500), 0.55)
    assert close(g(1), MAX)


def test_cosine_without_warmup_starts_at_max():
    f = S.build(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.0), 101)
    assert f(0) == MAX
    assert close(f(50), 0.55)
    assert close(f(100), MIN)


def test_cosine_with_paper_values():
    f = S.build(paper.SCHEDULES_405M["cosine"], 2000)  # T_w = 20
    assert f(10) == pytest.approx(1.5e-4, rel=1e-12)
    assert f(20) == pytest.approx(3e-4, rel=1e-12)
    assert f(1999) == pytest.approx(3e-5, rel=1e-12)


@pytest.mark.parametrize("kind", ["infinite_cosine", "infinite_inv_sqrt"])
def test_infinite_phases(kind):
    # T = 1000: warmup to step 10, cooldown to step 610, constant, annealing from step 900 to 999
    spec = dict(kind=kind, max_lr=MAX, min_lr=MIN, const_lr=0.4, warmup=0.01, cooldown=0.6, anneal=0.1)
    f = S.build(spec, 1000)
    assert f(0) == 0.0
    assert close(f(5), 0.5)
    assert close(f(10), MAX)
    assert close(f(610), 0.4)  # end of cooldown = const_lr
    assert close(f(700), 0.4) and close(f(900), 0.4)
    assert close(f(933), 0.4 * (0.1 / 0.4) ** (1 / 3))  # k/K = 33/99
    assert close(f(999), MIN)  # end of annealing = min_lr
    mid = f(310)  # tau = 0.5
    if kind == "infinite_cosine":
        assert close(mid, 0.4 + 0.6 / 2)
    else:
        assert close(mid, 1.0 - 0.6 * (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1))


def test_infinite_inv_sqrt_alpha():
    f = S.build(dict(kind="infinite_inv_sqrt", max_lr=MAX, min_lr=MIN, const_lr=0.5, warmup=0.0,
                     cooldown=0.5, alpha=3.0), 100)
    # h(x) = 1/sqrt(1 + 3x) - 1, h(1) = -1/2; tau = 0.5 at step 25
    assert close(f(25), 1.0 - 0.5 * (1 / math.sqrt(2.5) - 1) / -0.5)
    assert close(f(50), 0.5)
    assert close(f(99), 0.5)  # no annealing: ends on the constant


def test_infinite_default_const_lr_and_paper_values():
    f = S.build(dict(kind="infinite_cosine", max_lr=MAX, min_lr=MIN, warmup=0.0, cooldown=0.5), 100)
    assert close(f(50), 0.55)  # (max + min) / 2
    g = S.build(paper.SCHEDULES_405M["infinite_inv_sqrt"], 1000)
    assert g(10) == pytest.approx(3e-4, rel=1e-12)
    assert g(610) == pytest.approx(1.65e-4, rel=1e-12)
    assert g(999) == pytest.approx(1.65e-4, rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_points(shape):
    # T = 1000: warmup to 10, stable at max, decay from step 900 to 999
    f = S.build(dict(kind="wsd", max_lr=MAX, min_lr=MIN, warmup=0.01, decay=0.1, decay_shape=shape), 1000)
    assert f(0) == 0.0
    assert close(f(5), 0.5)
    assert f(10) == MAX and f(500) == MAX and f(899) == MAX
    assert close(f(900), MAX)
    third = f(933)  # p = 1/3
    if shape == "linear":
        assert close(third, 1.0 - 0.9 / 3)
    else:
        assert close(third, 0.1 + 0.9 * (1 - math.sqrt(1 / 3)))
    assert close(f(999), MIN)


def test_final_phase_shorter_than_a_step_still_ends_at_min():
    f = S.build(dict(kind="infinite_cosine", max_lr=MAX, min_lr=MIN, warmup=0.0, anneal=0.05), 10)
    assert close(f(8), 0.55) and close(f(9), MIN)
    g = S.build(dict(kind="wsd", max_lr=MAX, min_lr=MIN, warmup=0.0, decay=0.05), 10)
    assert g(8) == MAX and close(g(9), MIN)


def test_phases_filling_the_stage_and_unused_keys_are_accepted():
    f = S.build(dict(kind="infinite_cosine", max_lr=MAX, min_lr=MIN, warmup=0.01, cooldown=0.59, anneal=0.4),
                100)
    assert close(f(99), MIN)
    assert close(f(60), 0.55)  # cooldown ends and annealing starts at step 60
    assert close(f(79), 0.55 * (0.1 / 0.55) ** (19 / 39))
    g = S.build(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.0, cooldown=0.9, decay=0.9), 11)
    assert close(g(10), MIN)


def test_one_step_stage_and_defaults():
    assert close(S.build(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.0), 1)(0), MIN)
    assert S.build(dict(kind="constant", max_lr=MAX, min_lr=MIN, warmup=0.0), 1)(0) == MAX
    # missing keys take ScheduleConfig's defaults; a ScheduleConfig is accepted as well
    f, g = S.build({}, 500), S.build(ScheduleConfig(), 500)
    assert [f(t) for t in (0, 3, 5, 250, 499)] == [g(t) for t in (0, 3, 5, 250, 499)]
    assert g(5) == pytest.approx(3e-4, rel=1e-12) and g(499) == pytest.approx(3e-5, rel=1e-12)


def test_presets_are_valid():
    for kind, spec in paper.SCHEDULES_405M.items():
        S.validate_spec(spec)
        assert spec["kind"] == kind
    values = dict(max_lr=3e-4, min_lr=3e-5, const_lr=1.65e-4, warmup=0.01, cooldown=0.6, alpha=10.0)
    assert values == paper.LR_405M


# -- bad specs -------------------------------------------------------------------------------------

INF = dict(kind="infinite_cosine")


@pytest.mark.parametrize("spec, match", [
    (dict(kind="foo"), r"^kind: 'foo' not allowed; allowed: constant, cosine, linear, infinite_cosine, "
                       r"infinite_inv_sqrt, wsd$"),
    (dict(warmpu=0.1), r"^warmpu: unknown key; allowed: kind, max_lr"),
    (dict(min_lr=0.5, max_lr=0.1), r"^min_lr: 0.5 is larger than max_lr \(0.1\)$"),
    (dict(max_lr=-1e-4), r"^max_lr: must be > 0"),
    (dict(max_lr=0.0), r"^max_lr: must be > 0"),
    (dict(min_lr=-1e-5), r"^min_lr: must be >= 0"),
    (dict(max_lr="3e-4"), r"^max_lr: expected a finite number"),
    (dict(min_lr=float("nan")), r"^min_lr: expected a finite number"),
    (dict(alpha=0.0), r"^alpha: must be > 0"),
    (dict(warmup=1.5), r"^warmup: must be in \[0, 1\], got 1.5$"),
    (dict(warmup=-0.1), r"^warmup: must be in \[0, 1\]"),
    (dict(INF, cooldown=2.0), r"^cooldown: must be in \[0, 1\]"),
    (dict(INF, anneal=-0.5), r"^anneal: must be in \[0, 1\]"),
    (dict(kind="wsd", decay=1.1), r"^decay: must be in \[0, 1\]"),
    (dict(INF, warmup=0.5, cooldown=0.4, anneal=0.2),
     r"^warmup \+ cooldown \+ anneal: must add up to at most 1"),
    (dict(kind="infinite_inv_sqrt", warmup=0.0, cooldown=1.0, anneal=0.01), r"^warmup \+ cooldown \+ anneal"),
    (dict(kind="wsd", warmup=0.5, decay=0.6), r"^warmup \+ decay: must add up to at most 1"),
    (dict(INF, max_lr=1.0, min_lr=0.1, const_lr=1.5), r"^const_lr: must be in \[min_lr, max_lr\]"),
    (dict(INF, max_lr=1.0, min_lr=0.1, const_lr=0.05), r"^const_lr: must be in \[min_lr, max_lr\]"),
    (dict(INF, min_lr=0.0, anneal=0.1), r"^min_lr: must be > 0 when anneal > 0"),
    (dict(kind="wsd", decay_shape="cubic"), r"^decay_shape: 'cubic' not allowed; allowed: linear, 1-sqrt$"),
])
def test_bad_spec_names_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        S.validate_spec(spec)
    with pytest.raises(ValueError, match=match):
        S.build(spec, 100)


@pytest.mark.parametrize("steps", [0, -5, 1.5, "10"])
def test_total_steps_must_be_positive_integer(steps):
    with pytest.raises(ValueError, match=r"^total_steps: must be an integer >= 1"):
        S.build({}, steps)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"^schedule: expected a mapping"):
        S.validate_spec([("kind", "cosine")])
    with pytest.raises(ValueError, match=r"^step: must be >= 0"):
        S.build({}, 10)(-1)
    with pytest.raises(ValueError, match=r"^stages: at least one"):
        S.compose([])
    with pytest.raises(ValueError, match=r"^stages\[1\]\.kind: 'bad' not allowed"):
        S.compose([({}, 10), (dict(kind="bad"), 10)])
    with pytest.raises(ValueError, match=r"^kind: 'cosine' cannot continue"):
        S.continuation(dict(kind="cosine"))
    with pytest.raises(ValueError, match=r"^n_stages: must be >= 1"):
        S.multi_stage({}, 0, 10)


def test_config_validate_wraps_the_schedule_message():
    cfg = RunConfig.from_dict({"stages": [{"name": "d0", "data": {"en-man": 1.0}, "tokens": 10**6,
                                           "schedule": {"max_lr": 0.1, "min_lr": 0.5}}]})
    match = r"^stages\[0\] \(d0\)\.schedule\.min_lr: 0.5 is larger than max_lr"
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


# -- several stages --------------------------------------------------------------------------------

def test_stage_boundaries():
    assert S.stage_boundaries([({}, 100), ({}, 200), ({}, 50)]) == [0, 100, 300, 350]


def test_repeated_cosine_rewarms_at_each_stage_start():
    spec = dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.1)  # T_w = 10 of 100 steps
    f = S.compose([(spec, 100), (spec, 100)])
    assert close(f(99), MIN)
    assert f(100) == 0.0  # the second stage's own warmup starts at its first step
    assert close(f(105), 0.5)
    assert close(f(110), MAX)
    assert close(f(199), MIN)
    assert close(f(10_000), MIN)


def test_rewarm_to_another_max_lr_and_constant_at_min():
    d0 = dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.01)
    d1 = dict(kind="cosine", max_lr=0.5, min_lr=0.05, warmup=0.02)  # T_w = 4 of 200
    f = S.compose([(d0, 100), (d1, 200)])
    assert close(f(102), 0.25) and close(f(104), 0.5) and close(f(299), 0.05)
    g = S.compose([(d0, 100), (dict(kind="constant", max_lr=MIN, min_lr=MIN, warmup=0.0), 100)])
    assert close(g(99), MIN) and g(100) == MIN and g(199) == MIN  # no re-warm


@pytest.mark.parametrize("kind", ["infinite_cosine", "infinite_inv_sqrt"])
def test_infinite_schedule_continues_across_stages(kind):
    spec = dict(kind=kind, max_lr=MAX, min_lr=MIN, const_lr=0.4, warmup=0.01, cooldown=0.6, anneal=0.1)
    plan = S.multi_stage(spec, 3, 100)
    assert [n for _, n in plan] == [100, 100, 100]
    assert plan[0][0]["anneal"] == 0.0 and not S.is_continuation(plan[0][0])
    assert all(S.is_continuation(s) for s, _ in plan[1:])
    assert plan[1][0]["anneal"] == 0.0 and plan[2][0]["anneal"] == 0.1
    f = S.compose(plan)
    assert close(f(1), MAX) and close(f(61), 0.4)
    for b in (100, 200):  # continuous: const_lr on both sides of each boundary
        assert close(f(b - 1), 0.4) and close(f(b), 0.4)
    assert close(f(290), 0.4)  # the last stage anneals from step 290 (local 90) to 299
    assert close(f(293), 0.4 * 0.25 ** (1 / 3))
    assert close(f(299), MIN)


def test_wsd_and_constant_plans_do_not_rewarm():
    wsd = S.compose(S.multi_stage(dict(kind="wsd", max_lr=MAX, min_lr=MIN, warmup=0.1, decay=0.1), 2, 100))
    assert wsd(0) == 0.0 and wsd(10) == MAX
    assert wsd(99) == MAX and wsd(100) == MAX and wsd(189) == MAX  # no decay in stage 0, no re-warm
    assert close(wsd(199), MIN)
    const = S.compose(S.multi_stage(dict(kind="constant", max_lr=MAX, min_lr=MIN, warmup=0.1), 3, 10))
    assert const(0) == 0.0 and const(1) == MAX and const(10) == MAX and const(29) == MAX
    cos = S.multi_stage(dict(kind="cosine", warmup=0.1), 2, [50, 80])
    assert [n for _, n in cos] == [50, 80] and cos[0][0] == cos[1][0]


def test_lr_values_matches_compose():
    plan = S.multi_stage(paper.SCHEDULES_405M["infinite_cosine"], 2, 50)
    f = S.compose(plan)
    assert S.lr_values(plan) == [f(t) for t in range(100)]


# -- optimizer -------------------------------------------------------------------------------------

def test_set_lr_and_attach_on_fake_optimizer():
    opt = SimpleNamespace(param_groups=[{"lr": 0.0}, {"lr": 0.0, "weight_decay": 0.0}])
    fn = S.compose([(dict(kind="cosine", max_lr=MAX, min_lr=MIN, warmup=0.1), 100)])
    update = S.attach(opt, fn)
    seen = [update(step) for step in range(40)]
    assert [g["lr"] for g in opt.param_groups] == [fn(39)] * 2
    # a resumed run (fresh updater at step 25) sets exactly the LR of the uninterrupted one
    resumed = S.attach(opt, fn)
    assert resumed(25) == seen[25]
    assert S.set_lr(opt, 0.123) == 0.123 and opt.param_groups[1]["lr"] == 0.123


def test_attach_torch_optimizer():
    torch = pytest.importorskip("torch")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    update = S.attach(opt, S.build(dict(kind="constant", max_lr=MAX, min_lr=MIN, warmup=0.5), 10))
    assert update(2) == pytest.approx(0.4) and opt.param_groups[0]["lr"] == pytest.approx(0.4)
