"""A run's model outside the lab: `cptlab export` gives a transformers model with the same logits and a
tokenizer with the same ids, `cptlab eval` gives the trainer's losses, and the optional loggers mirror
metrics.jsonl into TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from cptlab import cli
from cptlab.config import ModelConfig, RunConfig, TokenizerConfig
from cptlab.data import load_tokenizer
from cptlab.data.tokenizer import Tokenizer
from cptlab.interop import export as X
from cptlab.interop import families
from cptlab.interop.evaluate import evaluate_run, load_model
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir
from cptlab.training.train import train

transformers = pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interop") / "old.txt"
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(200)) + "\n")
    return path


def config(corpus: Path, **train) -> dict:
    return {"model": {"preset": "smoke"}, "tokenizer": {"kind": "byte"},
            "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "threads": 1,
                      "log_every_steps": 2, **train},
            "eval": {"sets": ["old"], "tokens": 512, "every_tokens": 1024},
            "corpora": {"old": {"path": str(corpus), "sample_by": "line"}},
            "stages": [{"name": "a", "data": {"old": 1.0}, "tokens": 4096,
                        "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4}}]}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop-run") / "exp" / "run"
    assert train(RunConfig.from_dict(config(corpus)), out, quiet=True).status == "done"
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    return out


def probe(vocab: int, n: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (3, n), generator=torch.Generator().manual_seed(1))


def test_exported_model_loads_offline_with_the_same_logits(run, exported):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    model, cfg, stage = load_model(run)
    assert type(hf).__name__ == "GPTNeoXForCausalLM" and stage == "a"
    x = probe(cfg.model.vocab_size)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x)[0], atol=1e-4)
    card = (exported / "README.md").read_text()
    assert "| a | old 1 | - | 4,096 | cosine" in card and "| old | " in card


def test_exported_tokenizer_gives_the_runs_ids_and_eval_the_same_loss(run, exported, corpus):
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = corpus.read_text()
    ids = Tokenizer("byte").encode(text)
    assert tok(text)["input_ids"] == ids and tok.decode(ids[:50]) == text[:50]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    n = (len(ids) - 1) // 32
    x, y = torch.tensor(ids[: n * 32]).view(n, 32), torch.tensor(ids[1: n * 32 + 1]).view(n, 32)
    with torch.no_grad():
        logits = hf(x).logits
    hf_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)))
    ours = evaluate_run(run, text=corpus, precision="fp32")
    assert ours["loss"] == pytest.approx(hf_loss, abs=1e-5) and ours["tokens"] == n * 32


def test_eval_of_a_corpus_gives_the_trainers_last_evaluation(run, capsys):
    last = [r for r in RunDir(run).read_metrics() if "val" in r][-1]["val"]["old"]
    assert evaluate_run(run, corpus="old")["loss"] == pytest.approx(last, abs=1e-7)
    assert cli.main(["eval", str(run), "--corpus", "old", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(last, abs=1e-7)


@pytest.mark.parametrize("preset", ["smoke", "tiny", "small"])
def test_every_preset_exports_with_equal_logits(preset):
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(preset=preset)).resolve(vocab_size=512).model
    model = GPT(cfg)
    hf = X.to_transformers(model, eot_id=511)  # refuses if the logits differ
    x = probe(512, 24)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x)[0], atol=1e-4)


def test_the_paper_shape_maps_every_tensor():
    cfg = RunConfig(model=ModelConfig(preset="paper-405m")).resolve().model
    with torch.device("meta"):
        ours = GPT(cfg).state_dict()
        theirs = transformers.GPTNeoXForCausalLM(families.transformers_config(cfg, 0)).state_dict()
    mapped = families.from_cptlab(ours, cfg)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("shape", [dict(tie_embeddings=True), dict(parallel_residual=False),
                                   dict(rotary_pct=1.0), dict(rotary_pct=0.0, mlp_ratio=2)])
def test_model_options_export_with_equal_logits(shape):
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(preset="smoke", **shape)).resolve(vocab_size=300).model
    X.to_transformers(GPT(cfg), eot_id=299)


def test_a_wrong_mapping_is_refused(monkeypatch):
    cfg = RunConfig(model=ModelConfig(preset="smoke")).resolve(vocab_size=300).model
    unpermuted = families.from_cptlab

    def wrong(state, model):  # the fused qkv left in cptlab's order
        out = unpermuted(state, model)
        for i in range(model.n_layer):
            key = f"gpt_neox.layers.{i}.attention.query_key_value.weight"
            out[key] = state[f"blocks.{i}.attn.qkv.weight"]
        return out

    monkeypatch.setattr(families, "from_cptlab", wrong)
    with pytest.raises(X.ExportError, match=r"model: the transformers model's logits differ from the run's"):
        X.to_transformers(GPT(cfg), eot_id=299)


def test_bpe_tokenizer_exports_with_the_same_ids():
    tok = load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1024))
    hf = tok.to_tokenizers()
    for text in ("NAME\n       ls - list directory contents", "Grüße aus der Manpage", "x = [1, 2]\n\tpass"):
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_export_and_eval_refuse_bad_requests(run, exported, tmp_path, capsys):
    assert cli.main(["export", str(run), "--out", str(exported)]) == 2
    assert f"--out: {exported} is not empty" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--corpus", "old", "--stage", "nope"]) == 2
    assert "--stage: 'nope' is not a stage of" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--corpus", "old"]) == 2
    assert "is not a run directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("tiny")
    assert cli.main(["eval", str(run), "--text", str(tmp_path / "short.txt")]) == 2
    assert "holds 4 tokens, fewer than one sequence" in capsys.readouterr().err


# -- loggers ---------------------------------------------------------------------------------------------

def test_tensorboard_mirrors_metrics_even_across_a_resume(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig.from_dict(config(corpus, loggers=["tensorboard"], checkpoint_every_tokens=1024))
    seen = []

    def crash(record):  # dies after logging step 10 (tokens 2560), past the checkpoint at step 8
        seen.append(record)
        if record["step"] == 10:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, tmp_path, quiet=True, on_record=crash)
    assert train(cfg, tmp_path, quiet=True).status == "done"  # resumed: steps 9 and 10 again
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = RunDir(tmp_path).read_metrics()
    evals = [(r["tokens"], r["val"]["old"]) for r in records if "val" in r]
    assert [(e.step, e.value) for e in events.Scalars("val/old")] == [(t, pytest.approx(v)) for t, v in evals]
    train_lines = [r for r in records if "train_loss" in r]
    assert [e.step for e in events.Scalars("train/loss")] == [r["tokens"] for r in train_lines]
    assert {"lr", "train/tokens_per_s", "tokens_by_source/old"} <= set(events.Tags()["scalars"])


def test_a_logger_without_its_package_is_a_one_line_error(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config(corpus, loggers=["wandb"])))
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "train.loggers[0]: wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wandb_gets_every_record_offline_grouped_by_experiment(corpus, tmp_path, monkeypatch):
    seen = {"log": []}
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        seen["init"] = kwargs
        return types.SimpleNamespace(log=lambda values, step: seen["log"].append((step, values)),
                                     finish=lambda: seen.setdefault("finished", True))

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "replay" / "weak-replay0.05-0123"
    train(RunConfig.from_dict(config(corpus, loggers=["wandb"])), out, quiet=True)
    init_kwargs = seen["init"]
    assert init_kwargs["mode"] == "offline" and init_kwargs["group"] == "replay"
    assert init_kwargs["name"] == init_kwargs["id"] == "weak-replay0.05-0123" and seen["finished"]
    records = RunDir(out).read_metrics()
    assert [step for step, _ in seen["log"]] == [r["step"] for r in records]
    assert seen["log"][-1][1]["val/old"] == records[-1]["val"]["old"]
