"""Shared test set-up, at the root so that `pytest --nbmake notebooks` alone uses it too.

Tests run offline (Hugging Face libraries never touch the network) and write nothing outside temporary
folders: the token cache and the run store of the whole session (notebooks under nbmake included: their
kernels inherit this environment) live in one temporary folder. Notebooks run at the smoke scale."""

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
os.environ.setdefault("CPTLAB_CACHE", os.path.join(_session, "cache"))
os.environ.setdefault("CPTLAB_RUNS", os.path.join(_session, "runs"))
os.environ.setdefault("CPTLAB_SCALE", "smoke")  # notebooks under nbmake run at the smoke scale
