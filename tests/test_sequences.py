"""The sequence study: its runs, the forgetting matrix and its summaries, the report's questions, the
figures and the sequence browser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cptlab.analysis import sequences as A
from cptlab.analysis.report import render_report
from cptlab.analysis.results import Results
from cptlab.config import RunRef
from cptlab.study import sequences as S
from cptlab.study.runner import run_dir
from cptlab.ui import SequenceBrowser
from cptlab.viz import plot_forgetting_matrices, plot_sequence_curves

DATASETS = list(S.SEQUENCE)


# -- the runs ------------------------------------------------------------------------------------------------

def test_the_study_builds_every_method_on_the_shared_base_model():
    runs = S.sequence_study("smoke", device="cpu")
    base = runs[0]
    names = [r.name for r in runs]
    assert names[0] == "base" and "seq-union" in names and "seq-infinite" in names
    assert {r.labels["variant"] for r in runs[1:]} >= {"none", "replay", "ewc 100", "ewc 1000", "lwf 0.3",
                                                        "lwf 3", "infinite", "union"}
    for run in runs[1:]:
        if run.labels["method"] in ("none", "replay", "ewc", "lwf"):
            first = run.config.stages[0]
            assert first.init_from == RunRef("base", base.run_id, "pretrain")
            assert [st.name for st in run.config.stages] == DATASETS[1:]
        assert run.config.eval.sets == DATASETS
    replay = next(r for r in runs if r.name == "seq-replay")
    assert replay.config.stages[1].replay.weights() == {"en-man": 1.0, "en-docs": 1.0}
    ewc = next(r for r in runs if r.labels.get("variant") == "ewc 100")
    assert ewc.config.stages[1].regularizer.data == {"en-man": 1.0, "en-docs": 1.0}
    for run in runs:
        run.config.validate()


def test_every_method_has_the_same_tokens():
    runs = S.sequence_study("tiny")
    tokens = {r.labels["variant"]: r.labels["compute_tokens"] for r in runs[1:]}
    assert len(set(tokens.values())) == 1
    union = next(r for r in runs if r.name == "seq-union")
    assert union.config.stages[0].tokens == tokens["union"]
    infinite = next(r for r in runs if r.name == "seq-infinite")
    assert sum(st.tokens for st in infinite.config.stages) == tokens["infinite"]


# -- the matrix and its summaries ----------------------------------------------------------------------------

# L[i, j]: after dataset i, on dataset j (3 datasets)
MATRIX = np.array([[3.0, 4.0, 6.0],
                   [3.2, 3.5, 5.5],
                   [3.4, 3.7, 3.9]])


def rows_of(variant: str, matrix: np.ndarray, flops: float = 1e15, vocab: int = 1024) -> list[dict]:
    return [{"variant": variant, "method": variant.split(" ")[0], "weight": None, "after": DATASETS[i],
             "position": i, **{f"val_{d}": matrix[i, j] for j, d in enumerate(DATASETS)}, "flops": flops,
             "vocab_size": vocab} for i in range(len(DATASETS))]


def test_summaries_follow_their_definitions():
    rows = pd.DataFrame(rows_of("none", MATRIX))
    matrix = A.forgetting_matrix(rows, "none", DATASETS)
    assert matrix.to_numpy().tolist() == MATRIX.tolist()
    s = A.summarize(matrix, 1024)
    assert s["forgetting en-man"] == pytest.approx(0.4)
    assert s["forgetting en-docs"] == pytest.approx(0.2)
    assert s["BWT"] == pytest.approx(-0.3)  # mean of (3.0 - 3.4, 3.5 - 3.7)
    assert s["FWT"] == pytest.approx(np.mean([math.log(1024) - 4.0, math.log(1024) - 5.5]))
    assert s["average loss"] == pytest.approx(np.mean([3.4, 3.7, 3.9]))


def test_a_union_has_only_its_last_row():
    rows = pd.DataFrame([rows_of("union", MATRIX)[-1]])
    matrix = A.forgetting_matrix(rows, "union", DATASETS)
    assert matrix.iloc[:2].isna().all().all() and matrix.iloc[2].tolist() == MATRIX[2].tolist()
    s = A.summarize(matrix, 1024)
    assert math.isnan(s["BWT"]) and s["average loss"] == pytest.approx(MATRIX[2].mean())


def study_table(**changes: np.ndarray) -> pd.DataFrame:
    better = MATRIX - np.array([[0, 0, 0], [0.1, 0, 0], [0.2, 0.1, 0]])  # forgets less on both columns
    matrices = {"none": MATRIX, "replay": better, "ewc 100": MATRIX + 0.05, "ewc 1000": better + 0.01,
                "lwf 0.3": MATRIX + 0.2, "infinite": MATRIX * 1.01, "union": MATRIX - 0.05, **changes}
    rows = [r for v, m in matrices.items() for r in rows_of(v, m, flops=1.1e15 if " " in v else 1e15)]
    return A.summary_table(pd.DataFrame(rows), DATASETS)


def test_the_questions_answer_what_was_measured():
    answers = {q.number: (answer, text) for q, answer, text in A.answer_all(study_table())}
    assert answers["S1"][0] is True
    assert answers["S2"][0] is False and "best ewc 1000" in answers["S2"][1] and "1.10x" in answers["S2"][1]
    assert answers["S3"][0] is False
    assert answers["S4"][0] is True and "+1.00%" in answers["S4"][1]
    assert answers["S5"][0] is True


def test_the_questions_can_say_no_and_not_run():
    worse = MATRIX + np.array([[0, 0, 0], [0, 0, 0], [0.5, 0, 0]])  # forgets en-man more than none
    answers = {q.number: answer for q, answer, _ in A.answer_all(study_table(replay=worse,
                                                                            infinite=MATRIX * 1.03))}
    assert answers["S1"] is False and answers["S4"] is False and answers["S5"] is False
    table = study_table().drop(index=["lwf 0.3", "union"])
    answers = {q.number: answer for q, answer, _ in A.answer_all(table)}
    assert answers["S3"] is None and answers["S5"] is None


# -- from a run store ----------------------------------------------------------------------------------------

def write_run(root: Path, run, stage_losses: dict[str, dict[str, float]], extra_flops: int = 0) -> None:
    """A finished run directory with one evaluation line per stage (and its resolved config)."""
    path = run_dir(run, root)
    path.mkdir(parents=True)
    cfg = run.config.resolve(vocab_size=1024)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "labels.json").write_text(json.dumps(run.labels))
    lines, tokens = [], 0
    for stage in cfg.stages:
        tokens += stage.tokens
        lines.append({"step": 1, "tokens": tokens, "stage": stage.name, "lr": 0.0, "train_loss": 1.0,
                      **({"extra_flops": extra_flops} if extra_flops else {})})
        if stage.name in stage_losses:
            lines.append({"step": 1, "tokens": tokens, "stage": stage.name, "lr": 0.0,
                          "val": stage_losses[stage.name]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "DONE").write_text("")


def test_rows_come_from_the_store_with_the_base_row_and_counted_flops(tmp_path):
    runs = S.sequence_study("smoke")
    base, ewc = runs[0], next(r for r in runs if r.labels.get("variant") == "ewc 100")
    row = {d: float(v) for d, v in zip(DATASETS, MATRIX[0])}
    write_run(tmp_path, base, {"pretrain": row})
    write_run(tmp_path, ewc, {d: {k: float(v) for k, v in zip(DATASETS, MATRIX[i])}
                              for i, d in enumerate(DATASETS) if i}, extra_flops=12345)
    rows = A.sequence_rows(runs, tmp_path)
    assert list(rows["variant"]) == ["ewc 100"] * 3  # runs not trained are left out
    matrix = A.forgetting_matrix(rows, "ewc 100", DATASETS)
    np.testing.assert_allclose(matrix.to_numpy(), MATRIX)
    from cptlab.training.model import GPT

    cfg = ewc.config.resolve(vocab_size=1024)
    expected = ewc.labels["compute_tokens"] * GPT.count_flops_per_token(cfg.model, cfg.train.seq_len) + 12345
    assert rows["flops"].unique().tolist() == [expected]


# -- figures and the widget ----------------------------------------------------------------------------------

def test_matrices_figure_draws_one_panel_per_method_with_values():
    rows = pd.DataFrame(rows_of("none", MATRIX) + rows_of("replay", MATRIX - 0.1))
    fig = plot_forgetting_matrices(rows, ["none", "replay", "never run"], DATASETS)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["none", "replay"]
    assert "3.40" in [t.get_text() for t in heatmaps[0].texts]


def _curves() -> pd.DataFrame:
    rows = []
    for variant, offset in (("none", 0.0), ("replay", -0.1)):
        for t in (1, 2, 3, 4):
            rows.append({"role": "sequence", "variant": variant, "method": variant, "name": f"seq-{variant}",
                         "stage": "x", "tokens": t * 1000, "switch_tokens": [2000, 3000],
                         **{f"val_{d}": 4 - 0.1 * t + offset for d in DATASETS}})
    return pd.DataFrame(rows)


def test_sequence_curves_draw_each_method_on_each_dataset():
    fig = plot_sequence_curves(_curves(), ["none", "replay"], DATASETS[:2])
    assert [ax.get_title() for ax in fig.axes] == DATASETS[:2]
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "none" in labels and "replay" in labels and labels.count("next dataset") == 1


def test_the_browser_redraws_from_its_picks():
    rows = pd.DataFrame(rows_of("none", MATRIX) + rows_of("replay", MATRIX - 0.1))
    browser = SequenceBrowser(rows, _curves(), DATASETS)
    assert list(browser.summary.index) == ["none", "replay"]
    assert browser.image.value[:4] == b"\x89PNG"
    browser.methods.value = ("replay",)
    assert list(browser.summary.index) == ["replay"]
    heatmaps = [ax for ax in browser.figure.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["replay"]
    browser.datasets.value = (DATASETS[0],)
    curve_axes = [ax for ax in browser.figure.axes if not ax.images and ax.get_title()]
    assert [ax.get_title() for ax in curve_axes] == [DATASETS[0]]
    browser.methods.value = ()
    assert "no method" in browser.table.value


def test_the_report_answers_the_questions_or_says_not_run(tmp_path):
    rows = pd.concat([pd.DataFrame(rows_of(v, m)) for v, m in (("none", MATRIX), ("replay", MATRIX - 0.1))])
    text = render_report(Results(sequence=rows), tmp_path, "smoke")
    section = text[text.index("## Beyond the paper"):]
    assert "### Sequences of datasets (en-man -> en-docs -> de-man)" in section
    assert "| S1 | Does replay from all earlier datasets keep every column's forgetting below" in section
    assert "**not run** |" in section  # S2: no EWC run
    assert "Forgetting matrix, replay" in section
    empty = render_report(Results(), tmp_path, "smoke")
    assert "### Sequences of datasets" in empty and "not run" in empty[empty.index("## Beyond the paper"):]
