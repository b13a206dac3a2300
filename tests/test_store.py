"""The run store: where every run's files are, run references instead of paths, a store that can move, and
stores written when continual runs held their base checkpoint's absolute path."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from cptlab.config import RunConfig, RunRef
from cptlab.study import experiments as E
from cptlab.training.rundir import RunDir, RunDirError, legacy_reference, with_references
from cptlab.training.store import RunStore, run_id


def continual() -> E.Run:
    return E.continual_run("replay", "weak-replay0.05", "weak", "smoke", replay=0.05)


def test_paths_ids_and_checkpoints_come_from_the_store(tmp_path):
    store = RunStore(tmp_path)
    run = continual()
    assert run.run_id == run_id(run.name, run.config) == f"weak-replay0.05-{run.config.hash()}"
    path = store.path(run.experiment, run.run_id)
    assert path == tmp_path / "replay" / run.run_id and not store.is_done("replay", run.run_id)
    ref = run.config.stages[0].init_from
    assert ref == RunRef("base", E.base_run("smoke").run_id, "pretrain")
    assert store.checkpoint(ref) == tmp_path / "base" / ref.run / "checkpoints" / "stage-pretrain.pt"
    rd = store.run(run.experiment, run.run_id)
    assert (rd.experiment, rd.run_id, rd.name) == ("replay", run.run_id, "weak-replay0.05")


def test_a_runs_identity_does_not_depend_on_where_its_store_is(tmp_path):
    run = continual()
    assert run.run_id == continual().run_id
    text = json.dumps(run.config.to_dict())
    assert str(tmp_path) not in text and "checkpoints" not in text  # no path of any store in the config


def test_runs_of_the_same_config_are_found_by_hash_finished_first(tmp_path):
    store = RunStore(tmp_path)
    cfg_hash = continual().config.hash()
    for experiment, done in (("a", False), ("b", True)):
        path = tmp_path / experiment / f"x-{cfg_hash}"
        path.mkdir(parents=True)
        if done:
            RunDir(path).mark_done()
    assert [r.experiment for r in store.with_hash(cfg_hash)] == ["b", "a"]
    assert store.with_hash("0" * 12) == []


def test_checkpoint_paths_of_a_store_are_read_as_references():
    ref = legacy_reference("/old/place/runs/base/base-0123456789ab/checkpoints/stage-pretrain.pt")
    assert ref == RunRef("base", "base-0123456789ab", "pretrain")
    assert legacy_reference("runs/paper/405m/chunks-wsd/checkpoints/stage-chunk1-tail.pt") == RunRef(
        "405m", "chunks-wsd", "chunk1-tail")
    for other in ("model.pt", "/ckpts/step-000000010.pt", "/a/b/checkpoints/stage-x.json"):
        assert legacy_reference(other) is None


def _legacy_store(root, run: E.Run):
    """``run`` written as cptlab wrote it before references: init_from the base checkpoint's absolute path,
    the directory named by the hash of that config, config.json resolved with the tokenizer's vocab."""
    base = E.base_run("smoke")
    path = root / "base" / base.run_id / "checkpoints" / "stage-pretrain.pt"
    stage = dataclasses.replace(run.config.stages[0], init_from=str(path))
    old = dataclasses.replace(run.config, stages=[stage])
    directory = root / run.experiment / f"{run.name}-{old.hash()}"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(old.resolve(vocab_size=1024).to_dict()))
    RunDir(directory).mark_done()
    return directory


def test_a_store_of_absolute_checkpoint_paths_still_loads_and_can_move(tmp_path):
    run = continual()
    old_dir = _legacy_store(tmp_path / "old", run)
    assert old_dir.name != run.run_id  # the old hash covered the path
    store = RunStore(tmp_path / "old")
    assert store.path("replay", run.run_id) == old_dir and store.is_done("replay", run.run_id)
    loaded = RunDir(old_dir).load_config()
    assert loaded.stages[0].init_from == run.config.stages[0].init_from  # the path, read as a reference
    shutil.move(tmp_path / "old", tmp_path / "new")  # moved: its absolute paths now point nowhere
    moved = RunStore(tmp_path / "new")
    assert moved.path("replay", run.run_id) == tmp_path / "new" / "replay" / old_dir.name
    RunDir(moved.path("replay", run.run_id)).claim(run.config.resolve(vocab_size=1024))  # the same run
    # the launcher finds it by the hash of its config, as it finds a new run
    assert [r.path for r in moved.with_hash(run.config.hash())] == [moved.path("replay", run.run_id)]


def test_a_different_config_is_still_refused_in_an_old_store(tmp_path):
    run = continual()
    old_dir = _legacy_store(tmp_path, run)
    other = E.continual_run("replay", "weak-replay0.05", "weak", "smoke", replay=0.10)
    with pytest.raises(RunDirError, match=r"stages\[0\].replay.fraction: 0.05 -> 0.1"):
        RunDir(old_dir).claim(other.config.resolve(vocab_size=1024))


def test_with_references_leaves_other_paths_alone():
    cfg = RunConfig.from_dict({"stages": [{"name": "a", "data": {"x": 1.0}, "tokens": 8,
                                           "init_from": "/home/me/model.pt"}]})
    assert with_references(cfg) == cfg
