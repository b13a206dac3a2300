"""Sequences of datasets and the continual-learning baselines: replay from several earlier datasets, EWC,
LwF, evaluation of every dataset at every stage end, exact resume with a regularizer, counted FLOPs."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cptlab.config import ConfigError, RegularizerConfig, ReplayConfig, RunConfig
from cptlab.data.sampler import BatchSampler
from cptlab.training import regularizers
from cptlab.training.model import GPT
from cptlab.training.train import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = {
    "a": "the quick brown fox jumps over the lazy dog while a manual page explains options".split(),
    "b": "install the package then read the documentation of every module and its functions".split(),
    "c": "der schnelle braune fuchs springt ueber den faulen hund und eine seite erklaert".split(),
}
SCHEDULE = {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seq-corpora")
    for seed, (name, words) in enumerate(WORDS.items()):
        rng = random.Random(seed)
        (d / name).mkdir()
        (d / name / "x.txt").write_text(
            "\n".join(" ".join(rng.choice(words) for _ in range(100)) for _ in range(200)) + "\n")
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def sequence_config(corpus_dir: Path, **train_overrides) -> dict:
    """a -> b (EWC) -> c (replay of a and b, LwF): byte tokenizer, fp32, seconds, bit-exact on resume."""
    return {
        "model": {"preset": "smoke"},
        "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "log_every_steps": 2,
                  "threads": 1, **train_overrides},
        "eval": {"every_tokens": 2048, "tokens": 512},
        "corpora": {n: {"path": str(corpus_dir / n / "*.txt"), "sample_by": "line"} for n in WORDS},
        "stages": [
            {"name": "a", "data": {"a": 1.0}, "tokens": 4096, "schedule": SCHEDULE},
            {"name": "b", "data": {"b": 1.0}, "tokens": 2048, "schedule": SCHEDULE,
             "regularizer": {"kind": "ewc", "weight": 50.0, "fisher_batches": 2}},
            {"name": "c", "data": {"c": 1.0}, "tokens": 2048, "schedule": SCHEDULE,
             "replay": {"source": {"a": 0.5, "b": 0.5}, "fraction": 0.25},
             "regularizer": {"kind": "lwf", "weight": 1.0, "temperature": 2.0}},
        ],
    }


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- config --------------------------------------------------------------------------------------------------

def test_replay_mapping_and_single_name_both_load():
    mapping = RunConfig.from_dict({"stages": [{"replay": {"source": {"en-man": 1, "en-docs": 3}}}]})
    assert mapping.stages[0].replay.weights() == {"en-man": 1.0, "en-docs": 3.0}
    single = RunConfig.from_dict({"stages": [{"replay": {"source": "en-man"}}]})
    assert single.stages[0].replay.weights() == {"en-man": 1.0}


def test_a_replay_mapping_is_another_config_reading_the_same_data(corpus_dir):
    cfg = RunConfig.from_dict(sequence_config(corpus_dir))
    cfg.stages[2].replay = ReplayConfig("a", 0.25)
    same = copy.deepcopy(cfg)
    same.stages[2].replay.source = {"a": 1.0}
    assert cfg.hash() != same.hash()  # a mapping is a different config ...
    assert cfg.stages[2].sources() == same.stages[2].sources() == ["c", "a"]  # ... reading the same data


@pytest.mark.parametrize("change, message", [
    (lambda c: c["stages"][0].update(regularizer={"kind": "ewc", "weight": 1.0}),
     r"^stages\[0\] \(a\)\.regularizer: the stage starts from scratch"),
    (lambda c: c["stages"][1]["regularizer"].update(kind="si"),
     r"^stages\[1\] \(b\)\.regularizer\.kind: unknown regularizer 'si'; allowed: ewc, lwf$"),
    (lambda c: c["stages"][1]["regularizer"].update(weight=-1.0),
     r"^stages\[1\] \(b\)\.regularizer\.weight: must be > 0"),
    (lambda c: c["stages"][2]["regularizer"].update(temperature=0),
     r"^stages\[2\] \(c\)\.regularizer\.temperature: must be > 0"),
    (lambda c: c["stages"][1]["regularizer"].update(fisher_batches=0),
     r"^stages\[1\] \(b\)\.regularizer\.fisher_batches: must be >= 1"),
    (lambda c: c["stages"][1].update(replay={"source": {"a": 1.0, "c": 1.0}, "fraction": 0.1}),
     r"^stages\[1\] \(b\)\.replay\.source: 'c' was not read before this stage \(read before it: a\)$"),
    (lambda c: c["stages"][2]["replay"]["source"].update(b=-0.5),
     r"^stages\[2\] \(c\)\.replay\.source\.b: weight must be > 0"),
    (lambda c: c["stages"][2]["replay"].update(source={}),
     r"^stages\[2\] \(c\)\.replay\.source: an empty mapping"),
    (lambda c: c["stages"][2].update(init_from="scratch"),
     r"^stages\[2\] \(c\)\.replay\.source: 'a' was not read before this stage"),
    (lambda c: c["train"].update(strategy="fsdp"),
     r"^stages\[1\] \(b\)\.regularizer: not supported with train.strategy fsdp"),
])
def test_bad_sequences_are_refused_before_training(corpus_dir, tmp_path, change, message):
    cfg = sequence_config(corpus_dir)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        train(RunConfig.from_dict(cfg), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "config.json").exists()


def test_ewc_on_a_first_stage_from_a_model_must_name_its_data(corpus_dir, tmp_path):
    cfg = sequence_config(corpus_dir)
    cfg["stages"] = [dict(cfg["stages"][1], init_from=str(tmp_path / "base.pt"))]
    with pytest.raises(ConfigError, match=r"^stages\[0\] \(b\)\.regularizer\.data: required"):
        RunConfig.from_dict(cfg).validate()
    cfg["stages"][0]["regularizer"]["data"] = {"a": 1.0}
    RunConfig.from_dict(cfg).validate()


def test_fisher_data_defaults_to_every_earlier_corpus(corpus_dir):
    cfg = RunConfig.from_dict(sequence_config(corpus_dir))
    cfg.stages[2].regularizer = RegularizerConfig("ewc", 1.0)
    assert cfg.fisher_data(2) == {"a": 1.0, "b": 1.0}
    assert cfg.fisher_data(1) == {"a": 1.0}
    cfg.stages[2].regularizer.data = {"a": 2.0}
    assert cfg.fisher_data(2) == {"a": 2.0}


# -- the sampler ---------------------------------------------------------------------------------------------

def test_replay_from_several_corpora_splits_by_weight():
    sources = {n: np.arange(20_000, dtype=np.uint16) for n in ("new", "x", "y")}
    sampler = BatchSampler(sources, {"new": 1.0}, ReplayConfig({"x": 1.0, "y": 3.0}, 0.2), 16, 10,
                           100 * 10 * 16, seed=0)
    for _ in sampler:
        pass
    seen = sampler.sequences_by_source
    assert seen["x"] + seen["y"] == 200  # 20% of 1000 sequences
    assert (seen["x"], seen["y"]) == (50, 150)
    assert seen["new"] == 800


# -- the regularizers ----------------------------------------------------------------------------------------

def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = RunConfig.from_dict({"model": {"preset": "smoke", "vocab_size": 64}}).resolve().model
    return GPT(cfg)


def test_ewc_penalty_gradient_is_the_penalty_s_gradient():
    start, model = _model(0), _model(1)
    fisher = {n: torch.rand_like(p) for n, p in start.named_parameters()}
    ewc = regularizers.EWC(start, fisher, weight=3.0, flops_per_token=1, fisher_tokens=0)
    penalty = sum(0.5 * 3.0 * (fisher[n] * (p - start.state_dict()[n]) ** 2).sum()
                  for n, p in model.named_parameters())
    expected = torch.autograd.grad(penalty, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    ewc.add_penalty_grad(model)
    for (name, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, msg=name)
    assert ewc.take_penalty() == pytest.approx(float(penalty.detach()), rel=1e-5)


def test_ewc_penalty_is_summed_on_the_parameters_device():
    """On CUDA a CPU accumulator refuses the in-place add of a CUDA sum; ``meta`` stands in for a device
    other than the CPU."""
    start, model = _model(0).to("meta"), _model(1).to("meta")
    fisher = {n: torch.empty_like(p) for n, p in start.named_parameters()}
    ewc = regularizers.EWC(start, fisher, weight=3.0, flops_per_token=1, fisher_tokens=0)
    penalty = ewc.penalty_grad(model)
    assert penalty.device.type == "meta" and penalty.dim() == 0
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_fisher_is_the_mean_squared_per_sequence_gradient():
    model = _model(0)
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    sampler = BatchSampler({"d": tokens}, {"d": 1.0}, None, 16, 4, 2 * 4 * 16, seed=0)
    no_autocast = torch.autocast("cpu", enabled=False)
    fisher = regularizers.estimate_fisher(model, sampler, torch.device("cpu"), no_autocast)
    batches = list(BatchSampler({"d": tokens}, {"d": 1.0}, None, 16, 4, 2 * 4 * 16, seed=0))
    squares = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        for row in range(len(x)):
            model.zero_grad(set_to_none=True)
            model.fuse_head_loss = False
            model(x[row:row + 1], y[row:row + 1])[1].backward()
            for s, p in zip(squares, model.parameters()):
                s += p.grad**2
    for (name, _), s in zip(model.named_parameters(), squares):
        torch.testing.assert_close(fisher[name], s / 8, rtol=1e-4, atol=1e-9, msg=name)


def test_lwf_adds_nothing_while_the_model_is_its_teacher():
    model = _model(0)
    lwf = regularizers.LwF(copy.deepcopy(model), 5.0, 2.0, flops_per_token=30,
                           autocast=torch.autocast("cpu", enabled=False))
    x = torch.randint(0, 64, (2, 16))
    objective, data_loss = lwf.loss_fn(model, x, x)
    assert float(objective.detach()) == pytest.approx(float(data_loss.detach()), abs=1e-6)
    assert lwf.step_flops(32) == 32 * 10  # the teacher's forward: a third of 30 FLOPs per token
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    objective, data_loss = lwf.loss_fn(model, x, x)
    assert float(objective.detach()) > float(data_loss.detach()) + 1e-4


# -- the trainer ---------------------------------------------------------------------------------------------

def test_a_sequence_evaluates_every_dataset_at_every_stage_end(corpus_dir, tmp_path):
    result = train(RunConfig.from_dict(sequence_config(corpus_dir)), tmp_path / "run", quiet=True)
    assert result.status == "done"
    records = _read(tmp_path / "run")
    for stage in ("a", "b", "c"):
        last = [r for r in records if r["stage"] == stage and "val" in r][-1]
        assert set(last["val"]) == {"a", "b", "c"}, stage
    training = [r for r in records if "train_loss" in r]
    assert all("regularizer_loss" in r for r in training if r["stage"] in ("b", "c"))
    assert not any("regularizer_loss" in r for r in training if r["stage"] == "a")
    last_c = [r for r in records if r["stage"] == "c" and "train_loss" in r][-1]
    assert set(last_c["tokens_by_source"]) == {"a", "b", "c"}
    by_source = last_c["tokens_by_source"]  # the whole run's: stages a and b read 4096 and 2048 tokens
    assert by_source["a"] - 4096 == by_source["b"] - 2048 == 2048 // 8  # replay: 25%, split 50/50
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    fpt = GPT.count_flops_per_token(RunConfig.from_dict(resolved).model, 32)
    fisher = 2 * 8 * 32 * fpt  # EWC: 2 batches of 8 x 32 tokens, forward and backward
    teacher = 8 * (256 * fpt // 3)  # LwF: a forward pass on every token of stage c's 8 steps
    assert last_c["extra_flops"] == fisher + teacher


def test_a_regularized_stage_resumes_exactly(corpus_dir, tmp_path):
    cfg = RunConfig.from_dict(sequence_config(corpus_dir, checkpoint_every_tokens=512))
    train(cfg, tmp_path / "whole", quiet=True)
    steps = {"n": 0}

    def stop() -> bool:  # stop inside stage b (EWC), then inside stage c (LwF)
        steps["n"] += 1
        return steps["n"] in (20, 27)

    for _ in range(3):
        result = train(cfg, tmp_path / "parts", quiet=True, stop=stop)
    assert result.status == "done"

    def comparable(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert comparable(_read(tmp_path / "parts")) == comparable(_read(tmp_path / "whole"))


@pytest.mark.parametrize("kind, weight", [("ewc", 1e4), ("lwf", 10.0)])
def test_a_strong_regularizer_holds_the_model_back(corpus_dir, tmp_path, kind, weight):
    """Stability for plasticity: held near the starting model, the stage learns its new data less. (At this
    scale learning c does not raise a's loss, so forgetting itself is measured at tiny, not here.)"""
    def learned(regularizer: dict | None, out: Path) -> float:
        cfg = sequence_config(corpus_dir)
        cfg["stages"] = [cfg["stages"][0], {**cfg["stages"][2], "replay": None, "regularizer": regularizer}]
        cfg["stages"][0]["tokens"] = 8192
        train(RunConfig.from_dict(cfg), out, quiet=True)
        ends = {r["stage"]: r["val"]["c"] for r in _read(out) if "val" in r}
        return ends["a"] - ends["c"]

    plain = learned(None, tmp_path / "none")
    held = learned({"kind": kind, "weight": weight}, tmp_path / kind)
    assert 0 < held < 0.85 * plain


def test_the_sequence_example_trains_from_the_cli(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "seq"
    config = ROOT / "configs/examples/sequence-smoke.yaml"
    subprocess.run([sys.executable, "-m", "cptlab", "train", str(config), "--out", str(out), "--quiet"],
                   check=True, cwd=ROOT, env=env, timeout=600)
    records = _read(out)
    ends = {}
    for r in records:
        if "val" in r:
            ends[r["stage"]] = r["val"]
    assert list(ends) == ["en-man", "en-docs", "de-man"]
    assert all(set(v) == {"en-man", "en-docs", "de-man"} for v in ends.values())
