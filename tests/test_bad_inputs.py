"""Bad input and faults, as a new user meets them: `cptlab train` (and `batch`) answer each with a one-line
error before any training step, write no checkpoint, and leave the user's files as they were; the cases
that should simply work (0% replay, a harmless change on resume) do."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cptlab import cli
from cptlab.analysis.runs import eval_frame, load_experiment
from cptlab.training.rundir import RunDir, RunDirError

WORDS = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()
WORDS_DE = "der schnelle braune fuchs springt ueber den faulen hund und eine seite erklaert".split()


def _lines(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(60)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-input-corpora")
    (d / "old.txt").write_text("\n".join(_lines(WORDS, 200, 0)) + "\n")
    (d / "new.txt").write_text("\n".join(_lines(WORDS_DE, 200, 1)) + "\n")
    (d / "tiny.txt").write_text("0123456789abcde")  # one document: 15 bytes + end-of-text = 16 tokens
    lines = _lines(WORDS, 200, 2)
    records = [{"id": i, "body": line} if i % 10 else {"id": i} for i, line in enumerate(lines)]
    (d / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # 20 of 200 lack "body"
    good = [json.dumps({"body": line}) for line in _lines(WORDS, 50, 3)]
    (d / "broken.jsonl").write_text("\n".join(good[:2] + ['{"body": "unterminated'] + good[2:]) + "\n")
    (d / "binary").mkdir()
    for i in range(3):
        (d / "binary" / f"blob{i}.txt").write_bytes(random.Random(i).randbytes(4096))
    (d / "blob.jsonl").write_bytes(random.Random(9).randbytes(4096))
    return d


def config(corpora: Path, **extra_corpora) -> dict:
    """Two stages of 8 steps on a byte tokenizer: old, then new with 25% replay of old."""
    schedule = {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}
    return {
        "model": {"preset": "smoke"}, "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "threads": 1,
                  "log_every_steps": 2, "checkpoint_every_tokens": 1024},
        "eval": {"sets": ["old", "new"], "every_tokens": 1024, "tokens": 512},
        "corpora": {"old": {"path": str(corpora / "old.txt"), "sample_by": "line"},
                    "new": {"path": str(corpora / "new.txt"), "sample_by": "line"}, **extra_corpora},
        "stages": [{"name": "pretrain", "data": {"old": 1.0}, "tokens": 2048, "schedule": schedule},
                   {"name": "continue", "data": {"new": 1.0}, "tokens": 2048, "schedule": schedule,
                    "replay": {"source": "old", "fraction": 0.25}}],
    }


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_cli(capsys, *argv: str) -> tuple[int, str]:
    """``cptlab train ...`` in this process: (exit code, what it printed on stderr)."""
    capsys.readouterr()
    code = cli.main(["train", *map(str, argv), "--quiet"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(corpora, tmp_path_factory) -> Path:
    """A finished run of the two-stage config."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", str(write(out.parent / "run.yaml", config(corpora))), "--out", str(out),
                     "--quiet"]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy" / run.name
    shutil.copytree(run, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


# -- the table: set-up -> (exit code, words of the one-line message) ----------------------------------------

def _set(*overrides):
    """A fresh run of the config with ``--set`` overrides."""
    def setup(corpora, tmp_path, finished):
        args = [write(tmp_path / "run.yaml", config(corpora)), "--out", tmp_path / "out"]
        return args + [a for o in overrides for a in ("--set", o)]
    return setup


def _corpus(name, spec, stage=1):
    """A fresh run whose stage ``stage`` reads the extra corpus ``name`` (a spec under the corpora dir)."""
    def setup(corpora, tmp_path, finished):
        full = {k: (str(corpora / v) if k == "path" else v) for k, v in spec.items()}
        cfg = config(corpora, **{name: full})
        cfg["stages"][stage]["data"] = {name: 1.0}
        return [write(tmp_path / "run.yaml", cfg), "--out", tmp_path / "out"]
    return setup


def _raw_config(content: bytes | None):
    def setup(corpora, tmp_path, finished):
        path = tmp_path / "cfg"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return [path, "--out", tmp_path / "out"]
    return setup


def _out(make):
    """A fresh run into an ``--out`` that ``make(tmp_path)`` prepares."""
    def setup(corpora, tmp_path, finished):
        return [write(tmp_path / "run.yaml", config(corpora)), "--out", make(tmp_path)]
    return setup


def _finished_run(change, *overrides):
    """The finished run, copied and changed by ``change(out)``, trained again with ``--set`` overrides."""
    def setup(corpora, tmp_path, finished):
        out = copy_of(finished, tmp_path)
        change(out)
        args = [write(tmp_path / "run.yaml", config(corpora)), "--out", out]
        return args + [a for o in overrides for a in ("--set", o)]
    return setup


def _user_folder(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "metrics.jsonl").write_text("my own numbers\n")
    return tmp / "mine"


def _a_file(tmp):
    (tmp / "file").write_text("not a folder")
    return tmp / "file"


CASES = [
    ("model shape", _set("model.n_head=3"), 2, "model.d_model (32) must be divisible by model.n_head (3)"),
    ("unknown corpus", _set("stages.1.data={nope: 1.0}"), 2,
     "stages[1] (continue).data: unknown corpus 'nope'"),
    ("stage-2 init_from missing", _set("stages.1.init_from=/nowhere/stage-x.pt"), 2,
     "stages[1] (continue).init_from: checkpoint /nowhere/stage-x.pt does not exist"),
    ("stage-2 reference missing", _set("stages.1.init_from={experiment: e, run: r, stage: s}"), 2,
     "stages[1] (continue).init_from: run e/r (stage s) has no checkpoint"),
    ("16-token corpus only in stage 2", _corpus("tiny", {"path": "tiny.txt"}), 2,
     "stages[1] (continue).data.tiny: corpus 'tiny' has 16 training tokens, fewer than one sequence"),
    ("bad replay fraction", _set("stages.1.replay.fraction=1.5"), 2, "replay.fraction: must be in [0, 1)"),
    ("replay of the stage's own corpus only", _set("stages.1.replay.source={new: 1.0}"), 2,
     "replay.source: {'new': 1.0} is also the only new corpus"),
    ("a regularizer on a first stage", _set("stages.0.regularizer={kind: ewc, weight: 1.0}"), 2,
     "stages[0] (pretrain).regularizer: the stage starts from scratch, so there is no earlier model"),
    ("an unknown regularizer", _set("stages.1.regularizer={kind: si, weight: 1.0}"), 2,
     "stages[1] (continue).regularizer.kind: unknown regularizer 'si'; allowed: ewc, lwf"),
    ("a negative regularizer weight", _set("stages.1.regularizer={kind: lwf, weight: -1.0}"), 2,
     "stages[1] (continue).regularizer.weight: must be > 0"),
    ("replay after a fresh start", _set("stages.1.init_from=scratch"), 2,
     "stages[1] (continue).replay.source: 'old' was not read before this stage (read before it: nothing)"),
    ("config is a directory", _raw_config(None), 2, "is a directory; give a YAML file"),
    ("config is not UTF-8", _raw_config(b"model: {preset: \xff\xfe}\n"), 2, "is not UTF-8 text"),
    ("config is not YAML", _raw_config(b"stages: [\n"), 2, "is not valid YAML"),
    ("--out is a file", _out(_a_file), 2, "is a file, not a run directory"),
    ("--out cannot be made", _out(lambda tmp: _a_file(tmp) / "run"), 2, "cannot write the run directory"),
    ("--out is the user's folder", _out(_user_folder), 2,
     "is not a cptlab run directory (it holds metrics.jsonl and no config.json)"),
    ("another config in --out", _finished_run(lambda out: None, "stages.1.replay.fraction=0.05"), 2,
     "holds a run of a different config"),
    ("config.json deleted, checkpoints kept", _finished_run(lambda out: (out / "config.json").unlink()), 2,
     "holds checkpoints but no config.json"),
    ("metrics.jsonl cut short", _finished_run(lambda out: os.truncate(out / "metrics.jsonl", 10)), 2,
     "is shorter (10 bytes) than its checkpoint recorded"),
    ("finished run without checkpoints", _finished_run(lambda out: shutil.rmtree(out / "checkpoints")), 2,
     "is a finished run (DONE) whose checkpoints are gone; it is not trained again"),
    ("JSONL records without the text field",
     _corpus("notes", {"path": "notes.jsonl", "text_field": "body"}), 2, "20 of 200 records of"),
    ("a JSONL line that is not JSON", _corpus("broken", {"path": "broken.jsonl", "text_field": "body"}), 2,
     "broken.jsonl line 3 is not valid JSON"),
    ("a binary JSONL file", _corpus("blob", {"path": "blob.jsonl"}), 2, "blob.jsonl is not UTF-8 text"),
    ("a folder of binary .txt files", _corpus("bin", {"path": "binary"}), 2, "blob0.txt is not UTF-8 text"),
    ("a field of another regularizer kind",
     _set("stages.1.regularizer={kind: ewc, weight: 1.0, temperature: 4.0}"), 2,
     "stages[1] (continue).regularizer.temperature: not a field of ewc; ewc takes: weight, fisher_batches, "
     "data"),
    ("a logger named twice", _set("train.loggers=[tensorboard, tensorboard]"), 2,
     "train.loggers[1]: 'tensorboard' is named twice"),
    ("an infinite LwF temperature", _set("stages.1.regularizer={kind: lwf, weight: 1.0, temperature: .inf}"),
     2, "stages[1] (continue).regularizer.temperature: must be a finite number, got inf"),
    ("an infinite replay weight", _set("stages.1.replay.source={old: .inf}"), 2,
     "stages[1] (continue).replay.source.old: must be a finite number, got inf"),
    ("a NaN weight decay", _set("train.weight_decay=.nan"), 2, "train.weight_decay: must be a finite number"),
    ("diverged", _set("stages.0.schedule={kind: constant, max_lr: 1000.0, min_lr: 1.0, warmup: 0.0}"), 1,
     "diverged: loss is "),
]


@pytest.mark.parametrize("name, setup, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_step(name, setup, code, words, corpora, finished, tmp_path, capsys):
    argv = setup(corpora, tmp_path, finished)
    out = Path(argv[argv.index("--out") + 1])
    before = snapshot(out) if out.is_dir() else None
    got, err = train_cli(capsys, *argv)
    assert got == code, err
    lines = err.strip().splitlines()  # progress bars of the data layer may come first
    message = next(i for i, line in enumerate(lines) if line.startswith("cptlab train: "))
    assert words in err, err
    if name != "another config in --out":  # that one lists what differs, a line each
        assert message == len(lines) - 1, err
    if name == "diverged":  # it trained until the loss was NaN: the checkpoint it names is really there
        if "the last good checkpoint, " in err:
            assert Path(err.split("the last good checkpoint, ")[1].split(", is kept")[0]).is_file(), err
        else:
            assert "no checkpoint had been written yet" in err and not list(out.glob("checkpoints/*.pt"))
    elif before is None:
        assert not list(out.glob("checkpoints/*.pt")), "a checkpoint was written"
    else:
        assert snapshot(out) == before, "the folder's files changed"


def test_records_without_the_text_field_can_be_skipped(corpora, tmp_path, capsys):
    cfg = config(corpora, notes={"path": str(corpora / "notes.jsonl"), "text_field": "body",
                                 "missing_text": "skip"})
    cfg["stages"][1]["data"] = {"notes": 1.0}
    with pytest.warns(UserWarning, match=r"20 of 200 records .* have no 'body' \(lines 1, 11, 21, "):
        code, err = train_cli(capsys, write(tmp_path / "run.yaml", cfg), "--out", tmp_path / "out")
    assert code == 0, err


def test_zero_percent_replay_trains_like_no_replay(corpora, tmp_path, capsys):
    code, err = train_cli(capsys, *_set("stages.1.replay.fraction=0.0")(corpora, tmp_path, None))
    assert code == 0, err
    lines = RunDir(tmp_path / "out").read_metrics()
    last = [r for r in lines if "tokens_by_source" in r][-1]
    assert last["tokens_by_source"]["old"] == 2048 and last["tokens_by_source"]["new"] == 2048
    assert any(r["stage"] == "continue" and "val" in r for r in lines)


HOLDER = """
import sys, time
from cptlab.training.rundir import RunDir
run = RunDir(sys.argv[1])  # kept: the lock lasts as long as the object
run.lock()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold(out: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes the run directory for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_init_from_a_checkpoint_an_earlier_stage_writes_is_accepted(corpora, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = train_cli(capsys, *_set(f"stages.1.init_from={out}/checkpoints/stage-pretrain.pt")(
        corpora, tmp_path, None))
    assert code == 0, err
    assert RunDir(out).done


def test_a_second_trainer_is_refused_naming_the_first_or_waits(corpora, tmp_path, capsys):
    out = tmp_path / "out"
    first = hold(out, 60)
    try:
        code, err = train_cli(capsys, write(tmp_path / "run.yaml", config(corpora)), "--out", out)
        assert code == 2 and f"is being trained by process {first.pid} on " in err, err
        assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    finally:
        first.kill()
        first.wait()
    first = hold(out, 1.0)  # ends a second from now: --wait trains once it has
    code, err = train_cli(capsys, tmp_path / "run.yaml", "--out", out, "--wait")
    first.wait()
    assert code == 0 and RunDir(out).done, err


def test_resume_accepts_settings_that_do_not_change_the_result(corpora, finished, tmp_path, capsys):
    calls = []
    cfg = config(corpora)
    from cptlab.config import RunConfig
    from cptlab.training.train import train

    stopped = train(RunConfig.from_dict(cfg), tmp_path / "out", quiet=True,
                    stop=lambda: calls.append(1) or len(calls) > 5)
    assert stopped.status == "stopped"
    harmless = ["train.threads=2", "train.log_every_steps=3", "train.checkpoint_every_tokens=512"]
    if not torch.cuda.is_available():  # auto is this machine's CPU, as cpu is
        harmless.append("train.device=auto")
    code, err = train_cli(capsys, write(tmp_path / "run.yaml", cfg), "--out", tmp_path / "out",
                          *[a for h in harmless for a in ("--set", h)])
    assert code == 0, err
    evals = lambda run: [r["val"][k] for r in RunDir(run).read_metrics() if "val" in r  # noqa: E731
                         for k in sorted(r["val"])]
    assert evals(tmp_path / "out") == pytest.approx(evals(finished), abs=1e-6)


def test_the_effective_mixture_is_printed(corpora, tmp_path, capsys):
    cfg = config(corpora)
    cfg["stages"][0]["data"] = {"old": 3.0, "new": 1.0}
    capsys.readouterr()
    assert cli.main(["train", str(write(tmp_path / "run.yaml", cfg)), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "stage pretrain: sequences from old 75%, new 25% (data weights sum to 4: rescaled)" in out
    assert "stage continue: sequences from new 75%, old 25% (replay)" in out


def test_an_unknown_scale_fails_before_any_notebook(tmp_path, capsys):
    assert cli.main(["batch", "--scale", "nonexistent", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cptlab batch: config error: --scale: unknown scale 'nonexistent'; allowed: smoke" in err
    assert not (tmp_path / "b").exists()


def test_a_metrics_line_that_is_not_json_is_named(finished, tmp_path):
    out = tmp_path / "store" / "exp" / "run"
    shutil.copytree(finished, out)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3] + ["garbage\n"] + lines[3:]))
    with pytest.raises(RunDirError, match=r"metrics\.jsonl line 4 is not a JSON record: 'garbage'"):
        eval_frame(out)
    with pytest.raises(RunDirError, match="line 4"):
        load_experiment(tmp_path / "store")
    (out / "metrics.jsonl").write_text("".join(lines) + '{"step": 9, "tok')  # a line cut by a kill
    assert len(eval_frame(out)) == len(eval_frame(finished))


# -- cptlab merge: runs that cannot be merged, weights that are not weights ----------------------------------

def _merge(*argv, change=None):
    """``cptlab merge`` of the finished run's two stage ends (the second run a copy changed by ``change``)."""
    def setup(corpora, tmp_path, finished):
        other = finished
        if change is not None:
            other = copy_of(finished, tmp_path)
            cfg = json.loads((other / "config.json").read_text())
            change(cfg)
            (other / "config.json").write_text(json.dumps(cfg))
        args = [finished, other, "--stage", "pretrain,continue", "--weights", "0.5,0.5"]
        return [*args, "--out", tmp_path / "m", *argv]  # a later --weights / --stage wins
    return setup


def _merge_into(make):
    """``cptlab merge`` into an ``--out`` that ``make(tmp_path, finished)`` prepares."""
    def setup(corpora, tmp_path, finished):
        return [finished, finished, "--weights", "0.5,0.5", "--out", make(tmp_path, finished)]
    return setup


MERGE_CASES = [
    ("another model shape", _merge(change=lambda cfg: cfg["model"].update(n_layer=3)),
     "model.n_layer: the runs differ (2 in "),
    ("another tokenizer", _merge(change=lambda cfg: cfg["tokenizer"].update(kind="bpe")),
     "tokenizer.kind: the runs differ ('byte' in "),
    ("a weight too few", _merge("--weights", "1"), "--weights: 1 weight(s) for 2 run(s); give one per run"),
    ("a negative weight", _merge("--weights", "1.5,-0.5"),
     "--weights: -0.5 is negative; weights must be >= 0"),
    ("a weight that is not a number", _merge("--weights", "0.5,half"), "--weights: 'half' is not a number"),
    ("weights that do not sum to 1", _merge("--weights", "1,3"),
     "--weights: must sum to 1, got 4 (in these proportions: 0.25,0.75)"),
    ("an unknown stage", _merge("--stage", "nope"), "--stage: 'nope' is not a stage of"),
    ("a stage too many", _merge("--stage", "pretrain,continue,x"), "--stage: 3 stage(s) for 2 run(s)"),
    ("a folder that is not a run", lambda corpora, tmp_path, finished: [
        tmp_path, finished, "--weights", "0.5,0.5", "--out", tmp_path / "m"], "is not a run directory"),
    ("--out is the user's folder", _merge_into(lambda tmp, finished: _user_folder(tmp)),
     "is not a cptlab run directory (it holds metrics.jsonl and no config.json)"),
    ("--out is a trained run", _merge_into(lambda tmp, finished: copy_of(finished, tmp)),
     "holds a run that is not a merge; refusing to overwrite it"),
]


@pytest.mark.parametrize("name, setup, words", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_a_merge_that_cannot_be_is_one_line_before_any_work(name, setup, words, corpora, finished, tmp_path,
                                                             capsys):
    argv = setup(corpora, tmp_path, finished)
    out = Path(argv[argv.index("--out") + 1])
    before = snapshot(out) if out.is_dir() else None
    capsys.readouterr()
    assert cli.main(["merge", *map(str, argv)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cptlab merge: ") and words in lines[0], lines
    assert (snapshot(out) == before) if before is not None else not out.exists()


def test_merging_the_ends_of_two_stages_of_one_run_counts_its_tokens_once(finished, tmp_path, capsys):
    assert cli.main(["merge", str(finished), str(finished), "--stage", "pretrain,continue", "--weights",
                     "0.5,0.5", "--out", str(tmp_path / "m")]) == 0
    assert "4,096 training tokens behind it, 0 trained by the merge" in capsys.readouterr().out
    assert RunDir(tmp_path / "m").read_metrics()[0]["tokens"] == RunDir(finished).read_metrics()[-1]["tokens"]


# -- cptlab export: an --out it cannot use, a run it cannot read, a kill half-way ----------------------------

def _read_only(tmp, monkeypatch):
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as os.access does for any other user
        from cptlab.interop import export
        real = os.access
        monkeypatch.setattr(export.os, "access", lambda p, mode: Path(p) != tmp / "ro" and real(p, mode))
    return tmp / "ro"


def _bad_metrics_line(tmp, finished):
    run = copy_of(finished, tmp)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:3] + ["garbage\n"] + lines[3:]))
    return run


EXPORT_CASES = [
    ("--out is a file", lambda tmp, finished, mp: (finished, _a_file(tmp)),
     "is a file; give a new or empty folder"),
    ("--out inside a file", lambda tmp, finished, mp: (finished, _a_file(tmp) / "model"),
     "cannot be made: "),
    ("--out is read-only", lambda tmp, finished, mp: (finished, _read_only(tmp, mp)), "is not writable"),
    ("a metrics line that is not JSON", lambda tmp, finished, mp: (_bad_metrics_line(tmp, finished),
                                                                   tmp / "model"),
     "metrics.jsonl line 4 is not a JSON record"),
]


@pytest.mark.parametrize("name, setup, words", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_an_export_that_cannot_be_is_one_line_before_any_file(name, setup, words, finished, tmp_path, capsys,
                                                              monkeypatch):
    run, out = setup(tmp_path, finished, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cptlab export: ") and words in lines[0], lines
    assert snapshot(tmp_path) == before and not list(out.parent.glob(".*.tmp"))


def test_an_export_killed_half_way_leaves_nothing_and_is_redone(finished, tmp_path, monkeypatch, capsys):
    import transformers

    def killed(self, *args, **kwargs):  # the weights are written, the tokenizer and model card are not
        raise KeyboardInterrupt

    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", killed)
        assert cli.main(["export", str(finished), "--out", str(out)]) == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty folder is taken as a new one
    assert cli.main(["export", str(finished), "--out", str(out)]) == 0, capsys.readouterr().err
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= written


def test_eval_without_text_or_corpus_names_the_options_once(finished, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(finished)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cptlab eval: config error: give one of --text FILE or --corpus NAME", err


# -- cptlab corpora: fetch options it would ignore, a vocabulary the corpora cannot give ---------------------

def _debs_file(tmp):
    return ["--debs", _a_file(tmp)]


def _debs_empty(tmp):
    (tmp / "debs").mkdir()
    return ["--debs", tmp / "debs"]


FETCH_CASES = [
    ("no workers", lambda tmp: ["--workers", "0"], "--workers: must be >= 1 (extracting processes), got 0"),
    ("negative workers", lambda tmp: ["--workers", "-1"],
     "--workers: must be >= 1 (extracting processes), got -1"),
    ("--debs is a file", _debs_file, "is a file; give the folder that holds the .deb files"),
    ("--debs is empty", _debs_empty,
     "holds no .deb files; give the folder that holds the .deb files, or leave --debs out to download them"),
    ("--debs does not exist", lambda tmp: ["--debs", tmp / "nowhere"], "nowhere does not exist"),
]


@pytest.mark.parametrize("name, options, words", FETCH_CASES, ids=[c[0] for c in FETCH_CASES])
def test_a_fetch_option_it_would_not_honour_is_one_line_before_any_work(name, options, words, tmp_path,
                                                                        monkeypatch, capsys):
    from cptlab.data import packs

    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packs, "verified", lambda cache, packages: None)  # not built: fetch would build it

    def build_pack(*args):
        raise AssertionError("the pack was built")
    monkeypatch.setattr(packs, "build_pack", build_pack)
    capsys.readouterr()
    assert cli.main(["corpora", "fetch", "docs", *map(str, options(tmp_path))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cptlab corpora: ") and words in lines[0], lines


def test_a_vocabulary_larger_than_the_corpora_give_says_the_size_built(corpora, tmp_path):
    from cptlab import data

    registry = data.Registry({"old": {"path": str(corpora / "old.txt"), "sample_by": "line"}})
    asked = r"tokenizer\.vocab_size: asked for 100,000, but the corpora's sample holds merges for only "
    with pytest.warns(UserWarning, match=asked + r"(\d|,)+ entries; built (\d|,)+") as caught:
        tokenizer = data.train_bpe(registry, ["old"], vocab_size=100_000, cache_dir=tmp_path)
    assert f"built {tokenizer.vocab_size:,}" in str(caught[0].message) and tokenizer.vocab_size < 1000


# -- cptlab batch: notebooks that are not, options it would not use -----------------------------------------

def _notebook(tmp, text=None):
    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["scale = 'tiny'\n"],
            "outputs": [], "execution_count": None}
    nb = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp / "mine.ipynb").write_text(json.dumps(nb) if text is None else text)
    return tmp / "mine.ipynb"


BATCH_CASES = [
    ("a notebook that does not exist", lambda tmp: [tmp / "nope.ipynb"], "notebooks: "),
    ("a file that is not a notebook", lambda tmp: [_notebook(tmp, "scale = 'tiny'\n")],
     "mine.ipynb is not a Jupyter notebook (.ipynb JSON with cells)"),
    ("--workers with named notebooks", lambda tmp: [_notebook(tmp), "--workers", "1"],
     "--workers: only used when every notebook runs"),
    ("--workers beyond the cores", lambda tmp: ["--workers", "100000"], "--workers: at most "),
]


@pytest.mark.parametrize("name, args, words", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_a_batch_that_cannot_be_is_one_line_before_any_notebook(name, args, words, tmp_path, monkeypatch,
                                                                capsys):
    from cptlab import batch
    from cptlab.study import runner

    def started(*args, **kwargs):
        raise AssertionError("the batch started")
    monkeypatch.setattr(batch, "_execute", started)
    monkeypatch.setattr(runner, "run_all", started)
    capsys.readouterr()
    code = cli.main(["batch", *map(str, args(tmp_path)), "--scale", "smoke", "--out", str(tmp_path / "b")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("cptlab batch: ") and words in lines[0], lines
    assert not (tmp_path / "b").exists()
    if name == "a notebook that does not exist":
        assert f"{tmp_path / 'nope.ipynb'} does not exist" in lines[0]
