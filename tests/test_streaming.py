"""Streamed corpora: incremental, resumable tokenisation up to a token budget, offline on local files
streamed exactly as a hub dataset is (``datasets.load_dataset(..., streaming=True)``)."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from cptlab import data
from cptlab.data import corpus, shards
from cptlab.data.corpus import STREAM_VAL_MAX_TOKENS, doc_key

WORDS = "the quick brown fox jumps over a lazy dog while the manual page explains every option".split()
N_DOCS = 240


def make_docs(n: int = N_DOCS, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    docs[7] = "   "  # blank: dropped
    return docs


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "web.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(make_docs()):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    return path


def spec(jsonl: Path, **extra) -> dict:
    return {"path": str(jsonl), "text_field": "body", "streaming": True, "val_fraction": 0.1, **extra}


def expected(docs: list[str], val_fraction: float = 0.1,
             max_tokens: int | None = None) -> dict[str, list[int]]:
    """The shard contents the rule promises: documents in stream order, bytes + end-of-text (256), a
    document in validation when its key is in the lowest val_fraction and validation is not full."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    for doc in docs:
        if not doc.strip():
            continue
        val = len(out["val"]) < STREAM_VAL_MAX_TOKENS and doc_key(doc) < val_fraction * 2**63
        out["val" if val else "train"] += list(doc.encode()) + [256]
        if max_tokens is not None and len(out["train"]) >= max_tokens:
            break
    return out


class CountingTokenizer(data.Tokenizer):
    """The byte tokenizer (same fingerprint, so the same shard folder), counting the documents it
    encodes; raises after ``fail_after`` batches when that is set (an interrupted build)."""

    def __init__(self, fail_after: int | None = None):
        super().__init__("byte")
        self.fail_after, self.batches, self.documents = fail_after, 0, 0

    def encode_arrays(self, texts):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("simulated interruption")
        self.batches += 1
        self.documents += len(texts)
        return super().encode_arrays(texts)


def shard_files(cache: Path, name: str = "web") -> Path:
    (folder,) = (cache / "shards" / name).iterdir()
    return folder


def test_streamed_shard_holds_the_stream_in_order_split_by_hash(jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "STREAM_BATCH_DOCS", 16)
    monkeypatch.setattr(shards, "STREAM_FLUSH_TOKENS", 2000)
    reg = data.Registry({"web": spec(jsonl)}, cache_dir=str(tmp_path))
    tok = data.Tokenizer("byte")
    want = expected(make_docs())
    train, val = (data.token_shard("web", s, tok, reg) for s in ("train", "val"))
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert train.tolist() == want["train"] and val.tolist() == want["val"]
    assert 0 < len(val) < len(train)
    meta = data.shard_meta("web", tok, reg)
    assert meta["documents"]["train"] + meta["documents"]["val"] == N_DOCS - 1
    assert meta["streamed"] == {"max_tokens": None, "val_fraction": 0.1, "budget_reached": False}
    assert sorted(p.name for p in shard_files(tmp_path).iterdir()) == [".lock", "meta.json", "train.bin",
                                                                      "val.bin"]
    with pytest.raises(data.DataError, match=r"corpora\.web: a streamed corpus is never loaded whole"):
        reg.documents("web")


def test_interrupted_build_resumes_byte_identical(jsonl, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    reg = data.Registry({"web": spec(jsonl)}, cache_dir=str(reference))
    data.token_shard("web", "train", data.Tokenizer("byte"), reg)  # default batch and flush sizes

    monkeypatch.setattr(shards, "STREAM_BATCH_DOCS", 16)
    monkeypatch.setattr(shards, "STREAM_FLUSH_TOKENS", 1500)
    cache = tmp_path / "interrupted"
    reg = data.Registry({"web": spec(jsonl)}, cache_dir=str(cache))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        data.token_shard("web", "train", CountingTokenizer(fail_after=6), reg)
    folder = shard_files(cache)
    progress = json.loads((folder / ".stream" / "progress.json").read_text())
    assert not (folder / "meta.json").exists()
    assert progress["tokens"]["train"] > 0 and progress["stream_state"] is not None
    with open(folder / ".stream" / "train.bin", "ab") as f:  # written after the last record: discarded
        f.write(b"\x01\x02" * 100)

    resumed = CountingTokenizer()
    data.token_shard("web", "train", resumed, reg)
    assert 0 < resumed.documents < N_DOCS - 16  # continued from the record, not from the start
    ref_folder = shard_files(reference)
    for split in ("train", "val"):
        assert (folder / f"{split}.bin").read_bytes() == (ref_folder / f"{split}.bin").read_bytes()
    strip = lambda meta: {k: v for k, v in meta.items() if k != "build_seconds"}  # noqa: E731
    assert strip(json.loads((folder / "meta.json").read_text())) == strip(
        json.loads((ref_folder / "meta.json").read_text()))
    assert not (folder / ".stream").exists()


def test_token_budget_stops_at_the_document_that_reaches_it(jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "STREAM_BATCH_DOCS", 8)
    reg = data.Registry({"web": spec(jsonl, max_tokens="3.0e3")}, cache_dir=str(tmp_path))  # YAML's 3.0e3
    assert reg.stream_limits("web") == (3000, 0.1)
    tok = CountingTokenizer()
    train = data.token_shard("web", "train", tok, reg)
    val = data.token_shard("web", "val", tok, reg)
    want = expected(make_docs(), max_tokens=3000)
    assert train.tolist() == want["train"] and val.tolist() == want["val"]
    full = expected(make_docs())
    assert 3000 <= len(train) < 3000 + 62 and full["train"][:len(train)] == train.tolist()  # a prefix
    assert tok.documents < N_DOCS / 2  # the rest of the stream was never read
    meta = data.shard_meta("web", tok, reg)
    assert meta["streamed"]["budget_reached"] and meta["streamed"]["max_tokens"] == 3000


def test_stream_shorter_than_its_budget_warns(jsonl, tmp_path):
    reg = data.Registry({"web": spec(jsonl, max_tokens=10**9)}, cache_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = data.token_shard("web", "train", data.Tokenizer("byte"), reg)
    assert train.tolist() == expected(make_docs())["train"]
    assert any("short of its max_tokens (1,000,000,000)" in str(w.message) for w in caught)


def test_hub_corpus_streams_through_load_dataset(jsonl, tmp_path, monkeypatch):
    from datasets import load_dataset

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return load_dataset("json", data_files=str(jsonl), split="train", streaming=True)

    monkeypatch.setattr(corpus, "_load_dataset", fake_load_dataset)
    reg = data.Registry({"web": {"hf": "org/web", "config": "de", "text_field": "body", "streaming": True,
                                 "val_fraction": 0.1}}, cache_dir=str(tmp_path))
    train = data.token_shard("web", "train", data.Tokenizer("byte"), reg)
    assert calls == [("org/web", "de", {"split": "train", "revision": None, "streaming": True})]
    assert train.tolist() == expected(make_docs())["train"]

    reg = data.Registry({"web": {"hf": "org/web", "streaming": True}}, cache_dir=str(tmp_path / "b"))
    with pytest.raises(data.DataError, match=r"corpora\.web\.text_field: org/web has no field 'text'; "
                                             r"its fields: id, body"):
        data.token_shard("web", "train", data.Tokenizer("byte"), reg)


def test_stream_specs_are_checked():
    with pytest.raises(data.DataError, match=r"corpora\.w\.max_tokens: only applies to a streamed corpus"):
        data.Registry({"w": {"hf": "a/b", "max_tokens": 100}})
    with pytest.raises(data.DataError, match=r"corpora\.w\.max_tokens: expected a number of tokens >= 1"):
        data.Registry({"w": {"hf": "a/b", "streaming": True, "max_tokens": "lots"}})
    with pytest.raises(data.DataError, match=r"corpora\.w\.val_fraction: expected a number in \(0, 0\.5\]"):
        data.Registry({"w": {"hf": "a/b", "streaming": True, "val_fraction": 0.9}})
    with pytest.raises(data.DataError, match=r"corpora\.w\.streaming: expected true or false"):
        data.Registry({"w": {"hf": "a/b", "streaming": "yes"}})
    reg = data.Registry({"w": {"hf": "a/b", "streaming": True, "max_tokens": 3.0e11}})
    assert reg.is_streamed("w") and reg.stream_limits("w") == (300_000_000_000, corpus.STREAM_VAL_FRACTION)
    assert not reg.is_streamed("en-man")
