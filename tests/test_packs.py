"""The docs pack: fetch and build from a small .deb the test makes itself (dpkg-deb), offline; the pack's
corpora in the registry; the corpora table as JSON; parallel tokenising."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cptlab import cli, data
from cptlab.config import ConfigError, RunConfig
from cptlab.data import packs, shards
from cptlab.data.corpus import SEPARATOR, doc_key, split_mask
from cptlab.data.extract import clean_text, html_to_text

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("man") is None,
                                reason="needs dpkg-deb and man (Debian)")

EN_TEXT = ("The tool reads the file and writes the result to the output. It is used for the data that the "
           "user gives on the command line, and it can be run with options. ")
DE_TEXT = ("Das Werkzeug liest die Datei und schreibt das Ergebnis in die Ausgabe. Es wird für die Daten "
           "verwendet, die der Benutzer auf der Befehlszeile angibt, und es kann mit Optionen laufen. ")
MAN = ".TH DEMO 1\n.SH NAME\ndemo \\- {title}\n.SH DESCRIPTION\n{body}\n"


def _html(title: str, body: str) -> str:
    return (f"<html><head><title>{title}</title><style>p {{}}</style></head><body>"
            f"<div class='navheader'>Prev Next Home</div><h1>{title}</h1><p>{body}</p>"
            f"<pre>  code  line</pre><script>var x;</script></body></html>")


def _files(root: Path) -> None:
    """A package tree: English and German HTML, man pages (one an alias), POD, reST, a stub, a duplicate,
    an untranslated German page and a symbolic link."""
    doc = root / "usr/share/doc/demo-doc"
    for lang, text in (("en", EN_TEXT), ("de", DE_TEXT)):
        (doc / lang).mkdir(parents=True)
        for i in range(6):
            (doc / lang / f"page{i}.html").write_text(_html(f"{lang} {i}", text * (3 + i)), encoding="utf-8")
    (doc / "de" / "untranslated.html").write_text(_html("x", EN_TEXT * 4), encoding="utf-8")
    (doc / "en" / "stub.html").write_text(_html("s", "Moved."), encoding="utf-8")
    (doc / "en" / "zcopy.html").write_text((doc / "en" / "page0.html").read_text(), encoding="utf-8")
    os.symlink("page1.html", doc / "en" / "link.html")
    (doc / "copyright").write_text("Format: x\n\nFiles: *\nLicense: GPL-2+\n", encoding="utf-8")
    for text, sub in ((EN_TEXT, "man1"), (DE_TEXT, "de/man1")):
        man = root / "usr/share/man" / sub
        man.mkdir(parents=True)
        page = MAN.format(title="demo", body=text * 4).encode()
        (man / "demo.1.gz").write_bytes(gzip.compress(page, mtime=0))
        (man / "alias.1.gz").write_bytes(gzip.compress(b".so man1/demo.1\n", mtime=0))
    other = root / "usr/share/doc/other"
    other.mkdir(parents=True)
    (other / "guide.pod").write_text(f"=head1 NAME\n\nguide - a guide\n\n=head1 TEXT\n\n{EN_TEXT * 4}\n",
                                     encoding="utf-8")
    (other / "intro.rst.txt").write_text(f"Intro\n=====\n\n{EN_TEXT * 5}\n", encoding="utf-8")


def _deb(tmp: Path) -> Path:
    root = tmp / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text("Package: demo-doc\nVersion: 1.0-1\nArchitecture: all\n"
                                         "Maintainer: t <t@example.org>\nDescription: demo\n")
    _files(root)
    debs = tmp / "debs"
    debs.mkdir()
    out = debs / "demo-doc_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture()
def demo_pack(tmp_path, monkeypatch):
    """The docs pack redefined as one package, the .deb the test built; returns (cache, debs)."""
    deb = _deb(tmp_path)
    sha = hashlib.sha256(deb.read_bytes()).hexdigest()
    rules = (packs.Rule("usr/share/man/de/man1/*", "man", packs.DE),
             packs.Rule("usr/share/doc/demo-doc/de/*.html", "html", packs.DE),
             packs.Rule("usr/share/man/man1/*", "man", packs.EN),
             packs.Rule("usr/share/doc/demo-doc/en/*.html", "html", packs.EN, exclude=("page5",)),
             packs.Rule("usr/share/doc/other/*.pod", "pod", packs.OTHER),
             packs.Rule("usr/share/doc/other/*.rst.txt", "text", packs.OTHER))
    monkeypatch.setitem(packs.PACKS, "docs", (packs.Package("demo-doc", "1.0-1", sha, rules),))
    cache = tmp_path / "cache"
    return cache, deb.parent


def _documents(path: Path) -> list[tuple[str, str]]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        docs = f.read().split(SEPARATOR)
    return [tuple(doc.split("\n", 1)) for doc in docs]


def pack_is_disjoint(cache: Path) -> dict[str, int]:
    """Check that no title or content is in two corpora, nor in both splits of one; documents per corpus."""
    titles: dict[str, str] = {}
    hashes: dict[bytes, str] = {}
    counts = {}
    for name in packs.CORPORA:
        docs = _documents(packs.corpus_file(cache, name))
        for title, body in docs:
            assert title.startswith("# ") and title not in titles, f"{title}: {name}, {titles.get(title)}"
            digest = hashlib.sha256(body.encode()).digest()
            assert digest not in hashes, f"{title}: its text is in {hashes[digest]} too"
            titles[title], hashes[digest] = name, name
        texts = [f"{t}\n{b}" for t, b in docs]  # a loaded document keeps its title line
        is_val = split_mask([doc_key(t) for t in texts], [len(t) for t in texts])
        assert not {t for t, v in zip(texts, is_val) if v} & {t for t, v in zip(texts, is_val) if not v}
        counts[name] = len(docs)
    return counts


def test_fetch_builds_the_pack_from_pinned_debs_deterministically(demo_pack, capsys):
    cache, debs = demo_pack
    manifest = packs.fetch("docs", cache, workers=2, debs=debs)
    assert manifest["status"] == "built"
    titles = {name: [t for t, _ in _documents(packs.corpus_file(cache, name))] for name in packs.CORPORA}
    p = "# demo-doc:usr/share"
    assert titles["docs-de"] == [f"{p}/man/de/man1/demo.1.gz"] + [
        f"{p}/doc/demo-doc/de/page{i}.html" for i in range(6)]  # untranslated.html: English, dropped
    assert titles["docs-en"] == [f"{p}/man/man1/demo.1.gz"] + [
        f"{p}/doc/demo-doc/en/page{i}.html" for i in range(5)]  # no alias, copy, link, stub, page5
    assert titles["docs-en-other"] == [f"{p}/doc/other/guide.pod", f"{p}/doc/other/intro.rst.txt"]
    assert pack_is_disjoint(cache) == {"docs-de": 7, "docs-en": 6, "docs-en-other": 2}
    body = dict(_documents(packs.corpus_file(cache, "docs-en")))[f"{p}/doc/demo-doc/en/page0.html"]
    assert body.startswith("en 0\n\nThe tool reads") and "Prev Next" not in body and "var x" not in body
    assert body.endswith("\n\ncode  line")  # a paragraph loses its common indentation
    sources = (cache / "packs/docs/SOURCES.md").read_text()
    assert "| demo-doc | 1.0-1 |" in sources and "GPL-2+" in sources and "1 / 1 / 1 |" in sources

    files = {n: packs.corpus_file(cache, n).read_bytes() for n in packs.CORPORA}
    again = packs.fetch("docs", cache, workers=1, debs=debs)  # a no-op: checksums verified
    assert again["status"] == "verified" and again["files"] == manifest["files"]
    rebuilt = packs.fetch("docs", cache, workers=1, debs=debs, rebuild=True)
    assert rebuilt["status"] == "rebuilt, byte-identical"
    assert files == {n: packs.corpus_file(cache, n).read_bytes() for n in packs.CORPORA}
    packs.corpus_file(cache, "docs-de").write_bytes(b"changed")  # a damaged file is rebuilt
    assert packs.fetch("docs", cache, workers=1, debs=debs)["status"] == "built"
    assert "checksums verified" in capsys.readouterr().out


def test_pack_corpora_register_once_built(demo_pack, tmp_path):
    cache, debs = demo_pack
    empty = data.Registry(cache_dir=str(tmp_path / "empty"))
    assert not any(n.startswith("docs-") for n in empty.names())
    assert empty.unbuilt() == list(packs.CORPORA)
    with pytest.raises(data.DataError, match=r"^corpus 'docs-de' is not built: run `cptlab corpora fetch "
                                             r"docs`$"):
        empty.documents("docs-de")
    cfg = RunConfig.from_dict({"stages": [{"name": "a", "data": {"docs-de": 1.0}, "tokens": 100000}]})
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\)\.data: corpus 'docs-de' is not built .*"
                                          r"run `cptlab corpora fetch docs`"):
        cfg.validate(empty.names())

    packs.fetch("docs", cache, workers=1, debs=debs)
    reg = data.Registry(cache_dir=str(cache))
    assert reg.names()[-3:] == list(packs.CORPORA) and reg.unbuilt() == []
    assert reg.info("docs-de")["language"] == "de"
    assert reg.documents("docs-en-other")["text"][0].startswith("# demo-doc:usr/share/doc/other/guide.pod\n")
    cfg.validate(reg.names())
    with pytest.raises(data.DataError, match=r"corpora\.docs-en: 'docs-en' is a docs pack corpus"):
        data.Registry({"docs-en": {"path": str(tmp_path)}})


def test_corpora_json_and_the_line_about_unbuilt_pack_corpora(demo_pack, tmp_path, monkeypatch):
    cache, debs = demo_pack
    byte = data.Tokenizer("byte")
    with monkeypatch.context() as m:  # the shipped corpora are not tokenised here
        m.setattr(shards, "corpora_table", lambda *args: [])
        out = io.StringIO()
        data.print_corpora_table(data.Registry(cache_dir=str(tmp_path / "empty")), byte, file=out)
    assert out.getvalue().splitlines()[-1] == ("not built: docs-en, docs-de, docs-en-other (run `cptlab "
                                               "corpora fetch docs`)")
    packs.fetch("docs", cache, workers=1, debs=debs)
    reg = data.Registry(cache_dir=str(cache), include_shipped=False)  # the pack's corpora, built
    out = io.StringIO()
    data.print_corpora_table(reg, byte, cache, file=out, as_json=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["name"] for r in rows] == list(packs.CORPORA)
    assert set(rows[0]) == {"name", "language", "domain", "documents", "characters", "train_tokens",
                            "val_tokens"}
    assert rows[1]["language"] == "de" and rows[1]["documents"] == 7 and rows[1]["train_tokens"] > 0


def test_cli_fetch_and_its_errors(demo_pack, monkeypatch, capsys):
    cache, debs = demo_pack
    monkeypatch.setenv("CPTLAB_CACHE", str(cache))
    assert cli.main(["corpora", "fetch", "docs", "--debs", str(debs), "--workers", "1"]) == 0
    assert "docs pack built" in capsys.readouterr().out
    assert cli.main(["corpora", "fetch", "docs", "--debs", str(debs)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["corpora", "fetch"]) == 2
    assert "expected `fetch PACK` (PACK one of: docs)" in capsys.readouterr().err
    assert cli.main(["corpora", "fetch", "books"]) == 2
    assert "pack: 'books' not known; known packs: docs" in capsys.readouterr().err


def test_without_apt_the_error_points_to_the_web_data_path(demo_pack, tmp_path, monkeypatch):
    cache, _ = demo_pack
    monkeypatch.setattr(packs.shutil, "which", lambda name: None if name == "apt-get" else "/usr/bin/x")
    with pytest.raises(data.DataError, match=r"demo-doc_1\.0-1\.deb is not in .* this machine has no "
                                             r"apt-get; .* or use the web-data path"):
        packs.fetch("docs", tmp_path / "fresh-cache", workers=1)


def test_html_text_leaves_out_page_furniture():
    html = ("<html><head><title>T</title></head><body><nav>menu</nav><div class='sphinxsidebar'>side</div>"
            "<h2>Title</h2><p>One   two\nthree &amp; four.</p><ul><li>a</li><li>b</li></ul>"
            "<div hidden>x</div><pre>  a\n    b</pre></body></html>")
    assert clean_text(html_to_text(html)) == "Title\n\nOne two three & four.\n\na\nb\n\na\n  b"


def test_parallel_tokenising_gives_the_serial_tokens(tmp_path, monkeypatch):
    docs = [f"document {i} " + "word " * (i % 50) for i in range(400)]
    (tmp_path / "c.txt").write_text(SEPARATOR.join(docs))
    byte = data.Tokenizer("byte")
    serial = data.token_shard("c", "train", byte, data.Registry({"c": {"path": str(tmp_path / "c.txt")}},
                                                                cache_dir=str(tmp_path / "a")))
    monkeypatch.setattr(shards, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(shards.os, "cpu_count", lambda: 2)
    parallel = data.token_shard("c", "train", byte, data.Registry({"c": {"path": str(tmp_path / "c.txt")}},
                                                                  cache_dir=str(tmp_path / "b")))
    assert np.array_equal(serial, parallel)


@pytest.mark.skipif(not (Path.home() / ".cache/cptlab/packs/docs/manifest.json").exists(),
                    reason="the docs pack is not built in ~/.cache/cptlab")
def test_the_built_docs_pack_is_disjoint():
    counts = pack_is_disjoint(Path.home() / ".cache/cptlab")
    assert min(counts.values()) > 100
