"""MkDocs hooks (mkdocs.yml `hooks:`): the site's start page is the README, and the notebooks are rendered
from `notebooks/`, so neither is copied into docs/.

Links are written for GitHub, where the README sits at the repository root and the guides in docs/: the
README links `docs/training.md`, a guide links `../notebooks/03_replay.ipynb` and `../README.md`. In the
site the README is `index.md` and the notebooks are `notebooks/*.ipynb` beside the guides, so those links
are rewritten before MkDocs checks them; every other link is checked as written."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    """Add README.md as the start page and every notebook of notebooks/ as a page."""
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / "README.md")))
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # src_dir: mkdocs-jupyter needs one
        files.append(File(f"notebooks/{notebook.name}", str(ROOT), config["site_dir"],
                          config["use_directory_urls"]))
    return files


def site_links(markdown: str, src_uri: str) -> str:
    """Rewrite a page's GitHub-relative links to the README and the notebooks into the site's paths."""
    if src_uri == "index.md":  # the README: its links into docs/ lose the prefix
        return re.sub(r"(\]\(|src=\")docs/", r"\1", markdown)
    up = "../" * src_uri.count("/")  # from this page to docs/
    markdown = markdown.replace(f"]({up}../notebooks/", f"]({up}notebooks/")
    return re.sub(rf"\]\({re.escape(up)}\.\./README\.md", f"]({up}index.md", markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return site_links(markdown, page.file.src_uri)
