"""The GPU path on a CPU: the deadline's arithmetic, the bundle's recipe, the side-by-side benchmark's
start line and failures, the import check of scripts/gpu_reproduce.sh (with the lab's venv, and with the
dress rehearsal's venv and bundle where `make gpu-rehearsal` built them), and the notebooks after a deadline
that left their runs out."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cptlab import batch, cli
from cptlab.study import experiments as E
from cptlab.study import paper, runner

REPO = Path(__file__).resolve().parents[1]
REHEARSAL = REPO / "build" / "rehearsal"


def _script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_past_the_deadline_no_cuda_context_is_made(tmp_path, monkeypatch):
    """A notebook's run_all after the batch's deadline sizes no workers (on CUDA that asks the GPU's free
    memory: a CUDA context for nothing) and starts nothing."""
    def no_workers(*a, **k):
        raise AssertionError("default_workers called past the deadline")

    monkeypatch.setattr(runner, "default_workers", no_workers)
    monkeypatch.setenv(runner.DEADLINE_ENV, str(time.time() - 1))
    records, meta = runner.train_runs([E.base_run("smoke", device="cpu")], tmp_path, log=lambda s: None)
    assert [r.status for r in records] == ["not started"] and meta["workers"] == 1


def test_a_notebook_without_papermill_fails_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "papermill", None)  # `import papermill` raises ImportError
    assert not batch._execute(REPO / "notebooks" / "00_quickstart.ipynb", tmp_path / "x.ipynb", {})
    assert "FAILED (ModuleNotFoundError" in capsys.readouterr().out


def test_corpora_for_a_scale_tokenises_only_its_corpora(monkeypatch):
    seen = {}
    monkeypatch.setattr("cptlab.data.load_tokenizer", lambda cfg, registry: seen.setdefault("vocab", cfg))
    monkeypatch.setattr("cptlab.data.print_corpora_table",
                        lambda *a, names=None, **k: seen.update(names=names))
    assert cli.main(["corpora", "--scale", "small"]) == 0
    assert seen["names"] == list(paper.CORPORA) and seen["vocab"].vocab_size == 8192
    assert cli.main(["corpora", "--scale", "nope"]) == 2


def test_bundle_recipe_reads_the_image_list():
    bundle = _script("gpu_bundle", "scripts/gpu_bundle.py")
    image = bundle.image_packages()
    assert image["torch"] == "2.11.0" and image["huggingface-hub"] == "1.33.0" and image["pandas"] is None
    assert not {bundle.canonical(n) for n in bundle.NEEDED} & set(image)  # what the bundle must carry
    assert bundle.canonical("Jupyter_Client") == "jupyter-client"
    args = bundle.pip_target_args("3.12")
    assert args[:5] == ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    assert "manylinux2014_x86_64" in args


def test_side_by_side_copies_start_together_and_a_failed_one_is_reported(tmp_path):
    bench = _script("throughput_bench", "benchmarks/throughput.py")
    waiter = threading.Thread(target=bench.wait_at_barrier, args=(str(tmp_path), 30.0))
    waiter.start()
    deadline = time.monotonic() + 10
    while not any(p.name.startswith("ready-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiter.is_alive()  # ready, and waiting for the start
    (tmp_path / "go").touch()
    waiter.join(5)
    assert not waiter.is_alive()
    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('boom')"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert bench._child_result(failed) == {"error": "exit 1: boom"}


def test_gpu_reproduce_wants_a_run_folder():
    script = REPO / "scripts" / "gpu_reproduce.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def _check_imports(tmp_path: Path, python: Path, bundle: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=str(python), BUNDLE=str(bundle), SITE=str(tmp_path / "site"),
               RUN=str(tmp_path / "run"), CPTLAB_RUNS=str(tmp_path / "store"))
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_reproduce.sh"), "--check-imports"], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_import_check_passes_in_the_lab_venv(tmp_path):
    proc = _check_imports(tmp_path, Path(sys.executable), tmp_path / "no-bundle")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imports: all ok" in proc.stdout and "started and imported cptlab" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (REHEARSAL / "bundle" / "wheels").is_dir(), reason="`make gpu-rehearsal` builds it")
def test_import_check_passes_in_the_rehearsal_venv_with_its_bundle(tmp_path):
    """The GPU image's packages (build/rehearsal/venv) lack papermill and more: the bundle brings them."""
    python = REHEARSAL / "venv" / "bin" / "python"
    without = _check_imports(tmp_path, python, tmp_path / "no-bundle")
    assert without.returncode == 2 and "FAILED  papermill" in without.stdout
    proc = _check_imports(tmp_path, python, REHEARSAL / "bundle")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imports: all ok" in proc.stdout and str(tmp_path / "site") in proc.stdout


def _notebook_after_the_deadline(notebook: str, root: Path, tmp_path: Path, monkeypatch) -> str:
    """Run ``notebook`` at smoke on the run store ``root`` with a deadline already past; its text."""
    import papermill

    monkeypatch.setenv("CPTLAB_RUNS", str(root))
    monkeypatch.setenv(runner.DEADLINE_ENV, str(time.time() - 1))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / f"{notebook}.ipynb"
    params = {"scale": "smoke", "device": "cpu", "out_dir": str(tmp_path / "figures")}
    papermill.execute_notebook(str(REPO / "notebooks" / f"{notebook}.ipynb"), str(out), parameters=params,
                               cwd=str(REPO / "notebooks"), progress_bar=False)
    return out.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["05_infinite_schedules", "08_sequences"])
def test_notebooks_say_not_run_after_the_deadline(notebook, tmp_path, monkeypatch):
    """A deadline that left every run out: the notebook still runs and says so."""
    assert "not run" in _notebook_after_the_deadline(notebook, tmp_path / "runs", tmp_path, monkeypatch)


@pytest.mark.slow
def test_your_model_says_not_run_when_the_deadline_left_its_continual_runs_out(tmp_path, monkeypatch):
    """The rehearsal's case: the base model trained before the deadline, the continual runs from its
    import did not; the notebook imports, then says what it could not show or export."""
    root = tmp_path / "runs"
    runner.run_all([E.base_run("smoke", device="cpu")], root, workers=1)
    text = _notebook_after_the_deadline("10_your_model", root, tmp_path, monkeypatch)
    assert "not run: no continual run finished" in text and "nothing to export" in text


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_under_compile_writes_what_the_eager_path_writes(sign, monkeypatch):
    """torch.compile takes the out=-free form of the rotation (no graph break); it must be the same map."""
    from cptlab.training import model

    torch = pytest.importorskip("torch")
    x = torch.randn(2, 5, 3, 8)
    cos, sin = torch.randn(5, 1, 3), torch.randn(5, 1, 3)
    eager, compiled = torch.zeros_like(x), torch.zeros_like(x)
    model._rotate(x, eager, cos, sin, sign)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model._rotate(x, compiled, cos, sin, sign)
    torch.testing.assert_close(compiled, eager)
    assert compiled[..., 6:].abs().sum() == 0  # channels beyond 2 * cos.size(-1) untouched


def test_sequence_rows_of_runs_a_deadline_left_out_have_the_columns(tmp_path):
    from cptlab.analysis.sequences import sequence_rows
    from cptlab.study.sequences import sequence_study

    rows = sequence_rows(sequence_study("smoke", device="cpu"), tmp_path)
    assert rows.empty and list(dict.fromkeys(rows["variant"])) == []


def test_an_early_exit_still_writes_its_summary_and_tarball_and_no_earlier_result_stays(tmp_path):
    """A rerun into the same run folder that stops at the import check: the earlier REPORT.md,
    throughput.json and executed notebooks are gone, the runs summary says why nothing trained, the log
    ends with the script's last line (tee is waited for), and OUT gets the tarball."""
    import tarfile

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    for stale in ("REPORT.md", "throughput.json", "05_infinite_schedules.ipynb"):
        (run / stale).write_text("from an earlier run\n")
    env = dict(os.environ, PY="false", BUNDLE=str(tmp_path / "no-bundle"), OUT=str(out))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_reproduce.sh"), str(run)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert not any((run / stale).exists() for stale in ("REPORT.md", "throughput.json",
                                                        "05_infinite_schedules.ipynb"))
    assert "no run trained: imports failed" in (run / "runs_summary.md").read_text()
    assert "done in" in (run / "gpu_reproduce.log").read_text().strip().splitlines()[-1]
    with tarfile.open(out / "gpu_result.tar.gz") as tar:
        assert {"runs_summary.md", "gpu_reproduce.log", "STATUS", "imports.txt"} <= set(tar.getnames())
    back = sorted(p.name for p in out.iterdir())
    assert back == ["gpu_reproduce.log", "gpu_result.tar.gz", "runs_summary.md"]
