"""The shipped corpora: files present, format as documented in SOURCES.md, included in a built wheel."""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CORPORA_DIR = Path(__file__).resolve().parents[1] / "cptlab" / "data" / "corpora"
NAMES = ["en-man", "de-man", "en-pydoc", "en-docs"]
SEPARATOR = "\n\x1e\n"
MAX_XZ_BYTES = 3_000_000


def documented_counts() -> dict[str, int]:
    """Document counts per corpus, read from the table in SOURCES.md."""
    counts = {}
    for line in (CORPORA_DIR / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| (en-man|de-man|en-pydoc|en-docs) \| (\d+) \|", line)
        if match:
            counts[match.group(1)] = int(match.group(2))
    return counts


def read_documents(name: str) -> list[str]:
    data = lzma.decompress((CORPORA_DIR / f"{name}.txt.xz").read_bytes())
    return data.decode("utf-8").split(SEPARATOR)  # strict: raises on invalid UTF-8


def test_sources_md_documents_every_corpus() -> None:
    assert sorted(documented_counts()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_corpus_file_size_and_document_count(name: str) -> None:
    path = CORPORA_DIR / f"{name}.txt.xz"
    assert path.is_file(), f"missing {path}: run scripts/build_corpora.py"
    assert path.stat().st_size <= MAX_XZ_BYTES
    documents = read_documents(name)
    assert len(documents) >= documented_counts()[name] > 0


@pytest.mark.parametrize("name", NAMES)
def test_corpus_format(name: str) -> None:
    text = lzma.decompress((CORPORA_DIR / f"{name}.txt.xz").read_bytes()).decode("utf-8")
    assert not text.startswith("\x1e\n") and not text.endswith("\n\x1e"), "no leading or trailing separator"
    documents = text.split(SEPARATOR)
    ids = []
    for doc in documents:
        assert "\x1e" not in doc
        title, _, body = doc.partition("\n")
        assert re.fullmatch(r"# \S+", title), title
        assert body.strip(), f"empty document {title}"
        ids.append(title)
    assert len(set(ids)) == len(ids), "document ids are unique"
    assert len({doc.partition("\n")[2] for doc in documents}) == len(documents), "no duplicate documents"


def test_en_man_holds_at_least_5_mb() -> None:
    assert len(SEPARATOR.join(read_documents("en-man")).encode("utf-8")) >= 5_000_000


def test_en_docs_mixes_python_docs_with_man_pages_that_en_man_lacks() -> None:
    """The weak shift's new data: about half Python documentation, half other programs' manual pages."""
    en_man = {doc.partition("\n")[0] for doc in read_documents("en-man")}
    docs = read_documents("en-docs")
    pydoc = [d for d in docs if d.partition("\n")[0].endswith(".rst")]
    man = [d for d in docs if not d.partition("\n")[0].endswith(".rst")]
    share = sum(map(len, pydoc)) / sum(map(len, docs))
    assert 0.4 < share < 0.6
    assert not en_man & {d.partition("\n")[0] for d in man}
    assert max(len(d.partition("\n")[2]) for d in docs) <= 100_000


@pytest.mark.slow
def test_wheel_includes_corpora(tmp_path: Path) -> None:
    """Build a wheel offline from a copy of the sources and look for the package data in it."""
    repo = CORPORA_DIR.parents[2]
    src = tmp_path / "src"  # a copy, so that the build leaves no build/ or egg-info in the work tree
    shutil.copytree(repo / "cptlab", src / "cptlab", ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        if (repo / name).is_file():
            shutil.copy2(repo / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, cwd=src,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("cptlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in NAMES:
        assert f"cptlab/data/corpora/{name}.txt.xz" in names
    assert "cptlab/data/corpora/SOURCES.md" in names
