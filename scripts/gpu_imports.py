"""Check, before any training, that this interpreter imports everything ``scripts/gpu_reproduce.sh`` needs:
the GPU image's packages, the bundle's (``make gpu-bundle``), cptlab from this checkout, and a Jupyter kernel
that papermill can start and that imports cptlab too. Prints one line per check; exits 1 if a required one
fails (``datasets`` is needed only to tokenise what the cache lacks: its failure is reported, not fatal).

    PYTHONPATH=REPO:SITE python3 scripts/gpu_imports.py
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REQUIRED = ("torch", "numpy", "pandas", "matplotlib", "scipy", "threadpoolctl", "yaml", "tqdm", "filelock",
            "tokenizers", "papermill", "nbclient", "nbformat", "ipykernel", "jupyter_client", "ipywidgets",
            "IPython", "zmq", "cptlab.cli", "cptlab.batch", "cptlab.analysis.report", "cptlab.study.runner",
            "cptlab.ui", "cptlab.viz")
OPTIONAL = ("datasets",)  # only to build shards the cache lacks


def check_import(name: str) -> str | None:
    """None if ``name`` imports, else why not (one line)."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported the same way
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"ok      {name} {getattr(module, '__version__', '')} ({getattr(module, '__file__', '')})")
    return None


def check_kernel(timeout: float = 60.0) -> str | None:
    """Start the ``python3`` kernel papermill uses, in notebooks/ as papermill does (a relative path on
    PYTHONPATH fails there), and import cptlab in it; None if it worked, else why not."""
    from jupyter_client.manager import start_new_kernel

    start = time.perf_counter()
    try:
        manager, client = start_new_kernel(kernel_name="python3", startup_timeout=timeout,
                                           cwd=str(NOTEBOOKS))
    except Exception as exc:  # noqa: BLE001
        return f"kernel did not start: {type(exc).__name__}: {exc}"
    printed: list[str] = []

    def keep(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"].strip())

    try:
        reply = client.execute_interactive("import sys, cptlab.analysis.report, IPython.display; "
                                           "print(sys.executable)", timeout=timeout, output_hook=keep)
        if reply["content"]["status"] != "ok":
            return f"the kernel could not import cptlab: {reply['content'].get('evalue', '')}"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    print(f"ok      kernel python3 ({' '.join(printed)}) started and imported cptlab in "
          f"{time.perf_counter() - start:.1f}s")
    return None


def main() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    failed = []
    for name in REQUIRED:
        why = check_import(name)
        if why:
            print(f"FAILED  {name}: {why}")
            failed.append(name)
    for name in OPTIONAL:
        why = check_import(name)
        if why:
            print(f"missing {name} (needed only to tokenise what the cache lacks): {why}")
    if not failed:
        why = check_kernel()
        if why:
            print(f"FAILED  {why}")
            failed.append("kernel")
    print(f"imports: {'FAILED: ' + ', '.join(failed) if failed else 'all ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
