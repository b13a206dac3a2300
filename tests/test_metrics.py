"""Metrics on hand-made evaluation lines: final losses, forgetting, adaptation, seeds, compute, tables."""

import json
import math

import pandas as pd
import pytest

from cptlab.analysis import metrics as M
from cptlab.analysis.runs import load_experiment
from cptlab.study import paper
from cptlab.training.store import runs_root


def run(run_id: str, evals: list[tuple[int, str, dict[str, float]]], **labels) -> pd.DataFrame:
    """Evaluation lines of one run: (tokens, stage, {set: loss}) each, step = tokens // 10."""
    rows = [{"step": t // 10, "tokens": t, "stage": st, "lr": 1e-3, **{f"val_{k}": v for k, v in val.items()}}
            for t, st, val in evals]
    df = pd.DataFrame(rows)
    for key, value in {"name": run_id, **labels}.items():
        df[key] = [value] * len(df) if isinstance(value, list) else value
    df["run_id"] = run_id
    df["done"] = True
    return df


def frames(*dfs: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(dfs, ignore_index=True)


def base(seed: int = 0, d0: float = 3.0) -> pd.DataFrame:
    evals = [(100, "pretrain", {"a": d0 + 1, "b": 4.5}), (200, "pretrain", {"a": d0, "b": 4.0}),
             (300, "pretrain", {"a": d0, "b": 4.0})]
    return run(f"base-{seed}", evals,
               role="base", d0="a", seed=seed, experiment="base", compute_tokens=300)


def continual(name: str, d0: float, d1: float, seed: int = 0, shift: str = "weak", replay: float = 0.0,
              **labels) -> pd.DataFrame:
    """A continual run from the base model: its start evaluation, one far from the end, two at the end."""
    evals = [(300, "continue", {"a": 3.0, "b": 4.0}), (400, "continue", {"a": 9.0, "b": 9.0}),
             (500, "continue", {"a": d0, "b": d1}), (600, "continue", {"a": d0, "b": d1})]
    return run(f"{name}-{seed}", evals,
               role="continual", d0="a", d1="b", seed=seed, shift=shift, replay=replay, experiment="replay",
               compute_tokens=600, switch_tokens=300, **labels).assign(name=name)


def union(shift: str, d0: float, d1: float, seed: int = 0, tokens: int = 600) -> pd.DataFrame:
    evals = [(tokens // 3, "union", {"a": 9.0, "b": 9.0}), (2 * tokens // 3, "union", {"a": d0, "b": d1}),
             (tokens, "union", {"a": d0, "b": d1})]
    return run(f"union-{shift}-{tokens}-{seed}", evals,
               role="union", d0="a", d1="b", seed=seed, shift=shift, experiment="union",
               compute_tokens=tokens).assign(name=f"union-{shift}-{tokens}")


# -- final losses ----------------------------------------------------------------------------------------

def test_final_loss_is_the_mean_of_the_last_k_evaluations_of_the_last_stage():
    df = run("r", [(10, "one", {"a": 7.0}), (20, "two", {"a": 4.0}), (30, "two", {"a": 3.0}),
                   (40, "two", {"a": 2.0})], role="union", d0="a", d1="a")
    assert M.K_FINAL == 2
    finals = M.final_losses(df)
    assert finals.loc[0, "val_a"] == pytest.approx(2.5)
    assert (finals.loc[0, "stage"], finals.loc[0, "tokens"], finals.loc[0, "n_evals"]) == ("two", 40, 2)
    assert M.final_losses(df, k=3).loc[0, "val_a"] == pytest.approx(3.0)
    assert M.final_losses(df, stage="one").loc[0, "val_a"] == pytest.approx(7.0)
    assert M.final_losses(df, stage="three").empty


def test_start_evaluation_is_never_part_of_the_final_loss():
    evals = [(300, "continue", {"a": 9.0}), (400, "continue", {"a": 3.0})]
    finals = M.final_losses(run("c", evals, role="continual", d0="a"))
    assert finals.loc[0, "val_a"] == pytest.approx(3.0) and finals.loc[0, "n_evals"] == 1
    from_scratch = M.final_losses(run("u", evals, role="union", d0="a"))
    assert from_scratch.loc[0, "val_a"] == pytest.approx(6.0)
    start = M.start_losses(run("c", evals, role="continual", d0="a"))
    assert start.loc[0, "val_a"] == 9.0


def test_d0_d1_and_avg_follow_the_run_labels():
    finals = M.final_losses(frames(continual("x", 3.5, 2.5), base()))
    x = finals.set_index("name").loc["x"]
    assert (x["D0"], x["D1"], x["avg"]) == pytest.approx((3.5, 2.5, 3.0))
    assert x["replay"] == 0.0 and x["shift"] == "weak" and x["run_id"] == "x-0"
    b = finals.set_index("name").loc["base-0"]
    assert b["D0"] == 3.0 and math.isnan(b["D1"]) and math.isnan(b["avg"])


def test_final_losses_from_metrics_jsonl(tmp_path):
    d = tmp_path / "replay" / "weak-replay0.05-abc"
    d.mkdir(parents=True)
    lines = [{"step": 30, "tokens": 300, "stage": "continue", "lr": 0.0,
              "val": {"en-man": 3.0, "en-pydoc": 4.0}}]
    for step, d0, d1 in ((35, 3.6, 3.5), (40, 3.4, 3.2), (45, 3.2, 3.0)):
        lines.append({"step": step, "tokens": step * 10, "stage": "continue", "lr": 1e-3, "train_loss": 3.0,
                      "tokens_by_source": {"en-pydoc": 100}, "tokens_per_s": 1.0})
        lines.append({"step": step, "tokens": step * 10, "stage": "continue", "lr": 1e-3,
                      "val": {"en-man": d0, "en-pydoc": d1}})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    labels = {"experiment": "replay", "name": "weak-replay0.05", "role": "continual", "shift": "weak",
              "d0": "en-man", "d1": "en-pydoc", "replay": 0.05, "seed": 0, "compute_tokens": 450,
              "switch_tokens": 300}
    (d / "labels.json").write_text(json.dumps(labels))
    df = load_experiment(tmp_path, "replay")
    assert M.final_losses(df).empty  # not finished (no DONE): its last losses are not final
    finals = M.final_losses(df, finished_only=False)
    finals = M.add_forgetting(finals, base=pd.DataFrame({"seed": [0], "val_en-man": [3.0]}))
    row = finals.iloc[0]
    assert (row["D0"], row["D1"], row["avg"]) == pytest.approx((3.3, 3.1, 3.2))
    assert row["forgetting"] == pytest.approx(0.3)
    assert not row["done"]


# -- forgetting and adaptation ---------------------------------------------------------------------------

def test_forgetting_against_the_base_of_the_same_seed_else_the_mean_base():
    df = frames(base(0, 3.0), base(1, 3.2), *[continual("x", 3.5, 2.5, seed=s) for s in (0, 1, 2)])
    finals = M.add_forgetting(M.final_losses(df)).set_index("run_id")
    assert finals.loc["x-0", "forgetting"] == pytest.approx(0.5)
    assert finals.loc["x-1", "forgetting"] == pytest.approx(0.3)
    assert finals.loc["x-2", "forgetting"] == pytest.approx(0.4)  # no base of seed 2: mean of the bases
    assert finals.loc["base-0", "forgetting"] == pytest.approx(0.0)


def test_forgetting_without_a_base_is_nan():
    finals = M.add_forgetting(M.final_losses(continual("x", 3.5, 2.5)))
    assert math.isnan(finals.loc[0, "forgetting"])


def test_adaptation_and_gap_to_the_union_of_the_same_shift_and_compute():
    df = frames(union("weak", 3.1, 3.4), union("weak", 3.0, 3.0, tokens=1200), union("strong", 3.1, 2.0),
                continual("w", 3.5, 3.3), continual("s", 3.5, 2.5, shift="strong"))
    finals = M.add_adaptation(M.final_losses(df)).set_index("name")
    assert finals.loc["w", "adaptation"] == pytest.approx(3.3)
    assert finals.loc["w", "union_D1"] == pytest.approx(3.4)  # the union with the run's compute (600)
    assert finals.loc["w", "d1_gap_to_union"] == pytest.approx(-0.1)
    assert finals.loc["s", "d1_gap_to_union"] == pytest.approx(0.5)
    assert finals.loc["union-weak-1200", "d1_gap_to_union"] == pytest.approx(0.0)


# -- seeds -----------------------------------------------------------------------------------------------

def test_seed_means_average_runs_that_differ_only_in_seed():
    df = frames(continual("x", 3.0, 2.0, seed=0), continual("x", 3.2, 2.4, seed=1), continual("y", 5.0, 5.0))
    means = M.seed_means(M.final_losses(df)).set_index("name")
    assert means.loc["x", "D0"] == pytest.approx(3.1) and means.loc["x", "avg"] == pytest.approx(2.65)
    assert means.loc["x", "D0_std"] == pytest.approx(math.sqrt(0.02))
    assert means.loc["x", "n_seeds"] == 2 and means.loc["y", "n_seeds"] == 1
    assert math.isnan(means.loc["y", "D0_std"])
    assert "seed" not in means.columns and "run_id" not in means.columns


# -- compute ---------------------------------------------------------------------------------------------

def test_compute_counts_the_shared_base_model_apart():
    finals = M.add_compute(M.final_losses(frames(continual("x", 3.0, 2.0), union("weak", 3.0, 3.0))), 10.0)
    finals = finals.set_index("name")
    assert finals.loc["x", "new_tokens"] == 300 and finals.loc["x", "compute_flops"] == 6000
    assert finals.loc["union-weak-600", "new_tokens"] == 600
    assert finals.loc["union-weak-600", "new_flops"] == 6000


# -- tables ----------------------------------------------------------------------------------------------

def test_replay_table_shaped_like_the_papers():
    df = frames(base(), union("weak", 3.05, 3.4), union("strong", 3.0, 2.0),
                *[continual(f"weak-replay{r:g}", 3.2 - r, 3.3 + r, replay=r) for r in (0.0, 0.01, 0.05, 0.5)],
                continual("strong-replay0", 3.9, 2.3, shift="strong"))
    table = M.replay_table(M.final_losses(df), "weak")
    assert list(table.index) == ["0%", "1%", "5%", "10%", "25%", "50%", "union", "base"]
    assert {"D0", "D1", "avg", "forgetting", "n_seeds"} <= set(table.columns)
    assert table.loc["0%", "D0"] == pytest.approx(3.2) and table.loc["0%", "forgetting"] == pytest.approx(0.2)
    assert table.loc["50%", "avg"] == pytest.approx((2.7 + 3.8) / 2)
    assert math.isnan(table.loc["10%", "D0"]) and table.loc["10%", "n_seeds"] == 0  # not run
    assert table.loc["union", "D1"] == pytest.approx(3.4)
    assert table.loc["base", "D0"] == 3.0 and table.loc["base", "D1"] == 4.0  # base on this shift's D1 set
    strong = M.replay_table(M.final_losses(df), "strong")
    assert strong.loc["0%", "forgetting"] == pytest.approx(0.9) and strong.loc["union", "D1"] == 2.0
    empty = M.replay_table(pd.DataFrame(), "weak")
    assert empty["D0"].isna().all() and len(empty) == 8


def test_paper_tables():
    weak = M.paper_replay_table("weak")
    assert weak.loc["0%", "forgetting"] == pytest.approx(0.27)
    assert math.isnan(weak.loc["25%", "D0"])
    assert M.paper_replay_table("strong").loc["25%", "avg"] == 1.75
    lr = M.paper_max_lr_table("strong")
    assert lr.loc["2x", "D0"] == 3.63 and math.isnan(lr.loc["re-warm, no re-decay", "D0"])
    both = M.side_by_side(M.paper_replay_table("weak"), weak)
    assert list(both.columns[:2]) == ["D0", "D0 paper"]
    assert (both["D0"].dropna() == both["D0 paper"].dropna()).all()


def test_max_lr_table_by_run_names():
    df = frames(base(), continual("weak-constant-min", 3.1, 3.6), continual("weak-maxlr0.5x", 3.15, 3.35),
                continual("weak-replay0", 3.2, 3.3), continual("weak-maxlr2x", 3.3, 3.25))
    table = M.max_lr_table(M.final_losses(df), "weak")
    assert list(table.index) == list(paper.MAX_LR_ROWS)
    assert table["D0"].tolist()[2:] == pytest.approx([3.15, 3.2, 3.3])
    assert table.loc["constant at min", "forgetting"] == pytest.approx(0.1)
    assert math.isnan(table.loc["re-warm, no re-decay", "D0"])


# -- curves ----------------------------------------------------------------------------------------------

def test_peak_rise_from_the_start_evaluation():
    evals = [(300, "continue", {"a": 3.0}), (400, "continue", {"a": 3.25}), (500, "continue", {"a": 3.1}),
             (600, "continue", {"a": 2.9})]
    df = run("c", evals, role="continual", d0="a")
    rise = M.peak_rise(df).iloc[0]
    assert (rise["start"], rise["peak"], rise["rise"], rise["last"]) == pytest.approx((3.0, 3.25, 0.25, 2.9))
    assert rise["peak_tokens"] == 400 and not rise["peak_is_last"]
    scratch = run("u", [(400, "x", {"a": 3.25}), (600, "x", {"a": 3.5})], role="union", d0="a")
    assert M.peak_rise(scratch).empty  # no start: left out ...
    assert bool(M.peak_rise(scratch, start=3.0).iloc[0]["peak_is_last"])  # ... unless given one


def test_boundary_jumps_at_each_switch():
    evals = [(10, "c1", {"b": 3.0}), (20, "c1", {"b": 2.8}), (30, "c2", {"b": 2.9}), (40, "c2", {"b": 2.5}),
             (50, "c3", {"b": 2.4})]
    df = run("i", evals, role="infinite", d1="b", switch_tokens=[20, 40])
    jumps = M.boundary_jumps(df)
    assert jumps["boundary"].tolist() == [20, 40]
    assert jumps["jump"].tolist() == pytest.approx([0.1, -0.1])


def test_runs_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CPTLAB_RUNS", raising=False)
    assert runs_root() == tmp_path.resolve() / "runs"
    monkeypatch.setenv("CPTLAB_RUNS", "elsewhere/runs")
    assert runs_root() == tmp_path.resolve() / "elsewhere" / "runs"
    assert runs_root().is_absolute()
