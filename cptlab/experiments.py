"""The paper's experiments as functions that build runs, at a chosen scale.

Every builder returns a list of ``Run`` (a name, a RunConfig and labels that say what the run is). The
same configuration always gets the same directory, ``<root>/<experiment>/<name>-<config hash>/``, so
identical runs are shared across experiments and notebooks, finished runs are reused and unfinished
ones resumed (see ``cptlab.runner``). Continual runs start from the base model's checkpoint
(``init_from``), which makes the base run a dependency that the runner trains first.

How the scales were chosen (DESIGN.md, "A measured starting point for tiny", then the probes below):
- ``smoke``: the smallest model and budgets that exercise every code path in seconds; no science.
- ``tiny``: 2 layers x 4 heads x 48 dims (57k non-embedding parameters, 155k in all), BPE vocab 1024,
  sequences of 128, batches of 32, max LR 2e-3 (min 2e-4) with ablations at 1e-3 and 4e-3, B0 = 3M
  tokens of D0 for the base model, B1 = 2M tokens per continual stage (B1 / B0 = 2/3, the paper's strong
  shift; its weak shift has 1), infinite-schedule chunks of 1M tokens. The paper's model is heavily
  over-trained (405M parameters, 300B tokens): its union baseline is no better on D0 than the D0-only
  model (Pile 2.17 both, weak; 2.26 vs 2.17, strong), so continual + replay can match it. A model far from
  saturation is in another regime: with DESIGN.md's 4 x 128 (or 3 x 128, vocab 2048) at B0 = 2-4M the union
  trained D0 0.06-0.17 below the base model on the same D0 tokens (its longer schedule and the new data
  keep improving an unsaturated model), and continual + chosen replay stayed 4-10% above the union at
  every budget, width (64-128), max LR and B1 / B0 we tried (``scripts/probe_union_gap.py``). At 32-48
  dims the model saturates within B0: the union's D0 loss is the base model's (+-0.06), as in the paper.
  Width trades two findings: at 32 dims the union gap was +2.0% weak / +1.7% strong but the weak shift's
  forgetting did not grow with the max LR (D0 +0.002 from 0.5x to 2x, the rule asks > 0.02); at 48 dims
  (this scale) the probe gave +2.6% / +2.0% and +0.022. Max LR: at 3e-3 the 32-dim probe's strong gap was
  +2.8% (+2.0% at 2e-3). One training step runs at ~85k tokens/s on one core (``benchmarks/throughput.py
  --n-layer 2 --d-model 48 --vocab-size 1024 --threads 1 --no-reference``), so the whole reproduction fits
  the 20-minute budget. Evaluation: 8 times a stage on 32k tokens per set.
- ``small``: 8 layers x 512 dims on one GPU, vocab 8192, B0 = 5M, B1 = 3.3M, chunks of 1.6M tokens, max
  LR 1e-3. The shipped corpora bound it: at vocab 8192 en-man holds 1.24M training tokens, so B0 = 5M is 4
  epochs. Its first design (B0 = 32M, 26 epochs) was run on an H200 (``scripts/gpu_small.py``, 16 of its
  60 runs in 466 s at ~870k tokens/s over 3 processes): the base model overfit, its D0 validation loss
  bottomed at 3.67 after 6.4M tokens and rose to 6.11 by 32M, so new data lowered D0 loss (weak shift
  -0.73 at 0% replay) and the union rows compared overfit models. This design ran 34 of its 60 runs in
  246 s on an H200: replay, the strong shift and re-warming on D0 reproduce, the union rows do not (+5.2%
  weak, +5.9% strong): at these budgets a model this wide is far from saturation, as tiny's wider models
  were. A GPU scale that reproduces the paper needs corpora larger than the shipped ones.

The shifts: D0 is en-man. Strong: de-man (same domain, other language). Weak: en-docs, half Python
documentation and half manual pages of other programs than en-man's. DESIGN.md's weak shift was en-pydoc
alone; at tiny it forgot like the paper's strong shift (D0 +1.25 at 0% replay against the paper's +0.27
weak and +1.39 strong), and so did C-library man pages alone (+1.18): neither is weak. The paper's
SlimPajama shares kinds of sources with the Pile (web, books, arXiv, code) and adds others, and en-docs
does the same with en-man: at this scale it forgets +0.17 at 0% replay (paper weak +0.27).

The scale study (``scale_ladder``) trains smaller models of the same shape: the scale's ``ladder`` of
widths, the widest rung being the scale's own model (its runs are the replay sweep's and the union's).
Token budgets scale as (N / N_scale) ** ``ladder_token_power`` in non-embedding parameters N. ``tiny``
uses the paper's rule, one budget for every size (its 405M and 10B models both saw 300B tokens), on rungs
~2x apart (d_model 24, 32, 48: 14.5k, 25.5k, 56.6k non-embedding parameters): with sqrt(N) budgets a
d16 rung saw 1.5M tokens, too few to saturate, and training on en-docs lowered its D0 loss (-0.21), which
says nothing about forgetting. ``small`` climbs 4x apart with sqrt(N) budgets (a tokens-per-parameter rule
would give its smallest rung a few dozen steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptlab.config import RunConfig

D0 = "en-man"
SHIFTS = {"weak": "en-docs", "strong": "de-man"}
CHOSEN_REPLAY = {"weak": 0.05, "strong": 0.25}  # the paper's choice per shift
REPLAY_FRACTIONS = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50)
WARMUPS = (0.0, 0.005, 0.01, 0.02)
LR_FACTORS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Scale:
    """Everything that changes with scale: model, tokenizer, batch, budgets, LRs, evaluation."""

    model: str
    vocab_size: int
    seq_len: int
    batch_size: int
    base_tokens: int  # B0: pre-training on D0
    new_tokens: int  # B1: each continual stage (replay included)
    chunk_tokens: int  # each of the 3 chunks of the infinite-schedule experiment
    max_lr: float
    min_lr: float
    warmup: float = 0.01
    evals_per_stage: int = 10
    eval_tokens: int = 32768
    precision: str = "auto"
    seeds: tuple[int, ...] = (0,)
    union_factors: tuple[float, ...] = (1.5, 2.0)  # extra union baselines at more compute (figure 1)
    model_overrides: tuple[tuple[str, int], ...] = ()  # model fields set over the preset (ladder rungs)
    ladder: tuple[int, ...] = ()  # d_model of the scale study's smaller rungs, smallest first
    ladder_token_power: float = 0.5  # rung budgets scale as (N / N_scale) ** power; 0: one budget for all

    def eval_every(self, stage_tokens: int) -> int:
        return max(self.seq_len * self.batch_size, stage_tokens // self.evals_per_stage)


SCALES: dict[str, Scale] = {
    "smoke": Scale(model="smoke", vocab_size=1024, seq_len=64, batch_size=8, base_tokens=16384,
                   new_tokens=8192, chunk_tokens=4096, max_lr=3e-3, min_lr=3e-4, evals_per_stage=4,
                   eval_tokens=2048, ladder=(16,)),
    "tiny": Scale(model="tiny", vocab_size=1024, seq_len=128, batch_size=32, base_tokens=3_000_000,
                  new_tokens=2_000_000, chunk_tokens=1_000_000, max_lr=2e-3, min_lr=2e-4, evals_per_stage=8,
                  union_factors=(), ladder=(24, 32), ladder_token_power=0.0),
    "small": Scale(model="small", vocab_size=8192, seq_len=256, batch_size=64, base_tokens=5_000_000,
                   new_tokens=3_300_000, chunk_tokens=1_600_000, max_lr=1e-3, min_lr=1e-4,
                   eval_tokens=65536, ladder=(128, 256)),
}


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
        return f"{self.name}-{self.config.hash()}"


def get_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"scale: unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    return SCALES[scale]


def _schedule(s: Scale, kind: str = "cosine", max_lr: float | None = None, **extra: Any) -> dict[str, Any]:
    spec = {"kind": kind, "max_lr": s.max_lr if max_lr is None else max_lr, "min_lr": s.min_lr,
            "warmup": s.warmup}
    spec.update(extra)
    return spec


def _config(s: Scale, stages: list[dict[str, Any]], eval_sets: list[str], seed: int, device: str,
            eval_every: int) -> RunConfig:
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
    stage = {"name": "pretrain", "data": {D0: 1.0}, "tokens": s.base_tokens, "schedule": _schedule(s)}
    cfg = _config(s, [stage], [D0, *SHIFTS.values()], seed, device, s.eval_every(s.base_tokens))
    return Run("base", "base", cfg, {"role": "base", "seed": seed, "d0": D0, "compute_tokens": s.base_tokens})


def _base_checkpoint(base: Run, root: str) -> str:
    return str((Path(root) / base.experiment / base.run_id / "checkpoints" / "stage-pretrain.pt").resolve())


def continual_run(experiment: str, name: str, shift: str, scale: str | Scale = "tiny", *,
                  replay: float = 0.0, schedule: dict[str, Any] | None = None, data: str | None = None,
                  seed: int = 0, device: str = "auto", root: str = "runs", tokens: int | None = None,
                  labels: dict[str, Any] | None = None) -> Run:
    """Continue the base model on D1 of ``shift`` (or on ``data``) for B1 tokens with re-warming and
    re-decaying (``schedule``) and ``replay`` compute-equivalent replay of D0."""
    s = get_scale(scale)
    base = base_run(s, seed, device)
    d1 = data or SHIFTS[shift]
    n_tokens = tokens or s.new_tokens
    stage = {"name": "continue", "data": {d1: 1.0}, "tokens": n_tokens,
             "schedule": schedule or _schedule(s), "init_from": _base_checkpoint(base, root)}
    if replay > 0:
        stage["replay"] = {"source": D0, "fraction": replay}
    cfg = _config(s, [stage], [D0, d1], seed, device, s.eval_every(n_tokens))
    spec = stage["schedule"]
    run_labels = {"role": "continual", "shift": shift, "d0": D0, "d1": d1, "replay": replay, "seed": seed,
                  "schedule": spec["kind"], "max_lr": spec["max_lr"], "warmup": spec.get("warmup", 0.0),
                  "switch_tokens": s.base_tokens, "compute_tokens": s.base_tokens + n_tokens}
    run_labels.update(labels or {})
    return Run(experiment, name, cfg, run_labels, [base])


def union_run(shift: str, scale: str | Scale = "tiny", seed: int = 0, device: str = "auto",
              tokens: int | None = None) -> Run:
    """From scratch on D0 ∪ D1 with one warmup + cosine, mixing the two in proportion to B0 and B1."""
    s = get_scale(scale)
    d1 = SHIFTS[shift]
    new = s.new_tokens if tokens is None else tokens - s.base_tokens
    total = s.base_tokens + new
    stage = {"name": "union", "data": {D0: s.base_tokens / total, d1: new / total}, "tokens": total,
             "schedule": _schedule(s)}
    cfg = _config(s, [stage], [D0, d1], seed, device, s.eval_every(total))
    return Run("union", f"union-{shift}" + (f"-{total}" if tokens else ""), cfg,
               {"role": "union", "shift": shift, "d0": D0, "d1": d1, "seed": seed, "compute_tokens": total})


# -- the experiments -----------------------------------------------------------------------------

def replay_sweep(shift: str, scale: str | Scale = "tiny", seeds: tuple[int, ...] | None = None,
                 device: str = "auto", root: str = "runs") -> list[Run]:
    """Table 2: 0/1/5/10/25/50% compute-equivalent replay, plus the union baseline (per seed)."""
    s = get_scale(scale)
    runs = []
    for seed in seeds or s.seeds:
        for frac in REPLAY_FRACTIONS:
            runs.append(continual_run("replay", f"{shift}-replay{frac:g}", shift, s, replay=frac, seed=seed,
                                      device=device, root=root))
        runs.append(union_run(shift, s, seed, device))
    return runs


def warmup_ablation(shift: str = "weak", scale: str | Scale = "tiny", device: str = "auto",
                    root: str = "runs") -> list[Run]:
    """Figure 2: re-warming over 0, 0.5, 1 and 2% of the continual stage (no replay)."""
    s = get_scale(scale)
    runs = []
    for w in WARMUPS:  # the scale's own warmup is the replay sweep's 0% run: shared, not trained twice
        shared = w == s.warmup
        experiment, name = ("replay", f"{shift}-replay0") if shared else ("warmup", f"{shift}-warmup{w:g}")
        runs.append(continual_run(experiment, name, shift, s, schedule=_schedule(s, warmup=w), device=device,
                                  root=root, labels={"variant": f"warmup {w:.1%}"}))
    return runs


def max_lr_ablation(shift: str, scale: str | Scale = "tiny", device: str = "auto",
                    root: str = "runs") -> list[Run]:
    """Figure 3 / the max-LR table: constant LR at min (no re-warming), re-warming without re-decaying,
    and re-warming + re-decaying at 0.5x, 1x and 2x the max LR (no replay)."""
    s = get_scale(scale)
    runs = [continual_run("max_lr", f"{shift}-constant-min", shift, s,
                          schedule=_schedule(s, "constant", s.min_lr, warmup=0.0), device=device, root=root,
                          labels={"variant": "constant at min LR"}),
            continual_run("max_lr", f"{shift}-rewarm-constant", shift, s,
                          schedule=_schedule(s, "constant"), device=device, root=root,
                          labels={"variant": "re-warm, no re-decay"})]
    for f in LR_FACTORS:  # 1x is the replay sweep's 0% run
        experiment, name = ("replay", f"{shift}-replay0") if f == 1.0 else ("max_lr", f"{shift}-maxlr{f:g}x")
        runs.append(continual_run(experiment, name, shift, s,
                                  schedule=_schedule(s, max_lr=s.max_lr * f), device=device, root=root,
                                  labels={"variant": f"re-warm + re-decay, max {s.max_lr * f:g}"}))
    return runs


def rewarm_same_data(scale: str | Scale = "tiny", device: str = "auto", root: str = "runs") -> list[Run]:
    """Figure 5: re-warming on D0 itself (new D0 tokens) at 1x and 2x max LR, and a constant-LR control."""
    s = get_scale(scale)
    runs = [continual_run("d0_rewarm", "d0-constant-min", "same", s, data=D0, device=device, root=root,
                          schedule=_schedule(s, "constant", s.min_lr, warmup=0.0),
                          labels={"variant": "constant at min LR"})]
    for f in (1.0, 2.0):
        runs.append(continual_run("d0_rewarm", f"d0-maxlr{f:g}x", "same", s, data=D0, device=device,
                                  root=root, schedule=_schedule(s, max_lr=s.max_lr * f),
                                  labels={"variant": f"re-warm to {s.max_lr * f:g}"}))
    return runs


INFINITE_KINDS = ("cosine", "infinite_cosine", "infinite_inv_sqrt", "wsd")


def infinite_schedules(scale: str | Scale = "tiny", device: str = "auto", root: str = "runs",
                       data: str | None = None, anneal: float = 0.1) -> list[Run]:
    """Figure 7: from scratch over 3 consecutive chunks of ``data`` (default: the weak shift's new data, as
    the paper splits SlimPajama; each chunk new tokens of the same corpus). Repeated cosine re-warms and
    re-decays per chunk; infinite cosine / inverse-sqrt warm up and cool down once then stay at
    ``const_lr`` across chunks; WSD stays at max. The infinite schedules and
    WSD get a model at the end of each chunk by annealing (a branch run from the constant phase's
    checkpoint over the chunk's last ``anneal`` fraction of tokens)."""
    s = get_scale(scale)
    data = data or SHIFTS["weak"]
    n = s.chunk_tokens
    runs = []
    const = (s.max_lr + s.min_lr) / 2
    k_tokens = max(s.seq_len * s.batch_size, int(n * anneal))
    for kind in INFINITE_KINDS:
        stages = []
        for c in range(3):
            first = c == 0
            if kind == "cosine":
                spec = _schedule(s)
            elif kind == "wsd":
                spec = _schedule(s, "wsd", warmup=s.warmup if first else 0.0, decay=0.0)
            else:
                spec = _schedule(s, kind, warmup=s.warmup if first else 0.0, const_lr=const,
                                 cooldown=0.6 if first else 0.0, anneal=0.0)
            if kind == "cosine":
                parts = [(f"chunk{c + 1}", n, spec)]
            else:  # split off the chunk's tail: an annealing branch replaces it to get a model
                head = n - k_tokens  # warmup and cooldown were fractions of the chunk: rescale to the head
                head_spec = dict(spec, warmup=spec["warmup"] * n / head)
                if kind != "wsd":
                    head_spec["cooldown"] = spec["cooldown"] * n / head
                tail_spec = dict(spec, warmup=0.0, **({} if kind == "wsd" else {"cooldown": 0.0}))
                parts = [(f"chunk{c + 1}", head, head_spec), (f"chunk{c + 1}-tail", k_tokens, tail_spec)]
            for name, tokens, sched in parts:
                stages.append({"name": name, "data": {data: 1.0}, "tokens": tokens, "schedule": sched,
                               "reset_optimizer": kind == "cosine"})
        cfg = _config(s, stages, [data, D0], 0, device, s.eval_every(n))
        labels = {"role": "infinite", "schedule": kind, "d0": D0, "d1": data, "switch_tokens": [n, 2 * n],
                  "compute_tokens": 3 * n}
        main = Run("infinite", f"sched-{kind}", cfg, labels)
        runs.append(main)
        if kind == "cosine":
            continue
        for c in range(3):  # from the constant phase at (c+1)*n - K, anneal over the chunk's last K tokens
            start_ckpt = str((Path(root) / "infinite" / main.run_id / "checkpoints"
                              / f"stage-chunk{c + 1}.pt").resolve())
            if kind == "wsd":
                spec = {"kind": "wsd", "max_lr": s.max_lr, "min_lr": s.min_lr, "warmup": 0.0, "decay": 1.0}
            else:
                spec = _schedule(s, kind, warmup=0.0, const_lr=const, cooldown=0.0, anneal=1.0)
            stage = {"name": "anneal", "data": {data: 1.0}, "tokens": k_tokens, "schedule": spec,
                     "init_from": start_ckpt, "reset_optimizer": False}
            acfg = _config(s, [stage], [data, D0], 0, device, k_tokens)
            runs.append(Run("infinite", f"anneal-{kind}-chunk{c + 1}", acfg,
                            {"role": "anneal", "schedule": kind, "chunk": c + 1, "d0": D0, "d1": data,
                             "compute_tokens": (c + 1) * n}, [main]))
    return runs


def compute_vs_loss(shift: str, scale: str | Scale = "tiny", device: str = "auto",
                    root: str = "runs") -> list[Run]:
    """Figure 1: continual + chosen replay (B0 + B1 tokens in all, B0 of them shared with every other
    continual run) against union baselines from scratch at the same and at larger compute."""
    s = get_scale(scale)
    frac = CHOSEN_REPLAY[shift]
    runs = [continual_run("replay", f"{shift}-replay{frac:g}", shift, s, replay=frac, device=device,
                          root=root), continual_run("replay", f"{shift}-replay0", shift, s, device=device,
                                                    root=root)]
    total = s.base_tokens + s.new_tokens
    for factor in (1.0, *s.union_factors):
        tokens = int(total * factor) // (s.seq_len * s.batch_size) * s.seq_len * s.batch_size
        runs.append(union_run(shift, s, tokens=None if factor == 1.0 else tokens, device=device))
    return runs


def ladder_scales(scale: str | Scale = "tiny") -> list[Scale]:
    """The rungs of the scale study, smallest first: the scale's ``ladder`` widths (same layers, heads
    of 32 dims or more, at least 2), then the scale itself. Token budgets scale with (N / N_scale) **
    ``ladder_token_power`` in non-embedding parameters N, rounded to whole batches."""
    from cptlab.config import MODEL_PRESETS
    from cptlab.model import GPT

    s = get_scale(scale)
    preset = MODEL_PRESETS[s.model]

    def params(**dims: int) -> int:
        cfg = RunConfig.from_dict({"model": {"preset": s.model, **dims}}).resolve(vocab_size=s.vocab_size)
        return GPT.count_params(cfg.model, non_embedding=True)

    top = params()
    step = s.seq_len * s.batch_size
    rungs = []
    for width in s.ladder:
        dims = {"d_model": width, "n_head": max(2, min(preset["n_head"], width // 32))}
        factor = (params(**dims) / top) ** s.ladder_token_power

        def scaled(n: int, factor: float = factor) -> int:
            return max(step, round(n * factor / step) * step)

        rungs.append(dataclasses.replace(s, model_overrides=tuple(sorted(dims.items())),
                                         base_tokens=scaled(s.base_tokens), new_tokens=scaled(s.new_tokens)))
    return [*rungs, s]


def scale_ladder(shift: str, scale: str | Scale = "tiny", device: str = "auto",
                 root: str = "runs") -> list[Run]:
    """The scale study for one shift: at every rung of ``ladder_scales`` the base model, continual runs
    with 0% and the chosen replay, and the union baseline. The top rung's runs are the replay sweep's."""
    from cptlab.metrics import flops_per_token
    from cptlab.model import GPT

    runs = []
    rungs = ladder_scales(scale)
    for rung in rungs:
        top = rung is rungs[-1]
        base = base_run(rung, 0, device)
        model = base.config.resolve(vocab_size=rung.vocab_size).model
        size = {"n_params": GPT.count_params(model, non_embedding=True), "d_model": model.d_model,
                "flops_per_token": flops_per_token(model, rung.seq_len)}
        rung_runs = [base]
        for frac in (0.0, CHOSEN_REPLAY[shift]):
            experiment, name = ("replay", f"{shift}-replay{frac:g}") if top else (
                "scales", f"{shift}-replay{frac:g}-d{model.d_model}")
            rung_runs.append(continual_run(experiment, name, shift, rung, replay=frac, device=device,
                                           root=root))
        rung_runs.append(union_run(shift, rung, 0, device))
        for run in rung_runs:
            run.labels.update(size, rung_base_tokens=rung.base_tokens)
        runs += rung_runs
    return runs
