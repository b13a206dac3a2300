"""``cptlab report DIR``: judge every finding of PAPER.md on the runs of a scale; write ``DIR/REPORT.md``.

The report has one row per finding: the claim, where the paper shows it, this run's figures (PNGs that
the notebooks saved under DIR, linked relatively), the measured numbers and ``reproduced: yes / no /
not run``, decided by a rule written below (``FINDINGS``). It then gives the final-loss tables next to
the paper's, the rules with their tolerances, and every figure found under DIR.

Rules are judged on final losses (``cptlab.metrics.final_losses``: mean of the last 2 evaluations), on
means over seeds where several seeds were run, and only on finished runs. A rule that lacks a run it
needs says "not run", never "yes". Tolerances (nats of validation loss unless said otherwise):

- ``NOISE_TOL`` = 0.02: a loss that should not rise may rise by this much; one that should clearly drop
  must drop by more. Near the end of a cosine the eval-to-eval jitter is well below the 0.05-0.1 that
  DESIGN.md measured at max LR, and the final loss averages two evaluations.
- ``UNION_TOL`` = 3%: how close (relative, on the average loss) continual + chosen replay must come to
  the union baseline (DESIGN.md measured +1.9% weak / +0.6% strong at tiny with B1 ~ B0).
- ``WARMUP_TOL`` = 0.05: the largest spread of final D0 or D1 over warmup lengths that still counts as
  "hardly changes".
- ``INFINITE_TOL`` = 2%: how much worse (relative) an annealed infinite schedule may end a chunk than
  repeated cosine; ``BOUNDARY_TOL`` = 0.02: the largest rise of the loss across a chunk boundary.
- ``COMPUTE_RATIO`` = 0.6: "about half" the union's compute, for the continual run's own tokens (the
  D0 base model already exists) over the union's.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cptlab import experiments as E
from cptlab import metrics as M
from cptlab.config import atomic_write_text

NOISE_TOL = 0.02
UNION_TOL = 0.03
WARMUP_TOL = 0.05
INFINITE_TOL = 0.02
BOUNDARY_TOL = 0.02
COMPUTE_RATIO = 0.6
MAX_SEEDS = 10  # seeds 0..9 of the base model and replay sweep are picked up where their base model ran

YES, NO, NOT_RUN = "yes", "no", "not run"
PAPER_RISE = M.PAPER_D0_REWARM_RISE
EXPERIMENTS = ("base", "replay", "warmup", "max_lr", "d0_rewarm", "infinite", "compute", "scales")


@dataclass
class Results:
    """The evaluation lines of each experiment (finished runs only), keyed by ``EXPERIMENTS``, and the
    training FLOPs per token of the scale's model."""

    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    flops_per_token: float = math.nan
    finished: int = 0  # of the distinct runs the experiments build (for the seeds found)
    expected: int = 0
    scale: E.Scale | None = None  # the scale judged (the scale study checks that every rung was run)
    cache: dict[str, object] = field(default_factory=dict, repr=False)  # tables computed from the frames

    def frame(self, key: str) -> pd.DataFrame:
        df = self.frames.get(key)
        return df if df is not None else pd.DataFrame()

    def cached(self, key: str, make: Callable[[], object]) -> object:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass
class Verdict:
    status: str  # YES | NO | NOT_RUN
    measured: str = ""


@dataclass
class Finding:
    key: str
    claim: str
    paper: str  # where the paper shows it
    rule: str  # the rule in words, tolerances included
    notebooks: tuple[str, ...]  # notebook names whose figures show it
    keywords: tuple[str, ...]  # figure file names to prefer (substrings)
    judge: Callable[[Results], Verdict]


# -- loading ----------------------------------------------------------------------------------------------

def experiment_runs(scale: str | E.Scale = "tiny", root: str | Path = "runs", device: str = "auto",
                    seeds: tuple[int, ...] | None = None) -> dict[str, list[E.Run]]:
    """The runs of every experiment of ``scale`` (as the notebooks build them), keyed by ``EXPERIMENTS``.
    ``seeds``: for the base model and the replay sweep (default: the scale's seeds)."""
    s = E.get_scale(scale)
    seeds = tuple(seeds) if seeds is not None else s.seeds
    return {key: list(runs) for key, runs in _experiment_runs(s, str(root), device, seeds).items()}


@functools.lru_cache(maxsize=8)
def _experiment_runs(s: E.Scale, root: str, device: str, seeds: tuple[int, ...]) -> dict[str, list[E.Run]]:
    shifts = list(E.SHIFTS)  # building ~100 configs takes a while: cached, the lists are copied out
    return {
        "base": [E.base_run(s, seed, device) for seed in seeds],
        "replay": [r for sh in shifts for r in E.replay_sweep(sh, s, seeds, device, root)],
        "warmup": E.warmup_ablation("weak", s, device, root),
        "max_lr": [r for sh in shifts for r in E.max_lr_ablation(sh, s, device, root)],
        "d0_rewarm": E.rewarm_same_data(s, device, root),
        "infinite": E.infinite_schedules(s, device, root),
        "compute": [r for sh in shifts for r in E.compute_vs_loss(sh, s, device, root)],
        "scales": [r for sh in shifts for r in E.scale_ladder(sh, s, device, root)],
    }


def collect_results(scale: str | E.Scale = "tiny", root: str | Path | None = None,
                    device: str = "auto") -> Results:
    """Load the finished runs of every experiment of ``scale`` from the run store ``root`` (default
    ``store.runs_root()``); seeds 0..9 of the base model and the replay sweep are included where run."""
    from cptlab import store

    root = Path(root).resolve() if root is not None else store.runs_root()
    s = E.get_scale(scale)
    bases = [E.base_run(s, seed, device) for seed in range(MAX_SEEDS)]
    seeds = sorted(set(s.seeds) | {b.labels["seed"] for b in bases if (root / "base" / b.run_id).exists()})
    frames, dirs = {}, {}
    for key, runs in experiment_runs(s, root, device, tuple(seeds)).items():
        dirs.update({root / r.experiment / r.run_id: r for r in runs})
        runs = [r for r in runs if (root / r.experiment / r.run_id / "metrics.jsonl").exists()]
        df = store.load_runs(runs, root)
        frames[key] = df[df["done"]].reset_index(drop=True) if len(df) else df
    finished = sum((d / "DONE").exists() for d in dirs)
    base = E.base_run(s, 0, device)  # the model's shape: as the base run resolved it, else as built
    resolved = root / base.experiment / base.run_id / "config.json"
    cfg = (store.RunDir(resolved.parent).load_config() if resolved.exists()
           else base.config.resolve(vocab_size=base.config.tokenizer.vocab_size))
    return Results(frames, float(M.flops_per_token(cfg.model, cfg.train.seq_len)), finished, len(dirs), s)


# -- helpers ----------------------------------------------------------------------------------------------

def _f(x: float, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _finals(res: Results, key: str) -> pd.DataFrame:
    """Final losses of an experiment's runs and of the base model(s), with forgetting."""
    return res.cached(f"finals/{key}", lambda: _make_finals(res, key))


def _make_finals(res: Results, key: str) -> pd.DataFrame:
    parts = [M.final_losses(res.frame(k)) for k in (key, "base") if not res.frame(k).empty]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    return M.add_forgetting(pd.concat(parts, ignore_index=True))


def _missing(values: dict[str, float]) -> list[str]:
    return [k for k, v in values.items() if v is None or math.isnan(v)]


def _seeds(table: pd.DataFrame) -> str:
    n = int(table["n_seeds"].max()) if "n_seeds" in table.columns and len(table) else 0
    return f" (mean of {n} seeds)" if n > 1 else ""


def _combine(parts: list[tuple[str, str, str]]) -> Verdict:
    """One verdict from per-shift ones: no if any says no, else not run if any lacks runs, else yes."""
    statuses = [status for _, status, _ in parts]
    status = NO if NO in statuses else NOT_RUN if NOT_RUN in statuses else YES
    return Verdict(status, "<br>".join(f"{shift} ({st}): {text}" for shift, st, text in parts))


def _per_shift(judge: Callable[[Results, str], tuple[str, str]]) -> Callable[[Results], Verdict]:
    def run(res: Results) -> Verdict:
        return _combine([(shift, *judge(res, shift)) for shift in E.SHIFTS])
    return run


# -- tables the rules and the report share ----------------------------------------------------------------

def replay_tables(res: Results) -> dict[str, pd.DataFrame]:
    """``metrics.replay_table`` per shift."""
    finals = _finals(res, "replay")
    return res.cached("replay", lambda: {shift: M.replay_table(finals, shift) for shift in E.SHIFTS})


def max_lr_tables(res: Results) -> dict[str, pd.DataFrame]:
    """``metrics.max_lr_table`` per shift."""
    finals = _finals(res, "max_lr")
    return res.cached("max_lr", lambda: {shift: M.max_lr_table(finals, shift) for shift in E.SHIFTS})


def warmup_table(res: Results) -> pd.DataFrame:
    """Final D0, D1, avg, forgetting and the D0 rise after the switch per warmup length (weak shift)."""
    finals = _finals(res, "warmup")
    cols = ["D0", "D1", "avg", "forgetting", "D0 rise", "n_seeds"]
    table = pd.DataFrame(math.nan, index=[f"{w:.1%}" for w in E.WARMUPS], columns=cols)
    table.index.name = "warmup"
    if finals.empty or "warmup" not in finals.columns:
        return table
    means = M.seed_means(finals[finals["role"] == "continual"])
    rises = M.peak_rise(res.frame("warmup"), on="d0")
    for w in E.WARMUPS:
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
        fallback = float(last[f"val_{E.D0}"].mean()) if f"val_{E.D0}" in last.columns else None
    rows = {"D0 -> D0, 1x": ("d0_rewarm", "d0-maxlr1x", PAPER_RISE["same data"]["1x"]),
            "D0 -> D0, 2x": ("d0_rewarm", "d0-maxlr2x", PAPER_RISE["same data"]["2x"]),
            "D0 -> D0, constant at min": ("d0_rewarm", "d0-constant-min", math.nan),
            "D0 -> D1 weak, 1x": ("max_lr", "weak-replay0", PAPER_RISE["switch to D1 (weak)"]["1x"]),
            "D0 -> D1 weak, 2x": ("max_lr", "weak-maxlr2x", PAPER_RISE["switch to D1 (weak)"]["2x"])}
    cols = ["start", "peak", "rise", "last", "rise paper"]
    table = pd.DataFrame(math.nan, index=list(rows), columns=cols)
    table["peak is last"] = False
    table.index.name = "run"
    rises = {k: M.peak_rise(f, on="d0", start=fallback) for k, f in (("d0_rewarm", df),
                                                                      ("max_lr", res.frame("max_lr")))}
    for label, (key, name, paper) in rows.items():
        table.loc[label, "rise paper"] = paper
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
    table = pd.DataFrame(math.nan, index=list(E.INFINITE_KINDS), columns=cols)
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
    for kind in E.INFINITE_KINDS:
        found = jumps[jumps["schedule"] == kind] if len(jumps) else jumps
        if len(found) >= 2:  # both boundaries were seen
            table.loc[kind, "max jump at boundaries"] = found["jump"].max()
    return table


def compute_table(res: Results, shift: str) -> pd.DataFrame:
    """Average final loss against compute for continual + chosen replay, continual without replay and
    the union baselines at 1x / 1.5x / 2x compute; compute in tokens and FLOPs, total and new (beyond the
    shared D0 base model)."""
    finals = _finals(res, "compute")
    cols = ["avg", "compute_tokens", "new_tokens", "compute_flops", "new_flops"]
    if finals.empty:
        return pd.DataFrame(columns=cols)
    finals = M.add_compute(finals[finals["role"] != "base"], res.flops_per_token)
    finals = finals[finals["shift"] == shift] if "shift" in finals.columns else finals.iloc[:0]
    if finals.empty:
        return pd.DataFrame(columns=cols)
    means = M.seed_means(finals, ("D0", "D1", "avg", "new_tokens", "compute_flops", "new_flops"))
    rows = {}
    chosen = E.CHOSEN_REPLAY[shift]
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


def _scale_rows(res: Results, shift: str, cols: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The scale table and what is missing from it (every rung of the ladder, every column in ``cols``)."""
    table = scale_table(res, shift)
    expected = len(E.ladder_scales(res.scale)) if res.scale is not None else 0
    missing = [f"{len(table)} of {expected} model sizes"] if len(table) < expected or table.empty else []
    for col in cols:
        if len(table) and table[col].isna().any():
            missing.append(col)
    return table, missing


def judge_scale_replay(res: Results, shift: str, tol: float = NOISE_TOL) -> tuple[str, str]:
    """Scale study, for one shift: replay reduces forgetting at every size; see ``FINDINGS``."""
    table, missing = _scale_rows(res, shift, ["forgetting 0%", "forgetting chosen"])
    if missing:
        return NOT_RUN, f"missing {', '.join(missing)}"
    ok = ((table["forgetting 0%"] > tol) & (table["forgetting chosen"] < table["forgetting 0%"] - tol)).all()
    text = "; ".join(f"{n:,} params: D0 rise {_f(r['forgetting 0%'], True)} at 0%, "
                     f"{_f(r['forgetting chosen'], True)} at {M.replay_label(E.CHOSEN_REPLAY[shift])}"
                     for n, r in table.iterrows())
    return (YES if ok else NO), text + " (paper: +0.27 -> +0.06 at 405M, +0.23 -> +0.07 at 10B, weak)"


def judge_scale_union(res: Results, shift: str, tol: float = UNION_TOL) -> tuple[str, str]:
    """Scale study, for one shift: continual + chosen replay within ``tol`` of the union at every size."""
    table, missing = _scale_rows(res, shift, ["avg chosen", "avg union"])
    if missing:
        return NOT_RUN, f"missing {', '.join(missing)}"
    text = "; ".join(f"{n:,} params: {r['gap to union']:+.1%}" for n, r in table.iterrows())
    return (YES if (table["gap to union"] <= tol).all() else NO), text + f" (limit +{tol:.0%})"


# -- the rules ----------------------------------------------------------------------------------------------

def judge_replay_forgetting(res: Results, shift: str, tol: float = NOISE_TOL) -> tuple[str, str]:
    """Rule 1 for one shift: (status, measured); the rule in words is in ``FINDINGS``."""
    table = replay_tables(res)[shift]
    d0 = {r: float(table.loc[r, "D0"]) for r in M.REPLAY_ROWS[:6]}
    if _missing(d0):
        return NOT_RUN, f"missing replay {', '.join(_missing(d0))}"
    values = list(d0.values())
    worst = max(b - a for a, b in zip(values[:-1], values[1:]))
    drop = d0["0%"] - d0["50%"]
    ok = worst <= tol and drop > tol
    text = (f"D0 {' → '.join(_f(v) for v in values)} (0→50% replay){_seeds(table)}; largest rise between "
            f"neighbours {_f(worst, True)}, 0% minus 50% {_f(drop, True)}")
    return (YES if ok else NO), text


def judge_replay_adaptation(res: Results, shift: str) -> tuple[str, str]:
    """Rule 2 for one shift: (status, measured); the rule in words is in ``FINDINGS``."""
    table = replay_tables(res)[shift]
    d1 = {r: float(table.loc[r, "D1"]) for r in ("0%", "50%")}
    if _missing(d1):
        return NOT_RUN, f"missing replay {', '.join(_missing(d1))}"
    diff = d1["50%"] - d1["0%"]
    return (YES if diff >= 0 else NO), f"D1 {_f(d1['0%'])} at 0%, {_f(d1['50%'])} at 50% ({_f(diff, True)})"


def judge_strong_forgets_more(res: Results) -> Verdict:
    """Rule 3: the D0 rise at 0% replay, strong vs weak; the rule in words is in ``FINDINGS``."""
    tables = replay_tables(res)
    rise = {shift: float(tables[shift].loc["0%", "forgetting"]) for shift in E.SHIFTS}
    if _missing(rise):
        return Verdict(NOT_RUN, f"missing 0% replay or base model for {', '.join(_missing(rise))}")
    paper = {shift: M.PAPER_REPLAY_TABLES[shift]["0%"][0] - M.PAPER_BASE_D0 for shift in E.SHIFTS}
    text = (f"D0 rise at 0% replay: weak {_f(rise['weak'], True)}, strong {_f(rise['strong'], True)} "
            f"(paper {paper['weak']:+.2f} / {paper['strong']:+.2f})")
    return Verdict(YES if rise["strong"] > max(rise["weak"], 0.0) else NO, text)


def judge_union(res: Results, shift: str, tol: float = UNION_TOL) -> tuple[str, str]:
    """Rule 4 for one shift: (status, measured); the rule in words is in ``FINDINGS``."""
    table = replay_tables(res)[shift]
    chosen = M.replay_label(E.CHOSEN_REPLAY[shift])
    avg = {chosen: float(table.loc[chosen, "avg"]), "union": float(table.loc["union", "avg"])}
    if _missing(avg):
        return NOT_RUN, f"missing {', '.join(_missing(avg))}"
    gap = avg[chosen] / avg["union"] - 1
    paper = M.PAPER_REPLAY_TABLES[shift]
    paper_gap = paper[chosen][2] / paper["union"][2] - 1
    text = (f"avg {_f(avg[chosen])} with {chosen} replay vs union {_f(avg['union'])}: {gap:+.1%} "
            f"(limit +{tol:.0%}; paper {paper_gap:+.1%})")
    return (YES if gap <= tol else NO), text


def judge_max_lr(res: Results, shift: str, tol: float = NOISE_TOL) -> tuple[str, str]:
    """Rule 5 for one shift: (status, measured); the rule in words is in ``FINDINGS``."""
    table = max_lr_tables(res)[shift]
    rows = ("constant at min", "0.5x", "1x", "2x")
    d0 = {r: float(table.loc[r, "D0"]) for r in rows}
    d1 = {r: float(table.loc[r, "D1"]) for r in rows}
    if _missing(d0) or _missing(d1):
        return NOT_RUN, f"missing {', '.join(sorted(set(_missing(d0) + _missing(d1))))}"
    ladder = ("0.5x", "1x", "2x")
    failed = []
    if not (d0["1x"] >= d0["0.5x"] - tol and d0["2x"] >= d0["1x"] - tol and d0["2x"] - d0["0.5x"] > tol):
        failed.append("D0 does not rise with max LR")
    if not (d1["1x"] <= d1["0.5x"] + tol and d1["2x"] <= d1["1x"] + tol):
        failed.append("D1 gets worse with max LR")
    if d0["constant at min"] > min(d0[r] for r in ladder) + tol:
        failed.append("constant LR does not forget least")
    if d1["constant at min"] < max(d1[r] for r in ladder) - tol:
        failed.append("constant LR does not adapt worst")
    text = (f"D0 const/0.5x/1x/2x {' / '.join(_f(d0[r]) for r in rows)}; "
            f"D1 {' / '.join(_f(d1[r]) for r in rows)}" + (f"; {'; '.join(failed)}" if failed else ""))
    return (NO if failed else YES), text


def judge_warmup(res: Results, tol: float = WARMUP_TOL) -> Verdict:
    """Rule 6: the spread of final D0 and D1 over warmup lengths (weak shift); see ``FINDINGS``."""
    table = warmup_table(res)
    d0 = {w: float(v) for w, v in table["D0"].items()}
    d1 = {w: float(v) for w, v in table["D1"].items()}
    if _missing(d0) or _missing(d1):
        return Verdict(NOT_RUN, f"weak shift: missing warmup {', '.join(_missing(d0) or _missing(d1))}")
    spread0, spread1 = max(d0.values()) - min(d0.values()), max(d1.values()) - min(d1.values())
    text = (f"weak shift, warmup {' / '.join(table.index)}: D0 {' / '.join(_f(v) for v in d0.values())} "
            f"(spread {_f(spread0)}), D1 {' / '.join(_f(v) for v in d1.values())} (spread {_f(spread1)}); "
            f"D0 rise after the switch {' / '.join(_f(v, True) for v in table['D0 rise'])}")
    return Verdict(YES if spread0 <= tol and spread1 <= tol else NO, text)


def judge_d0_rewarm(res: Results) -> Verdict:
    """Rule 7: the transient D0 rise when re-warming on D0 itself (eval curves); see ``FINDINGS``."""
    table = rewarm_table(res)
    r1, r2 = float(table.loc["D0 -> D0, 1x", "rise"]), float(table.loc["D0 -> D0, 2x", "rise"])
    if _missing({"1x": r1, "2x": r2}):
        return Verdict(NOT_RUN, f"missing re-warming on D0 at {', '.join(_missing({'1x': r1, '2x': r2}))}")
    transient = not table.loc[["D0 -> D0, 1x", "D0 -> D0, 2x"], "peak is last"].any()
    switch = table.loc[["D0 -> D1 weak, 1x", "D0 -> D1 weak, 2x"], "rise"]
    text = (f"D0 rise over the stage: {_f(r1, True)} at 1x, {_f(r2, True)} at 2x max LR "
            "(paper +0.10 / +0.20); "
            f"back down by the end: {'yes' if transient else 'no'}; when switching to weak D1: "
            f"{' / '.join(_f(v, True) for v in switch)} (paper +0.35 / +0.45)")
    return Verdict(YES if r1 > 0 and r2 > r1 and transient else NO, text)


def judge_infinite(res: Results, tol: float = INFINITE_TOL, jump_tol: float = BOUNDARY_TOL) -> Verdict:
    """Rule 8: annealed chunk ends vs repeated cosine, jumps at chunk boundaries; see ``FINDINGS``."""
    table = infinite_table(res)
    chunks = ["chunk 1", "chunk 2", "chunk 3"]
    missing = [f"{k} {c}" for k in table.index for c in chunks if math.isnan(table.loc[k, c])]
    missing += [f"{k} boundaries" for k in E.INFINITE_KINDS[1:]
                if math.isnan(table.loc[k, "max jump at boundaries"])]
    if missing:
        return Verdict(NOT_RUN, f"missing {', '.join(missing)}")
    failed, parts = [], []
    cosine = table.loc["cosine", chunks].astype(float)
    for kind in E.INFINITE_KINDS[1:]:
        rel = table.loc[kind, chunks].astype(float) / cosine - 1
        jump = float(table.loc[kind, "max jump at boundaries"])
        parts.append(f"{kind} {' / '.join(f'{v:+.1%}' for v in rel)} vs cosine, jump {_f(jump, True)}")
        if rel.max() > tol:
            failed.append(f"{kind} ends a chunk more than {tol:.0%} above repeated cosine")
        if jump > jump_tol:
            failed.append(f"{kind} loss rises across a chunk boundary")
    text = (f"chunk ends, repeated cosine {' / '.join(_f(v) for v in cosine)}; " + "; ".join(parts)
            + f"; cosine's own jump {_f(float(table.loc['cosine', 'max jump at boundaries']), True)}"
            + (f"; {'; '.join(failed)}" if failed else ""))
    return Verdict(NO if failed else YES, text)


def judge_compute(res: Results, shift: str, tol: float = UNION_TOL,
                  ratio_limit: float = COMPUTE_RATIO) -> tuple[str, str]:
    """Rule 9 for one shift: (status, measured); the rule in words is in ``FINDINGS``."""
    table = compute_table(res, shift)
    chosen = table[table.index.str.endswith("(chosen)")] if len(table) else table
    unions = table[table["role"] == "union"].sort_values("compute_tokens") if len(table) else table
    if chosen.empty or unions.empty:
        missing = ["continual + chosen replay"] * chosen.empty + ["union"] * unions.empty
        return NOT_RUN, f"missing {', '.join(missing)}"
    c = chosen.iloc[0]
    u = unions.iloc[0]
    ratio = c["new_tokens"] / u["compute_tokens"]
    gap = c["avg"] / u["avg"] - 1
    curve = ", ".join(f"{_f(r['avg'])} at {r['compute_tokens']:,.0f}" for _, r in unions.iterrows())
    matched = ("below every union's" if c["avg"] < unions["avg"].min()
               else "already reached by the 1x union")
    points = list(zip(unions["compute_tokens"], unions["avg"]))
    for (c0, a0), (c1, a1) in zip(points[:-1], points[1:]):
        if a0 >= c["avg"] >= a1 and a0 != a1:
            matched = f"matched by the union at ~{c0 + (a0 - c['avg']) / (a0 - a1) * (c1 - c0):,.0f} tokens"
    text = (f"continual + {M.replay_label(E.CHOSEN_REPLAY[shift])} replay: avg {_f(c['avg'])} for "
            f"{c['new_tokens']:,.0f} new tokens ({c['new_flops']:.2g} FLOPs) vs union avg {curve} tokens; "
            f"{ratio:.2f}x the 1x union's compute ({u['compute_flops']:.2g} FLOPs), avg {gap:+.1%}; "
            f"continual's avg {matched}")
    return (YES if gap <= tol and ratio <= ratio_limit else NO), text


FINDINGS: list[Finding] = [
    Finding("replay-forgetting", "Replay lowers forgetting: D0 loss falls as replay grows from 0% to 50%",
            "replay tables (weak, strong); figure list #4",
            f"per shift, D0 final loss at 0/1/5/10/25/50% replay never rises by more than {NOISE_TOL} from "
            f"one fraction to the next, and 0% is above 50% by more than {NOISE_TOL}",
            ("03_replay", "04_forgetting_curves"), ("replay_curves", "replay_final", "forgetting"),
            _per_shift(judge_replay_forgetting)),
    Finding("replay-adaptation", "Replay costs adaptation a little: D1 loss at 50% replay >= at 0%",
            "replay tables (D1 column)", "per shift, D1 final loss at 50% replay >= D1 at 0%",
            ("03_replay",), ("replay_curves", "replay_final"), _per_shift(judge_replay_adaptation)),
    Finding("strong-forgets-more", "The strong shift forgets more than the weak one",
            "replay tables, 0% rows (Pile 3.56 vs 2.44)",
            "D0 rise at 0% replay (D0 minus the base model's D0) is larger for the strong shift, and > 0",
            ("04_forgetting_curves", "00_quickstart", "03_replay"), ("forgetting",),
            judge_strong_forgets_more),
    Finding("replay-matches-union",
            "Continual + chosen replay (weak 5%, strong 25%) matches the union baseline",
            "replay tables, chosen rows vs union",
            f"per shift, average final loss of the chosen replay run is at most {UNION_TOL:.0%} above the "
            "union baseline's", ("03_replay", "06_compute"), ("replay_final", "compute"),
            _per_shift(judge_union)),
    Finding("max-lr", "Higher max LR forgets more and adapts no worse; constant LR at min (no re-warm) "
            "forgets least and adapts worst", "max-LR table; figure list #3",
            f"per shift, D0 at 0.5x -> 1x -> 2x max LR never falls by more than {NOISE_TOL} and 2x is above "
            f"0.5x by more than {NOISE_TOL}; D1 never rises by more than {NOISE_TOL}; constant at min has "
            f"D0 <= the lowest re-warmed D0 + {NOISE_TOL} and D1 >= the highest re-warmed D1 - {NOISE_TOL}",
            ("02_rewarming",), ("max_lr",), _per_shift(judge_max_lr)),
    Finding("warmup", "Warmup length (0, 0.5, 1, 2%) hardly changes final forgetting or adaptation",
            "figure list #2",
            f"weak shift, the spread (max - min) of final D0 and of final D1 over the four warmups is at "
            f"most {WARMUP_TOL}", ("02_rewarming",), ("warmup",), judge_warmup),
    Finding("d0-rewarm", "Re-warming on D0 itself raises D0 loss transiently, more at a higher max LR",
            "figure list #5 (+0.1 at 3e-4, +0.2 at 6e-4)",
            "on the D0 eval curve of D0 -> D0 runs: the peak minus the starting loss is > 0 at 1x, larger "
            "at 2x, and at both the peak is not the last evaluation", ("02_rewarming",),
            ("rewarm_d0", "d0_rewarm", "same"), judge_d0_rewarm),
    Finding("infinite", "Infinite schedules (annealed) end close to repeated cosine at each chunk end, "
            "with no large forgetting across chunk boundaries", "figure list #6, #7",
            f"for infinite cosine, infinite inverse-sqrt and WSD, the annealed loss at each of the 3 chunk "
            f"ends (last evaluation) is at most {INFINITE_TOL:.0%} above repeated cosine's; the un-annealed "
            f"run's loss rises by at most {BOUNDARY_TOL} across each chunk boundary",
            ("05_infinite_schedules", "01_schedules"), ("infinite", "schedules", "three_chunks"),
            judge_infinite),
    Finding("compute", "Continual + replay reaches the union's average loss with about half its compute",
            "figure list #1",
            f"per shift, the chosen replay run's average loss is at most {UNION_TOL:.0%} above the 1x "
            f"union's while its own tokens (beyond the shared D0 base model) are at most "
            f"{COMPUTE_RATIO:.0%} of the union's; unions at 1.5x and 2x show the rest of the union's curve",
            ("06_compute",), ("compute",), _per_shift(judge_compute)),
    Finding("scale-replay", "Replay reduces forgetting at every model size", "405M and 10B, weak shift",
            f"per shift, at every size of the scale study, D0 rise at 0% replay > {NOISE_TOL} and the chosen "
            f"replay's D0 rise is below it by more than {NOISE_TOL}", ("07_scales",), ("scale_forgetting",),
            _per_shift(judge_scale_replay)),
    Finding("scale-union", "Continual + chosen replay stays close to the union baseline at every model size",
            "405M and 10B (10B weak: avg 1.89 vs 1.87)",
            f"per shift, at every size of the scale study, the chosen replay run's average final loss is at "
            f"most {UNION_TOL:.0%} above the union's of the same size", ("07_scales",), ("scale_compute",),
            _per_shift(judge_scale_union)),
]


def judge_all(res: Results) -> list[tuple[Finding, Verdict]]:
    """Every finding's verdict. A rule that fails on unexpected data says "not run" with the error."""
    out = []
    for finding in FINDINGS:
        try:
            verdict = finding.judge(res)
        except Exception as exc:  # noqa: BLE001 - a report must still be written
            verdict = Verdict(NOT_RUN, f"could not judge: {type(exc).__name__}: {exc}")
        out.append((finding, verdict))
    return out


# -- figures -------------------------------------------------------------------------------------------------

def find_figures(out_dir: str | Path) -> list[Path]:
    """Every PNG under ``out_dir`` (notebooks save theirs into ``out_dir/<notebook>/``), sorted; files in
    hidden folders and in run directories (any with a ``metrics.jsonl``) are left out."""
    out_dir = Path(out_dir)
    found = []
    for p in out_dir.rglob("*.png"):
        parts = p.relative_to(out_dir).parts
        if any(part.startswith(".") for part in parts):
            continue
        if any((out_dir.joinpath(*parts[:i]) / "metrics.jsonl").exists() for i in range(1, len(parts))):
            continue
        found.append(p)
    return sorted(found)


def figures_for(finding: Finding, figures: list[Path], out_dir: str | Path) -> list[Path]:
    """The figures of ``finding``'s notebooks (a folder under ``out_dir`` named after the notebook, with
    or without a ``-<shift>`` suffix) whose file name contains one of its keywords; all of those
    notebooks' figures when none does."""
    out_dir = Path(out_dir)
    mine = [p for p in figures if p.relative_to(out_dir).parts[0].startswith(finding.notebooks)]
    named = [p for p in mine if any(k in p.stem.lower() for k in finding.keywords)]
    return named or mine


# -- writing -------------------------------------------------------------------------------------------------

def _cell(x: object) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return f"{x:,}" if abs(x) >= 1e4 else str(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isnan(x):
            return "—"
        if abs(x) >= 1e9:
            return f"{x:.3g}"
        return f"{x:,.0f}" if abs(x) >= 1e3 and x == round(x) else f"{x:.3f}"
    return str(x).replace("|", "\\|")


def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index first): losses with 3 decimals, counts with thousands
    separators, FLOPs in scientific notation, NaN as a dash."""
    head = [df.index.name or "", *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, *values in df.itertuples():
        lines.append("| " + " | ".join([_cell(idx), *(_cell(v) for v in values)]) + " |")
    return "\n".join(lines)


def _with_paper(ours: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    table = M.side_by_side(ours, paper)
    for c in ("D0", "D1", "avg"):  # mean ± std over seeds where several seeds ran
        std = ours.get(f"{c}_std")
        if std is not None and std.notna().any():
            table[c] = [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else _cell(m) for m, s in zip(ours[c], std)]
    table["seeds"] = ours["n_seeds"].astype(int)
    return table


def render_report(res: Results, out_dir: str | Path, scale: str = "", root: str | Path = "",
                  verdicts: list[tuple[Finding, Verdict]] | None = None) -> str:
    """REPORT.md's text (links relative to ``out_dir``); ``verdicts`` default to ``judge_all(res)``."""
    out_dir = Path(out_dir)
    verdicts = verdicts if verdicts is not None else judge_all(res)
    figures = find_figures(out_dir)
    counts = {s: sum(v.status == s for _, v in verdicts) for s in (YES, NO, NOT_RUN)}
    lines = ["# Reproduction report", "",
             f"Scale `{scale}`, runs from `{root}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    if res.expected:
        lines.append(f"Finished runs: {res.finished} of the {res.expected} that its experiments build.")
    lines += ["", f"**{counts[YES]} of {len(verdicts)} findings reproduced**, {counts[NO]} not, "
              f"{counts[NOT_RUN]} not run. Paper numbers are the 405M model's (PAPER.md); ours match them "
              "in direction, not in value.", "", "## Findings", "",
              "| # | Finding | Paper | This run's figure | Measured | Reproduced |",
              "|---|---|---|---|---|---|"]
    for i, (finding, verdict) in enumerate(verdicts, 1):
        links = "<br>".join(f"[{p.relative_to(out_dir).as_posix()}]({p.relative_to(out_dir).as_posix()})"
                            for p in figures_for(finding, figures, out_dir)) or "—"
        cells = [str(i), finding.claim, finding.paper, links, verdict.measured, f"**{verdict.status}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    lines += ["", "## Final losses (ours next to the paper's 405M)", ""]
    for shift, table in replay_tables(res).items():
        lines += [f"### Replay, {shift} shift ({E.D0} -> {E.SHIFTS[shift]})", "",
                  md_table(_with_paper(table, M.paper_replay_table(shift))), ""]
    for shift, table in max_lr_tables(res).items():
        lines += [f"### Max LR, {shift} shift, no replay", "",
                  md_table(_with_paper(table, M.paper_max_lr_table(shift))), ""]
    lines += ["### Warmup length, weak shift", "", md_table(warmup_table(res)), "",
              "### Re-warming: rise of D0 loss over the stage", "", md_table(rewarm_table(res)), "",
              "### Infinite schedules: loss on the chunks' data at each chunk end", "",
              md_table(infinite_table(res)), ""]
    for shift in E.SHIFTS:
        table = compute_table(res, shift)
        shown = md_table(table.drop(columns=["role", "replay"], errors="ignore")) if len(table) else "not run"
        lines += [f"### Compute vs average loss, {shift} shift", "", shown, ""]
    for shift in E.SHIFTS:
        table = scale_table(res, shift)
        lines += [f"### Scale study, {shift} shift (forgetting = D0 rise over the same size's base model)",
                  "", md_table(table) if len(table) else "not run", ""]

    lines += ["## Rules", "", "Final loss = mean of the last 2 evaluations of a run's last stage; means "
              "over seeds where several ran; unfinished runs are ignored; a rule missing a run says "
              "\"not run\".", ""]
    lines += [f"{i}. **{f.claim}**: {f.rule}." for i, (f, _) in enumerate(verdicts, 1)]
    lines += ["", "## Figures", ""]
    if not figures:
        lines.append(f"No PNG figures under `{out_dir}`.")
    folder = None
    for p in figures:
        rel = p.relative_to(out_dir)
        if rel.parent != folder:
            folder = rel.parent
            lines += ["", f"### {folder.as_posix()}", ""]
        lines.append(f"![{rel.stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, scale: str = "tiny", runs: str | Path | None = None,
                 device: str = "auto", results: Results | None = None,
                 log: Callable[[str], None] | None = print) -> Path:
    """Judge the findings on the runs of ``scale`` in the run store ``runs`` (default
    ``store.runs_root()``; ``device`` as the runs were built, it is part of their config) and write
    ``out_dir/REPORT.md``; return its path. ``results``: judge these instead of loading the run store.
    ``log`` gets one line per finding (None: quiet)."""
    from cptlab import store

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(runs).resolve() if runs is not None else store.runs_root()
    if results is None:
        results = collect_results(scale, root, device)
    verdicts = judge_all(results)
    path = out_dir / "REPORT.md"
    atomic_write_text(path, render_report(results, out_dir, scale, root, verdicts))
    if log is not None:
        for i, (finding, verdict) in enumerate(verdicts, 1):
            log(f"[report] {i}. {verdict.status:7} {finding.claim}")
        if results.expected:
            log(f"[report] {results.finished} of {results.expected} runs of scale {scale} finished in {root}")
        log(f"[report] wrote {path}")
    return path
