"""Beyond the paper: today's recipes beside the paper's, on the same shifts and at the same compute.

The paper's recipe is the replay sweep's run at the chosen replay (re-warm, re-decay a cosine to 10% of the
max LR, ``CHOSEN_REPLAY`` of D0): every comparison reuses it and the base model. The new runs, per shift:

- a **stable** trunk: re-warm and hold the max LR (wsd without decay) on D1 with the chosen replay for the
  first ``1 - TAIL`` of B1; from its end, three kinds of tail over the last ``TAIL`` (same compute, B1):
  - **decay**: linear to 0 on the same data (WSD with a decay to zero);
  - **merge**: the LR held, the stage ending with the average of its last ``MERGE_COUNT`` checkpoints
    (WSM, arXiv 2507.17634): merging instead of decaying;
  - **anneal**: linear to 0 on chosen data, D1 with ``ANNEAL_REPLAY`` of D0 (Llama 3's anneal upsamples the
    data it wants the model to end on); in ``SOUP_ORDERS`` data orders (the sampler's seed), whose average
    is OLMo 2's "soup";
- **schedule-free AdamW** (Defazio et al. 2024) over the whole B1 at a constant LR: with and without
  re-warming at the chosen replay, and re-warmed without replay.

Across the shifts: a **microanneal** per candidate D1 corpus (both shifts' D1): ``MICRO`` of B1 from the base
model, linear to 0, ``MICRO_SHARE`` of the candidate and the rest D0 (Llama 3's 30%), asked whether it ranks
the candidates as the full continual runs do. On the three-chunk experiment (``infinite``), **D2Z** (a linear
decay to zero, arXiv 2502.15938, repeated per chunk) and **WSD-S** (arXiv 2410.05192: chunks 2 and 3 resume
at the max LR from the previous chunk's decayed model, whose chunk 1 is WSD's first anneal branch).
"""

from __future__ import annotations

from typing import Any

from cptlab.study import paper
from cptlab.study.experiments import Run, base_run, continual_run, infinite_schedules, lr_schedule, run_config
from cptlab.study.paper import CHOSEN_REPLAY, D0, SHIFTS
from cptlab.study.scales import Scale, get_scale

EXPERIMENT = "modern"
TAIL = 0.2  # of B1: the decay, merge or anneal that ends a stable trunk
MERGE_COUNT = 4  # checkpoints averaged over the merge tail (its whole length: TAIL of B1)
ANNEAL_REPLAY = 0.5  # D0's share of the anneal's data ("chosen data")
SOUP_ORDERS = (0, 1, 2)  # data orders (sampler seeds) of the anneals averaged into the soup
MICRO = 0.1  # of B1: a microanneal's length
MICRO_SHARE = 0.3  # of a microanneal's sequences from the candidate corpus
TAILS = ("decay", "merge", "anneal")
# Recipes (the runs' ``recipe`` label) whose loss no LR-history law describes, and why
OUTSIDE_THE_LAWS = {
    "merge": "the merged weights are an average of points of the LR history, not a point of it",
    "schedule-free": "schedule-free AdamW's weights are an average the law's LR history does not describe",
}


def _whole_batches(s: Scale, tokens: float) -> int:
    step = s.seq_len * s.batch_size
    return max(step, round(tokens / step) * step)


def _labels(shift: str, s: Scale, recipe: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a run of the comparison is: its shift, recipe and (last) schedule, as the continual runs say."""
    return {"role": "modern", "shift": shift, "d0": D0, "d1": SHIFTS[shift], "recipe": recipe,
            "replay": CHOSEN_REPLAY[shift], "schedule": spec["kind"], "max_lr": spec["max_lr"],
            "warmup": spec.get("warmup", 0.0), "switch_tokens": s.base_tokens,
            "compute_tokens": s.base_tokens + s.new_tokens, **extra}


def stable_run(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> Run:
    """The trunk: re-warm to the max LR and hold it on D1 with the chosen replay for ``1 - TAIL`` of B1."""
    s = get_scale(scale)
    base = base_run(s, 0, device)
    d1 = SHIFTS[shift]
    tokens = s.new_tokens - _whole_batches(s, TAIL * s.new_tokens)
    spec = lr_schedule(s, "wsd", warmup=s.warmup * s.new_tokens / tokens, decay=0.0)
    stage = {"name": "stable", "data": {d1: 1.0}, "tokens": tokens, "schedule": spec,
             "replay": {"source": D0, "fraction": CHOSEN_REPLAY[shift]}, "init_from": base.ref("pretrain")}
    cfg = run_config(s, [stage], [D0, d1], 0, device, s.eval_every(s.new_tokens))
    labels = _labels(shift, s, "stable", spec, compute_tokens=s.base_tokens + tokens)
    return Run(EXPERIMENT, f"{shift}-stable", cfg, labels, [base])


def tail_run(shift: str, tail: str, scale: str | Scale = "tiny", order: int = 0, device: str = "auto") -> Run:
    """From the trunk's end, the last ``TAIL`` of B1: ``decay`` (linear to 0, same data), ``merge`` (LR
    held, the last ``MERGE_COUNT`` checkpoints averaged) or ``anneal`` (linear to 0 on D1 with
    ``ANNEAL_REPLAY`` of D0, data order ``order``)."""
    s = get_scale(scale)
    trunk = stable_run(shift, s, device)
    d1 = SHIFTS[shift]
    tokens = _whole_batches(s, TAIL * s.new_tokens)
    d2z = lr_schedule(s, "linear", min_lr=0.0, warmup=0.0)
    stage: dict[str, Any] = {"name": tail, "data": {d1: 1.0}, "tokens": tokens, "schedule": d2z,
                             "replay": {"source": D0, "fraction": CHOSEN_REPLAY[shift]},
                             "init_from": trunk.ref("stable"), "reset_optimizer": False}
    if tail == "merge":
        stage["schedule"] = lr_schedule(s, "constant", warmup=0.0)
        stage["merge"] = {"window": 1.0, "count": MERGE_COUNT}
    elif tail == "anneal":
        stage["replay"] = {"source": D0, "fraction": ANNEAL_REPLAY}
    elif tail != "decay":
        raise ValueError(f"tail: unknown tail {tail!r}; allowed: {', '.join(TAILS)}")
    cfg = run_config(s, [stage], [D0, d1], order, device, s.eval_every(s.new_tokens))
    name = f"{shift}-{tail}" + (f"-order{order}" if tail == "anneal" else "")
    return Run(EXPERIMENT, name, cfg, _labels(shift, s, tail, stage["schedule"], order=order), [trunk])


def schedule_free_run(shift: str, scale: str | Scale = "tiny", *, rewarm: bool = True, replay: bool = True,
                      device: str = "auto") -> Run:
    """Schedule-free AdamW from the base model over B1 at the scale's max LR, held (no decay): re-warmed
    (the scale's warmup) or not, with the chosen replay or none."""
    s = get_scale(scale)
    spec = lr_schedule(s, "constant", warmup=s.warmup if rewarm else 0.0)
    frac = CHOSEN_REPLAY[shift] if replay else 0.0
    name = f"{shift}-schedulefree" + ("" if rewarm else "-nowarmup") + ("" if replay else "-noreplay")
    run = continual_run(EXPERIMENT, name, shift, s, replay=frac, schedule=spec, device=device,
                        labels=_labels(shift, s, "schedule-free", spec, rewarm=rewarm, replay=frac))
    run.config.stages[0].optimizer = "schedulefree_adamw"
    return run


def microanneal_run(candidate: str, scale: str | Scale = "tiny", device: str = "auto") -> Run:
    """From the base model, ``MICRO`` of B1 annealed linearly to 0 with ``MICRO_SHARE`` of ``candidate``
    and the rest D0."""
    s = get_scale(scale)
    base = base_run(s, 0, device)
    tokens = _whole_batches(s, MICRO * s.new_tokens)
    stage = {"name": "microanneal", "data": {candidate: 1.0}, "tokens": tokens,
             "schedule": lr_schedule(s, "linear", min_lr=0.0),
             "replay": {"source": D0, "fraction": 1 - MICRO_SHARE}, "init_from": base.ref("pretrain")}
    cfg = run_config(s, [stage], [D0, candidate], 0, device, tokens)
    shift = next(k for k, v in SHIFTS.items() if v == candidate)
    labels = {**_labels(shift, s, "microanneal", stage["schedule"], replay=1 - MICRO_SHARE),
              "role": "microanneal", "d1": candidate, "compute_tokens": s.base_tokens + tokens}
    return Run(EXPERIMENT, f"micro-{candidate}", cfg, labels, [base])


def chunk_runs(scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """D2Z repeated over the 3 chunks (as repeated cosine, with a linear decay to 0), and WSD-S: from WSD's
    chunk-1 anneal branch, chunks 2 and 3 at the max LR, each decaying over its last ``paper.ANNEAL``."""
    s = get_scale(scale)
    data = SHIFTS["weak"]
    n = s.chunk_tokens
    to_zero = lr_schedule(s, "linear", min_lr=0.0)
    d2z = [{"name": f"chunk{c}", "data": {data: 1.0}, "tokens": n, "schedule": to_zero,
            "reset_optimizer": True} for c in (1, 2, 3)]
    cfg = run_config(s, d2z, [data, D0], 0, device, s.eval_every(n))
    labels = {"role": "infinite", "schedule": "d2z", "d0": D0, "d1": data, "switch_tokens": [n, 2 * n],
              "compute_tokens": 3 * n}
    runs = [Run(EXPERIMENT, "sched-d2z", cfg, labels)]
    first = next(r for r in infinite_schedules(s, device) if r.name == "anneal-wsd-chunk1")
    spec = lr_schedule(s, "wsd", warmup=0.0, decay=paper.ANNEAL)
    stages = [{"name": f"chunk{c}", "data": {data: 1.0}, "tokens": n, "schedule": spec,
               "reset_optimizer": False} for c in (2, 3)]
    stages[0]["init_from"] = first.ref("anneal")
    cfg = run_config(s, stages, [data, D0], 0, device, s.eval_every(n))
    labels = {**labels, "schedule": "wsd-s", "switch_tokens": [2 * n]}
    runs.append(Run(EXPERIMENT, "sched-wsd-s", cfg, labels, [first]))
    return runs


def modern_runs(scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Every new run of the comparisons (the paper's recipe, the base model and WSD's runs are shared)."""
    s = get_scale(scale)
    runs = []
    for shift in SHIFTS:
        runs.append(stable_run(shift, s, device))
        runs += [tail_run(shift, t, s, device=device) for t in ("decay", "merge")]
        runs += [tail_run(shift, "anneal", s, order, device) for order in SOUP_ORDERS]
        runs += [schedule_free_run(shift, s, device=device),
                 schedule_free_run(shift, s, rewarm=False, device=device),
                 schedule_free_run(shift, s, replay=False, device=device)]
    runs += [microanneal_run(d1, s, device) for d1 in SHIFTS.values()]
    return runs + chunk_runs(s, device)


def paper_recipe(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> Run:
    """The paper's recipe the new runs are compared with: the replay sweep's run at the chosen replay."""
    return continual_run("replay", f"{shift}-replay{CHOSEN_REPLAY[shift]:g}", shift, scale,
                         replay=CHOSEN_REPLAY[shift], device=device)


def comparison_runs(scale: str | Scale = "tiny", device: str = "auto") -> dict[str, list[Run]]:
    """The runs the comparisons read, by experiment: the new ones, the paper's recipe and its run without
    replay per shift, the base model, and the three-chunk experiment's (repeated cosine, WSD)."""
    s = get_scale(scale)
    replay = [paper_recipe(sh, s, device) for sh in SHIFTS]
    replay += [continual_run("replay", f"{sh}-replay0", sh, s, device=device) for sh in SHIFTS]
    infinite = [r for r in infinite_schedules(s, device) if r.labels["schedule"] in ("cosine", "wsd")]
    return {"base": [base_run(s, 0, device)], "replay": replay, "infinite": infinite,
            "modern": modern_runs(s, device)}
