"""The documentation: the site builds with `mkdocs build --strict`, the README's and the guides' blocks
marked runnable run, every other shell or Python block says why not, and the reference pages list what
the code holds.

A block is marked on the line just above its opening fence:
    <!-- runnable -->             run it (bash with `set -euo pipefail`, python with this interpreter)
    <!-- file: NAME -->           write it to NAME, for the runnable blocks after it on the page
    <!-- not runnable: WHY -->    leave it, for the reason given
The runnable blocks of a page run in order in one temporary folder, with `cptlab` on the PATH running this
checkout and the session's token cache (conftest.py), at the smoke scale."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_OR_PYTHON = {"bash", "sh", "shell", "console", "python", "py", "pycon"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(runnable|file:\s*(\S+)|not runnable:\s*(\S.*?))\s*-->")


@dataclasses.dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str  # "runnable", "file", "not runnable" or ""
    file: str = ""

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with the marker on the line above each."""
    text, out = page.read_text(), []
    for fence in FENCE.finditer(text):
        before = text[:fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(before.strip())
        kind = "" if mark is None else ("file" if mark.group(2) else mark.group(1).split(":")[0])
        out.append(Block(page, text[:fence.start()].count("\n") + 1, fence.group(1).lower(), fence.group(2),
                         kind, mark.group(2) if mark and mark.group(2) else ""))
    return out


def test_every_shell_and_python_block_runs_or_says_why_not():
    unmarked = [b.where() for page in PAGES for b in blocks(page)
                if b.lang in SHELL_OR_PYTHON and b.mark not in ("runnable", "not runnable")]
    assert not unmarked, ("mark these blocks on the line above the fence with <!-- runnable --> or "
                          f"<!-- not runnable: why -->: {unmarked}")


def test_markers_are_spelled_right():
    stray = [f"{page.relative_to(ROOT)}: {m}" for page in PAGES
             for m in re.findall(r"<!--\s*(?:not\s*)?(?:runnable|file)[^>]*-->", page.read_text())
             if not MARK.fullmatch(m)]
    assert not stray, ("markers that are not <!-- runnable -->, <!-- file: NAME --> or "
                       f"<!-- not runnable: why -->: {stray}")


RUNNABLE = [page for page in PAGES if any(b.mark == "runnable" for b in blocks(page))]


@pytest.fixture
def shell_env(tmp_path) -> dict[str, str]:
    """The environment the blocks run in: `cptlab` is `python -m cptlab` of this checkout."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "cptlab").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cptlab "$@"\n')
    (bin_dir / "cptlab").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                CPTLAB_RUNS=str(tmp_path / "runs"), MPLBACKEND="Agg")


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_runnable_blocks_run(page, tmp_path, shell_env):
    for block in blocks(page):
        if block.mark == "file":
            (tmp_path / block.file).write_text(block.code)
        if block.mark != "runnable":
            continue
        cmd = (["bash", "-euo", "pipefail", "-c", block.code] if block.lang in ("bash", "sh", "shell")
               else [sys.executable, "-c", block.code])
        done = subprocess.run(cmd, cwd=tmp_path, env=shell_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (f"{block.where()} failed ({done.returncode}):\n{block.code}\n"
                                      f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page the nav leaves out, a notebook or a
    docstring that does not render fails it. Offline: no plugin fetches anything."""
    pytest.importorskip("mkdocs", reason="mkdocs is missing (pip install -e '.[dev]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-5000:]}{done.stderr[-5000:]}"
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "notebooks" / "03_replay.html").exists()


def test_site_links_follow_the_readme_and_the_notebooks_into_the_site():
    import runpy

    site_links = runpy.run_path(str(ROOT / "scripts" / "docs_hooks.py"))["site_links"]
    assert site_links("[a](docs/training.md) ![f](docs/x.png) [n](notebooks/00_quickstart.ipynb)",
                      "index.md") == "[a](training.md) ![f](x.png) [n](notebooks/00_quickstart.ipynb)"
    assert site_links("[n](../notebooks/03_replay.ipynb) [r](../README.md#guides)", "widgets.md") == (
        "[n](notebooks/03_replay.ipynb) [r](index.md#guides)")
    assert site_links("[n](../../notebooks/03_replay.ipynb)", "api/index.md") == (
        "[n](../notebooks/03_replay.ipynb)")


def test_the_config_reference_lists_every_field():
    from cptlab import config as C
    from cptlab.data.corpus import USER_KEYS
    from cptlab.schedules import ScheduleConfig

    page = (ROOT / "docs" / "config-reference.md").read_text()
    sections = {"model": C.ModelConfig, "tokenizer": C.TokenizerConfig, "train": C.TrainConfig,
                "eval": C.EvalConfig, "stages[i]": C.Stage, "stages[i].schedule": ScheduleConfig,
                "stages[i].replay": C.ReplayConfig, "stages[i].regularizer": C.RegularizerConfig}
    keys = [f"{prefix}.{f.name}" for prefix, cls in sections.items() for f in dataclasses.fields(cls)]
    keys += [f"corpora.NAME.{key}" for key in USER_KEYS]
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"docs/config-reference.md lacks a row for {missing}"
    assert {f.name for f in dataclasses.fields(C.RunConfig)} == {"model", "tokenizer", "train", "eval",
                                                                 "stages", "corpora"}


def test_the_findings_table_is_up_to_date():
    from cptlab.analysis.findings import findings_table

    assert findings_table() in (ROOT / "docs" / "reproduction.md").read_text(), (
        "docs/reproduction.md's findings table differs from findings.findings_table(); paste it again")
