"""Run config: parsing, defaults, overrides, and clear errors naming the key."""

import json

import pytest

from cptlab.config import ConfigError, RunConfig, apply_overrides, diff

EXAMPLE = """
model: {preset: smoke}
tokenizer: {kind: bpe, vocab_size: 8192}
train: {seq_len: 64, batch_size: 8, seed: 0, device: auto, precision: auto}
eval: {sets: [en-man, de-man], every_tokens: 8192, tokens: 4096}
stages:
  - name: pretrain
    data: {en-man: 1.0}
    tokens: 65536
    schedule: {kind: cosine, max_lr: 3.0e-3, min_lr: 3.0e-4, warmup: 0.01}
  - name: continue
    data: {de-man: 1.0}
    replay: {source: en-man, fraction: 0.25}
    tokens: 32768
    schedule: {kind: cosine, max_lr: 3.0e-3, min_lr: 3.0e-4, warmup: 0.01}
    reset_optimizer: true
"""
KNOWN = ["en-man", "en-pydoc", "de-man", "en-docs"]


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(EXAMPLE)
    return path


def test_example_loads_resolves_and_validates(example):
    cfg = RunConfig.load(example)
    cfg.validate(KNOWN)
    res = cfg.resolve(vocab_size=8192)
    assert (res.model.n_layer, res.model.vocab_size) == (2, 8192)
    assert res.stages[1].replay.fraction == 0.25 and res.stages[1].reset_optimizer
    assert res.stages[0].replay is None and res.train.grad_clip == 1.0


def test_round_trip_through_yaml_and_json(example, tmp_path):
    cfg = RunConfig.load(example)
    cfg.save(tmp_path / "a.yaml")
    cfg.save(tmp_path / "a.json")
    assert RunConfig.load(tmp_path / "a.yaml") == cfg
    assert RunConfig.from_dict(json.loads((tmp_path / "a.json").read_text())) == cfg


def test_hash_changes_with_any_setting(example):
    a = RunConfig.load(example)
    b = RunConfig.load(example, ["stages.1.replay.fraction=0.05"])
    assert a.hash() == RunConfig.load(example).hash() != b.hash()
    assert diff(a.to_dict(), b.to_dict()) == ["stages[1].replay.fraction: 0.25 -> 0.05"]


def test_overrides_parse_values_as_yaml(example):
    cfg = RunConfig.load(example, ["train.batch_size=16", "model.preset=tiny", "eval.sets=[en-man]"])
    assert cfg.train.batch_size == 16 and cfg.model.preset == "tiny" and cfg.eval.sets == ["en-man"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["train.batch_size"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"stages": []}, ["stages.3.tokens=1"])


def test_relative_corpus_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("corpora: {mine: {path: 'data/*.txt'}}\nstages: []\n")
    assert RunConfig.load(path).corpora["mine"]["path"] == str(tmp_path / "sub" / "data/*.txt")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", r"train.bogus: unknown key"),
        ("train.batch_size=big", r"train.batch_size: expected an integer"),
        ("model.preset=huge", r"model.preset: unknown preset 'huge'"),
        ("stages.0.tokens=-5", r"stages\[0\] \(pretrain\).tokens: -5 is smaller than one batch"),
        ("stages.0.tokens=100", r"smaller than one batch"),
        ("eval.sets=[en-man, klingon]", r"eval.sets\[1\]: unknown corpus 'klingon'; known corpora: de-man"),
        ("stages.1.replay.fraction=1.0", r"stages\[1\] \(continue\).replay.fraction: must be in \[0, 1\)"),
        ("stages.1.replay.source=de-man", r"replay.source: 'de-man' is also the only new corpus"),
        ("stages.0.data={en-man: 0}", r"stages\[0\] \(pretrain\).data.en-man: weight must be > 0"),
        ("stages.0.schedule.kind=exponential", r"stages\[0\] \(pretrain\).schedule.kind"),
        ("train.precision=fp8", r"train.precision: 'fp8' not allowed; allowed: auto, fp32, bf16"),
        ("train.device=cuda:N", r"train.device: 'cuda:N' not allowed; allowed: auto, cpu, cuda, mps, cuda:N"),
        ("train.seq_len=4096", r"train.seq_len \(4096\) exceeds model.n_ctx"),
        ("stages.1.init_from=somewhere", r"init_from: 'somewhere' not allowed"),
        ("tokenizer.kind=file", r"tokenizer.path: required"),
    ],
)
def test_bad_values_fail_naming_the_key(example, override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(example, [override]).validate(KNOWN)


def test_user_corpora_are_known(example):
    cfg = RunConfig.load(example, ["corpora={mine: {path: x.txt}}", "eval.sets=[mine]"])
    cfg.validate(KNOWN)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.load(tmp_path / "bad.yaml")


def test_a_field_at_its_default_does_not_enter_the_hash(example):
    cfg = RunConfig.load(example)
    same = RunConfig.load(example, ["train.activation_checkpointing=false", "model.dropout=0.0"])
    other = RunConfig.load(example, ["train.activation_checkpointing=true"])
    assert cfg.hash() == same.hash() != other.hash()


def test_a_run_dir_written_before_a_field_existed_is_still_the_same_run(example, tmp_path):
    from cptlab.training.rundir import RunDir

    cfg = RunConfig.load(example).resolve(vocab_size=8192)
    run = RunDir(tmp_path)
    run.claim(cfg)
    old = json.loads(run.config_path.read_text())
    del old["train"]["activation_checkpointing"]  # as written by an older cptlab
    run.config_path.write_text(json.dumps(old))
    run.claim(cfg)  # no refusal
