"""Sharded training: ``train.strategy: fsdp`` with 2 CPU processes (gloo) matches 1 process, stops and
resumes from its checkpoints, and writes checkpoints in the same consolidated format as ddp."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cptlab.config import RunConfig, TrainConfig
from cptlab.training import runtime
from cptlab.training.model import GPT
from cptlab.training.train import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()
WORDS_DE = "der schnelle braune fuchs springt ueber den faulen hund und eine seite erklaert".split()

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    HAVE_FSDP2 = True
except ImportError:
    HAVE_FSDP2 = False
needs_fsdp = pytest.mark.skipif(not HAVE_FSDP2 or not torch.distributed.is_gloo_available(),
                                reason=f"torch {torch.__version__} lacks FSDP2 (fully_shard) or gloo")

# A worker run by torchrun: train the config, stopping (with a checkpoint) before step STOP + 1 if given.
WORKER = """
import sys
from cptlab.config import RunConfig
from cptlab.training import distributed
from cptlab.training.train import train

for hook in ("shard", "checkpoint_blocks"):  # say which strategy pieces ran
    def traced(model, _name=hook, _fn=getattr(distributed, hook)):
        sys.stdout.write(f"RAN {_name}\\n")  # one write: two ranks share the pipe
        _fn(model)
    setattr(distributed, hook, traced)

config, out, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]

def stop():
    calls[0] += 1
    return 0 < stop_after < calls[0]

sys.stdout.write(f"STATUS {train(RunConfig.load(config), out, quiet=True, stop=stop).status}\\n")
"""


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fsdp-corpora")
    for name, words, seed in (("old", WORDS, 0), ("new", WORDS_DE, 1)):
        rng = random.Random(seed)
        lines = (" ".join(rng.choice(words) for _ in range(120)) for _ in range(300))
        (d / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config(corpus_dir: Path, **train_args) -> dict:
    """Two stages (the second from the first's weights, optimizer kept), byte tokenizer, fp32 on the CPU."""
    return {
        "model": {"preset": "smoke"},
        "tokenizer": {"kind": "byte"},
        "train": {"seq_len": 32, "batch_size": 8, "micro_batch_size": 2, "seed": 0, "device": "cpu",
                  "precision": "fp32", "log_every_steps": 4, "checkpoint_every_tokens": 2048, "threads": 1,
                  **train_args},
        "eval": {"sets": ["old", "new"], "every_tokens": 1024, "tokens": 1024},
        "corpora": {"old": {"path": str(corpus_dir / "old.txt"), "sample_by": "line"},
                    "new": {"path": str(corpus_dir / "new.txt"), "sample_by": "line"}},
        "stages": [
            {"name": "pretrain", "data": {"old": 1.0}, "tokens": 4096,
             "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}},
            {"name": "continue", "data": {"new": 1.0}, "replay": {"source": "old", "fraction": 0.25},
             "tokens": 3072, "reset_optimizer": False,
             "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1}},
        ],
    }


def evals(run_dir: Path) -> list[tuple[int, dict]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["tokens"], r["val"]) for r in lines if "val" in r]


def assert_close(a: list[tuple[int, dict]], b: list[tuple[int, dict]], tol: float) -> None:
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, abs=tol)


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory) -> Path:
    """One process, no activation checkpointing."""
    out = tmp_path_factory.mktemp("one-process")
    with pytest.MonkeyPatch.context() as mp:  # not for the rest of the session
        mp.setenv("CPTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(RunConfig.from_dict(config(corpus_dir)), out, quiet=True).status == "done"
    return out


def torchrun(worker: Path, cfg: Path, out: Path, stop_after: int = 0) -> str:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(worker), str(cfg), str(out), str(stop_after)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_activation_checkpointing_changes_nothing_but_memory(reference, corpus_dir, tmp_path):
    assert train(RunConfig.from_dict(config(corpus_dir, activation_checkpointing=True)), tmp_path,
                 quiet=True).status == "done"
    assert_close(evals(tmp_path), evals(reference), 1e-6)


@pytest.mark.slow
@needs_fsdp
def test_two_fsdp_processes_match_one_and_resume(reference, corpus_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(corpus_dir, strategy="fsdp", activation_checkpointing=True)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "fsdp"

    stdout = torchrun(worker, cfg, out, stop_after=7)  # stops inside the first stage
    assert "STATUS stopped" in stdout and "RAN shard" in stdout and "RAN checkpoint_blocks" in stdout
    (ckpt,) = (out / "checkpoints").glob("step-*.pt")
    assert ckpt.name == "step-000000007.pt"
    assert "STATUS done" in torchrun(worker, cfg, out)
    assert_close(evals(out), evals(reference), 1e-4)

    # the checkpoints are consolidated: they load into an unsharded model and its AdamW as they are
    state = torch.load(out / "checkpoints" / "stage-pretrain.pt", weights_only=True)
    resolved = RunConfig.from_dict(config(corpus_dir)).resolve(vocab_size=257)
    model = GPT(resolved.model)
    model.load_state_dict(state["model"])
    optimizer = runtime.make_optimizer(model, TrainConfig())
    optimizer.load_state_dict(state["optimizer"])
    n_params = len(list(model.parameters()))
    assert sorted(state["optimizer"]["state"]) == list(range(n_params))
    assert all(torch.is_tensor(v) and not hasattr(v, "placements") for v in state["model"].values())
    ref_state = torch.load(reference / "checkpoints" / "stage-pretrain.pt", weights_only=True)
    for key, value in ref_state["model"].items():
        assert torch.allclose(state["model"][key], value, atol=1e-4), key
