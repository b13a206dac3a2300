"""Text out of documentation files: cleaning, man pages (troff), HTML, POD, reStructuredText.

The cleaning rules are those of the shipped corpora (``scripts/build_corpora.py`` imports them from here),
and so is the output format: an xz-compressed UTF-8 text whose documents are separated by a line holding
only the ASCII record separator (``SEPARATOR``), each document starting with a title line ``# <source id>``.
Every function is deterministic: external renderers run under the fixed ``RENDER_ENV``.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

SEPARATOR = "\n\x1e\n"  # between two documents of a corpus file: a line holding only ASCII RS
XZ_PRESET = 9
RENDER_ENV = {
    "PATH": "/usr/bin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "MANWIDTH": "80",
    "MANPAGER": "cat",
    "PAGER": "cat",
}

# Words after which a line-final hyphen is a suspended compound ("Ein- und Aushängen", "pre- and post-").
SUSPENDED_HYPHEN_FOLLOWERS = {"und", "oder", "bzw", "sowie", "and", "or", "nor"}
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f\u00ad]")
_HYPHEN_BREAK = re.compile(r"(?<=[^\W\d_])([-\u2010])\n[ ]*(?=([^\W\d_]+))")
_BLANK_RUNS = re.compile(r"\n{3,}")


# -- cleaning (the rules of SOURCES.md's "Cleaning" section) -------------------------------------

def _join_hyphen(match: re.Match[str]) -> str:
    """Join a word broken after its hyphen; keep a space after suspended compounds ("Ein- und")."""
    following = match.group(2).lower()
    return match.group(1) + (" " if following in SUSPENDED_HYPHEN_FOLLOWERS else "")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent_block(block: list[str]) -> list[str]:
    """Remove the indentation common to all lines of a block."""
    width = min(_indent(line) for line in block)
    return [line[width:] for line in block]


def _dedent_paragraphs(lines: list[str]) -> list[str]:
    """Remove from each paragraph (run of non-blank lines) the indentation common to all its lines.

    A paragraph whose first line is unindented and whose other lines are all indented is a heading over
    its body (as man renders `NAME` over `       ls - list ...`): the body is dedented on its own.
    """
    out: list[str] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if line:
            block.append(line)
            continue
        if len(block) > 1 and _indent(block[0]) == 0 and all(_indent(b) > 0 for b in block[1:]):
            out += [block[0], *_dedent_block(block[1:])]
        elif block:
            out += _dedent_block(block)
        block = []
        out.append("")
    return out[:-1]


def clean_text(text: str) -> str:
    """Clean one document; the same rules apply to every corpus (see SOURCES.md)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL_CHARS.sub("", text)
    lines = [line.expandtabs(8).rstrip() for line in text.split("\n")]
    text = _HYPHEN_BREAK.sub(_join_hyphen, "\n".join(lines))
    text = "\n".join(_dedent_paragraphs(text.split("\n")))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def compress(text: str) -> bytes:
    """xz with a fixed preset and check: the same text always gives the same bytes."""
    return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=XZ_PRESET)


# -- man pages -----------------------------------------------------------------------------------

def read_man_source(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def is_so_redirect(path: Path) -> bool:
    """True when a man page's first request (after comments) is `.so`: it is an alias of another page."""
    for line in read_man_source(path).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(('.\\"', "'\\\"")):
            continue
        return stripped.startswith(".so ")
    return False


def _strip_header_footer(lines: list[str]) -> list[str]:
    """Drop man's running header (first non-blank line) and footer (last non-blank line)."""
    idx = [i for i, line in enumerate(lines) if line.strip()]
    if len(idx) >= 2 and lines[idx[0]].rstrip().endswith(")"):  # "LS(1)   User Commands   LS(1)"
        return lines[idx[0] + 1 : idx[-1]]
    return lines


def render_man(path: Path) -> str:
    """Render one man page to plain text: `man --nh --nj -l FILE | col -bx`, fixed width and locale."""
    man = subprocess.run(
        ["man", "--nh", "--nj", "-l", str(path)], capture_output=True, env=RENDER_ENV, check=False
    )
    col = subprocess.run(
        ["col", "-bx"], input=man.stdout, capture_output=True, env=RENDER_ENV, check=True
    )
    text = col.stdout.decode("utf-8", errors="replace")
    return "\n".join(_strip_header_footer(text.split("\n")))


# -- POD -----------------------------------------------------------------------------------------

def render_pod(path: Path) -> str:
    """Perl's POD as plain text: `pod2text --loose FILE` (fixed locale)."""
    proc = subprocess.run(["pod2text", "--loose", str(path)], capture_output=True, env=RENDER_ENV,
                          check=False)
    return proc.stdout.decode("utf-8", errors="replace")


# -- HTML ----------------------------------------------------------------------------------------

SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button", "form", "select", "template",
             "footer"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
             "wbr", "param"}
PARAGRAPH_TAGS = {"p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "blockquote",
                  "figure"}  # a blank line before and after
BOX_TAGS = {"div", "section", "article", "main", "header", "aside", "body", "center"}  # on their own lines
LINE_TAGS = {"li", "tr", "dt", "dd", "br", "hr", "caption", "figcaption"}  # start a line
CELL_TAGS = {"td", "th"}  # a space before
# Page furniture of the generators these packages use (DocBook, Sphinx, mdBook, texi2html, asciidoc,
# LibreOffice help, Django's and Node.js's themes).
SKIP_CLASSES = {"navheader", "navfooter", "sidebar", "sphinxsidebar", "related", "breadcrumbs",
                "breadcrumb", "footer", "header", "headerlink", "nav-chapters", "nav-wrapper", "menu-bar",
                "nav-wide-wrapper", "toc-wrapper", "search-wrapper", "navigation", "nav-footer",
                "copyright", "skiplink", "topbar", "lp-navigation", "nav-panel", "menu", "leftside",
                "rightside", "debug", "nav", "nav_table", "picker"}
SKIP_IDS = {"sidebar", "menu-bar", "searchbar-outer", "search-wrapper", "footer", "header", "navigation",
            "toc", "tocframe", "lp-navigation", "TopLeftHeader", "hd", "ft", "global-nav", "column2", "gtoc"}


class _TextParser(HTMLParser):
    """Collects the visible text of an HTML page, block elements on their own lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self.pre = 0

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag, start=True)
        if tag in VOID_TAGS:
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = (self._skipping() or tag in SKIP_TAGS or bool(classes & SKIP_CLASSES)
                or (a.get("id") or "") in SKIP_IDS or "hidden" in a)
        self.stack.append((tag, skip))
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        self._break(tag, start=False)
        if all(t != tag for t, _ in self.stack):
            return  # a stray end tag
        while self.stack:
            open_tag, _ = self.stack.pop()
            if open_tag == "pre":
                self.pre -= 1
            if open_tag == tag:
                break

    def _break(self, tag: str, start: bool) -> None:
        """The line breaks (or space) a tag puts into the text where it starts or ends."""
        if tag in PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag in BOX_TAGS or (start and tag in LINE_TAGS):
            self.parts.append("\n")
        elif start and tag in CELL_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self._skipping():
            return
        if not self.pre:
            data = re.sub(r"[ \t\r\n\f\v]+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The visible text of an HTML page (navigation, sidebars, scripts and styles left out)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return "\n".join(line.rstrip() for line in "".join(parser.parts).split("\n"))


def read_html(path: Path) -> str:
    """An HTML file's text: decoded as UTF-8 (Latin-1 if it is not valid UTF-8), then ``html_to_text``."""
    raw = path.read_bytes()
    try:
        html = raw.decode("utf-8")
    except UnicodeDecodeError:
        html = raw.decode("latin-1")
    return html_to_text(html)


# -- language ------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+")
DE_WORDS = {"der", "die", "das", "und", "ist", "nicht", "mit", "den", "ein", "eine", "für", "auf", "wird",
            "werden", "sie", "von", "dem", "zu", "des", "im", "oder", "wenn", "sich", "auch", "kann", "diese"}
EN_WORDS = {"the", "and", "is", "not", "with", "for", "on", "be", "are", "of", "to", "this", "that", "you",
            "it", "can", "if", "or", "which", "from", "by", "an", "will", "as", "use", "your"}


def language(text: str) -> str:
    """``de``, ``en`` or ``?``: which language's common words a text uses more (``?``: under 20 of them)."""
    words = [w.lower() for w in _WORD.findall(text[:20000])]
    de = sum(w in DE_WORDS for w in words)
    en = sum(w in EN_WORDS for w in words)
    if de + en < 20:
        return "?"
    return "de" if de > en else "en"
