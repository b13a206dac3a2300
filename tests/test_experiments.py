"""Experiment builders and the runner: valid configs, shared runs, caching by config hash."""

from __future__ import annotations

import pytest

from cptlab.analysis import runs as loaded
from cptlab.data.corpus import SHIPPED
from cptlab.study import experiments as E
from cptlab.study import paper, runner
from cptlab.study.scales import SCALES


def all_runs(scale: str) -> list[E.Run]:
    runs = []
    for shift in paper.SHIFTS:
        runs += E.replay_sweep(shift, scale) + E.max_lr_ablation(shift, scale)
        runs += E.compute_vs_loss(shift, scale)
        runs += E.scale_ladder(shift, scale)
    return runs + E.warmup_ablation("weak", scale) + E.rewarm_same_data(scale) \
        + E.infinite_schedules(scale)


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_run_of_every_scale_validates(scale):
    for run in all_runs(scale):
        run.config.validate(SHIPPED)


def test_shared_runs_share_a_directory(tmp_path):
    root = str(tmp_path)
    sweep = {r.run_id: r for r in E.replay_sweep("weak", "smoke")}
    warm = E.warmup_ablation("weak", "smoke")
    lr = E.max_lr_ablation("weak", "smoke")
    one_percent = [r for r in warm if r.labels["warmup"] == 0.01][0]
    one_x = [r for r in lr if r.labels["max_lr"] == SCALES["smoke"].max_lr
             and r.labels["schedule"] == "cosine"]
    assert one_percent.run_id in sweep and one_x[0].run_id in sweep
    assert runner.run_dir(one_percent, root) == runner.run_dir(sweep[one_percent.run_id], root)
    assert len({r.run_id for r in warm}) == 4


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_scale_ladder_spacing_token_budgets_and_shared_top_rung(scale):
    """Rungs 2x (tiny) to 4x (small) apart; budgets ~ N ** ladder_token_power (tiny: one budget, small:
    sqrt(N)); the top rung is the scale's own model and reuses the replay sweep's runs."""
    s = SCALES[scale]
    runs = E.scale_ladder("strong", scale)
    bases = [r for r in runs if r.labels["role"] == "base"]
    sizes = [r.labels["n_params"] for r in bases]
    assert len(bases) == len(s.ladder) + 1 >= 3 and sizes == sorted(sizes)
    for small, big, b_small, b_big in zip(sizes, sizes[1:], bases, bases[1:]):
        assert 1.5 < big / small < 4.5  # in non-embedding parameters
        ratio = b_small.config.stages[0].tokens / b_big.config.stages[0].tokens
        assert ratio == pytest.approx((small / big) ** s.ladder_token_power, rel=0.02)
    assert SCALES["tiny"].ladder_token_power == 0.0 and SCALES["small"].ladder_token_power == 0.5
    top = [r for r in runs if r.labels["n_params"] == sizes[-1]]
    sweep = {r.run_id for r in E.replay_sweep("strong", scale)}
    assert {r.run_id for r in top if r.labels["role"] != "base"} <= sweep  # the replay sweep's own runs
    assert bases[-1].run_id == E.base_run(scale).run_id
    assert len({r.run_id for r in runs}) == len(runs)  # smaller rungs never collide with each other


def test_any_change_makes_a_new_hash():
    a = E.continual_run("replay", "x", "weak", "smoke", replay=0.05)
    b = E.continual_run("replay", "x", "weak", "smoke", replay=0.10)
    c = E.continual_run("replay", "x", "weak", "smoke", replay=0.05, seed=1)  # another base model too
    assert a.run_id == E.continual_run("replay", "x", "weak", "smoke", replay=0.05).run_id
    assert len({a.run_id, b.run_id, c.run_id}) == 3
    # the base run it starts from is part of the config, by reference: no path, so no store location
    assert a.config.stages[0].init_from == E.base_run("smoke").ref("pretrain")
    assert c.config.stages[0].init_from == E.base_run("smoke", seed=1).ref("pretrain")


def test_unknown_scale_is_named():
    with pytest.raises(ValueError, match="scale: unknown scale 'huge'; allowed: smoke, tiny, small"):
        E.base_run("huge")


def test_runner_starts_the_longest_chains_first(tmp_path):
    s = SCALES["smoke"]
    runs = runner._closure([E.union_run("weak", "smoke"), *E.infinite_schedules("smoke"),
                            E.continual_run("replay", "r", "weak", "smoke")], tmp_path)
    paths = runner._critical_paths(runs)
    base = E.base_run("smoke")
    assert paths[base.run_id] == s.base_tokens + s.new_tokens  # the base model, then a continual run
    assert paths[E.union_run("weak", "smoke").run_id] == s.base_tokens + s.new_tokens
    wsd = next(r for r in runs if r.name == "sched-wsd")
    assert paths[wsd.run_id] > 3 * s.chunk_tokens  # its annealing branches come after it


def test_runner_trains_needs_first_then_reuses_everything(tmp_path):
    root = tmp_path / "runs"
    runs = [E.continual_run("replay", "weak-replay0.25", "weak", "smoke", replay=0.25)]
    logs: list[str] = []
    dirs = runner.run_all(runs, root, workers=1, log=logs.append)
    assert len(dirs) == 2 and all((d / "DONE").exists() for d in dirs.values())
    assert "training 2" in logs[0]
    logs.clear()
    runner.run_all(runs, root, workers=1, log=logs.append)
    assert logs == []  # nothing to do: no line, no training
    df = loaded.load_runs(runs, root)
    assert set(df["name"]) == {"weak-replay0.25"} and df["tokens"].iloc[0] == SCALES["smoke"].base_tokens
    assert loaded.load_runs([*runs, *runs], root).equals(df)  # a run listed twice is read once
    everything = loaded.load_experiment(root)
    assert set(everything["experiment"]) == {"base", "replay"}
    assert {"val_en-man", "val_en-docs", "replay", "shift", "run_id"} <= set(everything.columns)


@pytest.mark.slow
def test_runner_side_by_side_subprocesses_match_in_process(tmp_path):
    runs = E.replay_sweep("strong", "smoke")[:2]
    runner.run_all(runs, tmp_path / "a", workers=1, log=lambda s: None)
    runs_b = E.replay_sweep("strong", "smoke")[:2]
    runner.run_all(runs_b, tmp_path / "b", workers=2, log=lambda s: None)
    a = loaded.load_runs(runs, tmp_path / "a")
    b = loaded.load_runs(runs_b, tmp_path / "b")
    assert len(a) == len(b) > 0
    assert a["val_en-man"].tolist() == pytest.approx(b["val_en-man"].tolist(), abs=2e-2)
