"""Tokenizers: byte-level BPE trained offline on the shipped corpora, plain bytes, or a saved file.

Every kind has an end-of-text token (``eot_id``) that separates documents in the token shards, and a
``fingerprint`` (a hash of the exact vocabulary and merges) that keys every cache built with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cptlab.config import TokenizerConfig
from cptlab.data.checks import DataError
from cptlab.data.corpus import SHIPPED, Registry, cache_root, doc_key, split_mask
from cptlab.files import atomic_write_text

EOT = "<|endoftext|>"
# End-of-text tokens recognised in a user's tokenizer file, in order of preference.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>")
BPE_VERSION = 1
BPE_SAMPLE_CHARS = 1_000_000  # characters per corpus in the BPE training sample


class Tokenizer:
    """Text <-> token ids. ``kind`` is ``byte`` (``hf`` None) or a wrapped ``tokenizers.Tokenizer``."""

    def __init__(self, kind: str, hf=None):
        self.kind = kind
        self._hf = hf
        if hf is None:
            self.vocab_size = 257  # 256 bytes + end-of-text
            self.eot_id = 256
            self.fingerprint = hashlib.sha256(b"cptlab byte tokenizer v1").hexdigest()[:16]
            return
        # Literal "<|endoftext|>" inside a document is text, never the separator.
        hf.encode_special_tokens = True
        eot = next((t for t in EOT_NAMES if hf.token_to_id(t) is not None), None)
        if eot is None:
            hf.add_special_tokens([EOT])
            eot = EOT
        self.eot_id = hf.token_to_id(eot)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        if self._hf is None:
            return list(text.encode("utf-8", "replace"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._hf is None:
            return [list(t.encode("utf-8", "replace")) for t in texts]
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_batch`` as uint32 arrays (what the shard builder stores; much faster for bytes)."""
        if self._hf is None:
            return [np.frombuffer(t.encode("utf-8", "replace"), np.uint8).astype(np.uint32) for t in texts]
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; end-of-text tokens are dropped."""
        ids = [int(i) for i in ids]
        if self._hf is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", "replace")
        return self._hf.decode(ids, skip_special_tokens=True)

    def to_tokenizers(self):
        """This tokenizer as a Hugging Face ``tokenizers.Tokenizer`` that gives the same ids (for export).
        The byte tokenizer becomes a byte-level BPE without merges: byte b is id b, end-of-text 256."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        if self._hf is not None:
            return HFTokenizer.from_str(self._hf.to_str())
        vocab = {char: byte for byte, char in _byte_chars().items()}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])
        return hf

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``tokenizers`` JSON file (``kind: file`` loads it back)."""
        if self._hf is None:
            raise DataError("tokenizer.kind: the byte tokenizer has no file to save")
        atomic_write_text(Path(path), self._hf.to_str())

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint!r})")


def _byte_chars() -> dict[int, str]:
    """The printable character byte-level BPE stands each byte for (GPT-2's table: printable Latin-1 bytes
    stand for themselves, the others for the code points from 256 on, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def load_tokenizer(cfg: TokenizerConfig, registry: Registry | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer a run config asks for; a BPE is trained on first use and cached."""
    if cfg.kind == "byte":
        return Tokenizer("byte")
    if cfg.kind == "file":
        return tokenizer_from_file(cfg.path)
    if cfg.kind == "bpe":
        return train_bpe(registry or Registry(), list(SHIPPED), cfg.vocab_size, cache_dir)
    raise DataError(f"tokenizer.kind: {cfg.kind!r} not allowed; allowed: bpe, byte, file")


def tokenizer_from_file(path: str | os.PathLike | None) -> Tokenizer:
    """A saved Hugging Face ``tokenizers`` JSON file; ``<|endoftext|>`` is added if it has no EOT."""
    from tokenizers import Tokenizer as HFTokenizer

    if not path:
        raise DataError("tokenizer.path: required when tokenizer.kind is 'file'")
    if not Path(path).is_file():
        raise DataError(f"tokenizer.path: {path} does not exist")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"tokenizer.path: {path} is not a tokenizers JSON file ({exc})") from None
    return Tokenizer("file", hf)


def train_bpe(registry: Registry, names: Sequence[str], vocab_size: int = 8192,
              cache_dir: str | os.PathLike | None = None, sample_chars: int = BPE_SAMPLE_CHARS) -> Tokenizer:
    """Byte-level BPE trained on an equal number of characters from the training split of each
    corpus in ``names``; cached under a hash of the corpora, the vocabulary size and the sample size."""
    from filelock import FileLock
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257:
        raise DataError(f"tokenizer.vocab_size: must be >= 257 (256 bytes + end-of-text), got {vocab_size}")
    for name in names:
        registry.check(name)
    inputs = [BPE_VERSION, vocab_size, sample_chars, sorted((n, registry.source_hash(n)) for n in names)]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    path = cache_root(cache_dir or registry.cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                hf = _train(balanced_sample(registry, names, sample_chars), vocab_size)
                atomic_write_text(path, hf.to_str())
    tokenizer = Tokenizer("bpe", HFTokenizer.from_file(str(path)))
    if tokenizer.vocab_size < vocab_size:  # the trainer stops when no pair occurs twice
        built = tokenizer.vocab_size
        warnings.warn(f"tokenizer.vocab_size: asked for {vocab_size:,}, but the corpora's sample holds "
                      f"merges for only {built:,} entries; built {built:,}", stacklevel=2)
    return tokenizer


def balanced_sample(registry: Registry, names: Sequence[str], sample_chars: int) -> list[str]:
    """The same number of characters from each corpus's training documents, in ``doc_key`` order
    (a stable pseudo-random order), so that every language and domain is represented alike."""
    per_corpus = []
    for name in names:
        texts = registry.documents(name)[:]["text"]
        keys = [doc_key(t) for t in texts]
        is_val = split_mask(keys, [len(t) for t in texts])
        per_corpus.append([texts[i] for i in sorted(range(len(texts)), key=keys.__getitem__)
                           if not is_val[i]])
    budget = min([sample_chars] + [sum(map(len, docs)) for docs in per_corpus])
    sample = []
    for docs in per_corpus:
        left = budget
        for doc in docs:
            if left <= 0:
                break
            sample.append(doc[:left])
            left -= len(doc)
    return sample


def _train(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return hf
