"""The web-data path on local copies of hub datasets: the recipes' `hf:` corpora (FineWeb-2's German, the
Pile, SlimPajama) go through `datasets.load_dataset(<repo>, <config>, split=..., streaming=...)`, and so
do these tests, with a local folder laid out as the hub serves the repository in place of its id. Nothing
is faked: with a network, `hf: HuggingFaceFW/fineweb-2` runs exactly this code."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cptlab import data
from cptlab.config import RunConfig

WORDS = "der die das und Daten Netz Seite the of data web page text".split()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for i in range(n)]


@pytest.fixture(scope="module")
def fineweb_like(tmp_path_factory):
    """A FineWeb-2-like repository: README.md declares config deu_Latn over parquet shards."""
    import pandas as pd

    root = tmp_path_factory.mktemp("fineweb-2")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: deu_Latn\n  data_files:\n  - split: train\n"
        "    path: data/deu_Latn/train/*.parquet\n- config_name: fra_Latn\n  data_files:\n  - split: train\n"
        "    path: data/fra_Latn/train/*.parquet\n---\n# a local copy\n")
    docs = []
    for lang in ("deu_Latn", "fra_Latn"):
        shard_dir = root / "data" / lang / "train"
        shard_dir.mkdir(parents=True)
        for i in range(2):
            part = _docs(150, seed=i + (10 if lang == "fra_Latn" else 0))
            pd.DataFrame({"text": part, "id": [f"{lang}-{i}-{j}" for j in range(len(part))],
                          "language_score": [0.9] * len(part)}).to_parquet(shard_dir / f"00{i}_00000.parquet")
            docs += part if lang == "deu_Latn" else []
    return root, docs


@pytest.fixture(scope="module")
def slimpajama_like(tmp_path_factory):
    """A SlimPajama-like repository: JSON lines shards under train/chunkN/, records with text and meta."""
    root = tmp_path_factory.mktemp("slimpajama")
    docs = []
    for chunk in (1, 2):
        (root / "train" / f"chunk{chunk}").mkdir(parents=True)
        part = _docs(120, seed=100 + chunk)
        with open(root / "train" / f"chunk{chunk}" / f"example_train_{chunk}.jsonl", "w") as f:
            for text in part:
                f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaC4"}}) + "\n")
        docs += part
    return root, docs


def _expected_bytes(docs: list[str], is_val: list[bool], split: str) -> list[int]:
    out: list[int] = []
    for doc, val in zip(docs, is_val):
        if val == (split == "val"):
            out += [*doc.encode(), 256]
    return out


def test_hub_layout_with_a_config_loads_whole_and_streams(fineweb_like, tmp_path):
    root, docs = fineweb_like
    spec = {"hf": str(root), "config": "deu_Latn", "split": "train", "text_field": "text", "language": "de"}
    reg = data.Registry({"german": spec}, cache_dir=str(tmp_path / "a"))
    assert sorted(reg.documents("german")["text"]) == sorted(docs)  # the config's shards only
    byte = data.Tokenizer("byte")
    whole = data.shard_meta("german", byte, reg)
    assert sum(whole["documents"].values()) == len(docs)

    streamed = data.Registry({"german": dict(spec, streaming=True, val_fraction=0.1)},
                             cache_dir=str(tmp_path / "b"))
    train = data.token_shard("german", "train", byte, streamed)
    val = data.token_shard("german", "val", byte, streamed)
    keys = [data.corpus.doc_key(d) for d in docs]
    is_val = [data.corpus.stream_is_val(k, 0, 0.1) for k in keys]
    assert train.tolist() == _expected_bytes(docs, is_val, "train")  # shards in order, split by hash
    assert val.tolist() == _expected_bytes(docs, is_val, "val") and len(val) > 0


def test_hub_layout_of_jsonl_shards_streams_with_a_budget(slimpajama_like, tmp_path):
    root, docs = slimpajama_like
    reg = data.Registry({"slimpajama": {"hf": str(root), "split": "train", "streaming": True,
                                        "max_tokens": 5000}}, cache_dir=str(tmp_path))
    meta = data.shard_meta("slimpajama", data.Tokenizer("byte"), reg)
    assert meta["streamed"]["budget_reached"] and 5000 <= meta["tokens"]["train"] < 5000 + 600
    train = data.token_shard("slimpajama", "train", data.Tokenizer("byte"), reg)
    assert np.asarray(train[:len(docs[0]) + 1]).tolist() == [*docs[0].encode(), 256]


def test_local_parquet_and_jsonl_shards_as_path_corpora(fineweb_like, slimpajama_like, tmp_path):
    (fw, fw_docs), (sp, sp_docs) = fineweb_like, slimpajama_like
    reg = data.Registry({"de": {"path": str(fw / "data/deu_Latn/train/*.parquet")},
                         "en": {"path": str(sp / "train/**/*.jsonl"), "streaming": True}},
                        cache_dir=str(tmp_path))
    assert reg.documents("de")["text"] == fw_docs
    meta = data.shard_meta("en", data.Tokenizer("byte"), reg)
    assert sum(meta["documents"].values()) == len(sp_docs)


def test_the_web_data_config_of_the_corpora_guide_validates():
    cfg = RunConfig.from_dict({
        "corpora": {"web": {"hf": "HuggingFaceFW/fineweb-2", "config": "deu_Latn", "streaming": True,
                            "max_tokens": 1e9}},
        "stages": [{"name": "web", "data": {"web": 1.0}, "tokens": 1_000_000}]})
    cfg.validate(data.Registry(cfg.corpora).names())
