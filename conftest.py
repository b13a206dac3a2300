"""Shared test set-up, at the root so that `pytest --nbmake notebooks` alone uses it too.

Tests run offline (Hugging Face libraries never touch the network) and write nothing outside temporary
folders: the token cache and the run store of the whole session (notebooks under nbmake included: their
kernels inherit this environment) live in one temporary folder, one per pytest-xdist worker. Notebooks run
at the smoke scale."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

_session = tempfile.mkdtemp(prefix="cptlab-tests-")
atexit.register(shutil.rmtree, _session, True)
# pytest-xdist's workers inherit the controller's environment: a folder that the controller's copy of this
# file made is replaced by the worker's own, so that two workers never train into one run store.
_inherited = os.environ.get("CPTLAB_TEST_SESSION")
for _name, _sub in (("CPTLAB_CACHE", "cache"), ("CPTLAB_RUNS", "runs")):
    if _name not in os.environ or (_inherited and os.environ[_name].startswith(_inherited + os.sep)):
        os.environ[_name] = os.path.join(_session, _sub)
os.environ["CPTLAB_TEST_SESSION"] = _session
os.environ.setdefault("CPTLAB_SCALE", "smoke")  # notebooks under nbmake run at the smoke scale
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # one thread per worker: torch's default (every core) in each of N workers oversubscribes the cores, and
    # OpenMP's waiting threads spin. Tests that need more threads set them; the runner sets its workers'.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
