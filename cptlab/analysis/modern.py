"""Today's recipes beside the paper's (``cptlab.study.modern``): their tables, the questions the report asks
of them, and what the schedule law predicts of them.

Final loss here = a run's last evaluation (the end of its last stage): a merged stage's last evaluation is
the only one of its merged model, so every row is read the same way. The soup is the average of the three
anneals' final weights, evaluated here as the trainer evaluates (``training.train.evaluate``, the runs'
precision and validation tokens). A microanneal's and a full run's value of a candidate corpus is how much
it lowers the mean of D0 and the candidate's loss below the base model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from cptlab import data
from cptlab.analysis import laws as L
from cptlab.analysis import metrics as M
from cptlab.analysis import results as T
from cptlab.analysis.runs import load_runs
from cptlab.study import modern as S
from cptlab.study.experiments import infinite_schedules
from cptlab.study.paper import CHOSEN_REPLAY, D0, SHIFTS
from cptlab.study.scales import get_scale
from cptlab.training import runtime
from cptlab.training.model import GPT, average_states
from cptlab.training.rundir import RunDir, load_checkpoint
from cptlab.training.store import RunStore
from cptlab.training.train import evaluate

# The rows of a shift's table: label -> (experiment key, run name); {s}: the shift, {r}: the chosen replay
ROWS = {
    "paper: re-warm + cosine to 10% + replay": ("replay", "{s}-replay{r}"),
    "stable + decay to 0 (WSD-D2Z)": ("modern", "{s}-decay"),
    "stable + merge of last 4": ("modern", "{s}-merge"),
    "stable + anneal on chosen data": ("modern", "{s}-anneal-order0"),
    "soup of 3 anneals": ("soup", ""),
    "schedule-free, re-warm, replay": ("modern", "{s}-schedulefree"),
    "schedule-free, no re-warm, replay": ("modern", "{s}-schedulefree-nowarmup"),
    "schedule-free, re-warm, no replay": ("modern", "{s}-schedulefree-noreplay"),
    "paper without replay": ("replay", "{s}-replay0"),
}
PAPER_ROW = "paper: re-warm + cosine to 10% + replay"
SAME = 0.01  # nats: a difference smaller than this is "as good as"


@dataclass
class Question:
    """One comparison asked so that either answer is a result: ``answer`` True / False (None: not run)."""

    number: str
    text: str
    answer: bool | None
    measured: str


def finals(res: T.Results) -> pd.DataFrame:
    """Last-evaluation losses of the modern, replay and base runs, by experiment and name."""
    def make() -> pd.DataFrame:
        parts = [M.final_losses(res.frame(k), k=1) for k in ("modern", "replay", "base") if len(res.frame(k))]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["experiment", "name"])
    return res.cached("modern/finals", make)


def _final(res: T.Results, experiment: str, name: str) -> pd.Series | None:
    df = finals(res)
    rows = df[(df["experiment"] == experiment) & (df["name"] == name)]
    return rows.iloc[0] if len(rows) else None


def soup_losses(store: RunStore, shift: str, scale: str = "tiny", device: str = "auto") -> dict[str, float]:
    """Validation losses of the average of the shift's ``SOUP_ORDERS`` anneals ({} if one is not done)."""
    runs = [S.tail_run(shift, "anneal", scale, order, device) for order in S.SOUP_ORDERS]
    dirs = [RunDir(store.path(r.experiment, r.run_id)) for r in runs]
    if not all(d.done and d.stage_checkpoint("anneal").exists() for d in dirs):
        return {}
    cfg = dirs[0].load_config()
    states = [load_checkpoint(d.stage_checkpoint("anneal"))["model"] for d in dirs]
    model = GPT(cfg.model)
    model.load_state_dict(average_states(states, [1 / len(states)] * len(states)))
    registry = data.Registry(cfg.corpora)
    tokenizer = data.load_tokenizer(cfg.tokenizer, registry)
    sets = {n: data.val_tokens(n, tokenizer, registry, cfg.eval.tokens) for n in cfg.eval_sets()}
    cpu = torch.device("cpu")
    autocast = runtime.autocast_context(cpu, runtime.pick_precision(cfg.train.precision, cpu))
    return evaluate(model, sets, cfg.train.seq_len, cfg.train.batch_size, cpu, autocast)


def soups(res: T.Results, store: RunStore, device: str = "auto") -> dict[str, dict[str, float]]:
    """``soup_losses`` of every shift, computed once per ``res``."""
    scale = res.scale or "tiny"
    return res.cached("modern/soups", lambda: {sh: soup_losses(store, sh, scale, device) for sh in SHIFTS})


def recipe_table(res: T.Results, shift: str, soup: dict[str, float] | None = None) -> pd.DataFrame:
    """Final D0, D1 and their mean of every recipe on ``shift``, with the difference from the paper's recipe
    (negative: better) and the training tokens each cost from the base model."""
    rows = {}
    for label, (key, pattern) in ROWS.items():
        name = pattern.format(s=shift, r=f"{CHOSEN_REPLAY[shift]:g}")
        if key == "soup":
            if soup:
                d0, d1 = soup[D0], soup[SHIFTS[shift]]
                rows[label] = {"D0": d0, "D1": d1, "tokens": _tail_tokens(res, shift) * len(S.SOUP_ORDERS)
                               + _stable_tokens(res, shift)}
            continue
        row = _final(res, key, name)
        if row is not None:
            rows[label] = {"D0": row["D0"], "D1": row["D1"], "tokens": _own_tokens(res, key, name)}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["D0", "D1", "tokens"])
    table.index.name = "recipe"
    table["avg"] = (table["D0"] + table["D1"]) / 2
    if PAPER_ROW in table.index:
        for col in ("D0", "D1", "avg"):
            table[f"{col} vs paper"] = table[col] - table.loc[PAPER_ROW, col]
    return table


def _own_tokens(res: T.Results, key: str, name: str) -> float:
    """Tokens trained since the base model: a tail's includes its trunk's."""
    df = res.frame(key)
    rows = df[df["name"] == name]
    if not len(rows):
        return math.nan
    return float(rows["tokens"].max() - rows["switch_tokens"].iloc[0])


def _stable_tokens(res: T.Results, shift: str) -> float:
    return _own_tokens(res, "modern", f"{shift}-stable")


def _tail_tokens(res: T.Results, shift: str) -> float:
    return _own_tokens(res, "modern", f"{shift}-decay") - _stable_tokens(res, shift)


def chunk_table(res: T.Results) -> pd.DataFrame:
    """Loss on the chunks' data at each chunk end: repeated cosine to 10%, repeated D2Z, WSD (each chunk's
    model an anneal branch from the pre-decay model) and WSD-S (resumed from the decayed model)."""
    frames = [f for f in (res.frame("infinite"), res.frame("modern")) if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    loss = f"val_{SHIFTS['weak']}"
    out = {}
    sources = {"cosine to 10%": lambda c: ("sched-cosine", f"chunk{c}"),
               "D2Z": lambda c: ("sched-d2z", f"chunk{c}"),
               "WSD (branch)": lambda c: (f"anneal-wsd-chunk{c}", "anneal"),
               "WSD-S": lambda c: ("anneal-wsd-chunk1", "anneal") if c == 1 else ("sched-wsd-s", f"chunk{c}")}
    for label, where in sources.items():
        column = {}
        for c in (1, 2, 3):
            name, stage = where(c)
            rows = frame[(frame["name"] == name) & (frame["stage"] == stage)] if len(frame) else frame
            if len(rows) and loss in rows.columns:
                column[f"chunk {c}"] = float(rows.sort_values("step")[loss].iloc[-1])
        out[label] = column
    table = pd.DataFrame(out).T.reindex(columns=["chunk 1", "chunk 2", "chunk 3"])
    table.index.name = "schedule"
    return table


def microanneal_table(res: T.Results) -> pd.DataFrame:
    """Per candidate D1 corpus: how much a microanneal and the full run (the paper's recipe) lower the mean
    of D0 and the candidate's loss below the base model's, and each one's rank (1: lowers it most)."""
    base = _final(res, "base", "base")
    rows = {}
    for shift, d1 in SHIFTS.items():
        micro = _final(res, "modern", f"micro-{d1}")
        full = _final(res, "replay", f"{shift}-replay{CHOSEN_REPLAY[shift]:g}")
        if base is None or micro is None or full is None:
            continue
        before = (base[f"val_{D0}"] + base[f"val_{d1}"]) / 2
        rows[d1] = {"microanneal gain": before - micro["avg"], "full run gain": before - full["avg"]}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["microanneal gain", "full run gain"])
    table.index.name = "candidate"
    return with_ranks(table)


def with_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a rank column beside each gain column (1: the largest gain); tied gains share the
    better rank, so a microanneal too short to move the model ranks no candidate above another."""
    for col in ("microanneal gain", "full run gain"):
        table[col.replace("gain", "rank")] = table[col].rank(ascending=False, method="min").astype("Int64")
    return table


# -- the questions -------------------------------------------------------------------------------------------

def _lower(table: pd.DataFrame, a: str, b: str, col: str, number: str, text: str) -> Question:
    """Is ``a``'s ``col`` lower than ``b``'s? The margin is b - a (positive: a is lower)."""
    if a not in table.index or b not in table.index:
        return Question(number, text, None, "not run")
    margin = table.loc[b, col] - table.loc[a, col]
    measured = f"{col} {table.loc[a, col]:.3f} vs {table.loc[b, col]:.3f} (margin {margin:+.3f})"
    return Question(number, text, bool(margin > 0), measured)


def shift_questions(table: pd.DataFrame, shift: str) -> list[Question]:
    """The comparisons of one shift's recipe table."""
    p, q = PAPER_ROW, list(ROWS)
    tag = shift[0].upper()
    return [
        _lower(table, q[3], p, "avg", f"{tag}1", f"{shift}: does a constant LR with an anneal to 0 on "
               f"chosen data (D1 + {S.ANNEAL_REPLAY:.0%} D0) end lower on the mean of D0 and D1 than the "
               "paper's recipe?"),
        _lower(table, q[1], p, "avg", f"{tag}2", f"{shift}: does WSD with a decay to 0 (same data) end "
               "lower on the mean of D0 and D1 than the paper's cosine to 10%?"),
        _lower(table, q[2], q[1], "avg", f"{tag}3", f"{shift}: does merging the last {S.MERGE_COUNT} "
               "checkpoints of the constant-LR tail end lower than decaying it?"),
        _lower(table, q[4], q[3], "avg", f"{tag}4", f"{shift}: does a soup of {len(S.SOUP_ORDERS)} anneals "
               "in different data orders end lower than one anneal?"),
        _lower(table, q[5], p, "D1", f"{tag}5", f"{shift}: does schedule-free AdamW (constant LR, re-warmed, "
               "replay) learn D1 better than the paper's recipe?"),
        _lower(table, q[5], p, "D0", f"{tag}6", f"{shift}: does schedule-free AdamW forget D0 less than the "
               "paper's recipe?"),
        _lower(table, q[5], q[6], "avg", f"{tag}7", f"{shift}: does schedule-free AdamW still gain from "
               "re-warming (re-warmed lower than not)?"),
        _lower(table, q[5], q[7], "D0", f"{tag}8", f"{shift}: does replay still lower D0 forgetting under "
               "schedule-free AdamW?"),
    ]


def chunk_questions(table: pd.DataFrame) -> list[Question]:
    """D2Z vs cosine to 10% at every chunk end; WSD-S vs WSD at chunk ends 2 and 3."""
    out = []
    for number, a, b, chunks, text in (
            ("C1", "D2Z", "cosine to 10%", ("chunk 1", "chunk 2", "chunk 3"),
             "three chunks: does repeated D2Z end every chunk lower than repeated cosine to 10%?"),
            ("C2", "WSD-S", "WSD (branch)", ("chunk 2", "chunk 3"),
             "three chunks: does WSD-S (resume from the decayed model) end chunks 2 and 3 lower than WSD "
             "(branch from the pre-decay model)?")):
        if a not in table.index or b not in table.index or table.loc[[a, b], list(chunks)].isna().any().any():
            out.append(Question(number, text, None, "not run"))
            continue
        margins = table.loc[b, list(chunks)] - table.loc[a, list(chunks)]
        shown = ", ".join(f"{c} {m:+.3f}" for c, m in margins.items())
        measured = f"margins {shown} (positive: {a} lower)"
        out.append(Question(number, text, bool((margins > 0).all()), measured))
    return out


def microanneal_question(table: pd.DataFrame) -> Question:
    text = ("does a microanneal (10% of B1, 30% candidate) rank the two candidate D1 corpora as the full "
            "continual runs do?")
    if len(table) < 2:
        return Question("M1", text, None, "not run")
    same = list(table["microanneal rank"]) == list(table["full run rank"])
    measured = "; ".join(f"{c}: gain {r['microanneal gain']:.3f} micro vs {r['full run gain']:.3f} full"
                         for c, r in table.iterrows())
    return Question("M1", text, same, measured)


def all_questions(res: T.Results, store: RunStore | None = None, device: str = "auto") -> list[Question]:
    """Every question of the comparison, in the report's order."""
    found = soups(res, store, device) if store is not None else {}
    out = []
    for shift in SHIFTS:
        out += shift_questions(recipe_table(res, shift, found.get(shift)), shift)
    out.append(microanneal_question(microanneal_table(res)))
    return out + chunk_questions(chunk_table(res))


# -- what the schedule law predicts ------------------------------------------------------------------------

def law_plan(scale: str = "tiny", device: str = "auto") -> list[L.Family]:
    """Families for the new schedules: from scratch over three chunks (fitted as the reproduction's, on
    repeated cosine and WSD's constant phase; D2Z and WSD-S held out) and, per shift, continual runs on D1
    with the chosen replay (fitted on the paper's recipe and the constant-LR trunk; the decay and the anneal
    tails held out, the anneal on other data)."""
    chunks = {r.name: r for r in infinite_schedules(scale, device)}
    new = {r.name: r for r in S.chunk_runs(scale, device)}
    plan = [L.Family("three chunks, new schedules", "d1", [chunks["sched-cosine"], chunks["sched-wsd"]],
                     [new["sched-d2z"], new["sched-wsd-s"]])]
    for shift in SHIFTS:
        fit = [S.paper_recipe(shift, scale, device), S.stable_run(shift, scale, device)]
        held = [S.tail_run(shift, t, scale, device=device) for t in ("decay", "anneal")]
        plan.append(L.Family(f"continual with replay, {shift} shift", "d1", fit, held))
    return plan


def law_table(res: T.Results, device: str = "auto") -> pd.DataFrame:
    """The schedule law's error on the new schedules' held-out runs, and a row for each run it does not
    apply to (merges, schedule-free) saying why."""
    frames = [res.frame(k) for k in ("infinite", "modern", "replay") if len(res.frame(k))]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = L.validate(law_plan(res.scale or "tiny", device), frame).table
    if len(table):
        table = table[["family", "trained on", "same data", "final error %", "mean error %"]]
    scale = res.scale or "tiny"
    outside = [run for shift in SHIFTS for run in (S.tail_run(shift, "merge", scale, device=device),
                                                   S.schedule_free_run(shift, scale, device=device))]
    rows = [{"run": f"modern/{run.name}", "law applies": S.OUTSIDE_THE_LAWS[run.labels["recipe"]]}
            for run in outside]
    apart = pd.DataFrame(rows).set_index("run")
    return pd.concat([table.assign(**{"law applies": "yes"}), apart]) if len(table) else apart



def collect(scale: str = "tiny", root: str | RunStore | None = None, device: str = "auto") -> T.Results:
    """The finished runs the comparisons read (``study.modern.comparison_runs``) from the run store ``root``,
    as ``results.collect_results`` would hold them (without loading every other experiment)."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    frames = {}
    for key, runs in S.comparison_runs(scale, device).items():
        df = load_runs([r for r in runs if store.is_done(r.experiment, r.run_id)], store)
        frames[key] = df
    return T.Results(frames=frames, scale=get_scale(scale))


# -- the report's section ----------------------------------------------------------------------------------

NOTEBOOK = "11_modern_recipes"


def report_lines(res: T.Results, store: RunStore | None, md_table: Callable[[pd.DataFrame], str],
                 figures: list[str]) -> list[str]:
    """REPORT.md's "Today's recipes" section: the questions answered, each shift's table, the three chunks,
    the microanneal, the law's predictions, and ``figures`` (paths relative to the report)."""
    lines = ["### Today's recipes beside the paper's", "",
             "Annealing on chosen data, merging instead of decaying, decay to zero (D2Z), WSD-S and "
             "schedule-free AdamW on the same shifts, from the same base model, at the paper recipe's "
             "compute (B1 tokens) unless the table's tokens say otherwise (`cptlab.study.modern`, notebook "
             f"`{NOTEBOOK}`). Final loss = the last evaluation; margins in nats.", ""]
    if not len(res.frame("modern")):
        return lines + ["not run", ""]
    found = soups(res, store) if store is not None else {}
    lines += ["| # | Question | Measured | Answer |", "|---|---|---|---|"]
    for q in all_questions(res, store):
        shown = {True: "yes", False: "no", None: "not run"}[q.answer]
        lines.append(f"| {q.number} | {q.text} | {q.measured} | **{shown}** |")
    lines.append("")
    for shift in SHIFTS:
        lines += [f"Recipes, {shift} shift ({D0} -> {SHIFTS[shift]}; tokens: trained since the base model):",
                  "", md_table(recipe_table(res, shift, found.get(shift))), ""]
    lines += ["Three chunks of en-docs from scratch: loss at each chunk end:", "",
              md_table(chunk_table(res)), "",
              "Microanneal vs full runs (gain: the mean of D0 and candidate loss lowered below the base "
              "model's):", "", md_table(microanneal_table(res)), "",
              "The schedule law (`cptlab.analysis.laws`) on the new schedules, fitted on two runs of each "
              "family and asked about the others; merges and schedule-free runs are outside it:", "",
              md_table(law_table(res)), ""]
    return lines + [f"![{Path(p).stem}]({p})" for p in figures] + [""]


def curves(res: T.Results) -> pd.DataFrame:
    """The evaluation lines of the paper's runs and the new ones, for loss curves."""
    frames = [res.frame(k) for k in ("replay", "modern") if len(res.frame(k))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
