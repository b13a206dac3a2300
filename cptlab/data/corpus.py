"""Corpus registry: the shipped corpora plus the user's own, loaded as Hugging Face datasets.

A user corpus is registered by name in a run config's ``corpora`` mapping:
``{mybooks: {path: "data/*.txt"}}``, ``{notes: {path: notes.jsonl, text_field: body}}``,
``{tables: {path: "dump/*.parquet"}}`` or ``{web: {hf: org/name, config: en, split: train}}``.
Every corpus becomes a ``datasets.Dataset`` with one ``text`` column, one row per document. Files are checked
first (``cptlab.data.checks``): a binary file, an invalid JSON line or a record without the text field is an
error naming the file and line; ``missing_text: skip`` leaves such records out instead, with a warning.
The deterministic train/validation split by document lives here too (``split_mask``).

A corpus too large to load whole is streamed: ``{web: {hf: org/name, streaming: true, max_tokens: 3.0e11}}``
(``path`` corpora stream too). It is then read document by document, in the dataset's own order, by the
shard builder only (``Registry.stream``; ``cptlab.data.shards`` tokenises it incrementally, resumably, up to
``max_tokens`` training tokens). Its validation split is drawn by document hash as it streams
(``stream_is_val``): ``val_fraction`` of the documents (default ``STREAM_VAL_FRACTION``) until the
split holds ``STREAM_VAL_MAX_TOKENS`` tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptlab.data import packs
from cptlab.data.checks import MISSING_TEXT, DataError, check_json_records, check_text
from cptlab.data.extract import SEPARATOR

# Bump when loading, cleaning or splitting changes: it invalidates every cached shard.
DATA_VERSION = 1
CORPORA_DIR = Path(__file__).parent / "corpora"

SHIPPED: dict[str, dict[str, str]] = {
    "en-man": dict(language="en", domain="manual pages",
                   description="English manual pages (Debian), rendered to plain text"),
    "en-pydoc": dict(language="en", domain="Python documentation",
                     description="reStructuredText sources of the Python documentation"),
    "de-man": dict(language="de", domain="manual pages",
                   description="German manual pages (Debian manpages-de), rendered to plain text"),
    "en-docs": dict(language="en", domain="software documentation",
                    description="Python documentation and manual pages of other programs than en-man's, "
                                "half and half (the weak shift's new data)"),
}

# Validation split: 5% of documents, topped up towards ~100k tokens (~400k characters at ~4 characters
# per BPE token) but never beyond 10% of the corpus's characters.
VAL_FRACTION = 0.05
VAL_MIN_CHARS = 400_000
VAL_MAX_SHARE = 0.10

# Streamed corpora: a document is a validation document while the validation split holds fewer than
# STREAM_VAL_MAX_TOKENS tokens, if its doc_key falls in the lowest val_fraction of the key range.
STREAM_VAL_FRACTION = 0.002
STREAM_VAL_MAX_TOKENS = 1 << 24

USER_KEYS = ("path", "text_field", "sample_by", "hf", "config", "split", "revision",
             "language", "domain", "description", "streaming", "max_tokens", "val_fraction", "missing_text")
FILE_KINDS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("document", "paragraph", "line")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$CPTLAB_CACHE``, else ``~/.cache/cptlab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("CPTLAB_CACHE"):
        return Path(os.environ["CPTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "cptlab"


def _load_dataset(*args: Any, **kwargs: Any):
    """``datasets.load_dataset``, imported late (importing datasets takes a second or two)."""
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


class Registry:
    """The corpora a run may name: the shipped ones (unless ``include_shipped`` is False) plus ``user``
    (name -> spec). ``cache_dir`` holds Hugging Face's arrow files of loaded user corpora."""

    def __init__(self, user: dict[str, dict[str, Any]] | None = None, cache_dir: str | None = None,
                 include_shipped: bool = True):
        self.cache_dir = cache_dir
        self.include_shipped = include_shipped
        self.invalid_utf8: dict[str, int] = {}  # corpus -> invalid UTF-8 sequences replaced on load
        self._specs: dict[str, dict[str, Any]] = {
            name: {"shipped": True} for name in SHIPPED if include_shipped}
        for name in packs.CORPORA:  # the docs pack's corpora, once `cptlab corpora fetch docs` built them
            if self._pack_file(name).is_file():
                self._specs[name] = {"pack": "docs"}
        self._files: dict[str, list[Path]] = {}
        for name, spec in (user or {}).items():
            self._add(str(name), spec)

    # -- registration ------------------------------------------------------------------------
    def _add(self, name: str, spec: Any) -> None:
        where = f"corpora.{name}"
        if name in SHIPPED:
            raise DataError(f"{where}: {name!r} is a shipped corpus; register yours under another name")
        if name in packs.CORPORA:
            raise DataError(f"{where}: {name!r} is a docs pack corpus ({packs.FETCH_HINT} builds it); "
                            "register yours under another name")
        if not name or "/" in name:
            raise DataError(f"{where}: a corpus name must be non-empty and without '/'")
        if not isinstance(spec, dict):
            raise DataError(f"{where}: expected a mapping with 'path' or 'hf', got {spec!r}")
        for key in spec:
            if key not in USER_KEYS:
                raise DataError(f"{where}.{key}: unknown key; allowed: {', '.join(USER_KEYS)}")
        if ("path" in spec) == ("hf" in spec):
            raise DataError(f"{where}: give exactly one of 'path' (local files) or 'hf' (a hub dataset)")
        for key in ("path", "hf", "text_field", "config", "split", "revision"):
            if key in spec and spec[key] is not None and not isinstance(spec[key], str):
                raise DataError(f"{where}.{key}: expected a string, got {spec[key]!r}")
        sample_by = spec.get("sample_by", "document")
        if sample_by not in SAMPLE_BY:
            raise DataError(f"{where}.sample_by: {sample_by!r} not allowed; allowed: {', '.join(SAMPLE_BY)}")
        if spec.get("missing_text", "error") not in MISSING_TEXT:
            raise DataError(f"{where}.missing_text: {spec['missing_text']!r} not allowed; allowed: "
                            f"{', '.join(MISSING_TEXT)}")
        spec = dict(spec)
        streaming = spec.get("streaming", False)
        if not isinstance(streaming, bool):
            raise DataError(f"{where}.streaming: expected true or false, got {streaming!r}")
        for key in ("max_tokens", "val_fraction"):
            if key in spec and not streaming:
                raise DataError(f"{where}.{key}: only applies to a streamed corpus (add streaming: true)")
        if "max_tokens" in spec:
            value = _number(spec["max_tokens"])
            if value is None or value < 1:
                raise DataError(f"{where}.max_tokens: expected a number of tokens >= 1, "
                                f"got {spec['max_tokens']!r}")
            spec["max_tokens"] = int(value)
        if "val_fraction" in spec:
            value = _number(spec["val_fraction"])
            if value is None or not 0 < value <= 0.5:
                raise DataError(f"{where}.val_fraction: expected a number in (0, 0.5], "
                                f"got {spec['val_fraction']!r}")
            spec["val_fraction"] = value
        self._specs[name] = spec
        kinds = {"hub"}
        if "path" in spec:
            self._files[name] = _resolve_files(where, spec["path"])
            kinds = {FILE_KINDS[f.suffix.lower()] for f in self._files[name]}
        if "sample_by" in spec and kinds != {"text"}:
            raise DataError(f"{where}.sample_by: only applies to .txt files")

    # -- queries -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._specs)

    def unbuilt(self) -> list[str]:
        """The docs pack's corpora that are not built yet (``cptlab corpora fetch docs`` builds them)."""
        return [name for name in packs.CORPORA if name not in self._specs and self.include_shipped]

    def _pack_file(self, name: str) -> Path:
        return packs.corpus_file(cache_root(self.cache_dir), name)

    def check(self, name: str) -> None:
        """Raise ``DataError`` listing the known corpora if ``name`` is not one of them."""
        if name in packs.CORPORA and name not in self._specs:
            raise DataError(f"corpus {name!r} is not built: {packs.FETCH_HINT}")
        if name not in self._specs:
            raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def is_streamed(self, name: str) -> bool:
        """True for a corpus read as a stream (``streaming: true``): see ``stream``."""
        self.check(name)
        return bool(self._specs[name].get("streaming", False))

    def stream_limits(self, name: str) -> tuple[int | None, float]:
        """(``max_tokens``, ``val_fraction``) of a streamed corpus; ``max_tokens`` None: no budget."""
        self.check(name)
        spec = self._specs[name]
        return spec.get("max_tokens"), float(spec.get("val_fraction", STREAM_VAL_FRACTION))

    def info(self, name: str) -> dict[str, str]:
        """language, domain, description and source of a corpus."""
        self.check(name)
        if name in SHIPPED:
            return dict(name=name, **SHIPPED[name], source=str(CORPORA_DIR / f"{name}.txt.xz"))
        spec = self._specs[name]
        if "pack" in spec:
            return dict(name=name, **packs.CORPORA[name], source=str(self._pack_file(name)))
        source = spec.get("path") or "hf:" + "/".join(
            str(spec[k]) for k in ("hf", "config", "split") if spec.get(k))
        return dict(name=name, language=spec.get("language", "?"), domain=spec.get("domain", "user"),
                    description=spec.get("description", f"user corpus from {source}"), source=source)

    def source_hash(self, name: str) -> str:
        """A short hash of what a corpus's documents are made from (cheap: no loading)."""
        self.check(name)
        spec = self._specs[name]
        if name in SHIPPED:
            parts: Any = _file_sha256(_shipped_path(name))
        elif "pack" in spec:
            parts = _file_sha256(self._pack_file(name))
        elif "hf" in spec:
            parts = spec  # a hub dataset is taken as fixed; pin it with 'revision'
        else:
            stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self._files[name]]
            parts = dict(spec, files=stats)
        text = json.dumps([DATA_VERSION, name, parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- loading -----------------------------------------------------------------------------
    def documents(self, name: str, cache_dir: str | None = None):
        """The corpus as a ``datasets.Dataset`` with one ``text`` column (empty documents dropped)."""
        from datasets import Dataset

        self.check(name)
        spec = self._specs[name]
        hf_cache = str(cache_root(cache_dir or self.cache_dir) / "hf-datasets")
        where = f"corpora.{name}"
        if spec.get("streaming"):
            raise DataError(f"{where}: a streamed corpus is never loaded whole; its documents are read by "
                            "the shard builder (cptlab.data.token_shard) through Registry.stream")
        if name in SHIPPED:
            ds = Dataset.from_dict({"text": read_shipped(_shipped_path(name))})
        elif "pack" in spec:
            ds = Dataset.from_dict({"text": read_shipped(self._pack_file(name))})
        elif "hf" in spec:
            ds = _load_dataset(spec["hf"], spec.get("config"), split=spec.get("split") or "train",
                               revision=spec.get("revision"), cache_dir=hf_cache)
            ds = _text_column(ds, where, spec, spec["hf"])
        else:
            ds = self._load_files(name, spec, hf_cache)
        ds = ds.filter(_non_empty, batched=True, desc=f"dropping empty documents of {name}")
        if len(ds) == 0:
            raise DataError(f"{where}: corpus {name!r} holds no text (every document is empty)")
        return ds

    def _load_files(self, name: str, spec: dict[str, Any], hf_cache: str):
        where = f"corpora.{name}"
        kind, data_files, extra = self._file_args(name, spec)
        if kind == "text":
            ds = _load_dataset("text", data_files=data_files, split="train", cache_dir=hf_cache, **extra)
            if extra["sample_by"] == "document":  # a file may hold several documents, as the shipped ones do
                ds = ds.map(_split_separators, batched=True, desc=f"splitting documents of {name}")
            return ds
        ds = _load_dataset(kind, data_files=data_files, split="train", cache_dir=hf_cache, **extra)
        return _text_column(ds, where, spec, _shown_files(spec, data_files))

    def _file_args(self, name: str, spec: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
        """(builder, data files, extra ``load_dataset`` arguments) of a ``path`` corpus, after checking its
        files (``cptlab.data.checks``: text, valid JSON records holding the text field)."""
        where = f"corpora.{name}"
        files = self._files[name]
        kinds = {FILE_KINDS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise DataError(f"{where}.path: files of mixed kinds ({', '.join(sorted(kinds))}); "
                            "use one kind of file per corpus")
        kind = kinds.pop()
        data_files = [str(f) for f in files]
        bad = 0
        if kind in ("text", "json"):
            bad = sum(check_text(where, f) for f in files)
        if kind == "json":
            for f in files:
                field = spec.get("text_field") or "text"
                check_json_records(where, f, field, spec.get("missing_text", "error"))
        self.invalid_utf8[name] = bad
        if kind == "text":
            sample_by = spec.get("sample_by", "document")
            return kind, data_files, dict(sample_by=sample_by, encoding_errors="replace")
        if kind == "json" and bad:
            # datasets re-decodes (with encoding_errors) only when the encoding is not spelt "utf-8";
            # "utf_8" is the same codec under another spelling.
            return kind, data_files, dict(encoding="utf_8", encoding_errors="replace")
        return kind, data_files, {}

    def stream(self, name: str) -> DocumentStream:
        """The documents of a streamed corpus, read lazily in the dataset's own order (nothing is
        downloaded or held whole): ``datasets.load_dataset(..., streaming=True)``."""
        self.check(name)
        spec = self._specs[name]
        where = f"corpora.{name}"
        if not spec.get("streaming"):
            raise DataError(f"{where}: not a streamed corpus (add streaming: true to read it as a stream)")
        field, missing = spec.get("text_field") or "text", spec.get("missing_text", "error")
        if "hf" in spec:
            ds = _load_dataset(spec["hf"], spec.get("config"), split=spec.get("split") or "train",
                               revision=spec.get("revision"), streaming=True)
            return DocumentStream(ds, field, where, spec["hf"], missing_text=missing)
        kind, data_files, extra = self._file_args(name, spec)
        ds = _load_dataset(kind, data_files=data_files, split="train", streaming=True, **extra)
        if kind == "text":
            return DocumentStream(ds, "text", where, _shown_files(spec, data_files),
                                  split_separators=extra["sample_by"] == "document")
        return DocumentStream(ds, field, where, _shown_files(spec, data_files), missing_text=missing)


class DocumentStream:
    """The documents of a streamed corpus: iterating yields, for each example of the dataset in order,
    the list of its non-empty documents (one, or several for a text file read by document).

    Resumable: ``state_dict()`` taken between two examples, given to ``load_state_dict`` of a fresh
    stream of the same corpus before iterating, continues with the next example.
    """

    def __init__(self, dataset: Any, field: str, where: str, shown: str, split_separators: bool = False,
                 missing_text: str = "error"):
        self.dataset = dataset  # a datasets.IterableDataset
        self.field = field
        self.missing_text = missing_text
        self.where = where
        self.shown = shown
        self.split_separators = split_separators
        names = getattr(dataset, "column_names", None)
        if names is not None and field not in names:
            raise DataError(f"{where}.text_field: {shown} has no field {field!r}; "
                            f"its fields: {', '.join(names)}")

    def __iter__(self):
        for example in self.dataset:
            if self.field not in example:
                raise DataError(f"{self.where}.text_field: {self.shown} has no field {self.field!r}; "
                                f"its fields: {', '.join(example)}")
            text = example[self.field]
            if text is None:
                if self.missing_text == "error":
                    raise DataError(f"{self.where}.text_field: an example of {self.shown} has no "
                                    f"{self.field!r} (null); set {self.where}.missing_text: skip to leave "
                                    "such examples out")
                yield []
                continue
            if not isinstance(text, str):
                raise DataError(f"{self.where}.text_field: field {self.field!r} of {self.shown} is not text "
                                f"(it is {type(text).__name__})")
            docs = text.split(SEPARATOR) if self.split_separators else [text]
            yield [d for d in docs if d.strip()]

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


# -- helpers -------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """A finite number from an int, a float or a numeric string (YAML reads ``3.0e11`` as a string)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _shown_files(spec: dict[str, Any], data_files: list[str]) -> str:
    return data_files[0] if len(data_files) == 1 else f"{len(data_files)} files ({spec['path']})"


def _shipped_path(name: str) -> Path:
    path = CORPORA_DIR / f"{name}.txt.xz"
    if not path.exists():
        raise DataError(f"shipped corpus {name!r} is missing: {path} does not exist "
                        "(build it with scripts/build_corpora.py or reinstall cptlab)")
    return path


def read_shipped(path: str | os.PathLike) -> list[str]:
    """The documents of a shipped corpus file (xz-compressed UTF-8, documents split by SEPARATOR)."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [doc for doc in f.read().split(SEPARATOR) if doc.strip()]


_sha_cache: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _sha_cache[key]


def _resolve_files(where: str, pattern: str) -> list[Path]:
    """The files a ``path`` names: a file, a folder (its files, recursively) or a glob."""
    path = Path(pattern).expanduser()
    if glob.has_magic(str(path)):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"{where}.path: {pattern!r} matches no files")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_KINDS)
        if not files:
            raise DataError(f"{where}.path: folder {pattern!r} holds no {'/'.join(FILE_KINDS)} files")
    elif path.exists():
        files = [path]
    else:
        raise DataError(f"{where}.path: {pattern!r} does not exist")
    for f in files:
        if f.suffix.lower() not in FILE_KINDS:
            raise DataError(f"{where}.path: {f} is not a supported file; allowed: {', '.join(FILE_KINDS)}")
        if f.stat().st_size == 0:
            raise DataError(f"{where}.path: file {f} is empty")
    return files


def _text_column(ds, where: str, spec: dict[str, Any], shown: str):
    """Keep only the spec's text field, renamed to ``text``; a clear error if it is missing or not text, and
    if records lack it (null) unless the spec says ``missing_text: skip``."""
    field = spec.get("text_field") or "text"
    if field not in ds.column_names:
        raise DataError(f"{where}.text_field: {shown} has no field {field!r}; "
                        f"its fields: {', '.join(ds.column_names)}")
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"{where}.text_field: field {field!r} of {shown} is not text (it is {dtype})")
    ds = ds.select_columns([field])
    nulls = ds.data.column(field).null_count
    if nulls and spec.get("missing_text", "error") == "error":
        raise DataError(f"{where}.text_field: {nulls} of {len(ds)} records of {shown} have no {field!r}; set "
                        f"{where}.missing_text: skip to train without them")
    return ds.rename_column(field, "text") if field != "text" else ds


def _non_empty(batch: dict[str, list]) -> list[bool]:
    return [bool(t and t.strip()) for t in batch["text"]]


def _split_separators(batch: dict[str, list]) -> dict[str, list]:
    return {"text": [doc for t in batch["text"] for doc in t.split(SEPARATOR)]}


def doc_key(text: str) -> int:
    """A 63-bit hash of a document's text (fits int64), the same on every machine (unlike ``hash()``)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def stream_is_val(key: int, val_tokens: int, val_fraction: float = STREAM_VAL_FRACTION) -> bool:
    """Whether a streamed document (its ``doc_key``) goes to validation, given the validation tokens
    taken so far: its key lies in the lowest ``val_fraction`` of the key range and the split holds fewer
    than ``STREAM_VAL_MAX_TOKENS`` tokens. Decided document by document in stream order, so the split
    of a prefix of the stream is the prefix of the split."""
    return val_tokens < STREAM_VAL_MAX_TOKENS and key < val_fraction * 2**63


def split_mask(keys: Sequence[int] | np.ndarray, chars: Sequence[int] | np.ndarray) -> np.ndarray:
    """Which documents are validation documents (True), from their ``doc_key`` and length.

    Documents are ranked by key; the lowest-ranked go to validation until it holds 5% of the documents
    and ``min(VAL_MIN_CHARS, VAL_MAX_SHARE x all characters)`` characters. At least one document stays
    in training; a single-document corpus has no validation split.
    """
    keys = np.asarray(keys, dtype=np.int64)
    chars = np.asarray(chars, dtype=np.int64)
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    if n < 2:
        return mask
    order = np.lexsort((np.arange(n), keys))  # by key, ties by position
    min_docs = max(1, math.ceil(VAL_FRACTION * n))
    char_target = min(VAL_MIN_CHARS, VAL_MAX_SHARE * int(chars.sum()))
    cum = np.cumsum(chars[order])
    # smallest count k with k >= min_docs and cum[k-1] >= char_target
    k = max(min_docs, int(np.searchsorted(cum, char_target)) + 1)
    mask[order[:min(k, n - 1)]] = True
    return mask
