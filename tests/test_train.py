"""The trainer: the metrics contract, exact resume after SIGKILL, refusals, divergence, DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cptlab.config import ConfigError, RunConfig
from cptlab.training import runtime
from cptlab.training.rundir import RunDirError
from cptlab.training.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
WORDS_A = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()
WORDS_B = "der schnelle braune fuchs springt ueber den faulen hund und eine seite erklaert".split()


def _write_corpus(path: Path, words: list[str], n_docs: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(n_docs)) + "\n")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpora")
    _write_corpus(d / "old" / "a.txt", WORDS_A, 300, 0)
    _write_corpus(d / "new" / "b.txt", WORDS_B, 300, 1)
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def small_config(corpus_dir: Path, **train) -> dict:
    """Two stages, byte tokenizer, fp32 on the CPU: seconds, and bit-exact when resumed."""
    return {
        "model": {"preset": "smoke"},
        "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "seed": 0, "device": "cpu", "precision": "fp32",
                  "log_every_steps": 2, "checkpoint_every_tokens": 1024, "threads": 1, **train},
        "eval": {"sets": ["old", "new"], "every_tokens": 1024, "tokens": 1024},
        "corpora": {"old": {"path": str(corpus_dir / "old" / "*.txt"), "sample_by": "line"},
                    "new": {"path": str(corpus_dir / "new" / "*.txt"), "sample_by": "line"}},
        "stages": [
            {"name": "pretrain", "data": {"old": 1.0}, "tokens": 6144,
             "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}},
            {"name": "continue", "data": {"new": 1.0}, "replay": {"source": "old", "fraction": 0.25},
             "tokens": 4096, "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}},
        ],
    }


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(config: Path, out: Path, prelude: str = "") -> subprocess.Popen:
    code = f"{prelude}\nfrom cptlab.cli import main\nraise SystemExit(main(['train', {str(config)!r}, " \
           f"'--out', {str(out)!r}, '--quiet']))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """An uninterrupted run of the small config, in-process."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:  # not for the rest of the session
        mp.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        result = train(RunConfig.from_dict(small_config(corpus_dir)), out, quiet=True)
    assert result.status == "done"
    return out


def test_metrics_follow_the_contract(reference):
    records = _read(reference)
    assert all({"step", "tokens", "stage", "lr"} <= r.keys() for r in records)
    evals = [r for r in records if "val" in r]
    trains = [r for r in records if "train_loss" in r]
    assert {tuple(sorted(r["val"])) for r in evals} == {("new", "old")}
    assert all({"tokens_by_source", "tokens_per_s"} <= r.keys() for r in trains)
    assert [r["tokens"] for r in evals] == [1024 * k for k in range(1, 11)]
    assert evals[5]["stage"] == "pretrain" and evals[6]["stage"] == "continue"
    # compute-equivalent replay: 25% of the continue stage's 4096 tokens came from the old corpus
    final = trains[-1]["tokens_by_source"]
    assert final == {"old": 6144 + 1024, "new": 3072}
    # forgetting shows: the old set's loss rises after the switch, the new one's falls
    assert evals[-1]["val"]["new"] < evals[5]["val"]["new"]
    assert (reference / "checkpoints" / "stage-pretrain.pt").exists()
    assert (reference / "DONE").exists()
    assert json.loads((reference / "config.json").read_text())["model"]["n_layer"] == 2


def test_rerun_of_a_finished_run_changes_nothing(reference, corpus_dir):
    before = (reference / "metrics.jsonl").read_bytes()
    train(RunConfig.from_dict(small_config(corpus_dir)), reference, quiet=True)
    assert (reference / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_resume_after_sigkill_writes_the_same_metrics(reference, corpus_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(corpus_dir)))
    expected = _comparable(_read(reference))
    kill_after_lines = [3, 11]  # inside the first stage, inside the second
    # one kill happens inside a checkpoint write: torch.save writes half a file, then the process dies
    mid_write = (
        "import os, signal, torch\n_save = torch.save\n_n = [0]\n"
        "def _dying_save(obj, f, *a, **k):\n"
        "    _n[0] += 1\n"
        "    if _n[0] == 3:\n"
        "        f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = _dying_save\n")
    for case, (lines, prelude) in enumerate([(kill_after_lines[0], ""), (kill_after_lines[1], ""),
                                             (None, mid_write)]):
        out = tmp_path / f"run{case}"
        proc = _cli(config, out, prelude)
        if lines is not None:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                path = out / "metrics.jsonl"
                if path.exists() and path.read_text().count("\n") >= lines:
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
        assert not (out / "DONE").exists()
        resumed = _cli(config, out)
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-2000:]
        assert _comparable(_read(out)) == expected, f"case {case}"
        assert not list((out / "checkpoints").glob(".*.tmp")), "a resume clears half-written temp files"


def test_a_different_config_is_refused(reference, corpus_dir):
    other = small_config(corpus_dir)
    other["stages"][1]["replay"]["fraction"] = 0.05
    with pytest.raises(RunDirError, match=r"stages\[1\].replay.fraction: 0.25 -> 0.05"):
        train(RunConfig.from_dict(other), reference, quiet=True)


def test_stop_inside_a_logging_window_resumes_exactly(corpus_dir, tmp_path, reference):
    cfg = RunConfig.from_dict(small_config(corpus_dir))
    stops = iter([False] * 7 + [True])  # stop before step 8: mid-window (a training line every 2 steps)
    assert train(cfg, tmp_path, quiet=True, stop=lambda: next(stops, False)).status == "stopped"
    assert train(cfg, tmp_path, quiet=True).status == "done"
    assert _comparable(_read(tmp_path)) == _comparable(_read(reference))


def test_corrupt_checkpoint_is_named_and_skipped(corpus_dir, tmp_path, reference):
    cfg = RunConfig.from_dict(small_config(corpus_dir))
    stops = iter([False] * 7 + [True])
    assert train(cfg, tmp_path, quiet=True, stop=lambda: next(stops, False)).status == "stopped"
    newest = sorted((tmp_path / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {newest} is unreadable")):
        assert train(cfg, tmp_path, quiet=True).status == "done"
    assert _comparable(_read(tmp_path)) == _comparable(_read(reference))


def test_nan_loss_stops_naming_the_step(corpus_dir, tmp_path, monkeypatch):
    real_step = runtime.train_step
    calls = iter(range(1000))

    def step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        return float("nan") if next(calls) == 4 else loss

    monkeypatch.setattr(runtime, "train_step", step)
    cfg = RunConfig.from_dict(small_config(corpus_dir, checkpoint_every_tokens=512))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5 \(stage 'pretrain'"):
        train(cfg, tmp_path, quiet=True)
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*.pt"))][-1] == "step-000000004.pt"


def test_a_stage_that_reads_a_corpus_many_times_over_warns(corpus_dir, tmp_path, monkeypatch):
    cfg = small_config(corpus_dir)
    cfg["stages"] = cfg["stages"][:1]  # 6144 tokens of "old": a few hundredths of an epoch
    monkeypatch.setattr(sys.modules[train.__module__], "MAX_EPOCHS_BEFORE_WARNING", 0.01)
    expected = r"stage 'pretrain' reads corpus 'old' 0\.0 times over \(more than 0\.01\)"
    with pytest.warns(UserWarning, match=expected):
        train(RunConfig.from_dict(cfg), tmp_path, quiet=True)


def test_config_errors_fail_before_any_training(corpus_dir, tmp_path):
    bad = small_config(corpus_dir)
    bad["eval"]["sets"] = ["old", "nope"]
    with pytest.raises(ConfigError, match=r"eval.sets\[1\]: unknown corpus 'nope'"):
        train(RunConfig.from_dict(bad), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_stage_can_start_from_another_runs_checkpoint(reference, corpus_dir, tmp_path):
    cfg = small_config(corpus_dir)
    cont = cfg["stages"][1]
    cont["init_from"] = str(reference / "checkpoints" / "stage-pretrain.pt")
    cfg["stages"] = [cont]
    train(RunConfig.from_dict(cfg), tmp_path, quiet=True)
    mine = [r for r in _read(tmp_path) if "val" in r]
    theirs = [r for r in _read(reference) if "val" in r]
    assert mine[0]["tokens"] == 6144 and mine[0]["val"] == theirs[5]["val"]  # the base model's losses
    flat = lambda records: [r["val"][k] for r in records for k in sorted(r["val"])]  # noqa: E731
    assert flat(mine[1:]) == pytest.approx(flat(theirs[6:]), abs=1e-6)


def test_a_run_reference_is_found_in_the_store_that_holds_the_run_wherever_it_moves(
        reference, corpus_dir, tmp_path):
    """init_from names a run of the store; the run store is copied elsewhere halfway through the continual
    run, which resumes there (its base checkpoint found in the new place) and ends as if never moved."""
    store = tmp_path / "store"
    shutil.copytree(reference, store / "exp" / "base-run")
    cfg = small_config(corpus_dir)
    cont = dict(cfg["stages"][1], init_from={"experiment": "exp", "run": "base-run", "stage": "pretrain"})
    cfg["stages"] = [cont]
    calls = []
    stopped = train(RunConfig.from_dict(cfg), store / "exp" / "cont", quiet=True,
                    stop=lambda: calls.append(1) or len(calls) > 3)
    assert stopped.status == "stopped"
    moved = tmp_path / "elsewhere" / "store"
    shutil.copytree(store, moved)
    shutil.rmtree(store)  # the old place is gone: only the new one can serve the base checkpoint
    assert train(RunConfig.from_dict(cfg), moved / "exp" / "cont", quiet=True).status == "done"
    mine = [r for r in _read(moved / "exp" / "cont") if "val" in r]
    theirs = [r for r in _read(reference) if "val" in r]
    assert mine[0]["val"] == theirs[5]["val"]  # started from the base model's end of pretraining
    flat = lambda records: [r["val"][k] for r in records for k in sorted(r["val"])]  # noqa: E731
    assert flat(mine[1:]) == pytest.approx(flat(theirs[6:]), abs=1e-6)


def test_a_run_reference_missing_from_the_store_is_a_config_error_before_training(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir)
    cfg["stages"][1]["init_from"] = {"experiment": "exp", "run": "nope", "stage": "pretrain"}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(continue\)\.init_from: run exp/nope \(stage "
                                          r"pretrain\) has no checkpoint .* in the run store"):
        train(RunConfig.from_dict(cfg), tmp_path / "exp" / "run", quiet=True)
    assert not (tmp_path / "exp" / "run").exists()  # nothing was written


@pytest.mark.slow
def test_two_processes_match_one(reference, corpus_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(corpus_dir)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "cptlab", "train", str(config), "--out", str(tmp_path / "ddp"), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [r["val"] for r in _read(tmp_path / "ddp") if "val" in r]
    one = [r["val"] for r in _read(reference) if "val" in r]
    assert len(two) == len(one)
    for a, b in zip(two, one):
        assert a == pytest.approx(b, abs=1e-4)


def test_evaluate_takes_tokens_or_sequences_batched_once():
    """The trainer batches each validation set once (``eval_sequences``); evaluating those rows gives
    exactly the loss of evaluating the tokens, the mean cross-entropy over the whole sequences they hold."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    from cptlab.config import ModelConfig
    from cptlab.training.model import GPT
    from cptlab.training.train import eval_sequences, evaluate

    torch.manual_seed(0)
    model = GPT(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=16, n_ctx=16, vocab_size=50))
    tokens = np.random.default_rng(0).integers(0, 50, size=16 * 5 + 7, dtype=np.uint16)
    x, y = eval_sequences(tokens, 16)
    assert x.shape == y.shape == (5, 16) and torch.equal(x[:, 1:], y[:, :-1])
    args = (16, 2, torch.device("cpu"), contextlib.nullcontext())
    from_tokens = evaluate(model, {"a": tokens}, *args)["a"]
    assert evaluate(model, {"a": (x, y)}, *args)["a"] == from_tokens
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0].reshape(-1, 50), y.reshape(-1)).item()
        per_batch = 0.0  # each batch's loss added as a Python float as it comes, in order
        for i in range(0, 5, 2):
            per_batch += float(model(x[i:i + 2], y[i:i + 2], return_logits=False)[1]) * len(x[i:i + 2])
    assert from_tokens == pytest.approx(expected, rel=1e-5)
    assert from_tokens == per_batch / 5
