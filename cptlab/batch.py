"""Execute the lab's notebooks with papermill (``cptlab batch``), at any scale."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds cptlab/
NOTEBOOK_DIR = PACKAGE_ROOT / "notebooks"
NOTEBOOK_SLOTS = 2  # notebooks executed side by side after the runs (their kernels mostly plot and fit laws)


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and default values of the cell tagged ``parameters``."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            values: dict[str, Any] = {}
            exec(compile(source, str(path), "exec"), {}, values)  # the cell holds plain assignments
            return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}
    return {}


def run_batch(notebooks: list[str] | None = None, *, scale: str = "tiny", device: str = "auto",
              out: str | Path = "runs/batch", params: dict[str, Any] | None = None,
              prefetch: bool = True, workers: int | None = None, deadline: float | None = None,
              cluster: str | None = None, store: str = "shared", keep_checkpoints: str = "final") -> int:
    """Run each notebook (all in ``notebooks/`` by default) into ``out``; a notebook that takes
    ``shift`` runs once per shift. A failing notebook is saved with its error and the rest still run;
    returns 0 when all succeeded, 1 otherwise.

    With every notebook and ``prefetch``, the runs of all experiments are trained first in one go
    (``workers`` side by side, default ``runner.default_workers``), so the cores or the GPU stay busy
    across notebooks; the notebooks then find their runs in the store; ``out`` gets runs_summary.md/.json.
    ``deadline``: seconds from now after which no run starts (the runs still training are stopped; the
    experiments' priority, ``scheduler.PRIORITY``, decides which start first); the notebooks and report
    use the runs that finished. After runs trained up front, ``NOTEBOOK_SLOTS`` notebooks run side by
    side. ``cluster``: the runs train on Ray (``runner.run_all``'s options)."""
    called = time.time()  # the deadline counts from the call, not from after the imports (torch: seconds)
    from cptlab.study.runner import DEADLINE_ENV

    _check_options(scale, workers, deadline, bool(notebooks))
    cluster_options = _cluster_options(cluster, store, keep_checkpoints, workers)
    paths = [Path(p) for p in notebooks] if notebooks else sorted(NOTEBOOK_DIR.glob("[0-9]*.ipynb"))
    parameters = {path: _parameters(path) for path in paths}  # every notebook read before any work
    _kernel_environment(None if deadline is None else called + deadline)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    total_start = time.perf_counter()
    if not notebooks and prefetch:
        failed += _prefetch(scale, device, out, workers, deadline, cluster_options)
    runs_s = time.perf_counter() - total_start
    side_by_side = not notebooks and prefetch and (os.cpu_count() or 1) > 1  # their runs trained up front
    groups = [_notebook_runs(path, parameters[path], scale, device, out, params) for path in paths]
    failed += _execute_groups(groups, NOTEBOOK_SLOTS if side_by_side else 1)
    notebooks_s = time.perf_counter() - total_start - runs_s
    print(f"[batch] {len(failed)} failed of the notebooks run, {time.perf_counter() - total_start:.0f}s "
          f"in all; executed notebooks in {out}", flush=True)
    report_start = time.perf_counter()
    try:  # the findings judged on the runs the notebooks trained, with links to their figures
        from cptlab.analysis.report import write_report

        write_report(out, scale=scale, device=device, log=lambda line: print(line, flush=True))
    except Exception as exc:  # noqa: BLE001 - reported; the notebooks' results are kept
        failed.append("report")
        print(f"[batch] report: FAILED ({type(exc).__name__}: {exc})", flush=True)
    trained_first = out if not notebooks and prefetch else None  # else its runs_summary.json is older
    print(time_line(trained_first, runs_s, notebooks_s, time.perf_counter() - report_start), flush=True)
    if deadline is not None:
        os.environ.pop(DEADLINE_ENV, None)
    if failed:
        print(f"[batch] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def time_line(out: Path | None, runs_s: float, notebooks_s: float, report_s: float) -> str:
    """Where the batch's time went: the runs trained up front (and, from ``out``/runs_summary.json, their
    sections summed over runs, so side-by-side runs add up to more than the wall time), the notebooks
    (with any runs they trained themselves) and the report."""
    line = f"[batch] time: runs {runs_s:.0f}s"
    try:
        totals = json.loads((out / "runs_summary.json").read_text()).get("run_seconds") or {} if out else {}
    except (OSError, ValueError):
        totals = {}
    if totals:
        names = {"startup": "start-up", "data": "data", "steps": "steps", "eval": "evaluation",
                 "checkpoint": "checkpoints", "rest": "rest"}
        line += " (summed over runs: " + ", ".join(f"{names.get(k, k)} {v:.0f}s" for k, v in totals.items())
        line += ")"
    return line + f", notebooks {notebooks_s:.0f}s, report {report_s:.0f}s"


def _kernel_environment(deadline_at: float | None) -> None:
    """What the notebooks' kernels (run in notebooks/) and the report inherit: the deadline (a Unix time:
    they start no run after it either), the run store as an absolute path, and this cptlab on their path
    (an uninstalled checkout too)."""
    from cptlab.study.runner import DEADLINE_ENV
    from cptlab.training.store import runs_root

    if deadline_at is not None:
        os.environ[DEADLINE_ENV] = str(deadline_at)
    os.environ["CPTLAB_RUNS"] = str(runs_root())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))
                                               if p)


def _check_options(scale: str, workers: int | None, deadline: float | None, named: bool = False) -> None:
    """A one-line ConfigError naming the option, before any notebook runs. ``named``: notebooks were named
    (then no runs are trained first, and ``workers`` would be ignored)."""
    from cptlab.config import ConfigError
    from cptlab.study.scales import get_scale

    try:
        get_scale(scale)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    cores = os.cpu_count() or 1
    if workers is not None and workers > cores:
        raise ConfigError(f"--workers: at most {cores} (this machine's cores: each run trains in a process "
                          f"of its own), got {workers}")
    if workers is not None and named:
        raise ConfigError("--workers: only used when every notebook runs (their runs are trained first, side "
                          "by side); named notebooks train their own runs: leave --workers out")
    if deadline is not None and not deadline > 0:
        raise ConfigError(f"--deadline: must be > 0 seconds, got {deadline:g}")


def _parameters(path: Path) -> dict[str, Any]:
    """``notebook_parameters`` of a notebook checked to exist and to be one (a one-line ConfigError)."""
    from cptlab.config import ConfigError

    if not path.is_file():
        raise ConfigError(f"notebooks: {path} does not exist" if not path.exists() else
                          f"notebooks: {path} is a folder; give notebook files (.ipynb)")
    try:
        return notebook_parameters(path)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"notebooks: {path} is not a Jupyter notebook (.ipynb JSON with cells)") from None


def _cluster_options(cluster: str | None, store: str, keep_checkpoints: str,
                     workers: int | None) -> dict[str, str]:
    """``runner.run_all``'s cluster options ({} without ``cluster``), checked: one-line ConfigErrors for
    ``--cluster`` and its options (Ray not installed included)."""
    from cptlab.config import ConfigError
    from cptlab.study.ray_executor import check_options

    if cluster is None:
        return {}
    check_options(cluster, store, keep_checkpoints)
    if workers is not None:
        raise ConfigError("--workers: not with --cluster (the cluster's resources say how many runs train "
                          "side by side)")
    return {"cluster": cluster, "store_mode": store, "keep_checkpoints": keep_checkpoints}


def _notebook_runs(path: Path, defaults: dict[str, Any], scale: str, device: str, out: Path,
                   params: dict[str, Any] | None) -> list[tuple[Path, Path, dict[str, Any]]]:
    """(notebook, executed copy, parameters) of each execution of ``path``: one per shift where it takes
    ``shift`` and ``params`` do not fix it, else one."""
    shifts = ["weak", "strong"] if "shift" in defaults and "shift" not in (params or {}) else [None]
    executions = []
    for shift in shifts:
        name = path.stem + (f"-{shift}" if shift else "")
        values = {"scale": scale, "device": device, "out_dir": str(out / name), **(params or {})}
        if shift:
            values["shift"] = shift
        executions.append((path, out / f"{name}.ipynb", {k: v for k, v in values.items() if k in defaults}))
    return executions


def _execute_groups(groups: list[list[tuple[Path, Path, dict[str, Any]]]], slots: int) -> list[str]:
    """Execute the notebooks of ``groups``, ``slots`` groups side by side (threads: each notebook runs in
    its own kernel process) and the executions of one group in turn (the shifts of a notebook may start
    from the same runs, and notebook 10's each train on all cores); the failed ones' names, in order."""
    def run(group: list[tuple[Path, Path, dict[str, Any]]]) -> list[str]:
        return [executed.stem for path, executed, values in group if not _execute(path, executed, values)]

    if slots <= 1 or len(groups) <= 1:
        return [name for group in groups for name in run(group)]
    with ThreadPoolExecutor(slots) as pool:
        return [name for names in pool.map(run, groups) for name in names]


def _execute(path: Path, executed: Path, parameters: dict[str, Any]) -> bool:
    """Execute one notebook into ``executed`` with papermill (saved with its error if it fails); says how it
    went and returns whether it succeeded (not without papermill: the report is still written)."""
    start = time.perf_counter()
    print(f"[batch] {executed.stem}: running at scale {parameters.get('scale')} ...", flush=True)
    try:
        import papermill  # imported here: a second or two that `cptlab --help` need not pay

        papermill.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                                   progress_bar=False)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - papermill saved the notebook with its error
        status = f"FAILED ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]})"
    print(f"[batch] {executed.stem}: {status} in {time.perf_counter() - start:.1f}s", flush=True)
    return status == "ok"


def _prefetch(scale: str, device: str, out: Path, workers: int | None = None,
              deadline: float | None = None, cluster_options: dict[str, str] | None = None) -> list[str]:
    """Train every experiment's runs of ``scale`` side by side (on a Ray cluster with
    ``cluster_options``), with the runs summary in ``out``; the failed ones' names (else [])."""
    from cptlab.analysis.results import experiment_runs
    from cptlab.study import runner, scheduler
    from cptlab.study.scales import SCALES

    if scale not in SCALES:
        return []
    runs = [r for group in experiment_runs(scale, device).values() for r in group]
    start = time.perf_counter()
    print(f"[batch] training the runs of every experiment at scale {scale} ...", flush=True)
    try:
        runner.run_all(runs, workers=workers, log=lambda line: print(line, flush=True), summary=out,
                       order=scheduler.PRIORITY if deadline is not None else None, **(cluster_options or {}))
    except RuntimeError as exc:
        print(f"[batch] runs: FAILED ({exc})", flush=True)
        return ["runs"]
    print(f"[batch] runs done in {time.perf_counter() - start:.0f}s", flush=True)
    return []
