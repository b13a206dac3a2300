"""Checks on a user's corpus files before they are loaded: text and not binary, valid JSON lines, and no
record that lacks the text field unless the corpus says to skip those (``missing_text: skip``).

Each raises ``DataError`` naming the corpus (``corpora.<name>``), the file and, for JSON, the line.
"""

from __future__ import annotations

import codecs
import json
import os
import warnings
from pathlib import Path

from cptlab.config import ConfigError

BINARY_SHARE = 0.3  # a file whose invalid UTF-8 sequences and NUL bytes exceed this share is not text
MISSING_TEXT = ("error", "skip")
SHOWN_LINES = 8  # line numbers quoted in a message


class DataError(ConfigError):
    """Bad data or a bad corpus spec; the message says which corpus and what is allowed."""


_invalid_seen = 0


def _replace_and_count(exc: UnicodeError) -> tuple[str, int]:
    global _invalid_seen
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _invalid_seen += 1
    return "\ufffd", exc.end


codecs.register_error("cptlab-replace-count", _replace_and_count)


def text_health(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[int, int, int]:
    """(invalid UTF-8 sequences, NUL bytes, bytes) of a file: how many U+FFFD a replacing UTF-8 decode
    inserts, and how many NULs, which UTF-8 text never holds."""
    global _invalid_seen
    _invalid_seen = 0
    nul = size = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="cptlab-replace-count")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            decoder.decode(block)
            nul += block.count(b"\0")
            size += len(block)
    decoder.decode(b"", final=True)
    return _invalid_seen, nul, size


def check_text(where: str, path: Path) -> int:
    """The invalid UTF-8 sequences of a text or JSON file (each is read as U+FFFD, with a warning); a file
    that is mostly not UTF-8 text (binary) is refused."""
    invalid, nul, size = text_health(path)
    if invalid + nul > BINARY_SHARE * size:
        raise DataError(f"{where}.path: {path} is not UTF-8 text ({invalid:,} invalid UTF-8 sequences and "
                        f"{nul:,} NUL bytes in {size:,} bytes); give text files, or convert it to UTF-8")
    if invalid:
        warnings.warn(f"{where}: {path} holds {invalid} invalid UTF-8 sequence(s); each was replaced with "
                      "U+FFFD", stacklevel=5)
    return invalid


def check_json_records(where: str, path: Path, field: str, missing_text: str = "error") -> int:
    """Check that every record of a JSON-lines file (or of a JSON array) is an object holding ``field``;
    records without it are an error, or (``missing_text: skip``) counted, warned about and left out.
    Returns how many were left out."""
    missing, n, fields = [], 0, []
    for where_in_file, record in _json_records(where, path):
        n += 1
        if not isinstance(record, dict):
            raise DataError(f"{where}.path: {path} {where_in_file} is not a JSON object (a record)")
        if record.get(field) is None:
            missing.append(where_in_file)  # "line 3" or "record 3"
        fields = fields or list(record)
    if not missing:
        return 0
    if len(missing) == n:
        raise DataError(f"{where}.text_field: {path} has no field {field!r}; its fields: {', '.join(fields)}")
    numbers = [label.split()[1] for label in missing[:SHOWN_LINES]]
    numbers += ["..."] if len(missing) > SHOWN_LINES else []
    what = (f"{len(missing)} of {n} records of {path} have no {field!r} ({missing[0].split()[0]}s "
            f"{', '.join(numbers)})")
    if missing_text == "error":
        raise DataError(f"{where}.text_field: {what}; set {where}.missing_text: skip to train without them")
    warnings.warn(f"{where}: {what}; left out (missing_text: skip)", stacklevel=4)
    return len(missing)


def _json_records(where: str, path: Path):
    """("line <i>" or "record <i>", record) of a JSON-lines file, or of a file holding one JSON array."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{where}.path: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") \
                from None
        yield from ((f"record {i}", r) for i, r in enumerate(records if isinstance(records, list) else [], 1))
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {i}", json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}.path: {path} line {i} is not valid JSON ({exc.msg}, column "
                                f"{exc.colno})") from None
