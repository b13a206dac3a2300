"""Beyond the paper: continual pre-training through a sequence of datasets, and the baselines replay is
measured against.

The sequence is D0 -> the weak shift's data -> the strong shift's (en-man -> en-docs -> de-man): the base
model (B0 tokens of D0) is shared with the paper's experiments, then every method continues through the
other datasets, ``stage_tokens`` (B1 / 4) each, evaluating all three datasets at every stage end (the rows
of the forgetting matrix, ``cptlab.analysis.sequences``). The methods:

- ``none``: re-warm and re-decay a cosine per dataset, nothing else (also "repeated cosine");
- ``replay``: ``SEQUENCE_REPLAY`` of every stage's sequences replayed from all earlier datasets, equally;
- ``ewc`` / ``lwf`` at each weight of ``EWC_WEIGHTS`` / ``LWF_WEIGHTS`` (``cptlab.training.regularizers``);
  EWC protects every earlier dataset (its Fisher is estimated on all of them);
- ``infinite``: from scratch, one infinite cosine schedule through the sequence (warm up and cool down
  during D0, then constant), with a model at each dataset's end annealed over its last ``ANNEAL`` tokens
  by a branch run, as the paper's chunks (same tokens as repeated cosine);
- ``union``: from scratch on all datasets mixed in proportion to their tokens, one cosine: the oracle
  that sees everything at once, at the same compute.
"""

from __future__ import annotations

from typing import Any

from cptlab.study import paper
from cptlab.study.experiments import Run, base_run, lr_schedule, run_config
from cptlab.study.paper import D0, SHIFTS
from cptlab.study.scales import Scale, get_scale

SEQUENCE = (D0, SHIFTS["weak"], SHIFTS["strong"])  # en-man -> en-docs -> de-man
SEQUENCE_REPLAY = 0.25  # the strong shift's chosen replay, split equally over every earlier dataset
EWC_WEIGHTS = (1e2, 1e3)  # chosen by a one-stage probe at tiny (docs/design-notes.md)
LWF_WEIGHTS = (0.3, 3.0)  # likewise
INFINITE_KIND = "infinite_cosine"


def stage_tokens(s: Scale) -> int:
    """Tokens of each continual stage of the sequence: B1 / 4, in whole batches (at tiny, 0.5M: the study
    then fits in `make reproduce`'s 20 minutes; at 1M, the first try, it would not)."""
    step = s.seq_len * s.batch_size
    return max(step, s.new_tokens // 4 // step * step)


def sequence_run(method: str, scale: str | Scale = "tiny", *, weight: float | None = None,
                 device: str = "auto") -> Run:
    """The base model continued through the rest of ``SEQUENCE`` with ``method`` (``none``, ``replay``,
    ``ewc`` or ``lwf``; ``weight``: the regularizer's)."""
    s = get_scale(scale)
    base = base_run(s, 0, device)
    n = stage_tokens(s)
    stages: list[dict[str, Any]] = []
    for i, name in enumerate(SEQUENCE[1:], start=1):
        stage = {"name": name, "data": {name: 1.0}, "tokens": n, "schedule": lr_schedule(s)}
        if i == 1:
            stage["init_from"] = base.ref("pretrain")
        earlier = {d: 1.0 for d in SEQUENCE[:i]}
        if method == "replay":
            stage["replay"] = {"source": earlier, "fraction": SEQUENCE_REPLAY}
        elif method == "ewc":
            stage["regularizer"] = {"kind": "ewc", "weight": weight, "data": earlier}
        elif method == "lwf":
            stage["regularizer"] = {"kind": "lwf", "weight": weight}
        elif method != "none":
            raise ValueError(f"method: unknown method {method!r}; allowed: none, replay, ewc, lwf")
        stages.append(stage)
    cfg = run_config(s, stages, list(SEQUENCE), 0, device, s.eval_every(n))
    suffix = f"-w{weight:g}" if weight is not None else ""
    labels = _labels(method, weight, s, stage_ends={"pretrain": D0, **{d: d for d in SEQUENCE[1:]}})
    return Run("sequence", f"seq-{method}{suffix}", cfg, labels, [base])


def union_run(scale: str | Scale = "tiny", device: str = "auto") -> Run:
    """From scratch on every dataset of the sequence at once, in proportion to their tokens, one cosine."""
    s = get_scale(scale)
    n = stage_tokens(s)
    total = s.base_tokens + n * (len(SEQUENCE) - 1)
    data = {D0: s.base_tokens / total, **{d: n / total for d in SEQUENCE[1:]}}
    stage = {"name": "union", "data": data, "tokens": total, "schedule": lr_schedule(s)}
    cfg = run_config(s, [stage], list(SEQUENCE), 0, device, s.eval_every(total))
    return Run("sequence", "seq-union", cfg, _labels("union", None, s, stage_ends={"union": SEQUENCE[-1]}))


def infinite_runs(scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """One infinite cosine schedule from scratch through the sequence, and a branch per dataset that anneals
    over the last ``paper.ANNEAL`` of its tokens (the model at that dataset's end)."""
    s = get_scale(scale)
    step = s.seq_len * s.batch_size
    chunks = [(D0, s.base_tokens), *((d, stage_tokens(s)) for d in SEQUENCE[1:])]
    stages, tails = [], {}
    for c, (name, tokens) in enumerate(chunks):
        k = max(step, round(tokens * paper.ANNEAL / step) * step)
        head = tokens - k
        first = c == 0  # warm up and cool down in the first dataset's head, then constant
        spec = lr_schedule(s, INFINITE_KIND, warmup=s.warmup * tokens / head if first else 0.0,
                           cooldown=paper.COOLDOWN * tokens / head if first else 0.0, anneal=0.0)
        constant = dict(spec, warmup=0.0, cooldown=0.0)
        stages += [{"name": name, "data": {name: 1.0}, "tokens": head, "schedule": spec,
                    "reset_optimizer": False},
                   {"name": f"{name}-tail", "data": {name: 1.0}, "tokens": k, "schedule": constant,
                    "reset_optimizer": False}]
        tails[name] = k
    cfg = run_config(s, stages, list(SEQUENCE), 0, device, s.eval_every(stage_tokens(s)))
    main = Run("sequence", "seq-infinite", cfg, _labels("infinite", None, s, stage_ends={}))
    runs = [main]
    for name, k in tails.items():
        spec = lr_schedule(s, INFINITE_KIND, warmup=0.0, cooldown=0.0, anneal=1.0)
        stage = {"name": f"{name}-anneal", "data": {name: 1.0}, "tokens": k, "schedule": spec,
                 "init_from": main.ref(name), "reset_optimizer": False}
        branch_cfg = run_config(s, [stage], list(SEQUENCE), 0, device, k)
        labels = _labels("infinite", None, s, stage_ends={f"{name}-anneal": name})
        runs.append(Run("sequence", f"seq-infinite-anneal-{name}", branch_cfg, labels, [main]))
    return runs


def sequence_study(scale: str | Scale = "tiny", device: str = "auto") -> list[Run]:
    """Every run of the sequence study (the base model they start from included)."""
    s = get_scale(scale)
    runs = [base_run(s, 0, device)]
    runs += [sequence_run(m, s, device=device) for m in ("none", "replay")]
    runs += [sequence_run("ewc", s, weight=w, device=device) for w in EWC_WEIGHTS]
    runs += [sequence_run("lwf", s, weight=w, device=device) for w in LWF_WEIGHTS]
    return runs + infinite_runs(s, device) + [union_run(s, device)]


def _labels(method: str, weight: float | None, s: Scale, stage_ends: dict[str, str]) -> dict[str, Any]:
    """What a sequence run is: its method (and weight), the datasets in order, and which of its stages
    ends which dataset (``stage_ends``: stage -> dataset; a stage not named is not a row of the matrix)."""
    variant = method if weight is None else f"{method} {weight:g}"
    n = stage_tokens(s)
    return {"role": "sequence", "method": method, "variant": variant, "weight": weight,
            "datasets": list(SEQUENCE), "stage_ends": stage_ends,
            "switch_tokens": [s.base_tokens + i * n for i in range(len(SEQUENCE) - 1)],
            "compute_tokens": s.base_tokens + n * (len(SEQUENCE) - 1)}
