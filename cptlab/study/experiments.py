"""The paper's experiments as functions that build runs, at a chosen scale (``cptlab.study.scales``).

Every builder returns a list of ``Run`` (a name, a RunConfig and labels that say what the run is). The
same configuration always gets the same directory in the run store, ``<experiment>/<name>-<config hash>``,
so identical runs are shared across experiments and notebooks, finished runs are reused and unfinished ones
resumed (``cptlab.study.runner``). A continual run starts from the base model's end-of-stage checkpoint,
named by reference (``init_from: {experiment, run, stage}``): the base run is a dependency that the runner
trains first, and the run's identity does not depend on where the store is.

The shifts (``cptlab.study.paper``): D0 is en-man (manual pages). Strong: de-man (the same domain in
German). Weak: en-docs, half Python documentation and half manual pages of other programs than en-man's,
sharing kinds of sources with D0 and adding new ones, as the paper's SlimPajama does with the Pile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cptlab.config import RunConfig, RunRef
from cptlab.study import paper
from cptlab.study.paper import CHOSEN_REPLAY, D0, LR_FACTORS, REPLAY_FRACTIONS, SHIFTS, WARMUPS
from cptlab.study.scales import Scale, get_scale, ladder_scales
from cptlab.training import store
from cptlab.training.model import GPT


@dataclass
class Run:
    """One training run of an experiment: ``labels`` say what it is (shift, replay, schedule, ...)."""

    experiment: str
    name: str
    config: RunConfig
    labels: dict[str, Any] = field(default_factory=dict)
    needs: list[Run] = field(default_factory=list)  # runs whose checkpoints this one starts from

    @property
    def run_id(self) -> str:
        return store.run_id(self.name, self.config)

    def ref(self, stage: str) -> RunRef:
        """A reference to this run's checkpoint at the end of ``stage`` (another run's ``init_from``)."""
        return RunRef(self.experiment, self.run_id, stage)


def lr_schedule(s: Scale, kind: str = "cosine", max_lr: float | None = None, **extra: Any) -> dict[str, Any]:
    """A stage's schedule at scale ``s``: ``kind`` from the scale's max LR (or ``max_lr``) to its min LR."""
    spec = {"kind": kind, "max_lr": s.max_lr if max_lr is None else max_lr, "min_lr": s.min_lr,
            "warmup": s.warmup}
    spec.update(extra)
    return spec


def run_config(s: Scale, stages: list[dict[str, Any]], eval_sets: list[str], seed: int, device: str,
               eval_every: int) -> RunConfig:
    """A run of scale ``s``: its model, tokenizer, batch and evaluation, with ``stages``."""
    return RunConfig.from_dict({
        "model": {"preset": s.model, **dict(s.model_overrides)},
        "tokenizer": {"kind": "bpe", "vocab_size": s.vocab_size},
        "train": {"seq_len": s.seq_len, "batch_size": s.batch_size, "seed": seed, "device": device,
                  "precision": s.precision, "log_every_steps": 10},
        "eval": {"sets": eval_sets, "every_tokens": eval_every, "tokens": s.eval_tokens},
        "stages": stages,
    })


def base_run(scale: str | Scale = "tiny", seed: int = 0, device: str = "auto") -> Run:
    """The D0 base model: pre-trained on en-man with warmup + cosine. Shared by every continual run."""
    s = get_scale(scale)
    stage = {"name": "pretrain", "data": {D0: 1.0}, "tokens": s.base_tokens, "schedule": lr_schedule(s)}
    cfg = run_config(s, [stage], [D0, *SHIFTS.values()], seed, device, s.eval_every(s.base_tokens))
    return Run("base", "base", cfg, {"role": "base", "seed": seed, "d0": D0, "compute_tokens": s.base_tokens})


def continual_run(experiment: str, name: str, shift: str, scale: str | Scale = "tiny", *,
                  replay: float = 0.0, schedule: dict[str, Any] | None = None, data: str | None = None,
                  seed: int = 0, device: str = "auto", tokens: int | None = None,
                  labels: dict[str, Any] | None = None) -> Run:
    """Continue the base model on D1 of ``shift`` (or on ``data``) for B1 tokens with re-warming and
    re-decaying (``schedule``) and ``replay`` compute-equivalent replay of D0."""
    s = get_scale(scale)
    base = base_run(s, seed, device)
    d1 = data or SHIFTS[shift]
    n_tokens = tokens or s.new_tokens
    stage = {"name": "continue", "data": {d1: 1.0}, "tokens": n_tokens,
             "schedule": schedule or lr_schedule(s), "init_from": base.ref("pretrain")}
    if replay > 0:
        stage["replay"] = {"source": D0, "fraction": replay}
    cfg = run_config(s, [stage], [D0, d1], seed, device, s.eval_every(n_tokens))
    spec = stage["schedule"]
    run_labels = {"role": "continual", "shift": shift, "d0": D0, "d1": d1, "replay": replay, "seed": seed,
                  "schedule": spec["kind"], "max_lr": spec["max_lr"], "warmup": spec.get("warmup", 0.0),
                  "switch_tokens": s.base_tokens, "compute_tokens": s.base_tokens + n_tokens}
    run_labels.update(labels or {})
    return Run(experiment, name, cfg, run_labels, [base])


def continue_imported(run: Run, settings: dict[str, Any]) -> Run:
    """Continual ``run`` started from an imported model (``cptlab import``) instead of the scale's base:
    ``settings`` holds the import's ``model`` and ``tokenizer`` sections and its ``init_from`` reference
    (``interop.pretrained.base_settings``). Its D0 corpus stands in for the model's pretraining data
    (label ``d0_stand_in``); the lab trained none of the model's tokens (``switch_tokens`` 0)."""
    data = run.config.to_dict()
    data["model"], data["tokenizer"] = settings["model"], settings["tokenizer"]
    data["stages"][0]["init_from"] = settings["init_from"]
    ref = settings["init_from"]
    tokens = sum(st["tokens"] for st in data["stages"])
    labels = {**run.labels, "base": f"{ref['experiment']}/{ref['run']}", "d0_stand_in": True,
              "switch_tokens": 0, "compute_tokens": tokens}
    return Run(run.experiment, f"{run.name}-from-{ref['run'].rsplit('-', 1)[0]}", RunConfig.from_dict(data),
               labels, [])


def union_run(shift: str, scale: str | Scale = "tiny", seed: int = 0, device: str = "auto",
              tokens: int | None = None) -> Run:
    """From scratch on D0 ∪ D1 with one warmup + cosine, mixing the two in proportion to B0 and B1."""
    s = get_scale(scale)
    d1 = SHIFTS[shift]
    new = s.new_tokens if tokens is None else tokens - s.base_tokens
    total = s.base_tokens + new
    stage = {"name": "union", "data": {D0: s.base_tokens / total, d1: new / total}, "tokens": total,
             "schedule": lr_schedule(s)}
    cfg = run_config(s, [stage], [D0, d1], seed, device, s.eval_every(total))
    return Run("union", f"union-{shift}" + (f"-{total}" if tokens else ""), cfg,
               {"role": "union", "shift": shift, "d0": D0, "d1": d1, "seed": seed, "compute_tokens": total})


# -- the experiments -----------------------------------------------------------------------------

def replay_sweep(shift: str, scale: str | Scale = "tiny", seeds: tuple[int, ...] | None = None,
                 device: str = "auto") -> list[Run]:
    """Table 2: 0/1/5/10/25/50% compute-equivalent replay, plus the union baseline (per seed)."""
    s = get_scale(scale)
    runs = []
    for seed in seeds or s.seeds:
        for frac in REPLAY_FRACTIONS:
            runs.append(continual_run("replay", f"{shift}-replay{frac:g}", shift, s, replay=frac, seed=seed,
                                      device=device))
        runs.append(union_run(shift, s, seed, device))
    return runs


def warmup_ablation(shift: str = "weak", scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Figure 2: re-warming over 0, 0.5, 1 and 2% of the continual stage (no replay)."""
    s = get_scale(scale)
    runs = []
    for w in WARMUPS:  # the scale's own warmup is the replay sweep's 0% run: shared, not trained twice
        shared = w == s.warmup
        experiment, name = ("replay", f"{shift}-replay0") if shared else ("warmup", f"{shift}-warmup{w:g}")
        runs.append(continual_run(experiment, name, shift, s, schedule=lr_schedule(s, warmup=w),
                                  device=device, labels={"variant": f"warmup {w:.1%}"}))
    return runs


def max_lr_ablation(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Figure 3 / the max-LR table: constant LR at min (no re-warming), re-warming without re-decaying,
    and re-warming + re-decaying at 0.5x, 1x and 2x the max LR (no replay)."""
    s = get_scale(scale)
    runs = [continual_run("max_lr", f"{shift}-constant-min", shift, s,
                          schedule=lr_schedule(s, "constant", s.min_lr, warmup=0.0), device=device,
                          labels={"variant": "constant at min LR"}),
            continual_run("max_lr", f"{shift}-rewarm-constant", shift, s,
                          schedule=lr_schedule(s, "constant"), device=device,
                          labels={"variant": "re-warm, no re-decay"})]
    for f in LR_FACTORS:  # 1x is the replay sweep's 0% run
        experiment, name = ("replay", f"{shift}-replay0") if f == 1.0 else ("max_lr", f"{shift}-maxlr{f:g}x")
        runs.append(continual_run(experiment, name, shift, s,
                                  schedule=lr_schedule(s, max_lr=s.max_lr * f), device=device,
                                  labels={"variant": f"re-warm + re-decay, max {s.max_lr * f:g}"}))
    return runs


def rewarm_same_data(scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Figure 5: re-warming on D0 itself (new D0 tokens) at 1x and 2x max LR, and a constant-LR control."""
    s = get_scale(scale)
    runs = [continual_run("d0_rewarm", "d0-constant-min", "same", s, data=D0, device=device,
                          schedule=lr_schedule(s, "constant", s.min_lr, warmup=0.0),
                          labels={"variant": "constant at min LR"})]
    for f in (1.0, 2.0):
        runs.append(continual_run("d0_rewarm", f"d0-maxlr{f:g}x", "same", s, data=D0, device=device,
                                  schedule=lr_schedule(s, max_lr=s.max_lr * f),
                                  labels={"variant": f"re-warm to {s.max_lr * f:g}"}))
    return runs


def infinite_schedules(scale: str | Scale = "tiny", device: str = "auto", data: str | None = None,
                       anneal: float = paper.ANNEAL) -> list[Run]:
    """Figure 7: from scratch over 3 consecutive chunks of ``data`` (default: the weak shift's new data, as
    the paper splits SlimPajama; each chunk new tokens of the same corpus). Repeated cosine re-warms and
    re-decays per chunk; infinite cosine / inverse-sqrt warm up and cool down once then stay at their
    constant LR across chunks; WSD stays at max. The infinite schedules and WSD get a model at the end of
    each chunk by annealing: a branch run from the constant phase's checkpoint over the chunk's last
    ``anneal`` fraction of tokens."""
    s = get_scale(scale)
    data = data or SHIFTS["weak"]
    n = s.chunk_tokens
    k_tokens = max(s.seq_len * s.batch_size, int(n * anneal))
    runs = []
    for kind in paper.CHUNK_SCHEDULES:
        cfg = run_config(s, _chunk_stages(s, kind, data, k_tokens), [data, D0], 0, device, s.eval_every(n))
        labels = {"role": "infinite", "schedule": kind, "d0": D0, "d1": data, "switch_tokens": [n, 2 * n],
                  "compute_tokens": 3 * n}
        main = Run("infinite", f"sched-{kind}", cfg, labels)
        runs.append(main)
        if kind != "cosine":
            runs += [_anneal_run(s, main, c, data, k_tokens, device) for c in (1, 2, 3)]
    return runs


def _chunk_stages(s: Scale, kind: str, data: str, k_tokens: int) -> list[dict[str, Any]]:
    """The stages of ``kind``'s run over 3 chunks: one per chunk for repeated cosine; a head and a tail of
    ``k_tokens`` per chunk for the others (their annealing branches replace a tail to get a model)."""
    n = s.chunk_tokens
    stages = []
    for c in range(1, 4):
        first = c == 1
        if kind == "cosine":
            spec = lr_schedule(s)
        elif kind == "wsd":
            spec = lr_schedule(s, "wsd", warmup=s.warmup if first else 0.0, decay=0.0)
        else:
            spec = lr_schedule(s, kind, warmup=s.warmup if first else 0.0,
                               cooldown=paper.COOLDOWN if first else 0.0, anneal=0.0)
        if kind == "cosine":
            parts = [(f"chunk{c}", n, spec)]
        else:
            head = n - k_tokens  # warmup and cooldown were fractions of the chunk: rescale to the head
            head_spec = dict(spec, warmup=spec["warmup"] * n / head)
            if kind != "wsd":
                head_spec["cooldown"] = spec["cooldown"] * n / head
            tail_spec = dict(spec, warmup=0.0, **({} if kind == "wsd" else {"cooldown": 0.0}))
            parts = [(f"chunk{c}", head, head_spec), (f"chunk{c}-tail", k_tokens, tail_spec)]
        stages += [{"name": name, "data": {data: 1.0}, "tokens": tokens, "schedule": sched,
                    "reset_optimizer": kind == "cosine"} for name, tokens, sched in parts]
    return stages


def _anneal_run(s: Scale, main: Run, chunk: int, data: str, k_tokens: int, device: str) -> Run:
    """From ``main``'s constant phase at the end of chunk ``chunk``'s head, anneal over its last
    ``k_tokens`` tokens (the model of an infinite schedule or WSD at that chunk's end)."""
    kind = main.labels["schedule"]
    if kind == "wsd":
        spec = {"kind": "wsd", "max_lr": s.max_lr, "min_lr": s.min_lr, "warmup": 0.0, "decay": 1.0}
    else:
        spec = lr_schedule(s, kind, warmup=0.0, cooldown=0.0, anneal=1.0)
    stage = {"name": "anneal", "data": {data: 1.0}, "tokens": k_tokens, "schedule": spec,
             "init_from": main.ref(f"chunk{chunk}"), "reset_optimizer": False}
    cfg = run_config(s, [stage], [data, D0], 0, device, k_tokens)
    labels = {"role": "anneal", "schedule": kind, "chunk": chunk, "d0": D0, "d1": data,
              "compute_tokens": chunk * s.chunk_tokens}
    return Run("infinite", f"anneal-{kind}-chunk{chunk}", cfg, labels, [main])


def compute_vs_loss(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Figure 1: continual + chosen replay (B0 + B1 tokens in all, B0 of them shared with every other
    continual run) against union baselines from scratch at the same compute and at the scale's
    ``union_factors`` times it."""
    s = get_scale(scale)
    frac = CHOSEN_REPLAY[shift]
    runs = [continual_run("replay", f"{shift}-replay{frac:g}", shift, s, replay=frac, device=device),
            continual_run("replay", f"{shift}-replay0", shift, s, device=device)]
    total = s.base_tokens + s.new_tokens
    for factor in (1.0, *s.union_factors):
        tokens = int(total * factor) // (s.seq_len * s.batch_size) * s.seq_len * s.batch_size
        runs.append(union_run(shift, s, tokens=None if factor == 1.0 else tokens, device=device))
    return runs


def scale_ladder(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """The scale study for one shift: at every rung of ``ladder_scales`` the base model, continual runs
    with 0% and the chosen replay, and the union baseline. The top rung's runs are the replay sweep's."""
    runs = []
    rungs = ladder_scales(scale)
    for rung in rungs:
        top = rung is rungs[-1]
        model = rung.model_config()
        size = {"n_params": GPT.count_params(model, non_embedding=True), "d_model": model.d_model,
                "flops_per_token": GPT.count_flops_per_token(model, rung.seq_len)}
        rung_runs = [base_run(rung, 0, device)]
        for frac in (0.0, CHOSEN_REPLAY[shift]):
            experiment, name = ("replay", f"{shift}-replay{frac:g}") if top else (
                "scales", f"{shift}-replay{frac:g}-d{model.d_model}")
            rung_runs.append(continual_run(experiment, name, shift, rung, replay=frac, device=device))
        rung_runs.append(union_run(shift, rung, 0, device))
        for run in rung_runs:
            run.labels.update(size, rung_base_tokens=rung.base_tokens)
        runs += rung_runs
    return runs
