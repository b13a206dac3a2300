#!/usr/bin/env bash
# The CPU dress rehearsal of the GPU command (`make gpu-rehearsal`): scripts/gpu_reproduce.sh run by an
# interpreter that holds only the GPU image's packages (those cptlab's imports need, from
# scripts/gpu_image_packages.txt, with the CPU torch 2.13 in place of the image's CUDA torch 2.11) plus a
# bundle of the same recipe as `make gpu-bundle` (for this Python, at SCALE=smoke), DEVICE=cpu, with a
# deadline that leaves runs out.
#
#   scripts/gpu_rehearsal.sh [venv|bundle|imports|run|all]      (default: all)
#
# Environment: REHEARSAL [build/rehearsal] its folder (venv/, bundle/, runs/, out/); PYTHON [python3] the
# interpreter the venv is made from; DEADLINE_S [720] the rehearsal's deadline, of which NOTEBOOKS_S [420]
# for the notebooks (a 2-core CPU runs them slower than the GPU machine's 16 cores); SCALE [smoke].
# The GPU image has Python 3.12; a venv of another Python gets the bundle's wheels for that Python.
set -euo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${REHEARSAL:-build/rehearsal}
PYTHON=${PYTHON:-python3}
SCALE=${SCALE:-smoke}
VENV=$REHEARSAL/venv
# The image's packages that cptlab and the bundle's packages import (their own needs come with them and
# must be in the image's list too: `venv` checks), at the versions seen there where known.
IMAGE_NEEDS=(numpy pandas matplotlib pyyaml tqdm filelock tokenizers huggingface-hub safetensors pyarrow
             fsspec xxhash requests aiohttp psutil packaging pygments attrs click httpx scipy threadpoolctl
             transformers)  # transformers: cptlab import / export (notebook 10)

venv() {
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    local pins; pins=$(mktemp)
    grep -v '^#' scripts/gpu_image_packages.txt | grep '==' | grep -v -e '^torch' -e '^numpy' >"$pins"
    "$VENV/bin/python" -m pip install --quiet 'torch==2.13.0+cpu'
    "$VENV/bin/python" -m pip install --quiet -c "$pins" "${IMAGE_NEEDS[@]}"
    rm -f "$pins"
    # Everything in the venv must be in the image's list (pip itself aside).
    "$VENV/bin/python" - <<'EOF'
import re
from importlib import metadata
from pathlib import Path

canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {canon(l.split("==")[0]) for l in Path("scripts/gpu_image_packages.txt").read_text().splitlines()
         if l.strip() and not l.startswith("#")}
extra = sorted({canon(d.metadata["Name"]) for d in metadata.distributions()} - image - {"pip"})
print(f"[rehearsal] venv: {len(list(metadata.distributions()))} packages"
      + (f"; NOT in the GPU image's list: {', '.join(extra)}" if extra else ", all in the GPU image's list"))
EOF
}

bundle() {
    local version; version=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    .venv/bin/python scripts/gpu_bundle.py --python-version "$version" --scale "$SCALE" --out "$REHEARSAL/bundle" \
        --unpin numpy  # as the venv: the image's numpy 2.5.2 has no wheel for every Python
}

imports() {  # the GPU script's own import check, with the venv and the bundle
    PY=$VENV/bin/python BUNDLE=$REHEARSAL/bundle SITE=$REHEARSAL/site scripts/gpu_reproduce.sh --check-imports
}

run() {
    rm -rf "$REHEARSAL/runs" "$REHEARSAL/out" "$REHEARSAL/site"
    local start; start=$(date +%s)
    PY=$VENV/bin/python BUNDLE=$REHEARSAL/bundle SITE=$REHEARSAL/site OUT=$REHEARSAL/out DEVICE=cpu \
        SCALE=$SCALE DEADLINE_S=${DEADLINE_S:-720} NOTEBOOKS_S=${NOTEBOOKS_S:-420} CPTLAB_CACHE=$REHEARSAL/cache \
        scripts/gpu_reproduce.sh "$REHEARSAL/runs" || echo "[rehearsal] gpu_reproduce.sh exited $?"
    echo "[rehearsal] wall time $(( $(date +%s) - start ))s; $REHEARSAL/out holds:"
    ls -la "$REHEARSAL/out"
    tar -tzf "$REHEARSAL/out/gpu_result.tar.gz"
}

case "${1:-all}" in
    venv) venv ;;
    bundle) bundle ;;
    imports) imports ;;
    run) run ;;
    all) venv; bundle; imports; run ;;
    *) echo "usage: $0 [venv|bundle|imports|run|all]" >&2; exit 2 ;;
esac
