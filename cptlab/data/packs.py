"""Corpus packs: larger corpora built on the user's machine from pinned Debian packages.

``cptlab corpora fetch docs`` builds the docs pack into ``<cache>/packs/docs/``: it downloads the pinned
.deb files with ``apt-get download`` (each checked against its recorded sha256), unpacks them with
``dpkg-deb -x``, extracts the text of their documentation (HTML, troff rendered through man, POD,
reStructuredText and AsciiDoc sources kept as written), cleans it with the rules of the shipped corpora
(``cptlab.data.extract``) and writes one xz corpus per pack corpus in the shipped format, plus SOURCES.md
and manifest.json (the sha256 of every output). A second fetch checks the manifest and does nothing.

The docs pack (its corpus names begin with ``docs-``):

- ``docs-en`` (D0): the English sides of documentation that Debian ships in German too (LibreOffice help,
  the GIMP manual, the Debian handbook, reference, FAQ, developers' reference and maintainers' guide,
  Debian Edu, KiCad, LilyPond, the Apache manual, and the English manual pages that manpages-de
  translates), plus English-only manuals of the same kinds (the rest of LilyPond's, Perl's POD, the
  PostgreSQL, GNU Octave, Vim and gnuplot manuals).
- ``docs-de`` (the strong shift's D1): the German sides, all the German there is in those packages.
- ``docs-en-other`` (the weak shift's D1): English documentation of other programs and of other kinds,
  mostly programming: the Linux kernel documentation, the Python, Node.js, Django, CMake and LLVM
  documentation, the Rust books, the Git, SQLite and Bash manuals.

Every document belongs to one corpus, decided by the rule that found it (package and path); a document
whose cleaned text equals an earlier one's (in pack order) is dropped, so no text is in two corpora, and
a document in a corpus's language other than the one expected is dropped too (untranslated pages).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptlab.data.checks import DataError
from cptlab.data.extract import (
    RENDER_ENV,
    SEPARATOR,
    clean_text,
    compress,
    is_so_redirect,
    language,
    read_html,
    render_man,
    render_pod,
)

PACK_VERSION = 2  # bump when extraction or assignment changes: the manifest then asks for a rebuild
MIN_CHARS = 200  # shorter documents (redirect stubs, empty index pages) are dropped
FETCH_HINT = "run `cptlab corpora fetch docs`"


@dataclass(frozen=True)
class Rule:
    """Files of a package (a glob relative to the unpacked tree) that become documents of ``corpus``."""

    glob: str
    kind: str  # html, man, pod, text
    corpus: str
    exclude: tuple[str, ...] = ()  # files whose path (in the tree) contains one of these are left out


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    rules: tuple[Rule, ...]


CORPORA: dict[str, dict[str, str]] = {
    "docs-en": dict(language="en", domain="software documentation (docs pack D0)",
                    description="English documentation that Debian also ships in German, plus English "
                                "manuals of the same kinds"),
    "docs-de": dict(language="de", domain="software documentation (docs pack, strong shift)",
                    description="German documentation: the German sides of docs-en's parallel sources"),
    "docs-en-other": dict(language="en", domain="software documentation (docs pack, weak shift)",
                          description="English documentation of other programs and kinds: the kernel, "
                                      "Python, Node.js, Django, CMake, LLVM, Rust, Git, SQLite, Bash"),
}
EN, DE, OTHER = "docs-en", "docs-de", "docs-en-other"
MAN = "usr/share/man/man[1-8]/*"
SPHINX_INDEXES = ("/genindex", "/search.html", "/py-modindex")  # generated lists of names, no prose


def _pkg(name: str, version: str, sha256: str, *rules: Rule) -> Package:
    return Package(name, version, sha256, rules)


PACKAGES: tuple[Package, ...] = (
    # German sides first: with equal texts the German package keeps the document
    _pkg("manpages-de", "4.18.1-1", "37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978",
         Rule("usr/share/man/de/man[1-8]/*", "man", DE)),
    _pkg("manpages-de-dev", "4.18.1-1", "cb3d7c10977dd3c811065d89e0d912196ec5e6f2551308edb0ba72e02da838d7",
         Rule("usr/share/man/de/man[1-8]/*", "man", DE)),
    _pkg("libreoffice-help-de", "4:7.4.7-1+deb12u14",
         "00490b63c509ac96f7f212d6a6e40452d3e0d1f97ccf4b824dd5ec4c01e8277f",
         Rule("usr/share/libreoffice/help/de/text/**/*.html", "html", DE)),
    _pkg("gimp-help-de", "2.10.34-2", "06d1f51828e0c68d373bbdd0d34c695e6405062143cd612407cd0fcf9531c199",
         Rule("usr/share/gimp/2.0/help/de/*.html", "html", DE)),
    _pkg("debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
         Rule("usr/share/doc/debian-handbook/html/de-DE/*.html", "html", DE),
         Rule("usr/share/doc/debian-handbook/html/en-US/*.html", "html", EN)),
    _pkg("debian-reference-de", "2.100", "3b0ce65fd63e75ddf8eb07ca36293425135080e690a07e06a6ac8bc8040ef0aa",
         Rule("usr/share/debian-reference/*.de.html", "html", DE)),
    _pkg("lilypond-doc-html-de", "2.24.1-2",
         "f4a7347e5120a080d732aa4f0a81310bc5557784efd0c0a913304f75b622a3ec",
         Rule("usr/share/doc/lilypond/html/Documentation/**/*.de.html", "html", DE)),
    _pkg("kicad-doc-de", "6.0.11+dfsg-1", "f29275d90d09d4536c031159e5cde5bcb5b2f49300ff1d28fe2ec7e996648cbc",
         Rule("usr/share/doc/kicad/help/de/*.html", "html", DE)),
    _pkg("debian-faq-de", "11.1", "e9a8d8234f4b182660d521f80f50cea87f797b4541005a3d64fab7777766f6de",
         Rule("usr/share/doc/debian/FAQ/de/*.html", "html", DE)),
    _pkg("developers-reference-de", "12.18",
         "281f0c2b24139e0ac83117c3e95b60458a6644fe14c82cf9ea78e87ea8c175d7",
         Rule("usr/share/developers-reference/de/*.html", "html", DE)),
    _pkg("maint-guide-de", "1.2.53", "821afc6b85ffe9cbc9b7acbcdd5876ccbb855c3876ee5524d21602fd41d979c1",
         Rule("usr/share/doc/maint-guide-de/html/*.html", "html", DE)),
    _pkg("debian-edu-doc-de", "2.12.23~deb12u1",
         "8bf494be7b24baf3b84cf080421357a01938e0f643971d6fb58834612882f2bc",
         Rule("usr/share/doc/debian-edu-doc-de/debian-edu-bookworm-manual.html", "html", DE)),
    _pkg("apache2-doc", "2.4.68-1~deb12u1",
         "cee8fe80ffb5de2744cd690c3d795b489e43a1c44c4e3a634c521642f22d7835",
         Rule("usr/share/doc/apache2-doc/manual/de/**/*.html", "html", DE),
         Rule("usr/share/doc/apache2-doc/manual/en/**/*.html", "html", EN)),
    # English sides of the same sources
    _pkg("manpages", "6.03-2", "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91",
         Rule(MAN, "man", EN)),
    _pkg("manpages-dev", "6.03-2", "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838",
         Rule(MAN, "man", EN)),
    _pkg("coreutils", "9.1-1", "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091",
         Rule(MAN, "man", EN)),
    _pkg("util-linux", "2.38.1-5+deb12u3", "8eb241ff24b2e1ee9c0373f4fc9bc728b85bf5966c1496154df7da01c0e42f34",
         Rule(MAN, "man", EN)),
    _pkg("findutils", "4.9.0-4", "5dd86bd0af4aa73f067dfd6b8339dd868f2dd84056aa79db29d1206d4fbc5e04",
         Rule(MAN, "man", EN)),
    _pkg("grep", "3.8-5", "3264acea728df3c48a54f20e9291b965130e306b9d00adac76647049da7196df",
         Rule(MAN, "man", EN)),
    _pkg("sed", "4.9-1+deb12u1", "fd557efeee8aae4619c2cb7f68aadccb804322ad4a99ab048aaae5901d253885",
         Rule(MAN, "man", EN)),
    _pkg("procps", "2:4.0.2-3", "d9d0e75779cb79af869181f17b93c5c263a2b89cac6a0193c436160a4483ddc1",
         Rule(MAN, "man", EN)),
    _pkg("systemd", "252.39-1~deb12u2", "286f879c537bfba92e59d580c075ad20ab49020244c79634656850a306dd462b",
         Rule(MAN, "man", EN)),
    _pkg("libreoffice-help-en-us", "4:7.4.7-1+deb12u14",
         "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
         Rule("usr/share/libreoffice/help/en-US/text/**/*.html", "html", EN)),
    _pkg("gimp-help-en", "2.10.34-2", "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36",
         Rule("usr/share/gimp/2.0/help/en/*.html", "html", EN)),
    _pkg("debian-reference-en", "2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
         Rule("usr/share/debian-reference/*.en.html", "html", EN)),
    _pkg("lilypond-doc-html", "2.24.1-2", "be9fb743e58bd5ad4710146fe05e7c5f447fe4559e42c6acef1916d53e4bec60",
         Rule("usr/share/doc/lilypond/html/Documentation/**/*.html", "html", EN)),
    _pkg("kicad-doc-en", "6.0.11+dfsg-1", "20dbe9acb2e6f38d49bd742d4b71bee2dc3e7dbd8c54a7a45ad05a742e5ae834",
         Rule("usr/share/doc/kicad/help/en/*.html", "html", EN)),
    _pkg("debian-faq", "11.1", "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0",
         Rule("usr/share/doc/debian/FAQ/*.html", "html", EN)),
    _pkg("developers-reference", "12.18", "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
         Rule("usr/share/developers-reference/*.html", "html", EN)),
    _pkg("maint-guide", "1.2.53", "762c8a400a36668d2eb814a3ba356b06488fd889dfce478eb11d5cfb189a47b5",
         Rule("usr/share/doc/maint-guide/html/*.html", "html", EN)),
    _pkg("debian-edu-doc-en", "2.12.23~deb12u1",
         "0a985aebd07dd69ea1d22c767c410fbca429e7c9fa378024bcaf4fedeb09506a",
         Rule("usr/share/doc/debian-edu-doc-en/debian-edu-bookworm-manual.html", "html", EN)),
    _pkg("perl-doc", "5.36.0-7+deb12u3", "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
         Rule("usr/share/perl/5.36.0/pod/*.pod", "pod", EN)),
    _pkg("postgresql-doc-15", "15.18-0+deb12u1",
         "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0",
         Rule("usr/share/doc/postgresql-doc-15/html/*.html", "html", EN)),
    _pkg("octave-doc", "7.3.0-2", "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5",
         Rule("usr/share/doc/octave/octave.html/*.html", "html", EN)),
    _pkg("vim-doc", "2:9.0.1378-2+deb12u2",
         "6a7e9419d1e249ab5eabd4753bf600e807ccd564dbd9621d0fb90fa30d25e36d",
         Rule("usr/share/doc/vim/html/*.html", "html", EN)),
    _pkg("gnuplot-doc", "5.4.4+dfsg1-2", "73fe1816a296594cf6a1d38528f8d740fd650f57a2cb62e029f7920fcd5b31f0",
         Rule("usr/share/doc/gnuplot/htmldocs/*.html", "html", EN)),
    # other programs, other kinds: the weak shift
    _pkg("linux-doc-6.1", "6.1.176-1", "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
         Rule("usr/share/doc/linux-doc-6.1/html/_sources/**/*.txt", "text", OTHER)),
    _pkg("python3.11-doc", "3.11.2-6+deb12u8",
         "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
         Rule("usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "text", OTHER)),
    _pkg("rust-doc", "1.63.0+dfsg1-2", "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
         *(Rule(f"usr/share/doc/rust-doc/html/{book}/**/*.html", "html", OTHER, exclude=("print.html",))
           for book in ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "embedded-book",
                        "rustc", "cargo", "rustdoc", "unstable-book"))),
    _pkg("git-doc", "1:2.39.5-0+deb12u3", "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
         Rule("usr/share/doc/git-doc/**/*.txt", "text", OTHER)),
    _pkg("sqlite3-doc", "3.40.1-2+deb12u2",
         "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2",
         Rule("usr/share/doc/sqlite3/**/*.html", "html", OTHER)),
    _pkg("bash-doc", "5.2.15-2", "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b",
         Rule("usr/share/doc/bash/bashref.html", "html", OTHER)),
    _pkg("nodejs-doc", "18.20.4+dfsg-1~deb12u2",
         "9f674d3536be94923bb8720c48ec17bc92b8de62f2954c3172b59a3ada1de65f",
         Rule("usr/share/doc/nodejs/api/*.html", "html", OTHER, exclude=("/all.html",))),
    _pkg("cmake-doc", "3.25.1-1", "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133",
         Rule("usr/share/doc/cmake-data/html/**/*.html", "html", OTHER, exclude=SPHINX_INDEXES)),
    _pkg("python-django-doc", "3:3.2.25-0+deb12u3",
         "33319c8e45b95693603213442ccf9bcee933ef338488115203ad25a0e01c696f",
         Rule("usr/share/doc/python-django-doc/html/**/*.html", "html", OTHER,
              exclude=("/_modules/", *SPHINX_INDEXES))),
    _pkg("llvm-15-doc", "1:15.0.6-4", "613d2f6c303411508b28775269d4f6c35498905d0f3e2dd39f862191a1faf564",
         Rule("usr/share/doc/llvm-15-doc/html/_sources/*.txt", "text", OTHER)),
)
PACKS: dict[str, tuple[Package, ...]] = {"docs": PACKAGES}


# -- where things are ----------------------------------------------------------------------------

def pack_dir(cache: Path, pack: str = "docs") -> Path:
    """The folder of a built pack under the cache root ``cache``."""
    return cache / "packs" / pack


def corpus_file(cache: Path, name: str) -> Path:
    """The xz file of pack corpus ``name`` (it exists once the pack is built)."""
    return pack_dir(cache) / f"{name}.txt.xz"


def spec_hash(packages: tuple[Package, ...]) -> str:
    """A hash of what a pack is built from: the packages, their pins and rules, and the code's version."""
    pins = [[p.name, p.version, p.sha256, [list(vars(r).values()) for r in p.rules]] for p in packages]
    parts = [PACK_VERSION, MIN_CHARS, pins]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# -- downloading and unpacking -------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_deb(debs: Path, package: Package) -> Path | None:
    """The .deb of ``package`` in ``debs`` whose sha256 is the pinned one, if there is one."""
    for path in sorted(debs.glob(f"{package.name}_*.deb")):
        if _sha256(path) == package.sha256:
            return path
    return None


def download(debs: Path, package: Package) -> Path:
    """The pinned .deb of ``package``: found in ``debs`` or fetched there with ``apt-get download``."""
    found = find_deb(debs, package)
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        raise DataError(f"packs: {package.name}_{package.version}.deb is not in {debs} and this machine has "
                        "no apt-get; put the .deb files there by hand (see docs/corpora.md, 'The docs "
                        "pack') or use the web-data path (a config's corpora with hf: or path:)")
    proc = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root",
                           f"{package.name}={package.version}"], cwd=debs, capture_output=True, text=True,
                          check=False)
    found = find_deb(debs, package)
    if found is None:
        why = (proc.stderr.strip().splitlines() or ["downloaded file has another sha256"])[-1]
        raise DataError(f"packs: cannot get {package.name} {package.version} (sha256 "
                        f"{package.sha256[:12]}...) with apt-get: {why}. The pins are Debian 12 "
                        "(bookworm)'s; on another release add a bookworm apt source, or put the .deb "
                        f"(snapshot.debian.org) into {debs}")
    return found


def unpack(deb: Path, tree: Path) -> None:
    """``dpkg-deb -x`` into ``tree`` (emptied first)."""
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, env=RENDER_ENV)


# -- documents -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input document: its id (the title line), its file, its package and kind, and its corpus."""

    doc_id: str
    path: Path
    package: str
    kind: str
    corpus: str


def package_sources(package: Package, tree: Path) -> list[Source]:
    """The package's documents, rule by rule, sorted by path: regular files only, no `.so` man aliases."""
    out: list[Source] = []
    for rule in package.rules:
        for path in sorted(tree.glob(rule.glob)):
            rel = path.relative_to(tree).as_posix()
            if path.is_symlink() or not path.is_file() or any(part in rel for part in rule.exclude):
                continue
            if rule.kind == "man" and is_so_redirect(path):
                continue
            out.append(Source(f"{package.name}:{rel}", path, package.name, rule.kind, rule.corpus))
    return out


def load_document(source: Source) -> str:
    """A source's text (rendered for man pages and POD, visible text of HTML), cleaned."""
    if source.kind == "man":
        raw = render_man(source.path)
    elif source.kind == "pod":
        raw = render_pod(source.path)
    elif source.kind == "html":
        raw = read_html(source.path)
    elif source.kind == "text":
        raw = source.path.read_bytes().decode("utf-8", errors="replace")
    else:
        raise DataError(f"packs: rule kind {source.kind!r} not allowed; allowed: html, man, pod, text")
    return clean_text(raw)


def package_licences(tree: Path, package: str) -> str:
    """Licence names from the `License:` fields of usr/share/doc/<package>/copyright (DEP-5 files)."""
    path = tree / "usr/share/doc" / package / "copyright"
    if not path.is_file():
        return "see the package's copyright file"
    names: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        name = line[len("License:"):].strip() if line.startswith("License:") else ""
        if name and name not in names:
            names.append(name)
    return ", ".join(sorted(names)) if names else "not machine-readable, see its copyright file"


class PackBuild:
    """The documents of a pack's corpora as they are assembled, and what was left out on the way."""

    def __init__(self, packages: tuple[Package, ...]):
        self.packages = packages
        self.corpora: dict[str, list[tuple[str, str]]] = {name: [] for name in CORPORA}
        self.seen: set[bytes] = set()
        self.stats: dict[str, dict[str, Any]] = {}

    def add(self, package: Package, sources: list[Source], texts: list[str], licences: str) -> None:
        """Keep each document that is long enough, in its corpus's language and not seen before."""
        row: dict[str, Any] = dict(version=package.version, licences=licences, short=0, language=0,
                                   duplicate=0, documents={}, characters={})
        for src, text in zip(sources, texts):
            if len(text) < MIN_CHARS:
                row["short"] += 1
                continue
            if language(text) not in (CORPORA[src.corpus]["language"], "?"):
                row["language"] += 1
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in self.seen:
                row["duplicate"] += 1
                continue
            self.seen.add(digest)
            self.corpora[src.corpus].append((src.doc_id, text))
            row["documents"][src.corpus] = row["documents"].get(src.corpus, 0) + 1
            row["characters"][src.corpus] = row["characters"].get(src.corpus, 0) + len(text)
        self.stats[package.name] = row

    def text(self, name: str) -> str:
        return SEPARATOR.join(f"# {doc_id}\n{body}" for doc_id, body in self.corpora[name])


# -- building ------------------------------------------------------------------------------------

def _load_package(pool: Any, package: Package, deb: Path, work: Path, build: PackBuild) -> None:
    """Unpack one package, extract its documents with a progress bar, add them to ``build``."""
    from tqdm.auto import tqdm

    tree = work / package.name
    unpack(deb, tree)
    try:
        sources = package_sources(package, tree)
        texts = []
        with tqdm(total=len(sources), desc=package.name, unit="doc", leave=True) as bar:
            for text in pool.imap(load_document, sources, chunksize=4):
                texts.append(text)
                bar.update()
        build.add(package, sources, texts, package_licences(tree, package.name))
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def build_pack(cache: Path, packages: tuple[Package, ...], workers: int, debs: Path) -> dict[str, Any]:
    """Download, unpack and extract every package, then write the corpora, SOURCES.md and manifest.json
    into the pack folder; returns the manifest."""
    out = pack_dir(cache)
    work = out / ".work"
    debs.mkdir(parents=True, exist_ok=True)
    found = {p.name: download(debs, p) for p in packages}  # every pin checked before any work
    build = PackBuild(packages)
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        for package in packages:
            _load_package(pool, package, found[package.name], work, build)
        names = list(CORPORA)
        texts = [build.text(n) for n in names]
        blobs = pool.map(compress, texts, chunksize=1)
    shutil.rmtree(work, ignore_errors=True)
    files = {}
    for name, text, blob in zip(names, texts, blobs):
        _write_atomic(out / f"{name}.txt.xz", blob)
        files[name] = dict(sha256=hashlib.sha256(blob).hexdigest(), xz_bytes=len(blob),
                           documents=len(build.corpora[name]), characters=len(text))
    manifest = dict(pack="docs", spec=spec_hash(packages), files=files,
                    packages={p.name: dict(version=p.version, sha256=p.sha256) for p in packages})
    (out / "SOURCES.md").write_text(sources_md(build, files), encoding="utf-8")
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def verified(cache: Path, packages: tuple[Package, ...]) -> dict[str, Any] | None:
    """The pack's manifest if the pack is built from ``packages`` and every file has its recorded sha256."""
    try:
        manifest = json.loads((pack_dir(cache) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("spec") != spec_hash(packages) or set(manifest.get("files", {})) != set(CORPORA):
        return None
    for name, entry in manifest["files"].items():
        path = corpus_file(cache, name)
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            return None
    return manifest


def _check_options(workers: int | None, debs: Path | None) -> None:
    """``--workers`` at least 1; ``--debs`` a folder that holds .deb files (one that holds none would
    silently download them all: leaving --debs out does that, into the pack's cache)."""
    if workers is not None and workers < 1:
        raise DataError(f"--workers: must be >= 1 (extracting processes), got {workers}")
    if debs is None:
        return
    hint = "give the folder that holds the .deb files, or leave --debs out to download them"
    if not debs.exists():
        raise DataError(f"--debs: {debs} does not exist; {hint}")
    if not debs.is_dir():
        raise DataError(f"--debs: {debs} is a file; {hint}")
    if not any(debs.glob("*.deb")):
        raise DataError(f"--debs: {debs} holds no .deb files; {hint}")


def fetch(pack: str, cache: Path, workers: int | None = None, rebuild: bool = False,
          debs: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Build pack ``pack`` into ``cache`` unless it is built and its checksums verify (then nothing is done).
    ``rebuild``: build again and say whether the files are byte-identical to the recorded ones."""
    if pack not in PACKS:
        raise DataError(f"pack: {pack!r} not known; known packs: {', '.join(PACKS)}")
    _check_options(workers, debs)
    packages = PACKS[pack]
    before = verified(cache, packages)
    if before is not None and not rebuild:
        log(f"{pack} pack already built in {pack_dir(cache)}: checksums verified, nothing to do")
        return dict(before, status="verified")
    if shutil.which("dpkg-deb") is None:
        raise DataError("packs: this machine has no dpkg-deb (not Debian); the docs pack is built from "
                        "Debian packages: use the web-data path (a config's corpora with hf: or path:)")
    workers = workers or min(os.cpu_count() or 1, 16)
    manifest = build_pack(cache, packages, workers, debs or pack_dir(cache) / "debs")
    status = "built"
    if before is not None:
        same = all(before["files"][n]["sha256"] == manifest["files"][n]["sha256"] for n in CORPORA)
        status = "rebuilt, byte-identical" if same else "rebuilt, DIFFERENT from the recorded checksums"
    for name, entry in manifest["files"].items():
        log(f"{name}: {entry['documents']:,} documents, {entry['characters']:,} characters, "
            f"sha256 {entry['sha256'][:16]}")
    log(f"{pack} pack {status} in {pack_dir(cache)}")
    return dict(manifest, status=status)


# -- provenance ----------------------------------------------------------------------------------

def sources_md(build: PackBuild, files: dict[str, dict[str, Any]]) -> str:
    """SOURCES.md of a built pack: corpora, packages (versions, licences, documents, characters), rules."""
    lines = [
        "# The docs pack: sources and provenance",
        "",
        f"Generated by `cptlab corpora fetch docs` (cptlab.data.packs, pack version {PACK_VERSION}); do not "
        "edit. Format: that of the shipped corpora (cptlab/data/corpora/SOURCES.md): xz (preset 9, CRC64) "
        "UTF-8, documents separated by a line holding only \\x1e, each starting with a title line "
        "`# <package>:<path>`.",
        "",
        "| corpus | language | documents | characters | xz bytes | sha256 |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, entry in files.items():
        lines.append(f"| {name} | {CORPORA[name]['language']} | {entry['documents']:,} | "
                     f"{entry['characters']:,} | {entry['xz_bytes']:,} | `{entry['sha256']}` |")
    lines += ["", *(f"- `{n}`: {c['description']}." for n, c in CORPORA.items()), "",
              "## Packages", "",
              "Each .deb is checked against the sha256 below before it is unpacked (Debian 12 bookworm).", "",
              "| package | version | corpus: documents / characters | dropped: short / other language / "
              "duplicate | licences |", "|---|---|---|---|---|"]
    for package in build.packages:
        row = build.stats[package.name]
        kept = "; ".join(f"{c}: {row['documents'][c]:,} / {row['characters'][c]:,}" for c in row["documents"])
        lines.append(f"| {package.name} | {package.version} | {kept or 'none'} | {row['short']} / "
                     f"{row['language']} / {row['duplicate']} | {row['licences']} |")
    lines += ["", "## Rules", "",
              "Files of each package (globs in its unpacked tree), in this order; regular files only:", ""]
    lines += [f"- {p.name}: " + "; ".join(f"`{r.glob}` ({r.kind}) -> {r.corpus}"
                                         + "".join(f", not `*{x}*`" for x in r.exclude) for r in p.rules)
              for p in build.packages]
    lines += ["", "Rendering: man pages `man --nh --nj -l FILE | col -bx`, POD `pod2text --loose`, HTML "
              "the visible text (stdlib html.parser; navigation, sidebars, scripts, styles left out), reST "
              "and AsciiDoc sources as written; all under LC_ALL=C.UTF-8, MANWIDTH=80. Then the cleaning "
              f"rules of the shipped corpora. Dropped: documents under {MIN_CHARS} characters, documents "
              "whose common words are not their corpus's language (untranslated pages), and exact "
              "duplicates of an earlier document of the pack (pack order).", ""]
    return "\n".join(lines)
