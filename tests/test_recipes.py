"""The paper's real-scale recipes (configs/paper/): generated from one description and committed up to
date; every one loads and validates with its corpora registered by name, never downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cptlab import schedules
from cptlab.config import RunConfig, RunRef
from cptlab.data import corpus
from cptlab.data.corpus import Registry
from cptlab.study import recipes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "paper"
FILES = sorted(CONFIGS.glob("*/*.yaml"))
NEOX_VOCAB = 50277  # tokens of EleutherAI/gpt-neox-20b's tokenizer, added tokens included
HUB = {"monology/pile-uncopyrighted", "cerebras/SlimPajama-627B", "HuggingFaceFW/fineweb-2"}


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to open a dataset fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load a dataset: {args} {kwargs}")

    monkeypatch.setattr(corpus, "_load_dataset", refuse)


def test_committed_files_are_what_the_generator_writes(monkeypatch):
    assert recipes.stale_files(CONFIGS) == []
    assert len(FILES) == len(recipes.VARIANTS) * 25 + len(recipes.IMPORTED_VARIANTS) * 12
    monkeypatch.chdir(ROOT)
    assert recipes.main(["check"]) == 0


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_loads_and_validates_offline(path, no_hub):
    cfg = RunConfig.load(path)
    registry = Registry(cfg.corpora)
    cfg.validate(registry.names())
    resolved = cfg.resolve(vocab_size=NEOX_VOCAB)
    assert resolved.model.vocab_size >= NEOX_VOCAB and cfg.tokenizer.kind == "file"
    assert all(registry.is_streamed(n) and spec["hf"] in HUB for n, spec in cfg.corpora.items())
    t = cfg.train
    for processes in (1, 2, 4, 8):  # the micro-batch divides every process's share of the batch
        assert (t.batch_size // processes) % t.micro_batch_size == 0
    # each corpus is streamed up to at least what the run reads of it
    new: dict[str, float] = {}
    for st in cfg.stages:
        replay = st.replay.fraction if st.replay else 0.0
        total = sum(st.data.values())
        for name, weight in st.data.items():
            new[name] = new.get(name, 0) + st.tokens * (1 - replay) * weight / total
        if st.replay:
            assert cfg.corpora[st.replay.source]["max_tokens"] >= st.tokens * replay
        if isinstance(st.init_from, RunRef) and st.init_from.experiment == "pretrained":  # cptlab import
            assert path.parent.name in recipes.IMPORTED_VARIANTS
        elif isinstance(st.init_from, RunRef):  # another recipe of the same variant, to be trained first
            assert st.init_from.experiment == path.parent.name
            assert (path.parent / f"{st.init_from.run}.yaml").exists()
    assert all(cfg.corpora[n]["max_tokens"] >= tokens for n, tokens in new.items())


def test_405m_recipes_follow_the_paper():
    rs = {r.name: RunConfig.from_dict(r.config) for r in recipes.recipes("405m")}
    base = rs["pile-base"]
    t = base.train
    assert base.model.preset == "paper-405m" and (t.batch_size, t.seq_len) == (1104, 2048)
    assert (t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    s = base.stages[0].schedule
    assert (s.kind, s.max_lr, s.min_lr, s.warmup) == ("cosine", 3e-4, 3e-5, 0.01)
    assert base.stages[0].tokens == 300e9 and base.stages[0].data == {"pile": 1.0}
    for shift, d1, tokens in (("weak", "slimpajama", 300e9), ("strong", "german", 200e9)):
        for percent in (0, 1, 5, 10, 25, 50):  # compute-equivalent: the same tokens whatever the replay
            st = rs[f"{shift}-replay{percent}"].stages[0]
            assert st.tokens == tokens and st.data == {d1: 1.0} and st.reset_optimizer
            assert (st.replay.fraction if st.replay else 0.0) == percent / 100
            assert st.init_from == RunRef("405m", "pile-base", "pretrain")  # in the store runs/paper
    assert rs["weak-union"].stages[0].tokens == 600e9
    assert rs["weak-union"].stages[0].data == {"pile": 0.5, "slimpajama": 0.5}
    assert rs["strong-union"].stages[0].tokens == 500e9
    assert rs["strong-union"].stages[0].data == {"pile": 0.6, "german": 0.4}
    assert rs["strong-replay0"].corpora["german"] == {
        "hf": "HuggingFaceFW/fineweb-2", "config": "deu_Latn", "split": "train", "text_field": "text",
        "language": "de", "domain": "German web text", "streaming": True, "max_tokens": 202_000_000_000,
        "description": "FineWeb-2, German (deu_Latn): filtered, deduplicated Common Crawl"}


def test_pythia_410m_recipes_continue_the_imported_model_with_the_papers_schedule():
    rs = {r.name: RunConfig.from_dict(r.config) for r in recipes.recipes("pythia-410m")}
    assert len(rs) == 12 and not any(r.needs for r in recipes.recipes("pythia-410m"))
    for shift, d1, tokens in (("weak", "slimpajama", 1e9), ("strong", "german", 200e9 / 300)):
        for percent in (0, 1, 5, 10, 25, 50):
            cfg = rs[f"{shift}-replay{percent}"]
            st = cfg.stages[0]
            assert st.init_from == RunRef("pretrained", "pythia-410m", "pretrained")
            assert st.tokens == pytest.approx(tokens, abs=1) and st.data == {d1: 1.0} and st.reset_optimizer
            assert (st.replay.fraction if st.replay else 0.0) == percent / 100
            s = st.schedule
            assert (s.kind, s.max_lr, s.min_lr, s.warmup) == ("cosine", 3e-4, 3e-5, 0.01)  # Pythia's own
            assert cfg.model.preset == "paper-405m" and cfg.train.seq_len == 2048
    # one H100 trains a weak-shift run in hours at the assumed MFU
    assert 1 < recipes.days(int(1e9), recipes.PYTHIA_410M, 1) * 24 < 4


def test_chunk_schedules_over_three_chunks():
    rs = {r.name: RunConfig.from_dict(r.config) for r in recipes.recipes("405m")}
    batch = 1104 * 2048
    chunk = int(100e9) // batch  # steps of one chunk
    for kind in recipes.CHUNK_SCHEDULES:
        cfg = rs[f"chunks-{kind}"]
        assert sum(st.tokens for st in cfg.stages) == 300e9
        plan = [(st.schedule.to_spec(), st.tokens // batch) for st in cfg.stages]
        lr = schedules.compose(plan)
        ends = [sum(n for _, n in plan[:i + 1]) for i in range(len(plan))]
        assert lr(int(0.01 * chunk)) == pytest.approx(3e-4, rel=1e-3)  # warmed up after 1% of chunk 1
        assert lr(ends[-1] - 1) == pytest.approx(3e-5)  # the run ends at min_lr
        if kind == "cosine":  # re-warm and re-decay every chunk
            assert [st.reset_optimizer for st in cfg.stages] == [True] * 3
            assert [lr(e - 1) for e in ends] == pytest.approx([3e-5] * 3)
            assert lr(ends[0]) == 0.0 and lr(ends[1]) == 0.0
            continue
        assert not any(st.reset_optimizer for st in cfg.stages)
        flat = 1.65e-4 if kind.startswith("infinite") else 3e-4  # the paper's constant phase (c)
        for step in (int(0.61 * chunk), chunk, int(1.5 * chunk), 2 * chunk, int(2.85 * chunk)):
            assert lr(step) == pytest.approx(flat, rel=1e-6), (kind, step)
        for c in (1, 2):  # a branch anneals from the constant phase at 90% of chunk c to min_lr
            branch = rs[f"chunks-{kind}-anneal{c}"].stages[0]
            assert branch.init_from == RunRef("405m", f"chunks-{kind}", f"chunk{c}")
            assert branch.tokens == 10e9 and not branch.reset_optimizer
            f = schedules.build(branch.schedule.to_spec(), branch.tokens // batch)
            assert f(0) == pytest.approx(flat) and f(branch.tokens // batch - 1) == pytest.approx(3e-5)


def test_smaller_variants_scale_the_tokens():
    for name, scale in (("405m-10x", 0.1), ("small", 0.01)):
        full = {r.name: r.tokens for r in recipes.recipes("405m")}
        assert {r.name: r.tokens for r in recipes.recipes(name)} == pytest.approx(
            {k: v * scale for k, v in full.items()})
    small = RunConfig.from_dict(recipes.recipes("small")[0].config)
    assert small.model.preset == "small" and small.train.seq_len == 1024


def test_time_estimates_come_from_flops_per_token():
    v = recipes.VARIANTS["405m"]
    d, L, V, T = 1024, 24, 50304, 2048  # 6 x (non-embedding + output projection) + attention
    n_matmul = L * (12 * d * d + 13 * d) + 2 * d + V * d
    assert recipes.flops_per_token(v) == 6 * n_matmul + 12 * L * d * T
    one = recipes.days(300_000_000_000, v, 1)
    assert one == pytest.approx(300e9 * recipes.flops_per_token(v) / (989e12 * 0.40) / 86400)
    assert recipes.days(300_000_000_000, v, 8) == pytest.approx(one / 8)
    table = recipes.estimate_table()
    assert "| 405m | pile-base | 300B | 23.9 d | 3.0 d |" in table
    assert table in (ROOT / "docs" / "gpus.md").read_text()  # docs/gpus.md, "How long"


def test_prepare_tokenises_a_configs_corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path / "cache"))
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"document {i} " + "words " * (i % 7 + 3)}) + "\n")
    (tmp_path / "run.yaml").write_text(
        "tokenizer: {kind: byte}\n"
        "train: {seq_len: 16, batch_size: 2}\n"
        "eval: {sets: [d], tokens: 16}\n"
        "corpora: {d: {path: d.jsonl, streaming: true, val_fraction: 0.2, max_tokens: 500}}\n"
        "stages: [{name: s, data: {d: 1.0}, tokens: 64}]\n")
    metas = recipes.prepare(tmp_path / "run.yaml")
    assert list(metas) == ["d"] and 500 <= metas["d"]["tokens"]["train"] < 600
    assert metas["d"]["tokens"]["val"] > 0
