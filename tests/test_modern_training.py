"""Today's recipes in the trainer: a stage that ends with the average of its last checkpoints (``merge``),
schedule-free AdamW (its train / eval weights around evaluation and checkpoints, exact resume), and what the
config says about both (hash-neutral defaults, one-line errors)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from cptlab.config import ConfigError, MergeConfig, RunConfig
from cptlab.training.model import average_states
from cptlab.training.rundir import load_checkpoint
from cptlab.training.train import train

WORDS = {
    "a": "the quick brown fox jumps over the lazy dog while a manual page explains options".split(),
    "b": "install the package then read the documentation of every module and its functions".split(),
}
CONSTANT = {"kind": "constant", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("modern-corpora")
    for seed, (name, words) in enumerate(WORDS.items()):
        rng = random.Random(seed)
        (d / name).mkdir()
        (d / name / "x.txt").write_text(
            "\n".join(" ".join(rng.choice(words) for _ in range(100)) for _ in range(200)) + "\n")
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def two_stages(corpus_dir: Path, second: dict | None = None, **train_overrides) -> dict:
    """a (AdamW, cosine) -> b (``second`` over a constant-LR stage): byte tokenizer, fp32, bit-exact."""
    return {
        "model": {"preset": "smoke"},
        "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "log_every_steps": 2,
                  "threads": 1, **train_overrides},
        "eval": {"every_tokens": 1024, "tokens": 512},
        "corpora": {n: {"path": str(corpus_dir / n / "*.txt"), "sample_by": "line"} for n in WORDS},
        "stages": [
            {"name": "a", "data": {"a": 1.0}, "tokens": 2048,
             "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}},
            {"name": "b", "data": {"b": 1.0}, "tokens": 2048, "schedule": CONSTANT,
             "replay": {"source": "a", "fraction": 0.25}, **(second or {})},
        ],
    }


def _read(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"stage-{stage}.pt")["model"]


def _train_in_parts(cfg: RunConfig, out: Path, stops: tuple[int, ...]) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] in stops

    for _ in range(len(stops) + 1):
        result = train(cfg, out, quiet=True, stop=stop)
    assert result.status == "done"


# -- config --------------------------------------------------------------------------------------------------

def test_new_fields_at_their_defaults_keep_every_hash():
    plain = {"stages": [{"name": "s", "data": {"en-man": 1.0}, "tokens": 8192}]}
    explicit = {"stages": [{**plain["stages"][0], "optimizer": "adamw", "merge": None}]}
    assert RunConfig.from_dict(plain).hash() == RunConfig.from_dict(explicit).hash()
    merged = {"stages": [{**plain["stages"][0], "merge": {"window": 0.2, "count": 4}}]}
    assert RunConfig.from_dict(merged).hash() != RunConfig.from_dict(plain).hash()


def test_merge_steps_end_at_the_last_step_and_stay_inside_the_window():
    assert MergeConfig(window=0.2, count=4).steps(100) == [85, 90, 95, 100]
    assert MergeConfig(window=1.0, count=1).steps(7) == [7]
    assert MergeConfig(window=0.5, count=8).steps(4) == [2, 3, 4]  # more snapshots than steps: each once


@pytest.mark.parametrize("stage, message", [
    ({"optimizer": "sgd"}, "stages[1] (b).optimizer: unknown optimizer 'sgd'"),
    ({"optimizer": "schedulefree_adamw", "schedule": {"kind": "cosine"}},
     "stages[1] (b).schedule.kind: schedule-free AdamW takes a constant schedule"),
    ({"optimizer": "schedulefree_adamw", "reset_optimizer": False},
     "stages[1] (b).reset_optimizer: must be true when the optimizer changes (adamw -> schedulefree_adamw)"),
    ({"merge": {"window": 0.0}}, "stages[1] (b).merge.window: must be in (0, 1]"),
    ({"merge": {"count": 0}}, "stages[1] (b).merge.count: must be >= 1"),
])
def test_bad_optimizer_or_merge_is_a_one_line_error(corpus_dir, stage, message):
    cfg = RunConfig.from_dict(two_stages(corpus_dir, stage))
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate(WORDS)


# -- merge ---------------------------------------------------------------------------------------------------

def test_a_merged_stage_ends_with_the_average_of_its_last_checkpoints(corpus_dir, tmp_path):
    """The merged model is the average of the unmerged run's weights at the two last steps (its rolling
    checkpoint one step before the end and its stage end), and is what the stage end evaluates."""
    step_tokens = 8 * 32
    plain = RunConfig.from_dict(two_stages(corpus_dir, checkpoint_every_tokens=step_tokens))
    train(plain, tmp_path / "plain", quiet=True)
    merged = RunConfig.from_dict(two_stages(corpus_dir, {"merge": {"window": 0.25, "count": 2}}))
    train(merged, tmp_path / "merged", quiet=True)
    ckpts = tmp_path / "plain" / "checkpoints"
    last_step = json.loads((ckpts / "stage-b.json").read_text())["step"]
    before = load_checkpoint(ckpts / f"step-{last_step - 1:09d}.pt")["model"]
    expected = average_states([before, _weights(tmp_path / "plain", "b")], [0.5, 0.5])
    got = _weights(tmp_path / "merged", "b")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ends = [r["val"] for r in _read(tmp_path / "merged") if "val" in r and r["stage"] == "b"]
    plain_ends = [r["val"] for r in _read(tmp_path / "plain") if "val" in r and r["stage"] == "b"]
    assert ends[:-1] == plain_ends[:-1] and ends[-1] != plain_ends[-1]
    assert not list((tmp_path / "merged" / "checkpoints" / "merge").glob("*.pt"))  # snapshots cleared


def test_a_merged_stage_resumes_exactly(corpus_dir, tmp_path):
    cfg = RunConfig.from_dict(two_stages(corpus_dir, {"merge": {"window": 0.5, "count": 3}},
                                         checkpoint_every_tokens=512))
    train(cfg, tmp_path / "whole", quiet=True)
    _train_in_parts(cfg, tmp_path / "parts", stops=(14, 16))  # inside b's merge window
    assert _read(tmp_path / "parts") == _read(tmp_path / "whole")
    a, b = _weights(tmp_path / "parts", "b"), _weights(tmp_path / "whole", "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- schedule-free AdamW -------------------------------------------------------------------------------------

SCHEDULE_FREE = {"optimizer": "schedulefree_adamw", "reset_optimizer": True}


def test_schedule_free_stage_resumes_exactly_and_saves_its_averaged_weights(corpus_dir, tmp_path):
    pytest.importorskip("schedulefree")
    cfg = RunConfig.from_dict(two_stages(corpus_dir, SCHEDULE_FREE, checkpoint_every_tokens=512))
    train(cfg, tmp_path / "whole", quiet=True)
    _train_in_parts(cfg, tmp_path / "parts", stops=(11, 15))  # inside b, after rolling checkpoints
    assert _read(tmp_path / "parts") == _read(tmp_path / "whole")
    a, b = _weights(tmp_path / "parts", "b"), _weights(tmp_path / "whole", "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(tmp_path / "whole" / "checkpoints" / "stage-b.pt")
    assert state["optimizer"]["param_groups"][0]["train_mode"] is False  # saved as the average x
    last_val = [r["val"] for r in _read(tmp_path / "whole") if "val" in r][-1]
    assert state["last_val"] == last_val


def test_schedule_free_evaluates_its_average_not_its_training_weights(corpus_dir, tmp_path):
    """The stage-end checkpoint (x) evaluated afresh gives the logged loss; the training weights y differ."""
    pytest.importorskip("schedulefree")
    from cptlab import data
    from cptlab.training import runtime
    from cptlab.training.model import GPT
    from cptlab.training.train import evaluate

    cfg = RunConfig.from_dict(two_stages(corpus_dir, SCHEDULE_FREE))
    train(cfg, tmp_path / "run", quiet=True)
    resolved = cfg
    registry = data.Registry(resolved.corpora)
    tok = data.load_tokenizer(resolved.tokenizer, registry)
    model = GPT(resolved.resolve(vocab_size=tok.vocab_size).model)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "stage-b.pt")
    model.load_state_dict(state["model"])
    sets = {"b": data.val_tokens("b", tok, registry, 512)}
    fp32 = runtime.autocast_context(torch.device("cpu"), "fp32")
    loss = evaluate(model, sets, 32, 8, torch.device("cpu"), fp32)
    assert loss["b"] == pytest.approx(state["last_val"]["b"], rel=1e-6)
    optimizer = runtime.make_optimizer(model, resolved.train, kind="schedulefree_adamw")
    optimizer.load_state_dict(state["optimizer"])
    optimizer.train()  # y: the weights the steps were taken at
    y_loss = evaluate(model, sets, 32, 8, torch.device("cpu"), fp32)
    assert y_loss["b"] != loss["b"]
