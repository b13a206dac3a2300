"""The data layer: registry and user corpora, train/validation split, tokenizers, tokenised shards."""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import time
import warnings

import numpy as np
import pytest

from cptlab import data
from cptlab.config import TokenizerConfig
from cptlab.data import corpus
from cptlab.data.corpus import CORPORA_DIR, SEPARATOR, SHIPPED

EN = ("the a manual page describes command option file name user system prints reads writes shows "
      "lists returns value error default section see also example synopsis description").split()
DE = ("der die das Handbuchseite beschreibt Befehl Option Datei Name Benutzer System gibt liest "
      "schreibt zeigt Fehler Vorgabe Abschnitt siehe auch Beispiel Übersicht Beschreibung").split()
SHIPPED_PRESENT = all((CORPORA_DIR / f"{n}.txt.xz").exists() for n in SHIPPED)


def make_docs(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def corpora_dir(tmp_path_factory):
    """Tiny user corpora: English .txt files (several documents per file), German .jsonl, .parquet."""
    import pandas as pd

    root = tmp_path_factory.mktemp("corpora")
    en = make_docs(EN, 120, 0)
    (root / "en").mkdir()
    for i in range(4):
        (root / "en" / f"part{i}.txt").write_text(SEPARATOR.join(en[i::4]), encoding="utf-8")
    de = make_docs(DE, 120, 1)
    with open(root / "de.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(de):
            f.write(json.dumps({"id": i, "body": doc}, ensure_ascii=False) + "\n")
    pd.DataFrame({"text": make_docs(EN + DE, 60, 2)}).to_parquet(root / "mix.parquet")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def registry(corpora_dir, cache_dir):
    return data.Registry({"en": {"path": str(corpora_dir / "en" / "*.txt"), "language": "en"},
                          "de": {"path": str(corpora_dir / "de.jsonl"), "text_field": "body"},
                          "mix": {"path": str(corpora_dir / "mix.parquet")}}, cache_dir=str(cache_dir))


@pytest.fixture(scope="session")
def bpe(registry, cache_dir):
    """A small BPE trained on the tiny corpora (trained once per session)."""
    return data.train_bpe(registry, ["en", "de"], vocab_size=320, cache_dir=cache_dir)


# -- registry and user corpora --------------------------------------------------------------------

def test_registry_lists_shipped_and_user_corpora(registry):
    assert registry.names()[:3] == ["en-man", "en-pydoc", "de-man"]
    assert {"en", "de", "mix"} <= set(registry.names())
    assert registry.info("de-man")["language"] == "de"
    assert registry.info("en-pydoc")["domain"] == "Python documentation"
    assert registry.info("en")["language"] == "en" and registry.info("de")["domain"] == "user"


def test_user_corpora_load_txt_glob_jsonl_and_parquet(registry, corpora_dir):
    en = registry.documents("en")
    assert en.column_names == ["text"] and len(en) == 120  # 4 files, split at the separator lines
    assert set(en["text"]) == set(make_docs(EN, 120, 0))
    de = registry.documents("de")
    assert de.column_names == ["text"] and de[0]["text"] == make_docs(DE, 120, 1)[0]
    assert len(registry.documents("mix")) == 60


def test_hub_corpus_goes_through_load_dataset(monkeypatch, cache_dir):
    from datasets import Dataset

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs["split"]))
        return Dataset.from_dict({"content": ["hub document one", "", "hub document two"], "n": [1, 2, 3]})

    monkeypatch.setattr(corpus, "_load_dataset", fake_load_dataset)
    reg = data.Registry({"web": {"hf": "org/web", "config": "en", "split": "train", "text_field": "content"}},
                        cache_dir=str(cache_dir))
    docs = reg.documents("web")
    assert calls == [("org/web", "en", "train")]
    assert docs["text"][:] == ["hub document one", "hub document two"]  # the empty one dropped
    reg = data.Registry({"web": {"hf": "org/web", "text_field": "body"}}, cache_dir=str(cache_dir))
    with pytest.raises(data.DataError, match=r"corpora\.web\.text_field: org/web has no field 'body'; "
                                             r"its fields: content, n"):
        reg.documents("web")


def test_unknown_corpus_lists_the_known_ones(registry, bpe):
    with pytest.raises(data.DataError, match=r"unknown corpus 'nope'; known corpora: en-man, en-pydoc, "
                                             r"de-man, en-docs, en, de, mix"):
        registry.info("nope")
    with pytest.raises(data.DataError, match=r"unknown corpus 'nope'; known corpora: en-man, "):
        data.token_shard("nope", "train", bpe, registry)


def test_txt_sample_by_paragraph(tmp_path, cache_dir):
    (tmp_path / "p.txt").write_text("first paragraph\nstill first\n\nsecond\n\n\nthird\n")
    reg = data.Registry({"p": {"path": str(tmp_path / "p.txt"), "sample_by": "paragraph"}},
                        cache_dir=str(cache_dir))
    assert len(reg.documents("p")) == 3


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(data.DataError, match=r"corpora\.books\.path: '.*missing\.txt' does not exist"):
        data.Registry({"books": {"path": str(tmp_path / "missing.txt")}})
    with pytest.raises(data.DataError, match=r"corpora\.books\.path: '.*\*\.txt' matches no files"):
        data.Registry({"books": {"path": str(tmp_path / "*.txt")}})


def test_empty_file(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(data.DataError, match=r"corpora\.books\.path: file .*b\.txt is empty"):
        data.Registry({"books": {"path": str(tmp_path / "*.txt")}})


def test_corpus_of_blank_documents_has_no_text(tmp_path, cache_dir):
    (tmp_path / "a.txt").write_text("  \n\n ")
    reg = data.Registry({"blank": {"path": str(tmp_path / "a.txt")}}, cache_dir=str(cache_dir))
    with pytest.raises(data.DataError, match=r"corpora\.blank: corpus 'blank' holds no text"):
        reg.documents("blank")


def test_jsonl_without_the_text_field(corpora_dir, cache_dir):
    reg = data.Registry({"notes": {"path": str(corpora_dir / "de.jsonl")}}, cache_dir=str(cache_dir))
    with pytest.raises(data.DataError, match=r"corpora\.notes\.text_field: .*de\.jsonl has no field 'text'; "
                                             r"its fields: id, body"):
        reg.documents("notes")


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, cache_dir):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe and more \xc3 end")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "json \xff text"}\n{"text": "clean"}\n')
    reg = data.Registry({"bad": {"path": str(tmp_path / "bad.txt")},
                         "badj": {"path": str(tmp_path / "bad.jsonl")}}, cache_dir=str(cache_dir))
    with pytest.warns(UserWarning, match=r"corpora\.bad: .*bad\.txt holds 3 invalid UTF-8 sequence\(s\); "
                                         r"each was replaced with U\+FFFD"):
        docs = reg.documents("bad")
    assert docs[0]["text"] == "good text \ufffd\ufffd and more \ufffd end"
    assert reg.invalid_utf8["bad"] == 3
    with pytest.warns(UserWarning, match="holds 1 invalid UTF-8"):
        assert reg.documents("badj")["text"][:] == ["json \ufffd text", "clean"]


def test_bad_user_specs():
    with pytest.raises(data.DataError, match=r"corpora\.en-man: 'en-man' is a shipped corpus"):
        data.Registry({"en-man": {"path": "x.txt"}})
    with pytest.raises(data.DataError, match=r"corpora\.x\.paht: unknown key; allowed: path, text_field"):
        data.Registry({"x": {"paht": "x.txt"}})
    with pytest.raises(data.DataError, match=r"corpora\.x: give exactly one of 'path' .* or 'hf'"):
        data.Registry({"x": {}})
    with pytest.raises(data.DataError, match=r"corpora\.x\.sample_by: 'page' not allowed; allowed: document"):
        data.Registry({"x": {"hf": "a/b", "sample_by": "page"}})


def test_cache_root_argument_env_and_default(monkeypatch, tmp_path):
    monkeypatch.delenv("CPTLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root() == tmp_path / "xdg" / "cptlab"
    monkeypatch.setenv("CPTLAB_CACHE", str(tmp_path / "env"))
    assert data.cache_root() == tmp_path / "env"
    assert data.cache_root(tmp_path / "arg") == tmp_path / "arg"


# -- train/validation split -----------------------------------------------------------------------

def test_split_is_deterministic_by_document_and_sized():
    docs = make_docs(EN, 2000, 3)
    keys, chars = [corpus.doc_key(d) for d in docs], [len(d) for d in docs]
    mask = data.split_mask(keys, chars)
    assert 0.05 * len(docs) <= mask.sum() <= 0.11 * len(docs)  # 5% of documents, at most ~10% of text
    assert np.array_equal(mask, data.split_mask(keys, chars))
    # by document text, not position: shuffling the corpus keeps every document on its side
    order = np.random.default_rng(0).permutation(len(docs))
    shuffled = data.split_mask([keys[i] for i in order], [chars[i] for i in order])
    assert np.array_equal(shuffled, mask[order])
    assert corpus.doc_key("same text") == 3720582458323139148  # no salted hash(): equal on every machine


@pytest.mark.skipif(not SHIPPED_PRESENT, reason="shipped corpora not built yet")
def test_shipped_corpora_split_sizes():
    reg = data.Registry()
    for name in SHIPPED:
        docs = reg.documents(name)["text"][:]
        mask = data.split_mask([corpus.doc_key(d) for d in docs], [len(d) for d in docs])
        val_chars = sum(len(d) for d, m in zip(docs, mask) if m)
        assert mask.sum() >= 0.05 * len(docs) and val_chars >= corpus.VAL_MIN_CHARS, name


def test_split_tops_up_towards_100k_tokens():
    big = [d * 40 for d in make_docs(EN, 400, 4)]  # ~10 MB of text, 5% of documents is < 400k chars
    mask = data.split_mask([corpus.doc_key(d) for d in big], [len(d) for d in big])
    val_chars = sum(len(d) for d, m in zip(big, mask) if m)
    assert val_chars >= corpus.VAL_MIN_CHARS and mask.sum() >= 20
    assert not data.split_mask([1], [100]).any()  # a single document stays in training


# -- tokenizers -----------------------------------------------------------------------------------

def test_byte_tokenizer():
    tok = data.load_tokenizer(TokenizerConfig(kind="byte"))
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    ids = tok.encode("Grüße <|endoftext|>")
    assert max(ids) < 256 and tok.decode(ids + [tok.eot_id]) == "Grüße <|endoftext|>"
    assert tok.encode_batch(["ab", "c"]) == [[97, 98], [99]]


def test_bpe_round_trip_eot_and_cache(bpe, registry, cache_dir):
    assert bpe.vocab_size == 320 and bpe.decode([bpe.eot_id]) == ""
    text = "der Benutzer liest die manual page. <|endoftext|> ok"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and bpe.eot_id not in ids  # literal EOT text is text
    assert bpe.encode_batch([text, "x"]) == [ids, bpe.encode("x")]
    assert len(ids) < len(text.encode()) * 0.8  # it did learn merges
    start = time.perf_counter()
    again = data.train_bpe(registry, ["en", "de"], vocab_size=320, cache_dir=cache_dir)
    assert time.perf_counter() - start < 1.0 and again.fingerprint == bpe.fingerprint


def test_bpe_training_is_deterministic(registry, bpe, tmp_path):
    retrained = data.train_bpe(registry, ["en", "de"], vocab_size=320, cache_dir=tmp_path)
    assert retrained.fingerprint == bpe.fingerprint


def test_bpe_sample_is_balanced(registry):
    from cptlab.data.tokenizer import balanced_sample

    sample = balanced_sample(registry, ["en", "de", "mix"], sample_chars=5000)
    ends = np.cumsum([len(t) for t in sample])
    assert 5000 in ends and 10000 in ends and ends[-1] == 15000  # 5000 characters from each corpus
    assert all(set(t.replace(".", " ").split()) <= set(EN) for t in sample[:list(ends).index(5000)])


def test_tokenizer_file_kind(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(path)
    tok = data.load_tokenizer(TokenizerConfig(kind="file", path=str(path)))
    assert tok.fingerprint == bpe.fingerprint and tok.encode("die Datei") == bpe.encode("die Datei")
    with pytest.raises(data.DataError, match=r"tokenizer\.path: .*nothere\.json does not exist"):
        data.load_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "nothere.json")))
    with pytest.raises(data.DataError, match=r"tokenizer\.kind: 'words' not allowed; allowed: bpe, byte"):
        data.load_tokenizer(TokenizerConfig(kind="words"))


@pytest.mark.skipif(not SHIPPED_PRESENT, reason="shipped corpora not built yet")
def test_bpe_on_shipped_corpora(tmp_path):
    tok = data.load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=512), cache_dir=tmp_path)
    assert tok.vocab_size == 512
    for text in ("Die Option zeigt die Hilfe an.", "The option shows the help.", "def f(x): return x"):
        assert tok.decode(tok.encode(text)) == text


# -- tokenised shards -----------------------------------------------------------------------------

def test_shards_hold_every_document_once_with_eot(bpe, registry, cache_dir):
    train = data.token_shard("en", "train", bpe, registry, cache_dir)
    val = data.token_shard("en", "val", bpe, registry, cache_dir)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    docs = registry.documents("en")["text"][:]
    mask = data.split_mask([corpus.doc_key(d) for d in docs], [len(d) for d in docs])
    expected = {s: [t for d, m in zip(docs, mask) if m == (s == "val") for t in bpe.encode(d) + [bpe.eot_id]]
                for s in ("train", "val")}
    assert train.tolist() == expected["train"] and val.tolist() == expected["val"]
    meta = data.shard_meta("en", bpe, registry, cache_dir)
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["documents"] == {"train": 120 - int(mask.sum()), "val": int(mask.sum())}
    assert meta["tokenizer"] == bpe.fingerprint and meta["dtype"] == "uint16"


def test_shard_cache_hit_is_fast(bpe, registry, cache_dir, corpora_dir):
    data.token_shard("de", "train", bpe, registry, cache_dir)
    start = time.perf_counter()
    fresh = data.Registry({"de": {"path": str(corpora_dir / "de.jsonl"), "text_field": "body"}})
    shard = data.token_shard("de", "train", bpe, fresh, cache_dir)
    assert time.perf_counter() - start < 1.0 and len(shard) > 1000


def test_shard_rebuilds_when_the_source_changes(tmp_path, bpe, cache_dir):
    path = tmp_path / "a.txt"
    path.write_text(SEPARATOR.join(make_docs(EN, 30, 5)))
    reg = data.Registry({"a": {"path": str(path)}}, cache_dir=str(cache_dir))
    before = len(data.token_shard("a", "train", bpe, reg))
    path.write_text(SEPARATOR.join(make_docs(EN, 60, 5)))
    assert len(data.token_shard("a", "train", bpe, reg)) > before


def _build_in_process(args):
    path, cache = args
    reg = data.Registry({"c": {"path": path}}, cache_dir=cache)
    return data.token_shard("c", "train", data.load_tokenizer(TokenizerConfig(kind="byte")), reg).sum()


def test_concurrent_builders_agree(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(SEPARATOR.join(make_docs(EN, 50, 6)))
    args = (str(path), str(tmp_path / "cache"))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(2) as pool:
        sums = pool.map(_build_in_process, [args, args])
    assert sums[0] == sums[1] == _build_in_process(args)
    folder = next((tmp_path / "cache" / "shards" / "c").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "meta.json", "train.bin", "val.bin"]


def test_large_vocabulary_uses_uint32(registry, cache_dir):
    class Wide(data.Tokenizer):
        def __init__(self):
            super().__init__("byte")
            self.vocab_size, self.eot_id, self.fingerprint = 70000, 69999, "wide-test"

    shard = data.token_shard("mix", "train", Wide(), registry, cache_dir)
    assert shard.dtype == np.uint32 and 69999 in shard[:500]


def test_val_tokens_is_a_fixed_slice(bpe, registry, cache_dir):
    first = data.val_tokens("de", bpe, registry, 300, cache_dir)
    assert len(first) == 300 and np.array_equal(first, data.val_tokens("de", bpe, registry, 300, cache_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = data.val_tokens("de", bpe, registry, 10**9, cache_dir)
    assert "fewer than the 1000000000 asked for" in str(caught[0].message)
    assert np.array_equal(everything[:300], first)


def test_single_document_corpus_has_no_validation_split(tmp_path, bpe, cache_dir):
    (tmp_path / "one.txt").write_text("one line\nper document?\nno: one document per file\n")
    reg = data.Registry({"one": {"path": str(tmp_path / "one.txt")}}, cache_dir=str(cache_dir))
    assert len(data.token_shard("one", "train", bpe, reg)) > 10
    with pytest.raises(data.DataError, match=r"corpus 'one' is a single document, so it has no validation "
                                             r"split; .* set corpora\.one\.sample_by to paragraph or line"):
        data.val_tokens("one", bpe, reg, 100)


def test_corpora_table(bpe, cache_dir, corpora_dir):
    reg = data.Registry({"en": {"path": str(corpora_dir / "en")}}, cache_dir=str(cache_dir),
                        include_shipped=False)  # a folder this time; the shipped ones are not needed here
    rows = data.corpora_table(reg, bpe, cache_dir)
    assert list(rows[0]) == ["name", "language", "domain", "documents", "characters", "train_tokens",
                             "val_tokens"]
    assert rows[0]["documents"] == 120 and rows[0]["train_tokens"] > 5 * rows[0]["val_tokens"] > 0
    out = io.StringIO()
    data.print_corpora_table(reg, bpe, cache_dir, file=out)
    header, line = out.getvalue().splitlines()
    assert header.split() == ["name", "language", "domain", "documents", "characters", "train_tokens",
                              "val_tokens"]
    assert line.split()[0] == "en" and f"{rows[0]['train_tokens']:,}" in line
