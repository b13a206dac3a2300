"""Tokenised shards: each corpus split tokenised once into a flat memmap, plus the corpora table.

Layout under the cache folder: ``shards/<corpus>/<key>/{train.bin, val.bin, meta.json}`` where ``key``
hashes the corpus source and the tokenizer fingerprint. Documents are separated (and ended) by the
tokenizer's end-of-text token. ``meta.json`` is written last: a folder without it is not a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cptlab.config import TokenizerConfig, atomic_write_text
from cptlab.corpus import DataError, Registry, cache_root, doc_key, split_mask
from cptlab.tokenizer import Tokenizer, load_tokenizer

SHARD_VERSION = 1
SPLITS = ("train", "val")
PARALLEL_BYTES = 64 << 20  # tokenise with several processes above this much text


def token_shard(name: str, split: str, tokenizer: Tokenizer, registry: Registry | None = None,
                cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The tokens of one split (``train`` or ``val``) of a corpus as a read-only 1-D memmap."""
    if split == "validation":
        split = "val"
    if split not in SPLITS:
        raise DataError(f"split: {split!r} not allowed; allowed: train, val")
    registry = registry or Registry()
    meta = shard_meta(name, tokenizer, registry, cache_dir)
    n = meta["tokens"][split]
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=meta["dtype"])
    path = _shard_dir(name, tokenizer, registry, cache_dir) / f"{split}.bin"
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,))


def val_tokens(name: str, tokenizer: Tokenizer, registry: Registry | None = None, n_tokens: int = 65536,
               cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The first ``n_tokens`` of a corpus's validation split (a copy; the same slice every time)."""
    shard = token_shard(name, "val", tokenizer, registry, cache_dir)
    if len(shard) == 0:
        raise DataError(f"corpus {name!r} is a single document, so it has no validation split; give it "
                        "several: one per file, or separated by a line holding only \\x1e (ASCII RS), or "
                        f"set corpora.{name}.sample_by to paragraph or line")
    if len(shard) < n_tokens:
        warnings.warn(f"corpus {name!r}: validation split has {len(shard)} tokens, fewer than the "
                      f"{n_tokens} asked for; using all of them", stacklevel=2)
    return np.array(shard[:n_tokens])


def shard_meta(name: str, tokenizer: Tokenizer, registry: Registry | None = None,
               cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The metadata of a corpus's shards, tokenising the corpus first if they are not cached yet."""
    from filelock import FileLock

    registry = registry or Registry()
    registry.check(name)
    folder = _shard_dir(name, tokenizer, registry, cache_dir)
    meta = _read_meta(folder)
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):  # a second builder waits, then finds the shard
            meta = _read_meta(folder) or _build(name, tokenizer, registry, folder, cache_dir)
    return meta


def _shard_dir(name: str, tokenizer: Tokenizer, registry: Registry, cache_dir) -> Path:
    key = json.dumps([SHARD_VERSION, registry.source_hash(name), tokenizer.fingerprint])
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    root = cache_root(cache_dir or registry.cache_dir)
    return root / "shards" / safe / hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The shard's metadata if the shard is complete (its files have the recorded sizes)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            if (folder / f"{split}.bin").stat().st_size != meta["tokens"][split] * itemsize:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return meta


def _encode(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    texts = batch["text"]
    return {"ids": tokenizer.encode_arrays(texts), "key": [doc_key(t) for t in texts],
            "chars": [len(t) for t in texts]}


def _build(name: str, tokenizer: Tokenizer, registry: Registry, folder: Path, cache_dir) -> dict[str, Any]:
    from datasets import Features, List, Value

    start = time.perf_counter()
    docs = registry.documents(name, cache_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".build-"))
    try:
        parallel = docs.data.nbytes > PARALLEL_BYTES and (os.cpu_count() or 1) > 1
        if parallel:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
        features = Features({"ids": List(Value("uint32")), "key": Value("int64"), "chars": Value("int64")})
        mapped = docs.map(_encode, batched=True, batch_size=256, fn_kwargs={"tokenizer": tokenizer},
                          remove_columns=docs.column_names, features=features,
                          num_proc=min(os.cpu_count() or 1, 8) if parallel else None,
                          cache_file_name=str(tmp / "tokens.arrow"), new_fingerprint=tmp.name,
                          desc=f"tokenising {name}")
        keys = mapped.data.column("key").to_numpy()
        chars = mapped.data.column("chars").to_numpy()
        is_val = split_mask(keys, chars)
        counts = {s: 0 for s in SPLITS}
        with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
            doc = 0
            for chunk in mapped.data.column("ids").chunks:
                lengths = chunk.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
                values = chunk.flatten().to_numpy()
                # the chunk's documents, each followed by end-of-text
                out = np.empty(len(values) + len(lengths), dtype=dtype)
                ends = np.cumsum(lengths + 1) - 1
                body = np.ones(len(out), dtype=bool)
                body[ends] = False
                out[body] = values
                out[ends] = tokenizer.eot_id
                in_val = np.repeat(is_val[doc:doc + len(lengths)], lengths + 1)
                out[~in_val].tofile(f_train)
                out[in_val].tofile(f_val)
                counts["val"] += int(in_val.sum())
                counts["train"] += len(out) - int(in_val.sum())
                doc += len(lengths)
        del mapped
        meta = dict(
            version=SHARD_VERSION, name=name, dtype=dtype.name, tokens=counts,
            documents={"train": int((~is_val).sum()), "val": int(is_val.sum())},
            characters={"train": int(chars[~is_val].sum()), "val": int(chars[is_val].sum())},
            tokenizer=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
            source=registry.source_hash(name), invalid_utf8=registry.invalid_utf8.get(name, 0),
            build_seconds=round(time.perf_counter() - start, 3))
        for split in SPLITS:
            os.replace(tmp / f"{split}.bin", folder / f"{split}.bin")
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the corpora table ---------------------------------------------------------------------------

COLUMNS = ("name", "language", "domain", "documents", "characters", "train_tokens", "val_tokens")


def corpora_table(registry: Registry | None = None, tokenizer: Tokenizer | None = None,
                  cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per corpus (tokenising what is not cached yet): the ``COLUMNS`` above."""
    registry = registry or Registry()
    tokenizer = tokenizer or load_tokenizer(TokenizerConfig(), registry, cache_dir)
    rows = []
    for name in registry.names():
        info = registry.info(name)
        meta = shard_meta(name, tokenizer, registry, cache_dir)
        rows.append(dict(name=name, language=info["language"], domain=info["domain"],
                         documents=sum(meta["documents"].values()),
                         characters=sum(meta["characters"].values()),
                         train_tokens=meta["tokens"]["train"], val_tokens=meta["tokens"]["val"]))
    return rows


def print_corpora_table(registry: Registry | None = None, tokenizer: Tokenizer | None = None,
                        cache_dir: str | os.PathLike | None = None, file: TextIO | None = None) -> None:
    """Print ``corpora_table`` as aligned columns (what ``cptlab corpora`` shows)."""
    rows = corpora_table(registry, tokenizer, cache_dir)
    cells = [list(COLUMNS)] + [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS]
                               for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    out = file or sys.stdout
    for row in cells:
        line = "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(line.rstrip(), file=out)
