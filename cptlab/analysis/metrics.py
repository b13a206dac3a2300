"""Metrics on evaluation lines: final losses, forgetting, adaptation, compute, seed means and final-loss
tables shaped like the paper's, next to the paper's own numbers.

Every function is pure: it takes the DataFrames of ``cptlab.analysis.runs.load_runs`` /
``load_experiment`` (one row per evaluation line: step, tokens, stage, lr, ``val_<set>`` columns and the
run's labels) or the tables built from them, and returns new DataFrames. Nothing here reads or writes files.

Final loss (``final_losses``). The paper averages the last 100 iterations. Our runs evaluate about 10
times per stage (every 10% of it, ``Scale.evals_per_stage``), so a run's final loss on an eval set is the
mean of its last ``k = 2`` evaluations in its last stage. Under a cosine those lie in the stage's last
10%, where the LR is within 2.5% of (max - min) from min and the model barely moves: two measurements of
nearly the same end point, whose mean halves the variance of the eval-to-eval jitter (DESIGN.md: 0.05-0.1
between evaluations at max LR). Every run of a comparison has the same evaluation cadence, so the small
upward bias of the earlier evaluation is shared. A run that starts from another run's checkpoint
(roles ``continual`` and ``anneal``) logs one evaluation before its first step, of the model it starts
from; that line is never part of its final loss (``start_rows``).

Compute. Training FLOPs per token are the model's own (``GPT.count_flops_per_token``, the 6N convention).
Replayed tokens cost the same as new ones; evaluation is not counted. A run's compute is its
``compute_tokens`` label (for a continual run: the D0 base model's tokens plus its own), its ``new_tokens``
what it costs beyond the shared base model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd

from cptlab.study import paper

K_FINAL = 2
STARTS_FROM_CHECKPOINT = ("continual", "anneal")
METRIC_COLUMNS = ("step", "tokens", "stage", "lr")
REPLAY_ROWS = ("0%", "1%", "5%", "10%", "25%", "50%", "union", "base")
TABLE_COLUMNS = ("D0", "D1", "avg", "forgetting")

# -- final losses ------------------------------------------------------------------------------------------

def val_sets(df: pd.DataFrame) -> list[str]:
    """The eval set names of ``df`` (from its ``val_<set>`` columns)."""
    return [c[4:] for c in df.columns if c.startswith("val_")]


def start_rows(df: pd.DataFrame) -> pd.Series:
    """True on each run's starting evaluation: the first line of a run whose role starts from another
    run's checkpoint (``STARTS_FROM_CHECKPOINT``), logged before its first step."""
    is_start = pd.Series(False, index=df.index)
    if "role" not in df.columns or df.empty:
        return is_start
    firsts = df.sort_values("step", kind="stable").groupby("run_id", sort=False).head(1)
    is_start[firsts.index[firsts["role"].isin(STARTS_FROM_CHECKPOINT)]] = True
    return is_start


def _label_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in METRIC_COLUMNS and not c.startswith("val_")]


def _set_losses(table: pd.DataFrame, label: str) -> pd.Series:
    """Per row of ``table``, its ``val_<set>`` for the set named in its ``label`` column (NaN if none)."""
    values = pd.Series(math.nan, index=table.index)
    if label in table.columns:
        for name in table[label].dropna().unique():
            if f"val_{name}" in table.columns:
                rows = table[label] == name
                values[rows] = table.loc[rows, f"val_{name}"]
    return values


def final_losses(df: pd.DataFrame, k: int = K_FINAL, stage: str | None = None,
                 finished_only: bool = True) -> pd.DataFrame:
    """One row per run: its labels, the final loss per eval set (``val_<set>``: mean of the last ``k``
    evaluations of its last stage, or of ``stage``; start evaluations excluded), ``D0`` and ``D1`` (the
    final losses on the run's ``d0`` / ``d1`` sets), ``avg`` (mean of D0 and D1, the paper's "Avg"),
    ``tokens`` (of its last evaluation), ``stage`` and ``n_evals`` (how many evaluations were averaged).
    Runs without an evaluation in that stage are left out, and so are unfinished runs (``done`` False:
    stopped by a deadline, say; their last losses are not final) unless ``finished_only`` is False."""
    empty = pd.DataFrame(columns=["run_id", "D0", "D1", "avg", "n_evals"])
    if finished_only and "done" in df.columns:
        df = df[df["done"].astype(bool)]
    if df.empty:
        return empty
    evals = df[~start_rows(df)].sort_values("step", kind="stable")
    last_stage = evals.groupby("run_id", sort=False)["stage"].transform("last")
    in_stage = evals[evals["stage"] == (last_stage if stage is None else stage)]
    last = in_stage.groupby("run_id", sort=False).tail(k)
    if last.empty:
        return empty
    runs = last.groupby("run_id", sort=False)
    labels = [c for c in _label_columns(df) if c != "run_id"]
    out = runs.head(1).set_index("run_id")[labels]
    out["stage"] = runs["stage"].last()
    out["tokens"] = runs["tokens"].last()
    out["n_evals"] = runs.size()
    out = out.join(runs[[f"val_{s}" for s in val_sets(df)]].mean())
    out["D0"] = _set_losses(out, "d0")
    out["D1"] = _set_losses(out, "d1")
    out["avg"] = (out["D0"] + out["D1"]) / 2
    return out.reset_index()


def start_losses(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run that has a starting evaluation: run_id and ``val_<set>`` of the model it started
    from (for a continual run: the D0 base model)."""
    starts = df[start_rows(df)]
    return starts[["run_id", *[c for c in starts.columns if c.startswith("val_")]]].reset_index(drop=True)


# -- forgetting, adaptation, compute ------------------------------------------------------------------------

def add_forgetting(finals: pd.DataFrame, base: pd.DataFrame | None = None) -> pd.DataFrame:
    """A copy of ``finals`` with ``base_D0`` (the D0 base model's final loss on the run's D0 set) and
    ``forgetting`` = D0 - base_D0. ``base``: final losses of the base model(s); default: the rows of
    ``finals`` with role ``base``. The base of the same seed is used where it exists, else the mean of
    all bases."""
    out = finals.copy()
    if base is None:
        base = finals[finals["role"] == "base"] if "role" in finals.columns else finals.iloc[:0]
    base_d0 = pd.Series(math.nan, index=out.index)
    if len(base) and "d0" in out.columns:
        for name in out["d0"].dropna().unique():
            col = f"val_{name}"
            if col not in base.columns:
                continue
            rows = out["d0"] == name
            by_seed = base.groupby("seed")[col].mean() if "seed" in base.columns else pd.Series(dtype=float)
            seeds = out["seed"] if "seed" in out.columns else pd.Series(math.nan, index=out.index)
            base_d0[rows] = seeds[rows].map(by_seed).fillna(base[col].mean())
    out["base_D0"] = base_d0
    out["forgetting"] = out["D0"] - out["base_D0"] if len(out) else []
    return out


def add_adaptation(finals: pd.DataFrame, union: pd.DataFrame | None = None) -> pd.DataFrame:
    """A copy of ``finals`` with ``adaptation`` (= D1, the final loss on the new data), ``union_D1`` (the
    union baseline's final D1 loss for the run's shift) and ``d1_gap_to_union`` = D1 - union_D1. Among
    union baselines of several sizes the one with the run's compute is used, else the smallest; the one
    of the same seed where it exists, else their mean. ``union``: default the rows of ``finals`` with
    role ``union``."""
    out = finals.copy()
    if union is None:
        union = finals[finals["role"] == "union"] if "role" in finals.columns else finals.iloc[:0]
    union_d1 = []
    for _, row in out.iterrows():
        refs = union[union["shift"] == row.get("shift")] if len(union) and "shift" in union.columns else union
        if len(refs) and "compute_tokens" in refs.columns:
            same = refs[refs["compute_tokens"] == row.get("compute_tokens")]
            refs = same if len(same) else refs[refs["compute_tokens"] == refs["compute_tokens"].min()]
        if len(refs) and "seed" in refs.columns and not pd.isna(row.get("seed")):
            same = refs[refs["seed"] == row.get("seed")]  # the same seed's union where it exists
            refs = same if len(same) else refs
        union_d1.append(float(refs["D1"].mean()) if len(refs) else math.nan)
    out["adaptation"] = out["D1"] if len(out) else []
    out["union_D1"] = union_d1
    out["d1_gap_to_union"] = out["D1"] - out["union_D1"] if len(out) else []
    return out


def add_compute(finals: pd.DataFrame, flops_per_tok: float) -> pd.DataFrame:
    """A copy of ``finals`` with ``new_tokens`` (compute_tokens minus the shared base model's
    ``switch_tokens`` for continual runs, else compute_tokens), ``compute_flops`` and ``new_flops``
    (tokens x ``flops_per_tok``)."""
    out = finals.copy()
    total = out["compute_tokens"].astype(float) if "compute_tokens" in out.columns else math.nan
    shared = pd.Series(0.0, index=out.index)
    if "switch_tokens" in out.columns and "role" in out.columns:
        for i, row in out.iterrows():
            switch = row["switch_tokens"]
            if row["role"] == "continual" and isinstance(switch, numbers.Real) and not pd.isna(switch):
                shared[i] = float(row["switch_tokens"])
    out["new_tokens"] = total - shared
    out["compute_flops"] = total * flops_per_tok
    out["new_flops"] = out["new_tokens"] * flops_per_tok
    return out


# -- seeds ---------------------------------------------------------------------------------------------------

def seed_means(finals: pd.DataFrame, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per run name (per experiment): runs that differ only in their seed are averaged. Each of
    ``columns`` (default: D0, D1, avg, forgetting, d1_gap_to_union and every ``val_<set>`` present) gets
    its mean, ``<col>_std`` (sample std over seeds; NaN for one seed) and ``n_seeds``; other labels are
    taken from the first seed."""
    if finals.empty:
        return finals.copy()
    if columns is None:
        wanted = ("D0", "D1", "avg", "forgetting", "d1_gap_to_union", "new_tokens", "compute_flops")
        columns = tuple(c for c in finals.columns if c in wanted or c.startswith("val_"))
    keys = [c for c in ("experiment", "name") if c in finals.columns] or ["run_id"]
    values = finals[list(columns)].astype(float).assign(**{k: finals[k] for k in keys})
    groups = values.groupby(keys, sort=False)
    first = finals.groupby(keys, sort=False).head(1).set_index(keys)
    out = first.drop(columns=[*columns, "run_id", "seed"], errors="ignore")
    out = out.join(groups.mean()).join(groups.std(ddof=1).add_suffix("_std"))
    out["n_seeds"] = groups.size()
    return out.reset_index()


# -- tables shaped like the paper's --------------------------------------------------------------------------

def replay_label(fraction: float) -> str:
    """``0.05`` -> ``"5%"`` (the replay table's row names)."""
    return f"{fraction * 100:g}%"


def _table_row(row: pd.Series | None, d1: str | None = None) -> dict[str, float]:
    out = {c: math.nan for c in TABLE_COLUMNS}
    out.update({f"{c}_std": math.nan for c in ("D0", "D1", "avg")})
    out["n_seeds"] = 0
    if row is None:
        return out
    for c in TABLE_COLUMNS:
        out[c] = float(row.get(c, math.nan))
    for c in ("D0", "D1", "avg"):
        out[f"{c}_std"] = float(row.get(f"{c}_std", math.nan))
    out["n_seeds"] = int(row.get("n_seeds", 1))
    if d1 is not None:  # the base model has no D1 of its own: its loss on this shift's D1 set
        out["D1"] = float(row.get(f"val_{d1}", math.nan))
        out["avg"] = (out["D0"] + out["D1"]) / 2
        out["D1_std"] = float(row.get(f"val_{d1}_std", math.nan))
    return out


def _with_columns(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``df`` with each of ``columns`` it lacks added as NaN (tables are built from whatever ran)."""
    df = df.copy()
    for c in columns:
        if c not in df.columns:
            df[c] = math.nan
    return df


def replay_table(finals: pd.DataFrame, shift: str) -> pd.DataFrame:
    """The paper's replay table for ``shift`` from the final losses of a replay sweep and the base model
    (any seeds): rows 0/1/5/10/25/50% replay, union, base; columns D0, D1, avg, forgetting (D0 minus the
    base model's D0), their ``_std`` over seeds and ``n_seeds``. A row whose run is missing is NaN."""
    has = finals
    if len(has) and "forgetting" not in has.columns:
        has = add_forgetting(has)
    means = _with_columns(seed_means(has), ("role", "shift", "replay", "d1", "compute_tokens"))

    def pick(mask: pd.Series) -> pd.Series | None:
        found = means[mask]
        return found.iloc[0] if len(found) else None

    continual = (means["role"] == "continual") & (means["shift"] == shift)
    fractions = means["replay"].map(lambda r: "" if pd.isna(r) else replay_label(float(r)))
    rows = {label: _table_row(pick(continual & (fractions == label))) for label in REPLAY_ROWS[:6]}
    unions = means[(means["role"] == "union") & (means["shift"] == shift)].sort_values("compute_tokens")
    rows["union"] = _table_row(unions.iloc[0] if len(unions) else None)
    d1s = means[(means["shift"] == shift) & means["d1"].notna()]["d1"]
    base = pick(means["role"] == "base")
    rows["base"] = _table_row(base, d1=d1s.iloc[0] if len(d1s) else paper.SHIFTS.get(shift))
    if base is not None:
        rows["base"]["forgetting"] = 0.0
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "replay"
    return table


def paper_replay_table(shift: str) -> pd.DataFrame:
    """The paper's replay table for ``shift`` (405M; PAPER.md) in ``replay_table``'s shape; rows the
    paper does not give are NaN."""
    rows = {}
    published = paper.REPLAY_TABLES[shift]
    for label in REPLAY_ROWS:
        d0, d1, avg = published.get(label, (math.nan, math.nan, math.nan))
        rows[label] = {"D0": d0, "D1": d1, "avg": avg, "forgetting": d0 - paper.BASE_D0}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "replay"
    return table


MAX_LR_NAMES = {"constant at min": "{shift}-constant-min", "re-warm, no re-decay": "{shift}-rewarm-constant",
                "0.5x": "{shift}-maxlr0.5x", "1x": "{shift}-replay0", "2x": "{shift}-maxlr2x"}


def max_lr_table(finals: pd.DataFrame, shift: str) -> pd.DataFrame:
    """The max-LR table for ``shift`` from the final losses of ``experiments.max_lr_ablation`` (run names
    as built there; ``1x`` is the replay sweep's 0% run): rows constant at min, re-warm without re-decay,
    re-warm + re-decay at 0.5x / 1x / 2x max LR; columns D0, D1, avg, forgetting (NaN without a base),
    ``_std`` and ``n_seeds``."""
    has = finals
    if len(has) and "forgetting" not in has.columns:
        has = add_forgetting(has)
    means = _with_columns(seed_means(has), ("name",))
    rows = {}
    for label, pattern in MAX_LR_NAMES.items():
        found = means[means["name"] == pattern.format(shift=shift)]
        rows[label] = _table_row(found.iloc[0] if len(found) else None)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "schedule"
    return table


def paper_max_lr_table(shift: str) -> pd.DataFrame:
    """The paper's max-LR table for ``shift`` in ``max_lr_table``'s shape (no replay; avg and forgetting
    derived from the paper's D0 and D1)."""
    rows = {}
    for label in paper.MAX_LR_ROWS:
        d0, d1 = paper.MAX_LR_TABLES[shift].get(label, (math.nan, math.nan))
        rows[label] = {"D0": d0, "D1": d1, "avg": (d0 + d1) / 2, "forgetting": d0 - paper.BASE_D0}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "schedule"
    return table


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame,
                 columns: tuple[str, ...] = ("D0", "D1", "avg", "forgetting")) -> pd.DataFrame:
    """``ours`` and ``paper`` (same row names) interleaved: ``D0``, ``D0 paper``, ``D1``, ``D1 paper``..."""
    out = pd.DataFrame(index=ours.index)
    for c in columns:
        out[c] = ours[c] if c in ours.columns else math.nan
        out[f"{c} paper"] = paper[c].reindex(ours.index) if c in paper.columns else math.nan
    return out


# -- curves: transient rises and jumps at dataset switches -------------------------------------------------

def _labels_of(run: pd.DataFrame) -> dict[str, Any]:
    return {c: run[c].iloc[0] for c in ("run_id", "experiment", "name", "role", "shift", "schedule", "max_lr",
                                        "seed") if c in run.columns}


def peak_rise(df: pd.DataFrame, on: str = "d0", start: float | None = None) -> pd.DataFrame:
    """Per run, how far the loss on its ``on`` set (the set named by the ``d0`` or ``d1`` label, or a
    set name) rises above where it started: ``start`` (the run's starting evaluation; the ``start``
    argument where a run has none), ``peak`` (max over the later evaluations), ``rise`` = peak - start,
    ``last`` (the last evaluation) and ``peak_is_last``. Runs without a start value are left out."""
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    is_start = start_rows(df)
    for _, run in df.groupby("run_id", sort=False):
        name = run[on].iloc[0] if on in run.columns else on
        col = f"val_{name}"
        if col not in run.columns:
            continue
        run = run.sort_values("step", kind="stable")
        first = run[is_start[run.index]]
        begin = float(first[col].iloc[0]) if len(first) else start
        after = run[~is_start[run.index]]
        if begin is None or after.empty:
            continue
        peak_at = after[col].idxmax()
        peak = float(after[col].max())
        rows.append({**_labels_of(run), "start": begin, "peak": peak, "rise": peak - begin,
                     "last": float(after[col].iloc[-1]), "peak_tokens": int(after.loc[peak_at, "tokens"]),
                     "peak_is_last": peak_at == after.index[-1]})
    return pd.DataFrame(rows)


def boundary_jumps(df: pd.DataFrame, on: str = "d1") -> pd.DataFrame:
    """Per run and dataset switch (its ``switch_tokens`` label: one number or a list), the loss on its
    ``on`` set at the last evaluation at or before the switch (``before``), at the first one after it
    (``after``) and ``jump`` = after - before (> 0: the loss went up across the switch)."""
    rows = []
    if df.empty or "switch_tokens" not in df.columns:
        return pd.DataFrame(rows)
    for _, run in df.groupby("run_id", sort=False):
        name = run[on].iloc[0] if on in run.columns else on
        col = f"val_{name}"
        switches = run["switch_tokens"].iloc[0]
        if col not in run.columns or switches is None:
            continue
        switches = list(switches) if pd.api.types.is_list_like(switches) else [switches]
        run = run.sort_values("step", kind="stable")
        for b in switches:
            if b is None or pd.isna(b):
                continue
            before, after = run[run["tokens"] <= b], run[run["tokens"] > b]
            if before.empty or after.empty:
                continue
            v0, v1 = float(before[col].iloc[-1]), float(after[col].iloc[0])
            rows.append({**_labels_of(run), "boundary": int(b), "before": v0, "after": v1, "jump": v1 - v0})
    return pd.DataFrame(rows)


# -- the scale study ------------------------------------------------------------------------------------

SCALE_COLUMNS = ["d_model", "base tokens", "base D0", "forgetting 0%", "forgetting chosen", "avg 0%",
                 "avg chosen", "avg union", "gap to union", "flops chosen", "flops union"]


def scale_table(finals: pd.DataFrame, shift: str) -> pd.DataFrame:
    """The scale study (``experiments.scale_ladder``) for one shift, one row per model size (index: its
    non-embedding parameters): the D0 budget, the base model's D0, forgetting (D0 rise over the base of
    the same size) at 0% and at the chosen replay, average final losses of both and of the union
    baseline, the chosen run's gap to the union, and compute in FLOPs: the continual run's own (its new
    tokens) and the union's (all its tokens). ``finals``: ``final_losses`` of the study's runs."""
    if finals.empty or "n_params" not in finals.columns:
        return pd.DataFrame(columns=SCALE_COLUMNS)
    chosen = paper.CHOSEN_REPLAY[shift]
    rows = {}
    for n, group in finals.groupby("n_params"):
        row = dict.fromkeys(SCALE_COLUMNS, math.nan)
        row["d_model"] = float(group["d_model"].iloc[0])
        row["base tokens"] = float(group["rung_base_tokens"].iloc[0])
        per_token = float(group["flops_per_token"].iloc[0])
        base = group[group["role"] == "base"]
        if len(base):
            row["base D0"] = float(base[f"val_{paper.D0}"].mean())
        mine = group[group["shift"] == shift] if "shift" in group.columns else group.iloc[:0]
        # no "replay" column when no continual run has finished (base models and unions only)
        continual = mine[mine["role"] == "continual"] if "replay" in mine.columns else mine.iloc[:0]
        for frac, label in ((0.0, "0%"), (chosen, "chosen")):
            found = continual[continual["replay"].sub(frac).abs() < 1e-12] if len(continual) else continual
            if len(found):
                row[f"forgetting {label}"] = float(found["D0"].mean()) - row["base D0"]
                row[f"avg {label}"] = float(found["avg"].mean())
                if label == "chosen":
                    new = found["compute_tokens"] - found["switch_tokens"]
                    row["flops chosen"] = float(new.mean()) * per_token
        union = mine[mine["role"] == "union"]
        if len(union):
            row["avg union"] = float(union["avg"].mean())
            row["flops union"] = float(union["compute_tokens"].mean()) * per_token
        row["gap to union"] = row["avg chosen"] / row["avg union"] - 1
        rows[int(n)] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=SCALE_COLUMNS).sort_index()
    table.index.name = "non-embedding params"
    return table
