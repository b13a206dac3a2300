"""Build the shipped corpora `en-man`, `de-man`, `en-pydoc` and `en-docs` from installed Debian packages.

Run from the repository root (Debian 12 with `manpages manpages-de python3.11-doc man-db` installed):

    python scripts/build_corpora.py [--out cptlab/data/corpora] [--workers 2]

Sources:
- `de-man`: every German manual page shipped by the package manpages-de (/usr/share/man/de/).
- `en-man`: first the English pages (/usr/share/man/manN/) that manpages-de translates, then pages of the
  man-pages project (packages manpages, then manpages-dev) in path order until the corpus holds at least
  5,000,000 bytes of UTF-8 text.
- `en-pydoc`: the reStructuredText sources of the Python 3.11 documentation (python3.11-doc ships them as
  /usr/share/doc/python3.11/html/_sources/**/*.rst.txt).
- `en-docs`: English software documentation mixed from two halves of about 5,000,000 bytes each: pages of
  en-pydoc, and the English manual pages (sections 1, 4, 5, 7, 8) of installed Debian packages that en-man
  does not hold; no document above 100,000 characters. Each half takes documents in the order of the
  sha256 of their title until it is full, and the two halves are interleaved in that order. It is the
  weak shift's new data: like SlimPajama after the Pile in the paper, it shares part of its sources'
  kind with the old data (manual pages) and brings a new domain (Python documentation).

Man pages are rendered with `man --nh --nj -l FILE | col -bx` under a fixed environment (LC_ALL=C.UTF-8,
MANWIDTH=80): no hyphenation and no justification, so no word is split by the typesetter and no spaces are
added by it. The running header and footer line of each rendered page are dropped. Symbolic links and pages
that only hold a `.so` redirect are aliases of another page and are skipped.

Output format (a contract the corpus loader relies on): `<out>/<name>.txt.xz`, an xz-compressed UTF-8
text. Documents are separated by a line holding only the ASCII record separator, i.e. "\\n\\x1e\\n" between
two documents, with no separator after the last one; no document contains "\\x1e". The first line of every
document is kept: it is a title line `# <source id>` (`# ls.1`, `# library/os.rst`), followed by the
cleaned text. We keep it because it names the document's origin, which makes a split by document stable
and inspectable, and it costs one short line per document.

The build is deterministic: inputs are sorted, the environment is fixed, nothing depends on the clock, and
xz is written with a fixed preset. Two builds on the same machine give identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The cleaning and rendering rules live in the library, shared with the docs pack (cptlab.data.packs).
from cptlab.data.extract import (  # noqa: F401 - XZ_PRESET, SEPARATOR: the format's constants, named here too
    RENDER_ENV,
    SEPARATOR,
    XZ_PRESET,
    clean_text,
    compress,
    is_so_redirect,
    render_man,
)

MAN_ROOT = Path("/usr/share/man")
DE_MAN_ROOT = MAN_ROOT / "de"
PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
DE_PACKAGE = "manpages-de"
PYDOC_PACKAGE = "python3.11-doc"
EN_FILL_PACKAGES = ("manpages", "manpages-dev")
TOOL_PACKAGES = ("man-db", "groff-base", "bsdextrautils", "liblzma5")

EN_MIN_BYTES = 5_000_000
DOCS_HALF_BYTES = 5_000_000  # each half of en-docs
DOCS_MAX_CHARS = 100_000  # longer documents (cmake-modules.7 has 700k characters) would crowd out the rest
DOCS_MAN_SECTIONS = ("man1", "man4", "man5", "man7", "man8")  # sections 2 and 3 are the C API (manpages-dev)
DOCS_EXCLUDED_PACKAGES = ("google-cloud-cli",)  # ~16,600 generated pages of one command
MAX_XZ_BYTES = 3_000_000
BUILD_COMMAND = "python scripts/build_corpora.py --out cptlab/data/corpora"

@dataclass(frozen=True)
class Source:
    """One input document: its id (the title line), its file and the Debian package that ships it."""

    doc_id: str
    path: Path
    package: str
    kind: str  # "man" or "rst"


@dataclass
class Corpus:
    """A built corpus: the documents kept, in order, and what was left out on the way."""

    name: str
    documents: list[tuple[Source, str]] = field(default_factory=list)
    skipped_empty: int = 0
    skipped_duplicate: int = 0
    dropped_by_cap: int = 0
    compressed: bytes = b""

    def text(self) -> str:
        return SEPARATOR.join(f"# {src.doc_id}\n{body}" for src, body in self.documents)


# ----------------------------------------------------------------------------- inputs


def _man_id(path: Path) -> str:
    return path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name


def _package_owners(pattern: str) -> dict[Path, str]:
    """Map each file matching `pattern` to the Debian package that ships it (dpkg-query -S)."""
    proc = subprocess.run(
        ["dpkg-query", "-S", pattern], capture_output=True, text=True, env=RENDER_ENV, check=True
    )
    owners: dict[Path, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("diversion by ") or ": " not in line:
            continue
        packages, path = line.split(": ", 1)
        owners[Path(path)] = packages.split(", ")[0].split(":")[0]
    return owners


def _real_man_pages(owners: dict[Path, str], package: str | None = None) -> list[Path]:
    """Sorted regular man page files (no symlinks, no `.so` aliases), optionally of one package."""
    pages = []
    for path, owner in owners.items():
        if package is not None and owner != package:
            continue
        if path.is_symlink() or not path.is_file() or is_so_redirect(path):
            continue
        pages.append(path)
    return sorted(pages)


def de_man_sources() -> list[Source]:
    owners = _package_owners(str(DE_MAN_ROOT / "man?" / "*"))
    return [Source(_man_id(p), p, DE_PACKAGE, "man") for p in _real_man_pages(owners, DE_PACKAGE)]


def en_man_candidates(de_sources: list[Source]) -> tuple[list[Source], list[Source]]:
    """English pages translated by manpages-de, then man-pages project pages to fill up with."""
    owners = _package_owners(str(MAN_ROOT / "man?" / "*"))
    translated: list[Source] = []
    for de in de_sources:
        path = MAN_ROOT / de.path.relative_to(DE_MAN_ROOT)
        if path in owners and not path.is_symlink() and path.is_file() and not is_so_redirect(path):
            translated.append(Source(_man_id(path), path, owners[path], "man"))
    taken = {src.path for src in translated}
    fill = [
        Source(_man_id(path), path, package, "man")
        for package in EN_FILL_PACKAGES
        for path in _real_man_pages(owners, package)
        if path not in taken
    ]
    return translated, fill


def other_man_sources(en: Corpus) -> list[Source]:
    """English man pages of installed packages in DOCS_MAN_SECTIONS that en-man does not hold."""
    owners = {
        path: package
        for path, package in _package_owners(str(MAN_ROOT / "man?" / "*")).items()
        if path.parent.name in DOCS_MAN_SECTIONS and package not in DOCS_EXCLUDED_PACKAGES
    }
    taken = {src.doc_id for src, _ in en.documents}
    pages = [p for p in _real_man_pages(owners) if _man_id(p) not in taken]
    return [Source(_man_id(p), p, owners[p], "man") for p in pages]


def _mix_key(item: tuple[Source, str]) -> bytes:
    return hashlib.sha256(item[0].doc_id.encode()).digest()


def docs_half(documents: list[tuple[Source, str]]) -> list[tuple[Source, str]]:
    """Documents of at most DOCS_MAX_CHARS in the order of the hash of their title, until the half holds
    DOCS_HALF_BYTES of text."""
    half, size = [], 0
    for src, body in sorted(documents, key=_mix_key):
        if size >= DOCS_HALF_BYTES:
            break
        if len(body) <= DOCS_MAX_CHARS:
            half.append((src, body))
            size += len(body.encode())
    return half


def pydoc_sources() -> list[Source]:
    paths = sorted(PYDOC_ROOT.rglob("*.rst.txt"))
    return [
        Source(str(p.relative_to(PYDOC_ROOT))[: -len(".txt")], p, PYDOC_PACKAGE, "rst")
        for p in paths
        if p.is_file()
    ]


# ----------------------------------------------------------------------------- rendering


def load_document(source: Source) -> str:
    """Raw text of a source (rendered for man pages), cleaned."""
    if source.kind == "man":
        raw = render_man(source.path)
    else:
        raw = source.path.read_bytes().decode("utf-8", errors="replace")
    return clean_text(raw)


def load_all(sources: list[Source], workers: int) -> list[str]:
    """Clean texts of `sources`, in the same order, rendered by a pool of `workers` processes."""
    if workers <= 1:
        return [load_document(src) for src in sources]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(load_document, sources, chunksize=8)


# ----------------------------------------------------------------------------- assembling


def add_documents(
    corpus: Corpus, sources: list[Source], texts: list[str], min_bytes: int | None = None
) -> None:
    """Append non-empty, not yet seen documents; stop once the corpus holds `min_bytes` of text."""
    seen = {hashlib.sha256(body.encode()).digest() for _, body in corpus.documents}
    size = len(corpus.text().encode())
    for src, body in zip(sources, texts):
        if min_bytes is not None and size >= min_bytes:
            return
        if not body.strip():
            corpus.skipped_empty += 1
            continue
        digest = hashlib.sha256(body.encode()).digest()
        if digest in seen:
            corpus.skipped_duplicate += 1
            continue
        seen.add(digest)
        corpus.documents.append((src, body))
        size += len(f"# {src.doc_id}\n{body}".encode()) + (len(SEPARATOR) if len(corpus.documents) > 1 else 0)


def compress_with_cap(corpus: Corpus) -> None:
    """Compress; if above MAX_XZ_BYTES keep the longest prefix of documents that fits (binary search)."""
    corpus.compressed = compress(corpus.text())
    if len(corpus.compressed) <= MAX_XZ_BYTES:
        return
    all_docs = corpus.documents
    low, high = 1, len(all_docs) - 1  # the answer n satisfies low <= n <= high
    while low < high:
        mid = (low + high + 1) // 2
        corpus.documents = all_docs[:mid]
        if len(compress(corpus.text())) <= MAX_XZ_BYTES:
            low = mid
        else:
            high = mid - 1
    corpus.documents = all_docs[:low]
    corpus.dropped_by_cap = len(all_docs) - low
    corpus.compressed = compress(corpus.text())


# ----------------------------------------------------------------------------- provenance


def package_versions(packages: list[str]) -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Version}\n", *packages],
        capture_output=True, text=True, env=RENDER_ENV, check=True,
    )
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines())


def package_licences(package: str) -> str:
    """Licence names from the `License:` fields of /usr/share/doc/<pkg>/copyright (DEP-5 files)."""
    path = Path("/usr/share/doc") / package / "copyright"
    if not path.is_file():
        return f"(no {path})"
    names = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("License:") and line[len("License:") :].strip():
            name = line[len("License:") :].strip()
            if name not in names:
                names.append(name)
    return ", ".join(sorted(names)) if names else f"not machine-readable, see {path}"


def corpus_stats(corpus: Corpus) -> dict[str, int]:
    text = corpus.text()
    return {
        "documents": len(corpus.documents),
        "characters": len(text),
        "utf8_bytes": len(text.encode()),
        "xz_bytes": len(corpus.compressed),
    }


CLEANING_RULES = """\
Applied to every document of every corpus, in this order:
1. Line ends normalised to `\\n`; Unicode NFC; control characters other than tab and newline (among them
   the record separator `\\x1e`) and soft hyphens (U+00AD) removed; tabs expanded to 8 columns; trailing
   spaces removed.
2. Words broken across a line break after a hyphen (`-` or U+2010) are joined: `apt-\\n    cache(8)`
   becomes `apt-cache(8)`. The hyphen is kept, because man pages are rendered without hyphenation
   (`--nh`), so every line-final hyphen was written by the author; when the next word is a conjunction
   (und, oder, bzw, sowie, and, or, nor) the hyphen is a suspended compound and a space is kept
   (`Ein- und Aushängen`).
3. Layout indentation collapsed: each paragraph (run of non-blank lines) loses the indentation common
   to all its lines; indentation relative to the paragraph (option descriptions, code) is kept. A
   paragraph made of an unindented first line over indented lines (a man section heading over its
   body) is dedented below its first line.
4. Runs of blank lines collapsed to one blank line; leading and trailing blank lines removed.
5. Documents that are empty after cleaning are dropped, and so are exact duplicates of an earlier
   document (same cleaned text, title line not counted); the first occurrence is kept.
Man pages are rendered before cleaning: `man --nh --nj -l FILE | col -bx` with LC_ALL=C.UTF-8,
LANG=C.UTF-8, MANWIDTH=80; the running header and footer lines are removed. Symbolic links and pages that
only hold a `.so` redirect are skipped as aliases.
"""


def write_sources_md(out: Path, corpora: list[Corpus]) -> None:
    """Write SOURCES.md: provenance, licences, counts, the build command and the cleaning rules."""
    packages = sorted({src.package for corpus in corpora for src, _ in corpus.documents} | set(TOOL_PACKAGES))
    versions = package_versions(packages)
    lines = [
        "# Shipped corpora: sources and provenance",
        "",
        "Generated by `scripts/build_corpora.py`; do not edit by hand. Rebuild (Debian 12, from the",
        "repository root, after `apt-get install manpages manpages-de manpages-dev python3.11-doc man-db`)",
        "with:",
        "",
        f"    {BUILD_COMMAND}",
        "",
        "## Format",
        "",
        "Each `<name>.txt.xz` is an xz-compressed (preset 9, CRC64) UTF-8 text. Documents are separated",
        "by a line holding only the ASCII record separator: `\"\\n\\x1e\\n\"` between two documents, none",
        "after the last; no document contains `\\x1e` and none is empty. The first line of each document",
        "is kept as a title line `# <source id>` (e.g. `# ls.1`, `# library/os.rst`): it names the",
        "document's origin, so a split by document is stable and can be inspected; the cleaned text follows",
        "on the next line.",
        "",
        "## Corpora",
        "",
        "| corpus | documents | characters | UTF-8 bytes | xz bytes | empty dropped | duplicates dropped "
        "| cut by the 3 MB cap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus in corpora:
        s = corpus_stats(corpus)
        lines.append(
            f"| {corpus.name} | {s['documents']} | {s['characters']} | {s['utf8_bytes']} | {s['xz_bytes']} "
            f"| {corpus.skipped_empty} | {corpus.skipped_duplicate} | {corpus.dropped_by_cap} |"
        )
    lines += [
        "",
        "- `en-man`: English manual pages (/usr/share/man/manN/). First every English page that manpages-de",
        "  translates (whatever package ships it), then pages of the man-pages project (manpages, then",
        "  manpages-dev) in path order, until the corpus holds at least 5,000,000 bytes of text.",
        "- `de-man`: every German manual page shipped by manpages-de (/usr/share/man/de/manN/). German pages",
        "  shipped by other packages (apt, dpkg, ...) are not included.",
        "- `en-pydoc`: the reStructuredText sources of the Python 3.11 documentation",
        "  (/usr/share/doc/python3.11/html/_sources/**/*.rst.txt, shipped by python3.11-doc).",
        "- `en-docs`: English software documentation, the weak shift's new data: two halves of about",
        f"  {DOCS_HALF_BYTES:,} bytes, pages of en-pydoc and English manual pages (sections",
        f"  {', '.join(d[3:] for d in DOCS_MAN_SECTIONS)}) of installed packages that en-man does not hold "
        f"(none of {', '.join(DOCS_EXCLUDED_PACKAGES)}),",
        f"  each document at most {DOCS_MAX_CHARS:,} characters; each half takes documents in the order of",
        "  the sha256 of their title, and the halves are interleaved in that order.",
        "- Documents appear in that order (sorted by path within each group; en-docs as said above). A",
        "  corpus above 3,000,000 compressed bytes would keep the longest prefix of documents that fits",
        "  (the last column).",
        "",
        "## Packages, versions and licences",
        "",
        "Licences are the `License:` fields of `/usr/share/doc/<package>/copyright` (see that file for the",
        "full terms). The corpora are derived from these works and stay under their licences, which differ",
        "from this project's.",
        "",
        "| package | version | documents (en-man / de-man / en-pydoc / en-docs) | licences |",
        "|---|---|---|---|",
    ]
    for package in packages:
        counts = [sum(1 for src, _ in c.documents if src.package == package) for c in corpora]
        if package == PYDOC_PACKAGE:
            licence = ("PSF License Agreement (Python software and documentation); code examples in the "
                       "documentation also Zero-Clause BSD (see license.rst in the sources)")
        elif package in TOOL_PACKAGES and not any(counts):
            licence = "build tool, no text taken"
        else:
            licence = package_licences(package)
        lines.append(
            f"| {package} | {versions.get(package, '?')} | {' / '.join(map(str, counts))} | {licence} |"
        )
    lines += [
        "",
        "The man-pages project (manpages, manpages-dev) uses per-page licences (Linux-man-pages-copyleft,",
        "GPL, BSD and others, listed in its copyright file); manpages-de translations are GPL-3+; the other",
        "English pages come from the packages listed above under their own licences.",
        "",
        "## Cleaning",
        "",
        CLEANING_RULES.rstrip(),
        "",
        "## Determinism",
        "",
        "Inputs are sorted, rendering runs under the fixed environment above, no timestamps are written, and",
        "xz uses a fixed preset, so two builds with the same package versions give identical bytes. The",
        "rendering tools were: " + ", ".join(f"{p} {versions.get(p, '?')}" for p in TOOL_PACKAGES) + ".",
        "",
    ]
    (out / "SOURCES.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(out: Path, workers: int) -> list[Corpus]:
    """Build the four corpora into `out` and write SOURCES.md."""
    out.mkdir(parents=True, exist_ok=True)
    de_sources = de_man_sources()
    translated, fill = en_man_candidates(de_sources)
    py_sources = pydoc_sources()

    de = Corpus("de-man")
    add_documents(de, de_sources, load_all(de_sources, workers))

    en = Corpus("en-man")
    add_documents(en, translated, load_all(translated, workers))
    start = 0
    while len(en.text().encode()) < EN_MIN_BYTES and start < len(fill):
        batch = fill[start : start + 200]  # render the fill in batches: only as much as is needed
        add_documents(en, batch, load_all(batch, workers), min_bytes=EN_MIN_BYTES)
        start += len(batch)
    if len(en.text().encode()) < EN_MIN_BYTES:
        sys.exit(f"en-man holds less than {EN_MIN_BYTES} bytes: install {', '.join(EN_FILL_PACKAGES)}")

    py = Corpus("en-pydoc")
    add_documents(py, py_sources, load_all(py_sources, workers))

    man_sources = other_man_sources(en)
    man_docs = list(zip(man_sources, load_all(man_sources, workers)))
    mixed = sorted(docs_half(py.documents) + docs_half([d for d in man_docs if d[1].strip()]), key=_mix_key)
    docs = Corpus("en-docs")
    add_documents(docs, [src for src, _ in mixed], [body for _, body in mixed])

    corpora = [en, de, py, docs]
    for corpus in corpora:
        compress_with_cap(corpus)
        _write_atomic(out / f"{corpus.name}.txt.xz", corpus.compressed)
    write_sources_md(out, corpora)
    return corpora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("cptlab/data/corpora"), help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpora = build(args.out, args.workers)
    for corpus in corpora:
        stats = corpus_stats(corpus)
        print(f"{corpus.name}: " + ", ".join(f"{k} {v}" for k, v in stats.items())
              + f", duplicates dropped {corpus.skipped_duplicate}, cut by cap {corpus.dropped_by_cap}")
    print(f"built in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
