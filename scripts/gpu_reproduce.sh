#!/usr/bin/env bash
# The paper on one GPU in one go, within a deadline (no network needed): warm the token cache, measure
# throughput, then `cptlab batch` (runs side by side on the GPU, every notebook through papermill,
# REPORT.md), all into one folder.
#
#   scripts/gpu_reproduce.sh [OUT]                       # on a GPU machine: SCALE=small, DEVICE=cuda
#   SCALE=smoke DEVICE=cpu DEADLINE_S=240 scripts/gpu_reproduce.sh /tmp/gpu-smoke   # the same on a CPU
#
# Environment (defaults in brackets):
#   SCALE [small]  DEVICE [cuda]  OUT [runs/gpu-$SCALE]  PY [.venv/bin/python, else python3]
#   DEADLINE_S [600]  wall-clock seconds from the start by which everything is written
#   NOTEBOOKS_S [150] of which kept for the notebooks and the report after the last run stops
#   BENCH_S [90]      at most this for each throughput benchmark (0: skip them)
#   BENCH_COMPILE [0] 1: also benchmark with torch.compile      MPS [0] 1: run under a CUDA MPS daemon
#   WORKERS []        runs side by side (default: chosen from the GPU's free memory)
#   PACK []           a .tar(.xz|.gz) of a built cache (docs pack and/or shards) to unpack into the cache
#   DEBS []           a folder of the docs pack's .deb files: `cptlab corpora fetch docs --debs` from it
#   CPTLAB_CACHE [~/.cache/cptlab]  CPTLAB_RUNS [/tmp/cptlab-$SCALE-runs] (checkpoints stay out of OUT)
#
# OUT gets: REPORT.md, runs_summary.md/.json, throughput.json, run_store.tar.gz (the runs' small files:
# `cptlab report DIR --scale S --runs WHERE` judges them again anywhere), the executed notebooks,
# environment.txt and gpu_reproduce.log.
set -uo pipefail

START=$(date +%s)
SCALE=${SCALE:-small}
DEVICE=${DEVICE:-cuda}
OUT=${1:-${OUT:-runs/gpu-$SCALE}}
DEADLINE_S=${DEADLINE_S:-600}
NOTEBOOKS_S=${NOTEBOOKS_S:-150}
BENCH_S=${BENCH_S:-90}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export CPTLAB_RUNS=${CPTLAB_RUNS:-/tmp/cptlab-$SCALE-runs}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_UPDATE_DOWNLOAD_COUNTS=0 TRANSFORMERS_OFFLINE=1
export PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$CPTLAB_RUNS"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_reproduce.log") 2>&1

left() { local s=$(( DEADLINE_S - ($(date +%s) - START) )); echo $(( s > 1 ? s : 1 )); }  # for timeout: >= 1
say() { echo "[gpu_reproduce $(( $(date +%s) - START ))s] $*"; }

say "scale $SCALE, device $DEVICE, deadline ${DEADLINE_S}s, out $OUT, run store $CPTLAB_RUNS"
{
    date -u; uname -a; nproc; free -g 2>/dev/null | head -2
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 1. The token cache: a built pack if given, the docs pack from .deb files if given, then every corpus
#    tokenised with the scale's vocabulary (on all cores; nothing is done for what is cached already).
if [ -n "${PACK:-}" ]; then
    CACHE=${CPTLAB_CACHE:-$HOME/.cache/cptlab}
    mkdir -p "$CACHE"
    say "unpacking $PACK into $CACHE"
    tar -xf "$PACK" -C "$CACHE" || { say "FAILED to unpack $PACK"; exit 2; }
fi
if [ -n "${DEBS:-}" ]; then
    "$PY" -m cptlab corpora fetch docs --debs "$DEBS" || say "docs pack from $DEBS: FAILED (going on)"
fi
VOCAB=$("$PY" -c "from cptlab.study.scales import get_scale; print(get_scale('$SCALE').vocab_size)") || exit 2
say "tokenising what is not cached (vocab $VOCAB)"
timeout "$(left)" "$PY" -m cptlab corpora --vocab-size "$VOCAB" || { say "cache: FAILED"; exit 2; }

# 2. Throughput: one run of the scale, then as many side by side as the batch will train; with
#    BENCH_COMPILE=1 the same with torch.compile (throughput_compile.json). MPS=1 starts a CUDA MPS
#    daemon of this job's own (pipe and log folders under OUT) for the benchmark and the batch.
if [ "${MPS:-0}" = 1 ]; then
    if command -v nvidia-cuda-mps-control >/dev/null; then
        export CUDA_MPS_PIPE_DIRECTORY=$OUT/mps/pipe CUDA_MPS_LOG_DIRECTORY=$OUT/mps/log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d; then
            trap 'echo quit | nvidia-cuda-mps-control' EXIT
            say "CUDA MPS started (pipe $CUDA_MPS_PIPE_DIRECTORY)"
        else
            say "CUDA MPS: could not start it (going on without)"
        fi
    else
        say "CUDA MPS: no nvidia-cuda-mps-control (going on without)"
    fi
fi
bench() {  # bench FILE [ARGS...]
    local file=$1; shift
    say "throughput benchmark $* (at most ${BENCH_S}s) -> $file"
    timeout "$BENCH_S" "$PY" benchmarks/throughput.py --device "$DEVICE" --scale "$SCALE" --no-reference \
        --steps 16 --rounds 4 --processes "${WORKERS:-0}" --out "$OUT/$file" "$@" \
        || say "throughput benchmark $*: FAILED or out of time (going on)"
}
if [ "$BENCH_S" -gt 0 ]; then
    bench throughput.json
    if [ "${BENCH_COMPILE:-0}" = 1 ]; then bench throughput_compile.json --compile; fi
fi

# 3. The batch: runs until NOTEBOOKS_S before the deadline, then the notebooks and REPORT.md.
TRAIN_S=$(( $(left) - NOTEBOOKS_S ))
if [ "$TRAIN_S" -le 0 ]; then say "no time left to train (DEADLINE_S $DEADLINE_S)"; exit 3; fi
say "cptlab batch: training for at most ${TRAIN_S}s, then the notebooks"
timeout "$(( $(left) > 20 ? $(left) - 10 : 10 ))" "$PY" -m cptlab batch --scale "$SCALE" --device "$DEVICE" --out "$OUT" \
    --deadline "$TRAIN_S" ${WORKERS:+--workers "$WORKERS"}
BATCH_RC=$?
say "cptlab batch exited $BATCH_RC"

# 4. What finished, kept small: the runs' small files, and a report if the batch did not get to write one.
(cd "$CPTLAB_RUNS" && find . -mindepth 3 -maxdepth 3 \( -name config.json -o -name labels.json \
    -o -name metrics.jsonl -o -name DONE -o -name run.yaml \) -print0 | tar --null -czf "$OUT/run_store.tar.gz" -T -)
if [ ! -s "$OUT/REPORT.md" ]; then
    say "no REPORT.md from the batch: writing it from the run store"
    "$PY" -m cptlab report "$OUT" --scale "$SCALE" --device "$DEVICE" --runs "$CPTLAB_RUNS" || true
fi
say "done in $(( $(date +%s) - START ))s; $OUT holds:"
ls -la "$OUT"
exit "$BATCH_RC"
