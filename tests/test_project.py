"""The project's own files agree with each other."""

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"] + extras["dev"] + extras["cluster"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section
    listed = [d for d in env["dependencies"] if isinstance(d, str)] + [d for d in pip_section if d != "-e ."]
    conda_names = {"pytorch": "torch", "ray-client": "ray"}  # conda-forge's names of pip packages
    conda = {conda_names.get(_name(d), _name(d)) for d in listed} - {"python", "pip"}
    assert conda == wanted, f"only in environment.yml: {conda - wanted}; only in pyproject: {wanted - conda}"


def test_torch_range_admits_the_local_cpu_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if _name(d) == "torch"]
    lo = re.search(r">=\s*([\d.]+)", torch).group(1)
    hi = re.search(r"<\s*([\d.]+)", torch).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    assert as_tuple(lo) <= (2, 13, 0) < as_tuple(hi)


def test_notebooks_are_committed_without_outputs():
    import json

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"


def test_no_function_is_longer_than_the_limit_unless_a_comment_says_why():
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "function_lengths.py"))
    rows = script["function_lengths"](ROOT / "cptlab")
    too_long = [f"{where} ({n} lines)" for n, where, excused in rows if n > script["LIMIT"] and not excused]
    assert not too_long, f"longer than {script['LIMIT']} lines with no comment saying why: {too_long}"


def test_the_cluster_error_names_the_cluster_extras_ray_range():
    from cptlab.study.ray_executor import RAY_RANGE

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cluster"] == [f"ray[client]{RAY_RANGE}"]


def test_xdist_processes_get_their_own_store_and_one_thread(tmp_path):
    """``make test``'s pytest-xdist processes: the root conftest.py gives each its own run store and token
    cache (never the controller's, which they inherit) and one torch thread."""
    import json
    import os
    import subprocess
    import sys

    report = tmp_path / "seen.jsonl"
    (tmp_path / "test_seen.py").write_text(
        "import json, os, torch\n"
        "def _seen():\n"
        f"    with open({str(report)!r}, 'a') as f:\n"
        "        f.write(json.dumps({k: os.environ.get(k) for k in ('PYTEST_XDIST_WORKER', 'CPTLAB_RUNS',\n"
        "                            'CPTLAB_CACHE')} | {'threads': torch.get_num_threads()}) + '\\n')\n"
        "def test_a():\n    _seen()\n"
        "def test_b():\n    _seen()\n")
    # as a fresh `make test` starts: none of this session's folders or threads set
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("CPTLAB_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "load", str(tmp_path / "test_seen.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(s["PYTEST_XDIST_WORKER"] for s in seen) == ["gw0", "gw1"]
    # both inherit the controller's folders: two different ones mean each replaced them with its own
    assert len({s["CPTLAB_RUNS"] for s in seen}) == 2 and len({s["CPTLAB_CACHE"] for s in seen}) == 2
    assert all(s["threads"] == 1 for s in seen)
