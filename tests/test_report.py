"""The report's rules on made-up results: a run store where every finding holds says yes everywhere; each
rule says no when its finding is broken and "not run" when a run it needs is missing."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cptlab import cli
from cptlab.analysis import findings as F
from cptlab.analysis import metrics
from cptlab.analysis import report as R
from cptlab.analysis import results as T
from cptlab.study import experiments as E
from cptlab.study.runner import run_dir
from cptlab.study.scales import SCALES

SCALE = SCALES["smoke"]
BASE = {"en-man": 3.0, "en-docs": 4.0, "de-man": 5.0}  # the base model's final losses
D1_END = {"en-docs": 3.3, "de-man": 2.3}  # continual D1 at 0% replay and 1x max LR
FORGET = {"weak": 0.2, "strong": 0.4}  # D0 rise at 0% replay and 1x max LR


# -- a made-up run store in which every finding of the paper holds -----------------------------------------

def _finals(run: E.Run, seed_offset: float) -> tuple[dict[str, float], dict[str, float] | None, float]:
    """(final loss per eval set, starting loss per set or None, rise of the first evaluation above
    the final) for a run, from its labels."""
    lab = run.labels
    role = lab["role"]
    if role == "base":
        return {k: v + seed_offset for k, v in BASE.items()}, None, 0.3
    if role == "union":
        f = lab["compute_tokens"] / (SCALE.base_tokens + SCALE.new_tokens)
        d1 = lab["d1"]
        return {"en-man": 3.05 - 0.1 * (f - 1) + seed_offset,
                d1: D1_END[d1] + 0.1 - 0.1 * (f - 1) + seed_offset}, None, 0.3
    start = {k: v + seed_offset for k, v in BASE.items()}
    if lab["shift"] == "same":  # re-warming on D0: a transient rise of 0.1 per 1x max LR
        if lab["schedule"] == "constant":
            return {"en-man": 2.98}, start, 0.0
        return {"en-man": 2.95}, start, 3.0 + 0.1 * lab["max_lr"] / SCALE.max_lr - 2.95
    d1, forget = lab["d1"], FORGET[lab["shift"]]
    if lab["schedule"] == "constant":  # at min: forgets least, adapts worst; re-warm without re-decay
        at_min = lab["max_lr"] == SCALE.min_lr
        d0 = 3.0 + (0.3 if at_min else 1.2) * forget
        d1v = D1_END[d1] + (0.3 if at_min else 0.1)
        return {"en-man": d0 + seed_offset, d1: d1v + seed_offset}, start, 0.05
    f, r, w = lab["max_lr"] / SCALE.max_lr, lab["replay"], lab["warmup"] * 100 - 1
    d0 = 3.0 + forget * (0.5 + 0.5 * f) * (1 - 2 * r) + 0.01 * w
    d1v = D1_END[d1] + 0.2 * r + 0.05 * (1 / f - 1) + 0.005 * w
    return {"en-man": d0 + seed_offset, d1: d1v + seed_offset}, start, 0.05


def _infinite_value(kind: str, tokens: float) -> float:
    return 3.7 - 0.3 * tokens / SCALE.chunk_tokens


def fake_lines(run: E.Run, seed_offset: float = 0.0) -> list[dict]:
    """Evaluation lines (4 per stage, the last two at the final loss) and a training line per stage."""
    batch = SCALE.seq_len * SCALE.batch_size
    lab = run.labels
    lines = []

    def log(tokens: int, stage: str, val: dict[str, float]) -> None:
        lines.append({"step": tokens // batch, "tokens": tokens, "stage": stage, "lr": 1e-3,
                      "train_loss": 9.0, "tokens_by_source": {}, "tokens_per_s": 1.0})
        lines.append({"step": tokens // batch, "tokens": tokens, "stage": stage, "lr": 1e-3, "val": val})

    if lab["role"] == "sequence":  # the sequence study (judged in test_sequences): every set, every stage
        at = 0
        for c, st in enumerate(run.config.stages):
            at += st.tokens
            log(at, st.name, {d: 3.5 + 0.1 * j - 0.05 * c for j, d in enumerate(lab["datasets"])})
        return lines
    if lab["role"] == "infinite":
        at = 0
        for st in run.config.stages:
            for i in range(4):
                tokens = at + st.tokens * (i + 1) // 4
                if lab["schedule"] == "cosine":  # re-warm and re-decay per chunk, ends at 3.6 - 0.2 c
                    end = 3.6 - 0.2 * int(st.name[5])
                    value = end + (0.1, 0.05, 0.0, 0.0)[i]
                else:
                    value = _infinite_value(lab["schedule"], tokens)
                log(tokens, st.name, {"en-docs": value, "en-man": 5.0})
            at += st.tokens
        return lines
    if lab["role"] == "anneal":  # from the constant phase to 0.01 below repeated cosine's chunk end
        c, k = lab["chunk"], run.config.stages[0].tokens
        at = c * SCALE.chunk_tokens - k
        lines.append({"step": at // batch, "tokens": at, "stage": "anneal", "lr": 1e-3,
                      "val": {"en-docs": _infinite_value(lab["schedule"], at), "en-man": 5.0}})
        for i in range(4):
            value = 3.59 - 0.2 * c if i >= 2 else 3.7
            log(at + k * (i + 1) // 4, "anneal", {"en-docs": value, "en-man": 5.0})
        return lines
    final, start, rise = _finals(run, seed_offset)
    stage = run.config.stages[0]
    at = SCALE.base_tokens if start is not None else 0
    if start is not None:
        lines.append({"step": at // batch, "tokens": at, "stage": stage.name, "lr": 0.0,
                      "val": {k: start[k] for k in final}})
    for i in range(4):
        first = {k: v + rise for k, v in final.items()}
        val = {k: (first[k], (first[k] + v) / 2, v, v)[i] for k, v in final.items()}
        log(at + stage.tokens * (i + 1) // 4, stage.name, val)
    return lines


def write_store(root: Path, seeds: tuple[int, ...] = (0,), keys: tuple[str, ...] = T.EXPERIMENTS) -> None:
    """Every run of the smoke scale's experiments ``keys``, finished, with made-up metrics (seed s adds
    0.01 s to every loss)."""
    runs = {}
    for key, group in T.experiment_runs("smoke", seeds=seeds).items():
        if key not in keys:
            continue
        for run in group:
            runs[run_dir(run, root)] = run
    for path, run in runs.items():
        path.mkdir(parents=True, exist_ok=True)
        labels = {"experiment": run.experiment, "name": run.name, **run.labels}
        (path / "labels.json").write_text(json.dumps(labels))
        offset = 0.01 * run.labels.get("seed", 0)
        (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in fake_lines(run, offset)))
        (path / "DONE").write_text("")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two seeds of the base model and the replay sweep (seed 1 adds 0.01 to every loss), one of the rest."""
    root = tmp_path_factory.mktemp("runs")
    write_store(root, seeds=(0, 1))
    return root


@pytest.fixture(scope="module")
def good(store) -> T.Results:
    return T.collect_results("smoke", store)


def changed(res: T.Results, key: str, name: str, column: str, delta: float = 0.0, *, last_only: bool = False,
            value: float | None = None) -> T.Results:
    """A copy of ``res`` where run ``name`` of experiment ``key`` has ``column`` moved by ``delta`` (or set
    to ``value``) on every evaluation after its start (or on its last one only)."""
    frames = {k: df.copy() for k, df in res.frames.items()}
    df = frames[key]
    rows = (df["name"] == name) & ~metrics.start_rows(df)
    assert rows.any(), name
    if last_only:
        last = df[rows].sort_values("step").index[-1]
        rows = df.index == last
    df.loc[rows, column] = value if value is not None else df.loc[rows, column] + delta
    return T.Results(frames, res.flops_per_token, scale=res.scale)


def dropped(res: T.Results, key: str, name: str) -> T.Results:
    frames = {k: df.copy() for k, df in res.frames.items()}
    frames[key] = frames[key][frames[key]["name"] != name]
    return T.Results(frames, res.flops_per_token, scale=res.scale)


def verdict(res: T.Results, key: str) -> F.Verdict:
    finding = next(f for f in F.FINDINGS if f.key == key)
    return finding.judge(res)


# -- every finding holds -----------------------------------------------------------------------------------

def test_made_up_store_reproduces_every_finding(good):
    verdicts = F.judge_all(good)
    assert [v.status for _, v in verdicts] == ["yes"] * len(F.FINDINGS), \
        "\n".join(f"{f.key}: {v.status} {v.measured}" for f, v in verdicts)


def test_replay_table_from_the_store_averages_the_seeds(good):
    assert sorted(good.frame("base")["seed"].unique()) == [0, 1]  # seed 1 found beside the scale's seed 0
    table = T.replay_tables(good)["weak"]
    assert list(table.index) == list(metrics.REPLAY_ROWS)
    assert table["n_seeds"].tolist() == [2] * len(table)
    assert table.loc["0%", "D0"] == pytest.approx(3.2 + 0.005)
    assert table.loc["0%", "D0_std"] == pytest.approx(math.sqrt(0.01**2 / 2))
    assert table.loc["50%", "D0"] == pytest.approx(3.0 + 0.005)
    assert table.loc["0%", "forgetting"] == pytest.approx(0.2)  # each seed against its own base model
    assert table.loc["base", "D1"] == pytest.approx(BASE["en-docs"] + 0.005)
    assert table.loc["union", "avg"] == pytest.approx((3.05 + 3.4) / 2 + 0.005)


# -- each rule says no when its finding is broken -----------------------------------------------------------

@pytest.mark.parametrize("key, change", [
    ("replay-forgetting", ("replay", "weak-replay0.1", "val_en-man", 0.1)),  # D0 rises from 5% to 10%
    ("replay-forgetting", ("replay", "strong-replay0.5", "val_en-man", 0.4)),  # 50% no lower than 0%
    ("replay-adaptation", ("replay", "strong-replay0.5", "val_de-man", -0.3)),
    ("strong-forgets-more", ("replay", "weak-replay0", "val_en-man", 0.5)),
    ("replay-matches-union", ("replay", "strong-replay0.25", "val_en-man", 0.3)),
    ("max-lr", ("max_lr", "strong-maxlr2x", "val_en-man", -0.3)),  # 2x forgets least
    ("max-lr", ("max_lr", "weak-maxlr2x", "val_en-docs", 0.2)),  # 2x adapts worse
    ("max-lr", ("max_lr", "weak-constant-min", "val_en-docs", -0.5)),  # constant adapts best
    ("max-lr", ("max_lr", "strong-constant-min", "val_en-man", 0.5)),  # constant forgets most
    ("warmup", ("warmup", "weak-warmup0", "val_en-docs", 0.1)),
    ("d0-rewarm", ("d0_rewarm", "d0-maxlr2x", "val_en-man", -0.15)),  # rises less at 2x than 1x
    ("d0-rewarm", ("d0_rewarm", "d0-maxlr1x", "val_en-man", -0.2)),  # never rises above the start
    ("infinite", ("infinite", "anneal-wsd-chunk2", "val_en-docs", 0.2)),
    ("compute", ("compute", "weak-replay0.05", "val_en-docs", 0.5)),
    ("scale-replay", ("scales", "weak-replay0.05-d16", "val_en-man", 0.5)),  # replay forgets more
    ("scale-union", ("scales", "strong-replay0.25-d16", "val_en-man", 1.0)),  # far above the union
])
def test_broken_finding_says_no(good, key, change):
    assert verdict(changed(good, *change), key).status == "no"


def test_no_forgetting_at_all_is_not_more_forgetting(good):
    res = changed(changed(good, "replay", "weak-replay0", "val_en-man", -0.6), "replay", "strong-replay0",
                  "val_en-man", -0.6)  # D0 falls below the base model's in both shifts
    assert verdict(res, "strong-forgets-more").status == "no"


def test_d0_rewarm_rise_that_does_not_come_back_down_says_no(good):
    res = changed(good, "d0_rewarm", "d0-maxlr1x", "val_en-man", value=3.5, last_only=True)
    assert verdict(res, "d0-rewarm").status == "no"


def test_infinite_jump_across_a_chunk_boundary_says_no(good):
    frames = {k: df.copy() for k, df in good.frames.items()}
    df = frames["infinite"]
    rows = (df["name"] == "sched-infinite_cosine") & (df["tokens"] > SCALE.chunk_tokens)
    df.loc[rows, "val_en-docs"] += 0.5
    v = verdict(T.Results(frames, good.flops_per_token), "infinite")
    assert v.status == "no" and "rises across a chunk boundary" in v.measured


def test_compute_ratio_above_half_says_no(good):
    frames = {k: df.copy() for k, df in good.frames.items()}
    df = frames["compute"]
    smallest = df[df["role"] == "union"]["compute_tokens"].min()
    union = (df["role"] == "union") & (df["compute_tokens"] == smallest)
    df.loc[union, "compute_tokens"] = SCALE.new_tokens  # a union as cheap as the continual run
    assert verdict(T.Results(frames, good.flops_per_token), "compute").status == "no"


# -- missing runs say "not run" -----------------------------------------------------------------------------

def test_missing_runs_say_not_run(good):
    res = dropped(good, "replay", "weak-replay0.25")
    assert verdict(res, "replay-forgetting").status == "not run"
    assert "weak (not run)" in verdict(res, "replay-forgetting").measured
    assert verdict(res, "replay-adaptation").status == "yes"  # needs only 0% and 50%
    assert verdict(dropped(good, "replay", "union-strong"), "replay-matches-union").status == "not run"
    assert verdict(dropped(good, "d0_rewarm", "d0-maxlr2x"), "d0-rewarm").status == "not run"
    assert verdict(dropped(good, "infinite", "anneal-wsd-chunk3"), "infinite").status == "not run"
    assert verdict(dropped(good, "warmup", "weak-warmup0.02"), "warmup").status == "not run"
    assert verdict(dropped(good, "max_lr", "weak-constant-min"), "max-lr").status == "not run"
    assert verdict(dropped(good, "scales", "weak-replay0-d16"), "scale-replay").status == "not run"


def test_scale_study_table_and_a_missing_size(good):
    table = T.scale_table(good, "weak")
    assert list(table["d_model"]) == [16, 32]  # the smoke ladder's rung, then the smoke model
    assert table["forgetting 0%"].tolist() == pytest.approx([0.2, 0.2])
    assert (table["base tokens"].iloc[0] < table["base tokens"].iloc[1])
    frames = {k: df.copy() for k, df in good.frames.items()}
    frames["scales"] = frames["scales"][frames["scales"]["d_model"] != 16]  # a whole size not run
    v = verdict(T.Results(frames, good.flops_per_token, scale=good.scale), "scale-union")
    assert v.status == "not run" and "1 of 2 model sizes" in v.measured


def test_scale_study_with_only_base_models_and_unions_says_not_run(good):
    """A partial store (a run cut off by a deadline) may hold no continual run of the study yet."""
    frames = {k: df.copy() for k, df in good.frames.items()}
    df = frames["scales"]
    assert "replay" in df.columns
    frames["scales"] = df[df["role"] != "continual"].drop(columns="replay")
    res = T.Results(frames, good.flops_per_token, scale=good.scale)
    assert T.scale_table(res, "weak")["forgetting 0%"].isna().all()
    assert verdict(res, "scale-replay").status == "not run"
    assert verdict(res, "scale-union").status == "not run"


def test_a_failing_shift_says_no_even_when_the_other_is_missing(good):
    res = changed(dropped(good, "replay", "weak-replay0.25"), "replay", "strong-replay0.1", "val_en-man", 0.3)
    assert verdict(res, "replay-forgetting").status == "no"


def test_nothing_run_says_not_run_everywhere_and_writes_a_report(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["report", str(out), "--scale", "smoke", "--runs", str(tmp_path / "empty")]) == 0
    text = (out / "REPORT.md").read_text()
    assert "Finished runs: 0 of the " in text
    assert text.count("| **not run** |") == len(F.FINDINGS)
    assert "**yes**" not in text and "**no**" not in text
    verdicts = F.judge_all(T.Results())
    assert {v.status for _, v in verdicts} == {"not run"}


def test_a_moved_run_store_gives_the_same_report(store, tmp_path):
    """Copy the store elsewhere (the original is left in place but not asked): every run is found and
    every finding judged alike."""
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(store, moved)
    reports, out = {}, tmp_path / "report"
    for name, root in (("here", store), ("moved", moved)):
        assert cli.main(["report", str(out), "--scale", "smoke", "--runs", str(root)]) == 0
        reports[name] = (out / "REPORT.md").read_text().split("\n", 3)[3]  # after the header naming root
    assert reports["here"] == reports["moved"]
    here, there = T.collect_results("smoke", store), T.collect_results("smoke", moved)
    assert there.finished == there.expected == here.finished == here.expected > 0
    assert f"**{len(F.FINDINGS)} of {len(F.FINDINGS)} findings reproduced**" in reports["moved"]


def test_unfinished_runs_are_ignored(store):
    sweep = E.replay_sweep("weak", "smoke", seeds=(0, 1))
    runs = [r for r in sweep if r.name == "weak-replay0.5"]
    for run in runs:
        (run_dir(run, store) / "DONE").unlink()
    try:
        res = T.collect_results("smoke", store)
    finally:
        for run in runs:
            (run_dir(run, store) / "DONE").write_text("")
    assert "weak-replay0.5" not in set(res.frame("replay")["name"])
    assert verdict(res, "replay-forgetting").status == "not run"


# -- the written report -------------------------------------------------------------------------------------

def test_report_file_with_figures_and_tables(good, tmp_path):
    out = tmp_path / "batch"
    for rel in ("03_replay-weak/replay_curves_weak.png", "02_rewarming/warmup.png",
                "02_rewarming/max_lr_strong.png", "06_compute-strong/compute_strong.png",
                "05_infinite_schedules/infinite.png"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"\x89PNG")
    text = R.write_report(out, scale="smoke", results=good, log=None).read_text()
    findings = text[:text.index("## Beyond the paper")]  # the sequence questions answer there too
    assert findings.count("| **yes** |") == len(F.FINDINGS)
    rows = {line.split(" | ")[1]: line for line in text.split("## Final losses")[0].splitlines()
            if line.startswith("| ") and line[2].isdigit()}
    assert len(rows) == len(F.FINDINGS)
    link = "03_replay-weak/replay_curves_weak.png"
    assert f"[{link}]({link})" in rows[F.FINDINGS[0].claim]
    assert "(02_rewarming/warmup.png)" in rows[F.FINDINGS[5].claim]
    assert "(02_rewarming/max_lr_strong.png)" in rows[F.FINDINGS[4].claim]
    assert "max_lr" not in rows[F.FINDINGS[5].claim]
    assert "(06_compute-strong/compute_strong.png)" in rows[F.FINDINGS[8].claim]
    assert "![replay_curves_weak](03_replay-weak/replay_curves_weak.png)" in text
    for title in ("Replay, weak shift", "Replay, strong shift", "Max LR, strong shift", "Warmup length",
                  "Re-warming", "Infinite schedules", "Compute vs average loss, weak shift"):
        assert f"### {title}" in text
    assert "| 0% | 3.205 ± 0.007 | 2.440 |" in text  # ours (mean ± std over 2 seeds) next to the paper's
    assert "Finished runs: " in text
    cpt = text[text.index("### Forgetting predicted before training"):]  # the CPT law, judged in code
    assert "Targets " in cpt and "Open models" in cpt and "Planner (equal weights" in cpt


def test_figures_for_prefers_keywords_and_falls_back_to_the_notebook(tmp_path):
    figs = [tmp_path / "02_rewarming" / n for n in ("warmup.png", "max_lr.png", "other.png")]
    warmup = next(f for f in F.FINDINGS if f.key == "warmup")
    assert R.figures_for(warmup, figs, tmp_path) == [figs[0]]
    d0 = next(f for f in F.FINDINGS if f.key == "d0-rewarm")
    assert R.figures_for(d0, figs, tmp_path) == figs  # no D0 figure: every figure of its notebook
    compute = next(f for f in F.FINDINGS if f.key == "compute")
    assert R.figures_for(compute, figs, tmp_path) == []


def test_md_table_formats():
    df = pd.DataFrame({"loss": [2.4567, math.nan], "tokens": [1_500_000, 8192], "flops": [2.7e13, 1.0]},
                      index=pd.Index(["a|b", "c"], name="run"))
    lines = R.md_table(df).splitlines()
    assert lines[0] == "| run | loss | tokens | flops |"
    assert lines[2] == "| a\\|b | 2.457 | 1,500,000 | 2.7e+13 |"
    assert lines[3] == "| c | — | 8192 | 1.000 |"


def test_partial_results_never_crash(good):
    only_base = T.Results({"base": good.frame("base")}, good.flops_per_token)
    verdicts = F.judge_all(only_base)
    assert {v.status for _, v in verdicts} == {"not run"}
    assert not any("could not judge" in v.measured for _, v in verdicts)
    assert "| **not run** |" in R.render_report(only_base, ".", verdicts=verdicts)


def test_scale_study_figures_draw_every_size(good):
    from cptlab import viz

    finals = metrics.final_losses(good.frame("scales"))
    fig = viz.plot_scale_forgetting(finals)
    assert [ax.get_title() for ax in fig.axes] == ["weak shift (en-man -> en-docs), chosen replay 5%",
                                                   "strong shift (en-man -> de-man), chosen replay 25%"]
    no_replay, replay = fig.axes[0].get_lines()[:2]
    assert no_replay.get_ydata().tolist() == pytest.approx([0.2, 0.2])  # FORGET["weak"] at both sizes
    assert replay.get_ydata().tolist() == pytest.approx([0.2 * 0.9, 0.2 * 0.9])  # 5% replay
    fig = viz.plot_scale_compute(good.frame("scales"))  # eval lines work too
    union, continual = fig.axes[1].get_lines()[:2]
    assert len(union.get_xdata()) == 2 and union.get_xdata()[0] < union.get_xdata()[1]
    assert (continual.get_xdata() < union.get_xdata()).all()  # the continual run pays only for its stage
    empty = viz.plot_scale_forgetting(pd.DataFrame())
    assert "no runs" in empty.axes[0].get_title()
