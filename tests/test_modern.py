"""Today's recipes: the linear schedule (D2Z) and WSD-S plans, the explorer's new kinds, the runs of the
comparison (same compute as the paper's recipe, existing runs' identities kept) and the questions asked of
their tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cptlab import schedules as S
from cptlab.analysis import modern as A
from cptlab.study import experiments as E
from cptlab.study import modern as M
from cptlab.study.paper import SHIFTS
from cptlab.ui import ScheduleExplorer

# -- schedules -----------------------------------------------------------------------------------------------

def test_linear_warms_up_then_decays_linearly_to_min_lr():
    lr = S.build({"kind": "linear", "max_lr": 1.0, "min_lr": 0.0, "warmup": 0.1}, 100)
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(99) == 0.0 and lr(500) == 0.0  # zero at the last step, and after it
    values = [lr(t) for t in range(10, 100)]
    assert np.allclose(np.diff(values), np.diff(values)[0])  # one slope


def test_linear_cannot_continue_and_repeats_per_stage():
    spec = {"kind": "linear", "max_lr": 1.0, "min_lr": 0.0, "warmup": 0.0}
    with pytest.raises(ValueError, match="cannot continue"):
        S.continuation(spec)
    values = S.lr_values(S.multi_stage(spec, 2, 10))
    assert values[0] == values[10] == 1.0 and values[9] == values[19] == 0.0


def test_wsd_s_decays_every_stage_and_resumes_at_max_without_warmup():
    plan = S.wsd_s({"kind": "wsd", "max_lr": 1.0, "min_lr": 0.1, "warmup": 0.1, "decay": 0.2}, 3, 10)
    values = S.lr_values(plan)
    assert values[0] == 0.0 and [values[9], values[19], values[29]] == [pytest.approx(0.1)] * 3
    assert values[10] == values[20] == 1.0  # the next stage starts at the max LR from the decayed model
    with pytest.raises(ValueError, match="WSD-S takes a wsd spec"):
        S.wsd_s({"kind": "cosine"}, 2, 10)


def test_explorer_draws_d2z_and_wsd_s():
    ex = ScheduleExplorer(kind="d2z", compare=("wsd-s",), n_stages=2, tokens_per_stage=1e6,
                          steps_per_stage=50)
    assert ex.error is None
    _, y = ex.lr_curve()
    assert y[-1] == 0.0 and y[49] == 0.0  # D2Z ends each stage at 0
    _, wsd_s = ex.curves()["wsd-s"]
    assert wsd_s[50] == ex.max_lr.value and math.isclose(wsd_s[49], ex.min_lr.value)


# -- the runs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs() -> dict[str, E.Run]:
    return {r.name: r for r in M.modern_runs("tiny")}


def test_new_runs_are_valid_and_cost_what_the_paper_recipe_costs(runs):
    for run in runs.values():
        run.config.validate()
    s_tokens = E.continual_run("replay", "x", "weak", "tiny").config.stages[0].tokens
    for shift in SHIFTS:
        trunk = runs[f"{shift}-stable"].config.stages[0].tokens
        for tail in ("decay", "merge", "anneal-order0"):
            assert trunk + runs[f"{shift}-{tail}"].config.stages[0].tokens == s_tokens
        assert runs[f"{shift}-schedulefree"].config.stages[0].tokens == s_tokens
        assert runs[f"{shift}-schedulefree"].config.stages[0].optimizer == "schedulefree_adamw"
        assert runs[f"{shift}-merge"].config.stages[0].merge.count == M.MERGE_COUNT


def test_anneals_differ_only_in_their_data_order(runs):
    a, b = runs["weak-anneal-order0"].config, runs["weak-anneal-order1"].config
    assert a.train.seed == 0 and b.train.seed == 1
    b.train.seed = 0
    assert a.hash() == b.hash()


def test_existing_runs_keep_their_identity():
    """The base model's id in the run store of today's main (hash-neutral new fields)."""
    assert E.base_run("tiny").run_id == "base-84312716cfc4"


def test_wsd_s_starts_from_wsds_first_anneal(runs):
    start = runs["sched-wsd-s"].config.stages[0].init_from
    assert (start.experiment, start.stage) == ("infinite", "anneal")
    assert start.run == next(r.run_id for r in E.infinite_schedules("tiny") if r.name == "anneal-wsd-chunk1")


# -- the questions -------------------------------------------------------------------------------------------

def _table(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(values, orient="index", columns=["D0", "D1"])
    table["avg"] = (table["D0"] + table["D1"]) / 2
    return table


def test_a_question_is_answered_either_way_with_its_margin():
    rows = list(A.ROWS)
    table = _table({A.PAPER_ROW: (3.0, 2.0), rows[3]: (2.9, 2.0), rows[1]: (3.1, 2.1)})
    questions = {q.number: q for q in A.shift_questions(table, "weak")}
    assert questions["W1"].answer is True and "+0.050" in questions["W1"].measured
    assert questions["W2"].answer is False and "-0.100" in questions["W2"].measured
    assert questions["W3"].answer is None and questions["W3"].measured == "not run"  # no merge row


def test_chunk_and_microanneal_questions():
    chunks = pd.DataFrame({"chunk 1": [3.0, 2.9, 3.1, 3.1], "chunk 2": [2.8, 2.7, 2.9, 2.8],
                           "chunk 3": [2.7, 2.6, 2.8, 2.9]},
                          index=["cosine to 10%", "D2Z", "WSD (branch)", "WSD-S"])
    d2z, wsd_s = A.chunk_questions(chunks)
    assert d2z.answer is True and wsd_s.answer is False  # WSD-S wins chunk 2, loses chunk 3
    micro = A.with_ranks(pd.DataFrame({"microanneal gain": [0.1, 0.3], "full run gain": [0.2, 0.5]},
                                      index=["a", "b"]))
    assert A.microanneal_question(micro).answer is True
    micro["full run rank"] = [1, 2]
    assert A.microanneal_question(micro).answer is False
    tied = A.with_ranks(pd.DataFrame({"microanneal gain": [0.0, 0.0], "full run gain": [0.2, 0.5]},
                                     index=["a", "b"]))  # a microanneal that did not move the model
    assert list(tied["microanneal rank"]) == [1, 1] and A.microanneal_question(tied).answer is False
