"""The forgetting matrix of a sequence of datasets, its summaries, and the questions the report asks of it.

For a method trained through datasets 1..T, ``L[i, j]`` is the validation loss on dataset j of the model at
the end of dataset i (rows: after each dataset; columns: every dataset). From it:

- forgetting of dataset j < T: ``L[T, j] - L[j, j]``, its loss now minus its loss right after it was
  learned (Chaudhry et al. 2018 take the maximum over earlier rows; with losses that fall as a dataset is
  learned, the diagonal is that best point);
- backward transfer (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", with loss in place of accuracy
  and the sign kept so that negative means forgetting): ``BWT = mean_{j<T} (L[j, j] - L[T, j])``;
- forward transfer (the same paper): ``FWT = mean_{j>1} (L0_j - L[j-1, j])``, what the earlier datasets
  did for dataset j before it was seen, against ``L0_j = ln(vocab size)``, the loss of the uniform
  prediction that a freshly initialised model starts at;
- the average loss over all datasets at the end, ``mean_j L[T, j]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cptlab.analysis.runs import eval_frame
from cptlab.config import RunConfig
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore

ROW_COLUMNS = ("variant", "method", "weight", "after", "position", "flops", "vocab_size")  # and val_<set>


def sequence_rows(runs: list, root: str | Path | RunStore | None = None) -> pd.DataFrame:
    """One row per (method variant, dataset end) of the sequence runs among ``runs``
    (``cptlab.study.experiments.Run`` labelled ``role: sequence``): ``variant``, ``method``, ``weight``,
    ``after`` (the dataset just learned), ``position`` (its index in the sequence), a ``val_<set>``
    column per dataset, ``flops`` (training FLOPs of the model, regularizers' extra passes included) and
    ``vocab_size`` (the model's, for forward transfer's reference).
    Finished runs only; a stage end that another run trained (a continual run's base model) is read from
    that run."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    frames: dict[Path, pd.DataFrame] = {}  # each run's evaluation lines, read once (the base serves many)
    rows = []
    for run in runs:
        labels = run.labels
        if labels.get("role") != "sequence" or not store.is_done(run.experiment, run.run_id):
            continue
        own = store.run(run.experiment, run.run_id)
        cfg = own.load_config() if own.config_path.exists() else run.config.resolve(
            vocab_size=run.config.tokenizer.vocab_size)
        cost = {"flops": _flops(own, cfg, labels["compute_tokens"]), "vocab_size": cfg.model.vocab_size}
        for stage, dataset in labels["stage_ends"].items():
            source = run if stage in [st.name for st in run.config.stages] else run.needs[0]
            path = store.path(source.experiment, source.run_id)
            frame = frames[path] if path in frames else frames.setdefault(path, eval_frame(path, {}))
            if not len(frame) or not (frame["stage"] == stage).any():
                continue
            end = frame[frame["stage"] == stage].iloc[-1]
            row = {"variant": labels["variant"], "method": labels["method"], "weight": labels["weight"],
                   "after": dataset, "position": labels["datasets"].index(dataset)}
            row.update({c: end[c] for c in frame.columns if c.startswith("val_")})
            rows.append({**row, **cost})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=ROW_COLUMNS)  # none finished: no row


def _flops(run: RunDir, cfg: RunConfig, compute_tokens: int) -> float:
    """Training FLOPs of the method's final model (``cfg``: its resolved config): its tokens at 6N +
    attention per token, plus the extra passes of a regularizer (``extra_flops`` of the run's last training
    line)."""
    extra = [r["extra_flops"] for r in run.read_metrics() if "extra_flops" in r]
    per_token = GPT.count_flops_per_token(cfg.model, cfg.train.seq_len)
    return float(compute_tokens * per_token + (extra[-1] if extra else 0))


def forgetting_matrix(rows: pd.DataFrame, variant: str, datasets: list[str]) -> pd.DataFrame:
    """``L[i, j]``: rows "after <dataset i>" in sequence order, columns the datasets (NaN where the
    variant has no model at that dataset's end, e.g. the union's earlier rows)."""
    mine = rows[rows["variant"] == variant].sort_values("position")
    matrix = pd.DataFrame(np.nan, index=[f"after {d}" for d in datasets], columns=datasets)
    for _, row in mine.iterrows():
        for d in datasets:
            matrix.loc[f"after {row['after']}", d] = row.get(f"val_{d}", np.nan)
    matrix.index.name = "model"
    return matrix


def summarize(matrix: pd.DataFrame, vocab_size: int) -> dict[str, float]:
    """Forgetting per earlier dataset, BWT, FWT and the final average loss of a forgetting matrix (see the
    module docstring; NaN where the matrix lacks the rows they need)."""
    L = matrix.to_numpy(dtype=float)
    T = L.shape[0]
    datasets = list(matrix.columns)
    out = {f"forgetting {d}": L[T - 1, j] - L[j, j] for j, d in enumerate(datasets[:-1])}
    out["BWT"] = float(np.mean([L[j, j] - L[T - 1, j] for j in range(T - 1)]))
    out["FWT"] = float(np.mean([math.log(vocab_size) - L[j - 1, j] for j in range(1, T)]))
    out["average loss"] = float(np.mean(L[T - 1]))
    return out


def summary_table(rows: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """One row per variant: the final loss on each dataset, the summaries, and the training FLOPs."""
    table = {}
    if not len(rows):
        return pd.DataFrame()
    vocab_size = int(rows["vocab_size"].iloc[0])
    for variant in rows["variant"].unique():
        matrix = forgetting_matrix(rows, variant, datasets)
        final = {f"final {d}": matrix.iloc[-1][d] for d in datasets}
        flops = rows.loc[rows["variant"] == variant, "flops"].max()
        table[variant] = {**final, **summarize(matrix, vocab_size), "FLOPs": flops}
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index.name = "method"
    return out


# -- the questions of the report's "Beyond the paper" -------------------------------------------------------

INFINITE_TOLERANCE = 0.02  # the infinite schedule's final average loss within 2% of repeated cosine's
UNION_TOLERANCE = 0.03  # replay within 3% of the union, as the paper's replay-vs-union comparison


@dataclass(frozen=True)
class Question:
    """A question about the sequence study, answered by ``judge`` from the summary table: (yes / no /
    None when a method it needs was not run, what was measured)."""

    number: str
    text: str
    judge: Callable[[pd.DataFrame], tuple[bool | None, str]]


def _has(table: pd.DataFrame, *variants: str) -> bool:
    return all(v in table.index for v in variants)


def _replay_forgets_less(table: pd.DataFrame) -> tuple[bool | None, str]:
    if not _has(table, "none", "replay"):
        return None, "needs none and replay"
    cols = [c for c in table.columns if c.startswith("forgetting ")]
    pairs = [(c.split(" ", 1)[1], table.loc["replay", c], table.loc["none", c]) for c in cols]
    text = "; ".join(f"{d}: {r:+.3f} vs {n:+.3f}" for d, r, n in pairs)
    return all(r < n for _, r, n in pairs), text


def _best_reaches_replay(method: str) -> Callable[[pd.DataFrame], tuple[bool | None, str]]:
    def judge(table: pd.DataFrame) -> tuple[bool | None, str]:
        mine = [v for v in table.index if v.split(" ")[0] == method]
        if not mine or "replay" not in table.index:
            return None, f"needs {method} and replay"
        best = min(mine, key=lambda v: table.loc[v, "average loss"])
        ours, replay = table.loc[best, "average loss"], table.loc["replay", "average loss"]
        ratio = table.loc[best, "FLOPs"] / table.loc["replay", "FLOPs"]
        tried = ", ".join(v.split(" ", 1)[1] for v in mine)
        text = f"best {best}: {ours:.3f} vs replay {replay:.3f} ({ratio:.2f}x its FLOPs; weights: {tried})"
        return bool(ours <= replay), text
    return judge


def _infinite_close(table: pd.DataFrame) -> tuple[bool | None, str]:
    if not _has(table, "none", "infinite"):
        return None, "needs none (repeated cosine) and infinite"
    inf, cos = table.loc["infinite", "average loss"], table.loc["none", "average loss"]
    gap = inf / cos - 1
    return bool(gap <= INFINITE_TOLERANCE), f"{inf:.3f} vs repeated cosine {cos:.3f} ({gap:+.2%})"


def _replay_near_union(table: pd.DataFrame) -> tuple[bool | None, str]:
    if not _has(table, "replay", "union"):
        return None, "needs replay and union"
    rep, union = table.loc["replay", "average loss"], table.loc["union", "average loss"]
    gap = rep / union - 1
    return bool(gap <= UNION_TOLERANCE), f"{rep:.3f} vs union {union:.3f} ({gap:+.2%})"


QUESTIONS = [
    Question("S1", "Does replay from all earlier datasets keep every column's forgetting below no-replay's?",
             _replay_forgets_less),
    Question("S2", "Does EWC at its best weight reach replay's average final loss (at its own, larger, "
             "compute)?", _best_reaches_replay("ewc")),
    Question("S3", "Does LwF at its best weight reach replay's average final loss (at its own, larger, "
             "compute)?", _best_reaches_replay("lwf")),
    Question("S4", f"Does the infinite schedule end the sequence within {INFINITE_TOLERANCE:.0%} of repeated "
             "cosine (average loss over the datasets)?", _infinite_close),
    Question("S5", f"Does continual + replay end within {UNION_TOLERANCE:.0%} of the union of all datasets "
             "trained from scratch at the same compute?", _replay_near_union),
]


def answer_all(table: pd.DataFrame) -> list[tuple[Question, bool | None, str]]:
    """Every question with its answer and what was measured."""
    return [(q, *q.judge(table)) for q in QUESTIONS]
