"""cptlab import: random small models of each family built from transformers configs (single and sharded
safetensors), converted with equal logits, exported back in their own class; the lab's own base exported and
imported continues exactly as the native base; bad input refused in one line before training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cptlab import cli
from cptlab.config import ModelConfig, RunConfig
from cptlab.data.tokenizer import Tokenizer
from cptlab.interop import pretrained
from cptlab.interop.evaluate import load_model
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir
from cptlab.training.train import train

transformers = pytest.importorskip("transformers")

VOCAB = 300  # the byte tokenizer's 257 ids fit
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48,
             max_position_embeddings=128)
FAMILIES = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, use_parallel_residual=True),
    "llama": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
}
CLASSES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
WORDS = "the quick brown fox jumps over the lazy dog while a manual page explains options".split()


def save_model(folder: Path, family: str, shard: str | None = None, seed: int = 0) -> Path:
    """A random transformers model of ``family`` and the byte tokenizer, saved in ``folder``."""
    torch.manual_seed(seed)
    cls = getattr(transformers, CLASSES[family])
    model = cls(FAMILIES[family]())
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so that a lost one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    Tokenizer("byte").to_tokenizers().save(str(folder / "tokenizer.json"))
    return folder


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("import")
    rng = random.Random(0)
    for name, words in (("old", WORDS), ("new", [w.upper() for w in WORDS])):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(200))
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_each_family_imports_and_exports_with_equal_logits(family, shard, tmp_path):
    src = save_model(tmp_path / f"{family}-model", family, shard)
    assert (src / "model.safetensors.index.json").exists() == (shard is not None)
    result = pretrained.import_model(src, tmp_path / "runs")
    assert result["family"] == family and not result["reused"]
    model, cfg, stage = load_model(result["run"])
    hf = getattr(transformers, CLASSES[family]).from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(probe())[0] - hf(probe()).logits).abs().max() < 1e-4
    assert stage == "pretrained" and RunDir(result["run"]).done
    assert GPT.count_params(cfg.model) == sum(p.numel() for p in hf.parameters())
    out = tmp_path / "exported"
    assert cli.main(["export", str(result["run"]), "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back).__name__ == CLASSES[family]
    with torch.no_grad():
        assert (back(probe()).logits - hf(probe()).logits).abs().max() < 1e-4


def test_importing_the_same_source_twice_gives_the_same_run(tmp_path):
    src = save_model(tmp_path / "m", "llama")
    first = pretrained.import_model(src, tmp_path / "runs")
    again = pretrained.import_model(src, tmp_path / "runs")
    assert again["run_id"] == first["run_id"] and again["reused"]
    other = pretrained.import_model(save_model(tmp_path / "m2" / "m", "llama", seed=1), tmp_path / "runs")
    assert other["run_id"] != first["run_id"]  # same name and config, other weights
    from cptlab.analysis.report import imported_section

    section = "\n".join(imported_section(tmp_path / "runs"))
    assert section.count("**stands in**") == 2
    assert "LR history: unknown (the schedule law fits its area)" in section


def test_two_imports_merge_counting_no_compute_of_the_lab(tmp_path):
    from cptlab.interop.merge import merge_runs

    runs = [pretrained.import_model(save_model(tmp_path / f"m{seed}" / "m", "llama", seed=seed),
                                    tmp_path / "runs")["run"] for seed in (0, 1)]
    merged = merge_runs(runs, [0.5, 0.5], tmp_path / "runs" / "merged" / "soup")
    labels = RunDir(merged["out"]).labels()
    assert labels["compute_tokens"] == 0 and set(labels["lineage"]) == {f"pretrained/{r.name}" for r in runs}


def test_the_hub_id_path_downloads_then_imports(tmp_path, monkeypatch):
    import huggingface_hub

    src = save_model(tmp_path / "local", "qwen2")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(src))
    result = pretrained.import_model("someone/tiny-qwen", tmp_path / "runs")
    assert result["run_id"].startswith("tiny-qwen-")
    assert RunDir(result["run"]).labels()["source"] == "someone/tiny-qwen"


def base_config(corpus: Path, stages: list[dict]) -> dict:
    return {"model": {"preset": "smoke"}, "tokenizer": {"kind": "byte"},
            "train": {"seq_len": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "threads": 1,
                      "log_every_steps": 2},
            "eval": {"sets": ["old"], "tokens": 512, "every_tokens": 1024},
            "corpora": {name: {"path": str(corpus / f"{name}.txt"), "sample_by": "line"}
                        for name in ("old", "new")},
            "stages": stages}


def test_the_labs_base_exported_and_imported_continues_as_the_native_base(corpus, tmp_path):
    store = tmp_path / "runs"
    schedule = {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4}
    base = store / "exp" / "base"
    cfg = base_config(corpus, [{"name": "a", "data": {"old": 1.0}, "tokens": 2048, "schedule": schedule}])
    assert train(RunConfig.from_dict(cfg), base, quiet=True).status == "done"
    assert cli.main(["export", str(base), "--out", str(tmp_path / "hf")]) == 0
    result = pretrained.import_model(tmp_path / "hf", store, eval_sets=["old"], train=cfg["train"],
                                     corpora=cfg["corpora"], eval_tokens=512)
    base_last = [r for r in RunDir(base).read_metrics() if "val" in r][-1]["val"]["old"]
    assert result["val"]["old"] == pytest.approx(base_last, abs=1e-6)

    def continual(init_from: dict, name: str, stop_after: int | None = None, **extra) -> list[dict]:
        c = base_config(corpus, [{"name": "b", "data": {"new": 1.0}, "tokens": 2048, "schedule": schedule,
                                  "init_from": init_from, "replay": {"source": "old", "fraction": 0.25}}])
        c.update(extra)
        if stop_after is not None:  # stopped mid-stage (with a checkpoint), then resumed
            calls: list[int] = []
            stopped = train(RunConfig.from_dict(c), store / "exp" / name, quiet=True,
                            stop=lambda: calls.append(1) or len(calls) > stop_after)
            assert stopped.status == "stopped"
        assert train(RunConfig.from_dict(c), store / "exp" / name, quiet=True).status == "done"
        return [r for r in RunDir(store / "exp" / name).read_metrics() if "val" in r]

    settings = pretrained.base_settings(result["run"])
    native = continual({"experiment": "exp", "run": "base", "stage": "a"}, "from-native")
    sections = dict(model=settings["model"], tokenizer=settings["tokenizer"])
    imported = continual(settings["init_from"], "from-import", **sections)
    assert continual(settings["init_from"], "from-import-resumed", stop_after=5, **sections) == imported
    assert imported[0]["val"]["old"] == pytest.approx(result["val"]["old"], abs=1e-6)
    assert len(native) == len(imported) > 2
    for a, b in zip(native, imported):  # the native run's counters continue the base's 2,048 tokens
        assert a["tokens"] - 2048 == b["tokens"]
        for name in ("old", "new"):
            assert a["val"][name] == pytest.approx(b["val"][name], abs=1e-5)


def test_new_model_options_keep_todays_config_hashes():
    # computed on main before these options existed
    assert RunConfig(model=ModelConfig(preset="smoke")).hash() == SMOKE_HASH
    assert RunConfig(model=ModelConfig(preset="smoke", norm="rmsnorm")).hash() != SMOKE_HASH


SMOKE_HASH = "aaca24e92eca"


# -- bad input: one line, exit 2, before anything is written ------------------------------------------

def refused(capsys, args: list[str], match: str) -> None:
    capsys.readouterr()  # what saving the test model printed
    assert cli.main(["import", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err


def test_an_unknown_architecture_is_refused_naming_the_supported(tmp_path, capsys):
    src = save_model(tmp_path / "m", "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    refused(capsys, [str(src), "--out", str(tmp_path / "runs")],
            "architecture MambaForCausalLM is not supported; supported: GPTNeoXForCausalLM, LlamaForCausalLM")
    assert not (tmp_path / "runs").exists()


def test_missing_or_truncated_weights_are_refused(tmp_path, capsys):
    src = save_model(tmp_path / "m", "gpt_neox", shard="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-100])
    refused(capsys, [str(src)], f"weights: {shards[0].name} is truncated")
    shards[0].unlink()
    refused(capsys, [str(src)], "shard(s) of model.safetensors.index.json are missing")
    single = save_model(tmp_path / "s", "qwen2")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(single / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, [str(single)], "weights: tensor model.layers.1.mlp.up_proj.weight is missing")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer as HF

    src = save_model(tmp_path / "m", "llama")
    tok = HF.from_file(str(src / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(60)])
    tok.save(str(src / "tokenizer.json"))
    refused(capsys, [str(src)], "tokenizer: ")
    refused(capsys, [str(src)], "has 317 ids, more than the model's embedding holds (vocab_size 300)")


def test_weights_of_other_shapes_than_the_config_are_refused(tmp_path, capsys):
    src = save_model(tmp_path / "m", "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 260}))
    refused(capsys, [str(src)], "weights: wte.weight has shape (300, 32) in the checkpoint, the config says "
                                "(260, 32)")


def test_a_model_larger_than_the_memory_is_refused_saying_what_it_needs(tmp_path, capsys, monkeypatch):
    src = save_model(tmp_path / "m", "qwen2")
    monkeypatch.setattr(pretrained, "available_memory", lambda: 1000)
    refused(capsys, [str(src)], "GiB of memory; this machine has 0.0 GiB available")


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    refused(capsys, [str(tmp_path / "notes")], "is not a transformers model folder (no config.json)")
    refused(capsys, [str(tmp_path / "nowhere")], "does not exist and is not a hub id")


# -- the widgets list imported models as bases ---------------------------------------------------------

@pytest.fixture(scope="module")
def imported_smoke_base(tmp_path_factory) -> Path:
    """The smoke scale's own base model, exported and imported back into the session's run store."""
    from cptlab.study import experiments as E
    from cptlab.study import runner
    from cptlab.training.store import runs_root

    base = E.base_run("smoke")
    runner.run_all([base], runs_root(), workers=1, log=lambda _: None)
    out = tmp_path_factory.mktemp("smoke-export") / "smoke-base"
    assert cli.main(["export", str(runner.run_dir(base, runs_root())), "--out", str(out)]) == 0
    return pretrained.import_model(out, runs_root(), eval_sets=list(base.config.eval.sets),
                                   train={"seq_len": 64})["run"]


@pytest.mark.slow  # trains the smoke base if the session has not, and tokenises its corpora anew
def test_the_launcher_continues_an_imported_model_and_the_browser_shows_it(imported_smoke_base):
    from cptlab.training.store import runs_root
    from cptlab.ui import ResultsBrowser, RunLauncher

    launcher = RunLauncher(scale="smoke", shift="strong", replay=0.25, device="cpu")
    assert (f"{imported_smoke_base.name} (imported)", str(imported_smoke_base)) in launcher.base.options
    launcher.base.value = str(imported_smoke_base)
    run = launcher.run()
    assert run.config.stages[0].init_from.run == imported_smoke_base.name and not run.needs
    assert run.labels["d0_stand_in"] and run.config.tokenizer.kind == "file"
    launcher.train_button.click()
    assert launcher.wait(300) and launcher.error is None, launcher.status.value
    assert launcher.base_records and launcher.records[-1]["stage"] == "continue"
    launcher.base.value = ""  # a run from the scale's own base beside it: a smoke run in the experiment
    launcher.train_button.click()
    assert launcher.wait(300) and launcher.error is None, launcher.status.value
    browser = ResultsBrowser(experiment="launcher")
    assert {"smoke", "custom"} <= set(browser.scale.options)  # an imported shape is not hidden by a scale
    browser.runs.value = (f"launcher/{run.run_id}",)
    refs = browser.reference_frame()
    assert set(refs["run_id"]) == {f"pretrained/{imported_smoke_base.name}"}
    assert "base model" in browser.curves()["D0"]
    from cptlab.analysis.report import imported_section

    section = "\n".join(imported_section(runs_root()))
    assert f"`{imported_smoke_base.name}`" in section and f"launcher/{run.name}" in section


def test_pythias_published_config_is_the_papers_405m_model():
    """EleutherAI/pythia-410m's config.json (the older key names: rotary_pct, rotary_emb_base) reads as the
    lab's paper-405m preset, 405,334,016 parameters; its lm head may be called embed_out."""
    from cptlab.interop import families

    published = {"architectures": ["GPTNeoXForCausalLM"], "hidden_act": "gelu", "hidden_size": 1024,
                 "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
                 "model_type": "gpt_neox", "num_attention_heads": 16, "num_hidden_layers": 24,
                 "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
                 "use_parallel_residual": True, "vocab_size": 50304}
    model = families.model_config(published)
    preset = RunConfig(model=ModelConfig(preset="paper-405m")).resolve().model
    assert GPT.count_params(model) == GPT.count_params(preset) == 405_334_016
    with torch.device("meta"):
        theirs = families.from_cptlab(GPT(model).state_dict(), model)
        expected = {k: v.shape for k, v in GPT(preset).state_dict().items()}
    theirs["embed_out.weight"] = theirs.pop("lm_head.weight")
    assert {k: v.shape for k, v in families.to_cptlab(theirs, model).items()} == expected
    assert pretrained.PASTS["pythia-410m"]["max_lr"] == 3e-4


# -- the imported model's past in the schedule law ----------------------------------------------------

def _curve(law_past: float, past_area: float | None):
    from cptlab.analysis import laws

    decay = 3e-5 + 0.5 * 2.7e-4 * (1 + np.cos(np.linspace(0, np.pi, 380)))
    lr = np.concatenate([np.linspace(0, 3e-4, 20), decay])
    truth = laws.ScheduleLaw(2.0, 1.5, 0.5, 400.0, 0.9, 3e-4, "old", (), 1024, 0, 0.0, law_past, "fitted")
    steps = np.arange(20, 401, 20)
    loss = truth.loss(lr, steps)
    return laws.Curve("x/run", "old", steps, loss, lr, 0, 1024, ("new",), past_area), truth


def test_the_law_fits_an_unknown_past_and_takes_a_published_one():
    from cptlab.analysis import laws

    true_past = laws.PAST_AREAS[9]  # in steps at lr_ref
    curve, truth = _curve(true_past, None)
    fitted = laws.fit_schedule_law([curve])
    assert fitted.past == "fitted" and fitted.s1_past == pytest.approx(true_past) and fitted.rmse < 1e-6
    assert "the imported model's past fitted" in fitted.describe()
    curve.past_area = true_past * 3e-4  # known: LR x steps
    published = laws.fit_schedule_law([curve])
    assert published.past == "published" and published.s1_past == pytest.approx(true_past)
    curve.past_area = 0.0  # taken as trained from scratch: the law fits worse
    assert laws.fit_schedule_law([curve]).rmse > published.rmse


def test_pythias_published_past_is_its_forward_area_in_the_continual_runs_steps(tmp_path):
    from cptlab.analysis import laws
    from cptlab.schedules import ScheduleConfig, lr_values
    from cptlab.study import experiments as E
    from cptlab.training.store import RunStore

    run_dir = tmp_path / "pretrained" / "pythia-410m"
    run_dir.mkdir(parents=True)
    (run_dir / "labels.json").write_text(json.dumps({"role": "pretrained",
                                                     "past": pretrained.PASTS["pythia-410m"]}))
    cfg = RunConfig.from_dict({"train": {"seq_len": 2048, "batch_size": 256}, "stages": [
        {"name": "continue", "data": {"en-man": 1.0}, "tokens": 2048 * 256 * 10,
         "init_from": {"experiment": "pretrained", "run": "pythia-410m", "stage": "pretrained"}}]})
    area = laws.past_area(E.Run("x", "y", cfg), RunStore(tmp_path))
    spec = ScheduleConfig(kind="cosine", max_lr=3e-4, min_lr=3e-5, warmup=0.01).to_spec()
    assert area == pytest.approx(sum(lr_values([(spec, 143_000)])) * 4)  # Pythia's batch is 4 of these
    assert 90 < area < 100  # about 143,000 x 4 steps at a mean LR near 1.65e-4


def test_a_wrong_conversion_is_refused_by_the_logit_check(tmp_path, monkeypatch, capsys):
    from cptlab.interop import families

    src = save_model(tmp_path / "m", "llama")
    right = families.to_cptlab

    def swapped(tensors, model):  # gate and up exchanged: shapes fit, the function does not
        out = right(tensors, model)
        fc = out["blocks.0.mlp.fc.weight"]
        out["blocks.0.mlp.fc.weight"] = torch.cat(fc.chunk(2)[::-1])
        return out

    monkeypatch.setattr(families, "to_cptlab", swapped)
    refused(capsys, [str(src), "--out", str(tmp_path / "runs")], "logits differ from transformers' by")
    assert not list((tmp_path / "runs").glob("pretrained/*/DONE"))
