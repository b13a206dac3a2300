"""The results of a scale's reproduction: every experiment's finished runs loaded from the run store
(``collect_results``), and the tables the findings are judged on and the report shows, each computed once
per ``Results`` (``replay_tables``, ``max_lr_tables``, ``warmup_table``, ``rewarm_table``,
``infinite_table``, ``compute_table``, ``scale_table``).

Tables are built on final losses (``metrics.final_losses``: the mean of a run's last 2 evaluations),
averaged over seeds where several seeds ran; unfinished runs are left out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cptlab.analysis import metrics as M
from cptlab.analysis.runs import load_runs
from cptlab.analysis.sequences import sequence_rows
from cptlab.study import experiments as E
from cptlab.study import modern, paper, sequences
from cptlab.study.scales import Scale, get_scale
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore

MAX_SEEDS = 10  # seeds 0..9 of the base model and replay sweep are picked up where their base model ran
EXPERIMENTS = ("base", "replay", "warmup", "max_lr", "d0_rewarm", "infinite", "compute", "scales", "sequence",
               "modern")


@dataclass
class Results:
    """The evaluation lines of each experiment (finished runs only), keyed by ``EXPERIMENTS``, and the
    training FLOPs per token of the scale's model."""

    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    flops_per_token: float = math.nan
    finished: int = 0  # of the distinct runs the experiments build (for the seeds found)
    expected: int = 0
    scale: Scale | None = None  # the scale judged (the scale study checks that every rung was run)
    sequence: pd.DataFrame = field(default_factory=pd.DataFrame)  # analysis.sequences.sequence_rows
    cache: dict[str, object] = field(default_factory=dict, repr=False)  # tables computed from the frames

    def frame(self, key: str) -> pd.DataFrame:
        df = self.frames.get(key)
        return df if df is not None else pd.DataFrame()

    def cached(self, key: str, make: Callable[[], object]) -> object:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def experiment_runs(scale: str | Scale = "tiny", device: str = "auto",
                    seeds: tuple[int, ...] | None = None) -> dict[str, list[E.Run]]:
    """The runs of every experiment of ``scale`` (as the notebooks build them), keyed by ``EXPERIMENTS``.
    ``seeds``: for the base model and the replay sweep (default: the scale's seeds)."""
    s = get_scale(scale)
    seeds = tuple(seeds) if seeds is not None else s.seeds
    return {key: list(runs) for key, runs in _experiment_runs(s, device, seeds).items()}


@functools.lru_cache(maxsize=8)
def _experiment_runs(s: Scale, device: str, seeds: tuple[int, ...]) -> dict[str, list[E.Run]]:
    shifts = list(paper.SHIFTS)  # building ~100 configs takes a while: cached, the lists are copied out
    return {
        "base": [E.base_run(s, seed, device) for seed in seeds],
        "replay": [r for sh in shifts for r in E.replay_sweep(sh, s, seeds, device)],
        "warmup": E.warmup_ablation("weak", s, device),
        "max_lr": [r for sh in shifts for r in E.max_lr_ablation(sh, s, device)],
        "d0_rewarm": E.rewarm_same_data(s, device),
        "infinite": E.infinite_schedules(s, device),
        "compute": [r for sh in shifts for r in E.compute_vs_loss(sh, s, device)],
        "scales": [r for sh in shifts for r in E.scale_ladder(sh, s, device)],
        "sequence": sequences.sequence_study(s, device),
        "modern": modern.modern_runs(s, device),
    }


def collect_results(scale: str | Scale = "tiny", root: str | Path | RunStore | None = None,
                    device: str = "auto") -> Results:
    """Load the finished runs of every experiment of ``scale`` from the run store ``root`` (default
    ``runs_root()``); seeds 0..9 of the base model and the replay sweep are included where run."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    s = get_scale(scale)
    bases = [E.base_run(s, seed, device) for seed in range(MAX_SEEDS)]
    seeds = sorted(set(s.seeds) | {b.labels["seed"] for b in bases if store.path("base", b.run_id).exists()})
    frames, dirs = {}, {}
    groups = experiment_runs(s, device, tuple(seeds))
    for key, runs in groups.items():
        dirs.update({store.path(r.experiment, r.run_id): r for r in runs})
        runs = [r for r in runs if store.run(r.experiment, r.run_id).metrics_path.exists()]
        df = load_runs(runs, store)
        frames[key] = df[df["done"]].reset_index(drop=True) if len(df) else df
    finished = sum(RunDir(d).done for d in dirs)
    base = E.base_run(s, 0, device)  # the model's shape: as the base run resolved it, else as built
    base_dir = store.run(base.experiment, base.run_id)
    cfg = (base_dir.load_config() if base_dir.config_path.exists()
           else base.config.resolve(vocab_size=base.config.tokenizer.vocab_size))
    flops = GPT.count_flops_per_token(cfg.model, cfg.train.seq_len)
    return Results(frames, float(flops), finished, len(dirs), s, sequence_rows(groups["sequence"], store))


def finals_of(res: Results, key: str) -> pd.DataFrame:
    """Final losses of an experiment's runs and of the base model(s), with forgetting."""
    return res.cached(f"finals/{key}", lambda: _make_finals(res, key))


def _make_finals(res: Results, key: str) -> pd.DataFrame:
    parts = [M.final_losses(res.frame(k)) for k in (key, "base") if not res.frame(k).empty]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    return M.add_forgetting(pd.concat(parts, ignore_index=True))


def replay_tables(res: Results) -> dict[str, pd.DataFrame]:
    """``metrics.replay_table`` per shift."""
    finals = finals_of(res, "replay")
    return res.cached("replay", lambda: {shift: M.replay_table(finals, shift) for shift in paper.SHIFTS})


def max_lr_tables(res: Results) -> dict[str, pd.DataFrame]:
    """``metrics.max_lr_table`` per shift."""
    finals = finals_of(res, "max_lr")
    return res.cached("max_lr", lambda: {shift: M.max_lr_table(finals, shift) for shift in paper.SHIFTS})


def warmup_table(res: Results) -> pd.DataFrame:
    """Final D0, D1, avg, forgetting and the D0 rise after the switch per warmup length (weak shift)."""
    finals = finals_of(res, "warmup")
    cols = ["D0", "D1", "avg", "forgetting", "D0 rise", "n_seeds"]
    table = pd.DataFrame(math.nan, index=[f"{w:.1%}" for w in paper.WARMUPS], columns=cols)
    table.index.name = "warmup"
    if finals.empty or "warmup" not in finals.columns:
        return table
    means = M.seed_means(finals[finals["role"] == "continual"])
    rises = M.peak_rise(res.frame("warmup"), on="d0")
    for w in paper.WARMUPS:
        found = means[means["warmup"].sub(w).abs() < 1e-12]
        if len(found):
            row = found.iloc[0]
            table.loc[f"{w:.1%}", cols[:4]] = [row["D0"], row["D1"], row["avg"], row["forgetting"]]
            table.loc[f"{w:.1%}", "n_seeds"] = row["n_seeds"]
            if len(rises):
                table.loc[f"{w:.1%}", "D0 rise"] = rises[rises["name"] == row["name"]]["rise"].mean()
    table["n_seeds"] = table["n_seeds"].fillna(0).astype(int)
    return table


def rewarm_table(res: Results) -> pd.DataFrame:
    """D0 loss at the start, at its peak and at the end of re-warming on D0 itself (and, for contrast,
    when switching to the weak shift's D1), with the paper's rise."""
    df = res.frame("d0_rewarm")
    base = res.frame("base")
    fallback = None
    if len(base):  # for runs without a starting evaluation: the base model's last one
        last = base.sort_values("step").groupby("run_id").tail(1)
        fallback = float(last[f"val_{paper.D0}"].mean()) if f"val_{paper.D0}" in last.columns else None
    same, switch = paper.D0_REWARM_RISE["same data"], paper.D0_REWARM_RISE["switch to D1 (weak)"]
    rows = {"D0 -> D0, 1x": ("d0_rewarm", "d0-maxlr1x", same["1x"]),
            "D0 -> D0, 2x": ("d0_rewarm", "d0-maxlr2x", same["2x"]),
            "D0 -> D0, constant at min": ("d0_rewarm", "d0-constant-min", math.nan),
            "D0 -> D1 weak, 1x": ("max_lr", "weak-replay0", switch["1x"]),
            "D0 -> D1 weak, 2x": ("max_lr", "weak-maxlr2x", switch["2x"])}
    cols = ["start", "peak", "rise", "last", "rise paper"]
    table = pd.DataFrame(math.nan, index=list(rows), columns=cols)
    table["peak is last"] = False
    table.index.name = "run"
    rises = {k: M.peak_rise(f, on="d0", start=fallback) for k, f in (("d0_rewarm", df),
                                                                      ("max_lr", res.frame("max_lr")))}
    for label, (key, name, published) in rows.items():
        table.loc[label, "rise paper"] = published
        r = rises[key]
        found = r[r["name"] == name] if len(r) else r
        if len(found):
            table.loc[label, cols[:4]] = [found[c].mean() for c in cols[:4]]
            table.loc[label, "peak is last"] = bool(found["peak_is_last"].any())
    return table


def infinite_table(res: Results) -> pd.DataFrame:
    """Loss on the chunks' data at the end of each chunk: repeated cosine (its last evaluation in the
    chunk) and each infinite schedule annealed from its constant phase (the annealing branch's one
    evaluation at its end: so both are read at the same point, k = 1); and the largest jump of the loss
    across a chunk boundary of the un-annealed run."""
    df = res.frame("infinite")
    cols = ["chunk 1", "chunk 2", "chunk 3", "max jump at boundaries"]
    table = pd.DataFrame(math.nan, index=list(paper.CHUNK_SCHEDULES), columns=cols)
    table.index.name = "schedule"
    if df.empty:
        return table
    mains = df[df["role"] == "infinite"]
    for c in (1, 2, 3):
        cosine = mains[mains["schedule"] == "cosine"]
        ends = M.final_losses(cosine, k=1, stage=f"chunk{c}") if len(cosine) else pd.DataFrame()
        if len(ends):
            table.loc["cosine", f"chunk {c}"] = ends["D1"].mean()
    anneals = df[df["role"] == "anneal"]
    finals = M.final_losses(anneals, k=1) if len(anneals) else pd.DataFrame()
    for _, row in finals.iterrows():
        table.loc[row["schedule"], f"chunk {int(row['chunk'])}"] = row["D1"]
    jumps = M.boundary_jumps(mains, on="d1")
    for kind in paper.CHUNK_SCHEDULES:
        found = jumps[jumps["schedule"] == kind] if len(jumps) else jumps
        if len(found) >= 2:  # both boundaries were seen
            table.loc[kind, "max jump at boundaries"] = found["jump"].max()
    return table


def compute_table(res: Results, shift: str) -> pd.DataFrame:
    """Average final loss against compute for continual + chosen replay, continual without replay and
    the union baselines at 1x compute and at the scale's ``union_factors`` times it; compute in tokens
    and FLOPs, total and new (beyond the shared D0 base model)."""
    finals = finals_of(res, "compute")
    cols = ["avg", "compute_tokens", "new_tokens", "compute_flops", "new_flops"]
    if finals.empty:
        return pd.DataFrame(columns=cols)
    finals = M.add_compute(finals[finals["role"] != "base"], res.flops_per_token)
    finals = finals[finals["shift"] == shift] if "shift" in finals.columns else finals.iloc[:0]
    if finals.empty:
        return pd.DataFrame(columns=cols)
    means = M.seed_means(finals, ("D0", "D1", "avg", "new_tokens", "compute_flops", "new_flops"))
    rows = {}
    chosen = paper.CHOSEN_REPLAY[shift]
    for _, row in means.sort_values(["role", "compute_tokens"]).iterrows():
        if row["role"] == "union":
            label = f"union {row['compute_tokens']:,.0f} tokens"
        else:
            label = f"continual, {M.replay_label(float(row['replay']))} replay"
            if abs(float(row["replay"]) - chosen) < 1e-12:
                label += " (chosen)"
        rows[label] = {c: row[c] for c in ("role", "replay", *cols) if c in row.index}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    return table


def scale_table(res: Results, shift: str) -> pd.DataFrame:
    """``metrics.scale_table`` of the scale study's runs for one shift."""
    df = res.frame("scales")
    return res.cached(f"scales/{shift}", lambda: M.scale_table(M.final_losses(df) if len(df) else df, shift))
