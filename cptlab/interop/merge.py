"""``cptlab merge``: the weighted average of runs' checkpoints, written as a run directory of its own, and
the sweep of the interpolation weight between two runs (``interpolation_sweep``), evaluated in memory.

What a merged run directory holds (it loads, evaluates and exports like any run):

    config.json      the first run's resolved config with one stage, ``merge``, that reads no data and
                     trains 0 tokens (``cptlab train`` refuses it), and as eval sets the union of the runs'
    labels.json      role ``merge``; ``sources`` (experiment, run id, stage of each run) and ``weights``;
                     ``lineage``: every run whose training is behind the merged weights, with the tokens it
                     trained; ``compute_tokens``, their sum; d0 / d1 / shift where the runs agree
    checkpoints/stage-merge.pt   the averaged weights
    metrics.jsonl    one evaluation line: step 0 (the merge takes no step), lr 0, stage ``merge``, and
                     ``tokens`` = ``compute_tokens``
    DONE             written last: a merge killed half-way never looks finished, and is redone

Weights are numbers >= 0 that sum to 1 (within ``WEIGHT_TOLERANCE``, for weights written with few
digits, e.g. 0.333 x 3); they are then rescaled to sum to exactly 1, and that is what labels.json records.

Compute. A merge trains nothing, but its weights cost the training of every run behind them. Runs share
ancestors (a continual run and the base model it started from), so the runs are not simply added: each run
of the lineage is counted once, with the tokens it trained itself (its training lines' ``tokens_by_source``)
up to the stage it contributed. A merge of the base model (3M tokens) and a continual run from it (2M more)
costs 5M tokens, as the continual run did; a merge of two runs trained apart costs their sum. The
evaluation line's ``tokens`` is that count, so tables and curves place the merge at the compute it needed.

Losses are the trainer's own (``training.train.evaluate``): the first run's ``train.seq_len``,
``eval.tokens``, precision and evaluation batch, on any device (``auto``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cptlab import data
from cptlab.config import ConfigError, ModelConfig, RunConfig, RunRef, Stage
from cptlab.files import atomic_write_text
from cptlab.interop.evaluate import find_checkpoint, run_tokenizer
from cptlab.schedules import ScheduleConfig
from cptlab.training import runtime
from cptlab.training.model import GPT, average_states
from cptlab.training.rundir import RunDir, RunDirError, load_checkpoint
from cptlab.training.store import RunStore
from cptlab.training.train import evaluate

MERGE_STAGE = "merge"
WEIGHT_TOLERANCE = 1e-3
# What makes two models the same function of the same parameters (dropout does not act at evaluation).
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("preset", "dropout"))
SHARED_LABELS = ("d0", "d1", "shift")

RunArg = str | Path | RunDir


@dataclasses.dataclass
class Source:
    """One run to merge: its directory, resolved config, stage and that stage's checkpoint."""

    run: RunDir
    cfg: RunConfig
    stage: str
    checkpoint: Path

    def ref(self) -> dict[str, str]:
        return {"experiment": self.run.experiment, "run": self.run.run_id, "stage": self.stage}

    def __str__(self) -> str:
        return f"{self.run.path} (stage {self.stage})"


# -- checks ----------------------------------------------------------------------------------------------

def parse_weights(text: str) -> list[float]:
    """``--weights 0.5,0.5`` as numbers (checked by ``check_weights``)."""
    weights = []
    for part in text.split(","):
        try:
            weights.append(float(part))
        except ValueError:
            raise ConfigError(f"--weights: {part.strip()!r} is not a number; give numbers separated by "
                              "commas, e.g. 0.5,0.5") from None
    return weights


def check_weights(weights: Sequence[float], n_runs: int) -> list[float]:
    """One finite weight >= 0 per run, summing to 1 (within ``WEIGHT_TOLERANCE``); rescaled to sum to 1."""
    if len(weights) != n_runs:
        raise ConfigError(f"--weights: {len(weights)} weight(s) for {n_runs} run(s); give one per run")
    for w in weights:
        if not _is_number(w):
            raise ConfigError(f"--weights: {w!r} is not a finite number")
        if w < 0:
            raise ConfigError(f"--weights: {w:g} is negative; weights must be >= 0")
    total = float(sum(weights))
    if abs(total - 1) > WEIGHT_TOLERANCE:
        hint = ",".join(f"{w / total:.4g}" for w in weights) if total > 0 else "0.5,0.5"
        raise ConfigError(f"--weights: must sum to 1, got {total:g} (in these proportions: {hint})")
    return [float(w) / total for w in weights]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _stages(stage: str | Sequence[str | None] | None, n_runs: int) -> list[str | None]:
    """One stage name (or None: the last) per run, from one name for all or a list of one per run."""
    if stage is None or isinstance(stage, str):
        return [stage] * n_runs
    if len(stage) != n_runs:
        raise ConfigError(f"--stage: {len(stage)} stage(s) for {n_runs} run(s); give one for all runs or "
                          "one per run")
    return list(stage)


def sources(runs: Sequence[RunArg], stage: str | Sequence[str | None] | None = None) -> list[Source]:
    """The runs' checkpoints of ``stage`` (default: each run's last), checked to exist and to be of one
    model shape and tokenizer; nothing is loaded."""
    if not runs:
        raise ConfigError("cptlab merge: give at least one run")
    found = []
    for run, name in zip(runs, _stages(stage, len(runs))):
        path, cfg, name = find_checkpoint(run, name)
        found.append(Source(run if isinstance(run, RunDir) else RunDir(run), cfg, name, path))
    check_compatible(found)
    return found


def check_compatible(found: Sequence[Source]) -> None:
    """Refuse runs of different model shapes or tokenizer settings, naming the first field that differs."""
    first = found[0]
    for other in found[1:]:
        pairs = [(f"model.{key}", getattr(first.cfg.model, key), getattr(other.cfg.model, key))
                 for key in SHAPE_FIELDS]
        a, b = first.cfg.tokenizer, other.cfg.tokenizer
        pairs.append(("tokenizer.kind", a.kind, b.kind))
        if a.kind == b.kind == "bpe":
            pairs.append(("tokenizer.vocab_size", a.vocab_size, b.vocab_size))
        for key, mine, theirs in pairs:
            if mine != theirs:
                raise ConfigError(f"{key}: the runs differ ({mine!r} in {first.run.path}, {theirs!r} in "
                                  f"{other.run.path}); only runs of one model shape and tokenizer merge")


def shared_tokenizer(found: Sequence[Source]) -> data.Tokenizer:
    """The runs' tokenizer, checked to hold the same vocabulary in every run (a ``file`` tokenizer may sit
    at different paths)."""
    tokenizers = [run_tokenizer(src.cfg) for src in found]
    for src, tok in zip(found[1:], tokenizers[1:]):
        if tok.fingerprint != tokenizers[0].fingerprint:
            raise ConfigError(f"tokenizer: the runs' vocabularies differ ({found[0].run.path}: "
                              f"{tokenizers[0].fingerprint}, {src.run.path}: {tok.fingerprint})")
    return tokenizers[0]


def merged_config(found: Sequence[Source]) -> RunConfig:
    """The first run's config with one stage that reads no data and trains 0 tokens, evaluating on the
    union of the runs' eval sets (with their corpora, which must agree where two runs name one)."""
    corpora: dict[str, dict[str, Any]] = {}
    owner: dict[str, Source] = {}
    for src in found:
        for name, spec in src.cfg.corpora.items():
            if name in corpora and corpora[name] != spec:
                raise ConfigError(f"corpora.{name}: {owner[name].run.path} and {src.run.path} define it "
                                  "differently; its validation split would be ambiguous")
            corpora.setdefault(name, spec)
            owner.setdefault(name, src)
    sets = list(dict.fromkeys(name for src in found for name in src.cfg.eval.sets))
    first = found[0].cfg
    nothing = ScheduleConfig(kind="constant", max_lr=0.0, min_lr=0.0, warmup=0.0)
    stage = Stage(name=MERGE_STAGE, data={}, tokens=0, schedule=nothing)
    return dataclasses.replace(first, eval=dataclasses.replace(first.eval, sets=sets), corpora=corpora,
                               stages=[stage])


# -- compute ---------------------------------------------------------------------------------------------

def lineage(run: RunDir, stage: str) -> dict[str, int]:
    """Every run whose training is behind ``run``'s weights at the end of ``stage``, as
    ``{"<experiment>/<run id>": tokens it trained}`` (itself included; a merge's is in its labels).
    Ancestors (a stage's ``init_from``) are found in the run store that holds ``run``."""
    labels = run.labels()
    if labels.get("role") == "merge":
        return {k: int(v) for k, v in labels["lineage"].items()}
    if labels.get("role") == "pretrained":  # an import: its pretraining was paid for outside the lab
        return {f"{run.experiment}/{run.run_id}": 0}
    cfg = run.load_config()
    upto = cfg.stages[: [st.name for st in cfg.stages].index(stage) + 1]
    own, counter = _trained(run, {st.name for st in upto})
    out = {f"{run.experiment}/{run.run_id}": own}
    store = RunStore(run.path.parent.parent)
    for i, st in enumerate(upto):
        if st.init_from in ("previous", "scratch"):
            continue
        ref = st.init_from
        found = store.run(ref.experiment, ref.run) if isinstance(ref, RunRef) else None
        if found is not None and found.config_path.exists():
            behind = lineage(found, ref.stage)
        elif i == 0:  # the run's counters continue the checkpoint's: the difference is what it trained
            behind = {f"{ref.experiment}/{ref.run}" if isinstance(ref, RunRef) else ref: counter - own}
        elif Path(str(ref)).absolute() in {run.stage_checkpoint(s.name).absolute() for s in upto}:
            continue
        else:
            raise RunDirError(f"{run.path}: cannot count the compute behind it: stage {st.name!r} starts "
                              f"from {ref}, which is not a run of its store")
        out = {k: max(out.get(k, 0), behind.get(k, 0)) for k in {**out, **behind}}
    return out


def _trained(run: RunDir, stages: set[str]) -> tuple[int, int]:
    """(tokens the run trained itself in ``stages``, its token counter then), from its last training line
    there (it counts every stage so far)."""
    lines = [r for r in run.read_metrics() if "tokens_by_source" in r and r.get("stage") in stages]
    if not lines:
        raise RunDirError(f"{run.metrics_path} has no training line of stage(s) {', '.join(sorted(stages))}; "
                          "cannot count the compute behind the run")
    return int(sum(lines[-1]["tokens_by_source"].values())), int(lines[-1]["tokens"])


def merge_lineage(found: Sequence[Source]) -> dict[str, int]:
    """The runs behind all of ``found``, each counted once (with the most tokens any source saw of it)."""
    out: dict[str, int] = {}
    for src in found:
        for key, tokens in lineage(src.run, src.stage).items():
            out[key] = max(out.get(key, 0), tokens)
    return dict(sorted(out.items()))


# -- averaging and evaluation ----------------------------------------------------------------------------

State = dict[str, torch.Tensor]


def val_sets(cfg: RunConfig, tokenizer: data.Tokenizer, names: Sequence[str], key: str = "eval.sets"
             ) -> dict[str, np.ndarray]:
    """The validation tokens of each corpus in ``names``, read as the trainer reads them; ``key`` names the
    setting in errors."""
    registry = data.Registry(cfg.corpora)
    out = {}
    for name in names:
        if name not in registry:
            raise ConfigError(f"{key}: unknown corpus {name!r}; known corpora: {', '.join(registry.names())}")
        tokens = data.val_tokens(name, tokenizer, registry, cfg.eval.tokens)
        if len(tokens) < cfg.train.seq_len + 1:
            raise ConfigError(f"{key}: {name!r} has {len(tokens)} validation tokens, fewer than one sequence "
                              f"of train.seq_len + 1 = {cfg.train.seq_len + 1}")
        out[name] = tokens
    return out


def evaluate_model(model: GPT, cfg: RunConfig, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """``model``'s loss on each set, as the trainer evaluates (``cfg``'s seq_len, precision, batch)."""
    t = cfg.train
    device = next(model.parameters()).device
    autocast = runtime.autocast_context(device, runtime.pick_precision(t.precision, device))
    return evaluate(model, sets, t.seq_len, t.micro_batch_size or t.batch_size, device, autocast)


def _model(cfg: RunConfig) -> GPT:
    return GPT(cfg.model).to(runtime.pick_device("auto")).eval()


# -- merge -----------------------------------------------------------------------------------------------

def merge_runs(runs: Sequence[RunArg], weights: Sequence[float], out: str | Path,
               stage: str | Sequence[str | None] | None = None) -> dict[str, Any]:
    """Write the run directory ``out`` (see the module docstring) holding the ``weights``-average of the
    runs' checkpoints of ``stage`` (one name for all, or one per run; default: each run's last) and its
    evaluation. Everything is checked before anything is written; ``out`` must be new, empty or this very
    merge (a finished one is reused). Returns out, val ({set: loss}), tokens, sources, weights, reused."""
    weights = check_weights(weights, len(runs))
    found = sources(runs, stage)
    cfg = merged_config(found)
    labels: dict[str, Any] = {"role": "merge", "sources": [src.ref() for src in found], "weights": weights}
    tokenizer = shared_tokenizer(found)
    out_dir = RunDir(out)
    if _check_out(out_dir, labels):
        return _result(out_dir, labels, reused=True)
    sets = val_sets(cfg, tokenizer, cfg.eval.sets)
    behind = merge_lineage(found)
    labels.update(experiment=out_dir.experiment, name=out_dir.run_id, lineage=behind,
                  compute_tokens=sum(behind.values()), **_shared_labels(found))
    out_dir.lock()
    try:
        _check_out(out_dir, labels)  # again, now that no other merge can write here
        state = average_states([load_checkpoint(src.checkpoint)["model"] for src in found], weights)
        model = _model(cfg)
        model.load_state_dict(state)
        write_untrained_run(out_dir, cfg, labels, state, evaluate_model(model, cfg, sets), MERGE_STAGE,
                            labels["compute_tokens"])
    finally:
        out_dir.unlock()
    return _result(out_dir, labels, reused=False)


def _check_out(out_dir: RunDir, labels: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds this very merge, finished. Refuse anything there but this merge (its
    sources and weights): a file, the user's files, another run, another merge."""
    out_dir.check_usable()
    if not (out_dir.config_path.exists() or out_dir.labels_path.exists()):
        return False
    old = out_dir.labels()
    if old.get("role") != "merge":
        raise RunDirError(f"{out_dir.path} holds a run that is not a merge; refusing to overwrite it: give a "
                          "new or empty folder")
    if (old.get("sources"), old.get("weights")) != (labels["sources"], labels["weights"]):
        raise RunDirError(f"{out_dir.path} holds a merge of other runs or weights; refusing to overwrite it: "
                          "give a new or empty folder")
    return out_dir.done


def write_untrained_run(out_dir: RunDir, cfg: RunConfig, labels: dict[str, Any], state: State,
                        val: dict[str, float], stage: str, tokens: int, files: dict[str, str] | None = None
                        ) -> None:
    """A run directory whose one ``stage`` trains nothing (a merge, an import): labels, config, ``files``
    (name -> text, beside config.json), the stage's checkpoint of ``state``, one evaluation line at
    ``tokens``, then DONE: each file atomic, DONE last. The caller holds the directory's lock."""
    out_dir.write_labels(labels)
    out_dir.claim(cfg)
    for name, text in (files or {}).items():
        atomic_write_text(out_dir.path / name, text)
    progress = {"step": 0, "tokens": tokens, "sequences_done": {}}
    out_dir.save_stage_checkpoint({"model": state, "progress": progress, "config_hash": cfg.hash()},
                                  stage, 0)
    out_dir.open_metrics(0)
    try:
        out_dir.log({"step": 0, "tokens": tokens, "stage": stage, "lr": 0.0, "val": val})
        out_dir.metrics_size()  # flushed and synced before DONE says it is there
    finally:
        out_dir.close()
    out_dir.mark_done()


def _result(out_dir: RunDir, labels: dict[str, Any], reused: bool) -> dict[str, Any]:
    line = [r for r in out_dir.read_metrics() if "val" in r][-1]
    return {"out": out_dir.path, "val": line["val"], "tokens": line["tokens"], "sources": labels["sources"],
            "weights": labels["weights"], "reused": reused}


def _shared_labels(found: Sequence[Source]) -> dict[str, Any]:
    """The ``SHARED_LABELS`` on which every run that has them agrees (a base model has no d1)."""
    out = {}
    all_labels = [src.run.labels() for src in found]
    for key in SHARED_LABELS:
        values = [labels[key] for labels in all_labels if key in labels]
        if values and all(v == values[0] for v in values):
            out[key] = values[0]
    return out


# -- interpolation sweep ---------------------------------------------------------------------------------

def interpolation_sweep(run_a: RunArg, run_b: RunArg, alphas: Sequence[float],
                        sets: Sequence[str] | None = None,
                        stages: tuple[str | None, str | None] = (None, None)) -> pd.DataFrame:
    """The loss of ``(1 - alpha) * A + alpha * B`` for each alpha (0 is run A, 1 is run B; values outside
    [0, 1] extrapolate), evaluated in memory, nothing written. One row per alpha: ``alpha`` and a
    ``val_<set>`` column per set of ``sets`` (default: the union of both runs' eval sets). ``attrs`` hold
    ``run_a``, ``run_b`` (names of the endpoints) and the runs' ``d0`` / ``d1`` labels where they exist."""
    for alpha in alphas:
        if not _is_number(alpha):
            raise ConfigError(f"alphas: {alpha!r} is not a finite number")
    found = sources([run_a, run_b], list(stages))
    cfg = merged_config(found)
    tokenizer = shared_tokenizer(found)
    evals = val_sets(cfg, tokenizer, cfg.eval.sets if sets is None else list(sets), "sets")
    states = [load_checkpoint(src.checkpoint)["model"] for src in found]
    model = _model(cfg)
    rows = []
    for alpha in alphas:
        model.load_state_dict(average_states(states, [1 - alpha, alpha]))
        losses = evaluate_model(model, cfg, evals)
        rows.append({"alpha": float(alpha), **{f"val_{name}": loss for name, loss in losses.items()}})
    df = pd.DataFrame(rows, columns=["alpha", *(f"val_{name}" for name in evals)])
    labels = [src.run.labels() for src in found]
    df.attrs = {"run_a": f"{found[0].run.run_id} ({found[0].stage})",
                "run_b": f"{found[1].run.run_id} ({found[1].stage})"}
    for key, order in (("d0", labels), ("d1", labels[::-1])):
        value = next((lab[key] for lab in order if key in lab), None)
        if value is not None and f"val_{value}" in df.columns:
            df.attrs[key] = value
    return df
