"""Weight averaging: `cptlab merge` writes a run directory holding the weighted average of runs' checkpoints
and its evaluation, with the compute behind it counted once per run; `interpolation_sweep` evaluates the
path between two runs' weights in memory; runs that cannot be merged are refused before any work."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from cptlab import cli, viz
from cptlab.analysis.metrics import final_losses
from cptlab.analysis.runs import eval_frame
from cptlab.config import ConfigError, RunConfig
from cptlab.interop import merge as M
from cptlab.interop.evaluate import evaluate_run, load_model
from cptlab.training.rundir import RunDir, RunDirError, load_checkpoint
from cptlab.training.store import RunStore
from cptlab.training.train import train

WORDS = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()
WORDS_DE = "der schnelle braune fuchs springt ueber den faulen hund und eine seite erklaert".split()
STAGE_TOKENS = 2048


def _lines(words: list[str], n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(n)) + "\n"


def config(corpora: Path, stage: dict, sets: list[str], seed: int = 0) -> RunConfig:
    schedule = {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}
    return RunConfig.from_dict({
        "model": {"preset": "smoke"}, "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "threads": 1,
                  "log_every_steps": 2, "seed": seed},
        "eval": {"sets": sets, "tokens": 512, "every_tokens": 1024},
        "corpora": {"old": {"path": str(corpora / "old.txt"), "sample_by": "line"},
                    "new": {"path": str(corpora / "new.txt"), "sample_by": "line"}},
        "stages": [{"tokens": STAGE_TOKENS, "schedule": schedule, **stage}]})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A run store with three smoke runs of experiment ``e``: ``a`` (old), ``b`` (new, continued from a's
    checkpoint) and ``c`` (new, from scratch, another seed)."""
    root = tmp_path_factory.mktemp("merge-store")
    corpora = root / "corpora"
    corpora.mkdir()
    (corpora / "old.txt").write_text(_lines(WORDS, 200, 0))
    (corpora / "new.txt").write_text(_lines(WORDS_DE, 200, 1))
    runs = {"a": config(corpora, {"name": "pretrain", "data": {"old": 1.0}}, ["old"]),
            "b": config(corpora, {"name": "continue", "data": {"new": 1.0},
                                  "init_from": {"experiment": "e", "run": "a", "stage": "pretrain"}},
                        ["old", "new"]),
            "c": config(corpora, {"name": "pretrain", "data": {"new": 1.0}}, ["new"], seed=1)}
    for name, cfg in runs.items():
        assert train(cfg, root / "e" / name, quiet=True).status == "done"
    return root


def run(store: Path, name: str) -> Path:
    return RunStore(store).path("e", name)


def last_val(path: Path) -> dict[str, float]:
    return [r for r in RunDir(path).read_metrics() if "val" in r][-1]["val"]


def weights_of(path: Path, stage: str | None = None) -> dict[str, torch.Tensor]:
    cfg = RunDir(path).load_config()
    return load_checkpoint(RunDir(path).stage_checkpoint(stage or cfg.stages[-1].name))["model"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.7], [0.999, 0.001]])
def test_a_run_merged_with_itself_is_itself(store, tmp_path, weights):
    a = run(store, "a")
    result = M.merge_runs([a, a], weights, tmp_path / "m")
    merged, original = weights_of(tmp_path / "m"), weights_of(a)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)  # bit for bit (float64 sums)
    assert result["val"] == pytest.approx(last_val(a), abs=1e-6) and not result["reused"]
    assert result["tokens"] == STAGE_TOKENS  # the same run twice costs it once


@pytest.mark.parametrize("weights, equal_to", [([1, 0], "a"), ([0, 1], "b")])
def test_weights_one_and_zero_give_that_run(store, tmp_path, weights, equal_to):
    M.merge_runs([run(store, "a"), run(store, "b")], weights, tmp_path / "m")
    merged, original = weights_of(tmp_path / "m"), weights_of(run(store, equal_to))
    assert all(torch.equal(merged[k], original[k]) for k in original)
    val = last_val(tmp_path / "m")
    assert set(val) == {"old", "new"}  # the union of the runs' eval sets
    for name, loss in last_val(run(store, equal_to)).items():
        assert val[name] == pytest.approx(loss, abs=1e-6)


def test_averaged_tensors_are_the_weighted_mean(store, tmp_path):
    names, weights = ("a", "b", "c"), [0.2, 0.3, 0.5]
    M.merge_runs([run(store, n) for n in names], weights, tmp_path / "m")
    merged = weights_of(tmp_path / "m")
    states = [weights_of(run(store, n)) for n in names]
    for key, tensor in merged.items():
        expected = sum(w * s[key].double() for w, s in zip(weights, states)).float()
        assert tensor.dtype == states[0][key].dtype
        assert torch.allclose(tensor, expected, atol=1e-7, rtol=0), key
    key = "blocks.0.attn.qkv.weight"
    assert not any(torch.allclose(merged[key], s[key]) for s in states)


def test_a_merged_directory_is_a_run_that_loads_evaluates_and_exports(store, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli.main(["merge", str(run(store, "a")), str(run(store, "b")), "--weights", "0.5,0.5",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    val = last_val(out)
    assert f"val old {val['old']:.4f}  new {val['new']:.4f}" in printed and "4,096 training tokens" in printed
    run_dir = RunDir(out)
    assert run_dir.done and [p.name for p in run_dir.checkpoints()] == ["stage-merge.pt"]
    model, cfg, stage = load_model(out)
    assert stage == "merge" and [st.name for st in cfg.stages] == ["merge"]
    assert cfg.eval.sets == ["old", "new"]
    assert cfg.stages[0].tokens == 0 and cfg.stages[0].data == {}
    with pytest.raises(ConfigError, match=r"stages\[0\] \(merge\).data: at least one corpus"):
        cfg.validate()  # so `cptlab train` refuses to train it
    assert evaluate_run(out, corpus="new")["loss"] == pytest.approx(val["new"], abs=1e-7)
    finals = final_losses(eval_frame(out))
    assert finals["role"].tolist() == ["merge"] and finals["tokens"].tolist() == [4096]
    assert finals["D0"].isna().all()  # the smoke runs have no d0 / d1 labels
    pytest.importorskip("transformers")  # the last check: export refuses unless its logits are the run's
    assert cli.main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert ("The weights are an average: 0.5 x e/a (stage pretrain), 0.5 x e/b (stage continue); 4,096 "
            "training tokens") in card


def test_the_record_names_the_sources_and_counts_each_run_behind_once(store, tmp_path):
    a, b, c = (run(store, n) for n in "abc")
    M.merge_runs([a, b], [0.25, 0.75], tmp_path / "ab")
    labels = RunDir(tmp_path / "ab").labels()
    assert labels["role"] == "merge" and labels["weights"] == [0.25, 0.75]
    assert labels["sources"] == [{"experiment": "e", "run": "a", "stage": "pretrain"},
                                 {"experiment": "e", "run": "b", "stage": "continue"}]
    # b continued from a: a's tokens are behind b already, so a merge of the two costs what b did
    assert labels["lineage"] == {"e/a": STAGE_TOKENS, "e/b": STAGE_TOKENS}
    assert labels["compute_tokens"] == 2 * STAGE_TOKENS == [r for r in RunDir(b).read_metrics()][-1]["tokens"]
    line = RunDir(tmp_path / "ab").read_metrics()
    assert len(line) == 1 and {k: line[0][k] for k in ("step", "tokens", "stage", "lr")} == {
        "step": 0, "tokens": 2 * STAGE_TOKENS, "stage": "merge", "lr": 0.0}
    # runs trained apart add up; a merge of a merge counts what is behind it, once
    assert M.merge_runs([a, c], [0.5, 0.5], tmp_path / "ac")["tokens"] == 2 * STAGE_TOKENS
    again = M.merge_runs([tmp_path / "ab", c, b], [0.4, 0.4, 0.2], tmp_path / "abc")
    assert again["tokens"] == 3 * STAGE_TOKENS
    assert RunDir(tmp_path / "abc").labels()["lineage"] == {"e/a": 2048, "e/b": 2048, "e/c": 2048}


def test_a_finished_merge_is_reused_and_nothing_else_is_overwritten(store, tmp_path):
    a, b = run(store, "a"), run(store, "b")
    first = M.merge_runs([a, b], [0.5, 0.5], tmp_path / "m")
    before = snapshot(tmp_path / "m")
    again = M.merge_runs([a, b], [0.5, 0.5], tmp_path / "m")
    assert again["reused"] and again["val"] == first["val"] and snapshot(tmp_path / "m") == before
    with pytest.raises(RunDirError, match="holds a merge of other runs or weights; refusing"):
        M.merge_runs([a, b], [0.4, 0.6], tmp_path / "m")
    with pytest.raises(RunDirError, match="holds a merge of other runs or weights; refusing"):
        M.merge_runs([b, a], [0.5, 0.5], tmp_path / "m")
    assert snapshot(tmp_path / "m") == before
    trained = tmp_path / "copy"
    shutil.copytree(a, trained)
    with pytest.raises(RunDirError, match="holds a run that is not a merge; refusing"):
        M.merge_runs([a, b], [0.5, 0.5], trained)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not a cptlab run directory"):
        M.merge_runs([a, b], [0.5, 0.5], tmp_path / "mine")
    assert snapshot(trained) == snapshot(a) and snapshot(tmp_path / "mine") == {"notes.txt": b"mine"}


@pytest.mark.parametrize("crash_in", ["save_stage_checkpoint", "mark_done"])
def test_a_merge_killed_half_way_never_looks_finished_and_is_redone(store, tmp_path, monkeypatch, crash_in):
    a, b = run(store, "a"), run(store, "b")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, crash_in, killed)
        with pytest.raises(KeyboardInterrupt):
            M.merge_runs([a, b], [0.5, 0.5], tmp_path / "e" / "m")
    assert not RunDir(tmp_path / "e" / "m").done
    if crash_in == "save_stage_checkpoint":  # no checkpoint, so no metrics: the store does not list it
        assert RunStore(tmp_path).runs() == [] and not (tmp_path / "e" / "m" / "metrics.jsonl").exists()
    else:
        assert eval_frame(tmp_path / "e" / "m")["done"].tolist() == [False]
    result = M.merge_runs([a, b], [0.5, 0.5], tmp_path / "e" / "m")
    assert not result["reused"] and RunDir(tmp_path / "e" / "m").done
    assert len(RunDir(tmp_path / "e" / "m").read_metrics()) == 1


def test_the_interpolation_sweep_runs_from_one_run_to_the_other(store, tmp_path):
    a, b = run(store, "a"), run(store, "b")
    before = snapshot(store)
    sweep = M.interpolation_sweep(a, b, [0.0, 0.5, 1.0])
    assert snapshot(store) == before  # evaluated in memory, nothing written
    assert list(sweep.columns) == ["alpha", "val_old", "val_new"] and sweep["alpha"].tolist() == [0, 0.5, 1]
    assert sweep.loc[0, "val_old"] == pytest.approx(last_val(a)["old"], abs=1e-6)
    assert sweep.loc[0, "val_new"] == pytest.approx(evaluate_run(a, corpus="new")["loss"], abs=1e-6)
    assert sweep.loc[2, ["val_old", "val_new"]].tolist() == pytest.approx(
        [last_val(b)["old"], last_val(b)["new"]], abs=1e-6)
    middle = M.merge_runs([a, b], [0.5, 0.5], tmp_path / "m")["val"]
    assert sweep.loc[1, "val_new"] == pytest.approx(middle["new"], abs=1e-6)
    assert sweep.attrs == {"run_a": "a (pretrain)", "run_b": "b (continue)"}  # no d0 / d1 labels
    only = M.interpolation_sweep(a, b, [0.25], sets=["new"])
    assert list(only.columns) == ["alpha", "val_new"]
    fig = viz.plot_interpolation(sweep, d0="old", d1="new")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()][:3] == ["D0: old", "D1: new", "mean of D0 and D1"]
    top = [t.get_text() for axis in ax.child_axes for t in axis.get_xticklabels()]
    assert top == ["A: a (pretrain)", "B: b (continue)"]


def _copy_with(source: Path, dest: Path, **sections) -> Path:
    """A copy of a run whose config.json has ``sections`` (dotted key -> value) changed."""
    shutil.copytree(source, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for key, value in sections.items():
        section, field = key.split(".")
        cfg[section][field] = value
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _tokenizer_file(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(_lines(words, 50, 0).splitlines(),
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    tok.save(str(path))
    return path


def test_runs_that_cannot_be_merged_are_refused_naming_the_field(store, tmp_path):
    a = run(store, "a")
    wide = _copy_with(a, tmp_path / "wide", **{"model.d_model": 64})
    bpe = _copy_with(a, tmp_path / "bpe", **{"tokenizer.kind": "bpe"})
    files = [_tokenizer_file(tmp_path / f"{i}.json", words) for i, words in enumerate((WORDS, WORDS_DE))]
    one, two = (_copy_with(a, tmp_path / f"tok{i}", **{"tokenizer.kind": "file", "tokenizer.path": str(f)})
                for i, f in enumerate(files))
    cases = [([a, wide], [0.5, 0.5], r"model\.d_model: the runs differ \(32 in .*, 64 in .*wide\)"),
             ([a, bpe], [0.5, 0.5], r"tokenizer\.kind: the runs differ \('byte' in .*, 'bpe' in"),
             ([one, two], [0.5, 0.5], r"tokenizer: the runs' vocabularies differ"),
             ([a, a], [0.5], r"--weights: 1 weight\(s\) for 2 run\(s\)"),
             ([a, a], [1.5, -0.5], r"--weights: -0.5 is negative"),
             ([a, a], [0.5, float("nan")], r"--weights: nan is not a finite number"),
             ([a, a], [True, 0], r"--weights: True is not a finite number"),
             ([a, a], [1, 1], r"--weights: must sum to 1, got 2 \(in these proportions: 0.5,0.5\)")]
    for runs, weights, words in cases:
        with pytest.raises(ConfigError, match=words):
            M.merge_runs(runs, weights, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"--weights: 'x' is not a number"):
        M.parse_weights("0.5,x")
    assert M.check_weights([0.333, 0.333, 0.333], 3) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError, match=r"model\.d_model: the runs differ"):
        M.interpolation_sweep(a, wide, [0.5])
    with pytest.raises(ConfigError, match=r"alphas: 'x' is not a finite number"):
        M.interpolation_sweep(a, a, [0.0, "x"])
    with pytest.raises(ConfigError, match=r"sets: unknown corpus 'nope'"):
        M.interpolation_sweep(a, a, [0.0], sets=["nope"])
