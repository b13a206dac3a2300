"""Tokenised shards: each corpus split tokenised once into a flat memmap, plus the corpora table.

Layout under the cache folder: ``shards/<corpus>/<key>/{train.bin, val.bin, meta.json}`` where ``key``
hashes the corpus source and the tokenizer fingerprint. Documents are separated (and ended) by the
tokenizer's end-of-text token. ``meta.json`` is written last: a folder without it is not a shard.

A streamed corpus (``streaming: true``, see ``cptlab.data.corpus``) is tokenised as it streams: batches of
documents are appended to ``.stream/{train,val}.bin`` in the shard folder and, every
``STREAM_FLUSH_TOKENS`` tokens, the files are synced and ``.stream/progress.json`` records their lengths,
the counters and the stream's position (``IterableDataset.state_dict``). A build that is interrupted
resumes from its last record (the files are cut back to the recorded lengths and the stream continues
after the last recorded example), so the finished shard is byte-identical to an uninterrupted build. It
stops at the document that brings the training split to the corpus's ``max_tokens``. When it is done the
files move into place, ``meta.json`` is written and ``.stream/`` is removed.
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

from cptlab.config import TokenizerConfig
from cptlab.data.checks import DataError
from cptlab.data.corpus import Registry, cache_root, doc_key, split_mask, stream_is_val
from cptlab.data.tokenizer import Tokenizer, load_tokenizer
from cptlab.files import atomic_write_text

SHARD_VERSION = 1
SPLITS = ("train", "val")
PARALLEL_BYTES = 16 << 20  # tokenise with several processes above this much text (shipped corpora: below)
MAX_PROCESSES = 16  # tokenising processes at most (one per core up to this)
STREAM_VERSION = 1
STREAM_BATCH_DOCS = 1024  # documents of a streamed corpus tokenised at a time
STREAM_FLUSH_TOKENS = 1 << 24  # a streamed build records its progress after about this many tokens


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

    if registry.is_streamed(name):
        return _build_streamed(name, tokenizer, registry, folder)
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
                          num_proc=min(os.cpu_count() or 1, MAX_PROCESSES) if parallel else None,
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


# -- streamed corpora ----------------------------------------------------------------------------

def _build_streamed(name: str, tokenizer: Tokenizer, registry: Registry, folder: Path) -> dict[str, Any]:
    """Tokenise a streamed corpus into ``folder`` incrementally, resuming an interrupted build (see the
    module docstring)."""
    max_tokens, val_fraction = registry.stream_limits(name)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    work = folder / ".stream"
    work.mkdir(exist_ok=True)
    if (work / "progress.json").exists():
        for split in SPLITS:  # killed while moving the finished files into place: move them back
            if not (work / f"{split}.bin").exists() and (folder / f"{split}.bin").exists():
                os.replace(folder / f"{split}.bin", work / f"{split}.bin")
    fresh = dict(version=STREAM_VERSION, dtype=dtype.name, tokenizer=tokenizer.fingerprint,
                 tokens={s: 0 for s in SPLITS}, documents={s: 0 for s in SPLITS},
                 characters={s: 0 for s in SPLITS}, budget_reached=False, finished=False, stream_state=None,
                 seconds=0.0)
    build = _StreamedBuild(work, dtype, _read_progress(work, fresh) or fresh)
    if not build.progress["finished"]:
        build.tokenise(registry.stream(name), tokenizer, max_tokens, val_fraction)
    progress = build.progress
    if max_tokens is not None and not progress["budget_reached"]:
        warnings.warn(f"corpus {name!r}: the stream ended at {progress['tokens']['train']:,} training "
                      f"tokens, short of its max_tokens ({max_tokens:,})", stacklevel=4)
    meta = dict(
        version=SHARD_VERSION, name=name, dtype=dtype.name, tokens=progress["tokens"],
        documents=progress["documents"], characters=progress["characters"],
        tokenizer=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
        source=registry.source_hash(name), invalid_utf8=registry.invalid_utf8.get(name, 0),
        streamed=dict(max_tokens=max_tokens, val_fraction=val_fraction,
                      budget_reached=progress["budget_reached"]),
        build_seconds=round(progress["seconds"], 3))
    for split in SPLITS:
        os.replace(work / f"{split}.bin", folder / f"{split}.bin")
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return meta


class _StreamedBuild:
    """The split files of a streamed build in ``work`` and its progress record."""

    def __init__(self, work: Path, dtype: np.dtype, progress: dict[str, Any]):
        self.work, self.dtype, self.progress = work, dtype, progress
        self.files: dict[str, Any] = {}
        self.since = time.perf_counter()

    def tokenise(self, stream: Any, tokenizer: Tokenizer, max_tokens: int | None,
                 val_fraction: float) -> None:
        """Append the stream's documents from where the progress record left off, recording progress
        every ``STREAM_FLUSH_TOKENS`` tokens, until the stream ends or the budget is reached."""
        progress = self.progress
        try:
            for split in SPLITS:  # cut back whatever was written after the last progress record
                self.files[split] = open(self.work / f"{split}.bin", "ab")  # noqa: SIM115 - closed below
                self.files[split].truncate(progress["tokens"][split] * self.dtype.itemsize)
            if progress["stream_state"] is not None:
                stream.load_state_dict(progress["stream_state"])
            pending: list[str] = []
            unrecorded = 0
            for docs in stream:
                pending += docs
                if len(pending) < STREAM_BATCH_DOCS:
                    continue
                unrecorded += _append(pending, tokenizer, self.dtype, self.files, progress, max_tokens,
                                      val_fraction)
                pending = []
                if progress["budget_reached"]:
                    break
                if unrecorded >= STREAM_FLUSH_TOKENS:
                    self.record(stream.state_dict())
                    unrecorded = 0
            else:  # the stream ended
                _append(pending, tokenizer, self.dtype, self.files, progress, max_tokens, val_fraction)
            progress["finished"] = True
            self.record(None)
        finally:
            for f in self.files.values():
                f.close()

    def record(self, state: dict[str, Any] | None) -> None:
        """Make the appended tokens durable, then record how far the build got."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.progress["stream_state"] = state
        self.progress["seconds"] += time.perf_counter() - self.since
        self.since = time.perf_counter()
        atomic_write_text(self.work / "progress.json", json.dumps(self.progress))


def _read_progress(work: Path, fresh: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record of an interrupted build, if it belongs to this build (same format, token
    type and tokenizer) and its files hold at least the recorded tokens."""
    try:
        progress = json.loads((work / "progress.json").read_text())
        if any(progress.get(k) != fresh[k] for k in ("version", "dtype", "tokenizer")):
            return None
        itemsize = np.dtype(progress["dtype"]).itemsize
        for split in SPLITS:
            if (work / f"{split}.bin").stat().st_size < progress["tokens"][split] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return progress


def _append(docs: list[str], tokenizer: Tokenizer, dtype: np.dtype, files: dict[str, Any],
            progress: dict[str, Any], max_tokens: int | None, val_fraction: float) -> int:
    """Tokenise ``docs`` and append each, with end-of-text, to its split, in order, stopping after the
    document that brings the training split to ``max_tokens``. Updates ``progress``; returns the tokens
    written."""
    if not docs:
        return 0
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    tokens, written = progress["tokens"], 0
    for text, ids in zip(docs, tokenizer.encode_arrays(docs)):
        split = "val" if stream_is_val(doc_key(text), tokens["val"], val_fraction) else "train"
        parts[split] += [ids.astype(dtype), eot]
        tokens[split] += len(ids) + 1
        progress["documents"][split] += 1
        progress["characters"][split] += len(text)
        written += len(ids) + 1
        if max_tokens is not None and tokens["train"] >= max_tokens:
            progress["budget_reached"] = True
            break
    for split in SPLITS:
        if parts[split]:
            np.concatenate(parts[split]).tofile(files[split])
    return written


# -- the corpora table ---------------------------------------------------------------------------

COLUMNS = ("name", "language", "domain", "documents", "characters", "train_tokens", "val_tokens")


def corpora_table(registry: Registry | None = None, tokenizer: Tokenizer | None = None,
                  cache_dir: str | os.PathLike | None = None,
                  names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per corpus, or per corpus of ``names`` (tokenising what is not cached yet): the ``COLUMNS``
    above."""
    registry = registry or Registry()
    tokenizer = tokenizer or load_tokenizer(TokenizerConfig(), registry, cache_dir)
    rows = []
    for name in registry.names() if names is None else names:
        info = registry.info(name)
        meta = shard_meta(name, tokenizer, registry, cache_dir)
        rows.append(dict(name=name, language=info["language"], domain=info["domain"],
                         documents=sum(meta["documents"].values()),
                         characters=sum(meta["characters"].values()),
                         train_tokens=meta["tokens"]["train"], val_tokens=meta["tokens"]["val"]))
    return rows


def print_corpora_table(registry: Registry | None = None, tokenizer: Tokenizer | None = None,
                        cache_dir: str | os.PathLike | None = None, file: TextIO | None = None,
                        as_json: bool = False, names: list[str] | None = None) -> None:
    """Print ``corpora_table`` (of ``names`` only, if given) as aligned columns (what ``cptlab corpora``
    shows), then a line naming the docs pack's corpora that are not built; ``as_json``: one JSON object per
    corpus instead (the line about unbuilt corpora goes to stderr)."""
    registry = registry or Registry()
    rows = corpora_table(registry, tokenizer, cache_dir, names)
    out = file or sys.stdout
    unbuilt = registry.unbuilt() if names is None else []
    note = f"not built: {', '.join(unbuilt)} (run `cptlab corpora fetch docs`)" if unbuilt else ""
    if as_json:
        for row in rows:
            print(json.dumps(row), file=out)
        if note:
            print(note, file=sys.stderr)
        return
    cells = [list(COLUMNS)] + [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS]
                               for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for row in cells:
        line = "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(line.rstrip(), file=out)
    if note:
        print(note, file=out)
