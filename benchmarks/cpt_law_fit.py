"""Cost of the continual-pre-training law's study (``cpt_validation.study``: both shifts fitted with and
without the base model's history, every held-out run predicted, the planner judged) at a scale, on a
synthetic run store whose losses a known law generates (8 evaluations a stage, as at tiny): what 09_predict
and REPORT.md add to ``make reproduce``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cpt_law_fit.py [--scale tiny]

Prints CPU and wall seconds and the targets judged (met by construction: a self-consistency check, not a
measurement of the law on real runs). Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cptlab.analysis import cpt_law as C
from cptlab.analysis import cpt_validation as V
from cptlab.analysis import laws as L
from cptlab.analysis.runs import load_runs
from cptlab.study import experiments as E
from cptlab.study import paper
from cptlab.training.store import RunStore

SHAPE = {"L0": 3.0, "A": 1.0, "alpha": 0.5, "C1": 0.004, "C2": 0.004, "E": 0.05, "beta": 1.0, "kappa": 4.0}


def write_run(store: RunStore, run: E.Run, laws: dict[str, C.CptLaw], evals: int = 8) -> None:
    """A finished run whose losses on every eval set ``laws`` give (D0's law on D0, D1's on the rest)."""
    lr = L.lr_history(run)
    start = len(lr) - sum(L.stage_steps(run.config))
    steps = np.unique(np.linspace(start, len(lr), evals + 1).astype(int))
    steps = steps[steps > 0]
    switch, r = C.continual_history(run)
    t = run.config.train
    stage = run.config.stages[-1].name
    lines = [{"step": int(s), "tokens": int(s) * t.batch_size * t.seq_len, "stage": stage,
              "lr": float(lr[s - 1]), "val": {}} for s in steps]
    for name in run.config.eval.sets:
        law = laws["D0"] if name == paper.D0 else laws["D1"]
        for line, value in zip(lines, law.loss(lr, switch, steps, r[steps])):
            line["val"][name] = float(value)
    path = store.path(run.experiment, run.run_id)
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (path / "labels.json").write_text(json.dumps(run.labels))
    (path / "DONE").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="tiny")
    args = parser.parse_args()
    lr_ref = E.base_run(args.scale).config.stages[0].schedule.max_lr
    laws = {"D0": C.CptLaw({**SHAPE, "B": 0.3}, 0.95, lr_ref, paper.D0, ("synthetic",)),
            "D1": C.CptLaw({**SHAPE, "L0": 3.2, "B": -0.4}, 0.95, lr_ref, "D1", ("synthetic",))}
    store = RunStore(Path(tempfile.mkdtemp(prefix="cpt-bench-")))
    runs = [E.base_run(args.scale)]
    for shift in paper.SHIFTS:
        fit, held = V.shift_runs(shift, args.scale)
        runs += [*fit, *held, *V.outside_runs(shift, args.scale)]
    for run in runs:
        write_run(store, run, laws)
    frame = load_runs(runs, store)
    wall, cpu = time.perf_counter(), time.process_time()
    study = V.study(frame, args.scale, store=store)
    print(f"cpt_validation.study at {args.scale}, {len(runs)} runs: {time.process_time() - cpu:.1f} s CPU, "
          f"{time.perf_counter() - wall:.1f} s wall")
    print(V.judge(study.held_out()).to_string())
    print(study.verdicts.to_string())


if __name__ == "__main__":
    main()
