#!/usr/bin/env bash
# The paper on one GPU in one go, within a deadline, with no network: install the bundle's wheels (`make
# gpu-bundle`) into a target folder, check every import, unpack the scale's token cache, measure
# throughput, then `cptlab batch` (runs side by side on the GPU, every notebook through papermill,
# REPORT.md), all into the run folder RUN; a small tarball of what matters goes to $OUT.
#
#   scripts/gpu_reproduce.sh RUN                  # on a GPU machine: SCALE=small, DEVICE=cuda
#   scripts/gpu_reproduce.sh --check-imports      # install the bundle and check the imports, nothing else
#   make gpu-rehearsal                            # the same on a CPU (scripts/gpu_rehearsal.sh)
#
# Environment (defaults in brackets):
#   SCALE [small]  DEVICE [cuda]  PY [python3]  OUT []: where gpu_result.tar.gz, REPORT.md, runs_summary.md
#       and gpu_reproduce.log are copied at the end (the device machine's $OUT: a few files come back)
#   DEADLINE_S [480]  wall-clock seconds from the start by which everything is written (a device command
#       may run 600 s: this leaves time to look and to try again)
#   NOTEBOOKS_S [120] kept for the notebooks and the report once the runs have stopped; the runner's
#       stop grace (a trainer has 60 s to exit after SIGINT) is kept on top of it
#   BENCH_S [45]      at most this for each throughput benchmark (0: skip them)
#   BENCH_COMPILE [0] 1: also benchmark with torch.compile      MPS [0] 1: run under a CUDA MPS daemon
#   WORKERS []        runs side by side (default: chosen from the GPU's free memory)
#   BUNDLE [gpu-bundle]  its wheels/ are installed into SITE [/tmp/cptlab-site] (pip --no-index --target),
#       its cache-$SCALE.tar.xz is unpacked into the cache       PACK []: another cache tarball to unpack
#   DEBS []           a folder of the docs pack's .deb files: `cptlab corpora fetch docs --debs` from it
#   CPTLAB_CACHE [~/.cache/cptlab]  CPTLAB_RUNS [RUN/store] (the run store: checkpoints stay in RUN)
#
# RUN gets: REPORT.md, runs_summary.md/.json, throughput*.json, run_store.tar.gz (the runs' small files:
# `cptlab report DIR --scale S --runs WHERE` judges them again anywhere), the executed notebooks and their
# figures, environment.txt, imports.txt, gpu_reproduce.log and gpu_result.tar.gz (all of these but the
# notebooks and figures). A rerun into the same RUN resumes the run store and rewrites every result.
set -uo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
CHECK_ONLY=0
if [ "${1:-}" = --check-imports ]; then CHECK_ONLY=1; RUN=${RUN:-/tmp/cptlab-import-check}
elif [ -n "${1:-}" ]; then RUN=$1
else echo "usage: $0 RUN (the run folder: results, notebooks and the run store) | --check-imports" >&2; exit 2
fi
SCALE=${SCALE:-small}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-480}
NOTEBOOKS_S=${NOTEBOOKS_S:-120}
BENCH_S=${BENCH_S:-45}
BUNDLE=${BUNDLE:-$REPO/gpu-bundle}
SITE=${SITE:-/tmp/cptlab-site}
STOP_GRACE_S=60  # cptlab.study.runner.STOP_GRACE_S: a stopped trainer's time to exit before it is killed
FINISH_S=15      # for the tarballs and the copies to OUT
abs() { mkdir -p "$1" && (cd "$1" && pwd); }  # the notebooks' kernels run in notebooks/: no relative path
RUN=$(abs "$RUN") SITE=$(abs "$SITE")
if [ -d "$BUNDLE" ]; then BUNDLE=$(cd "$BUNDLE" && pwd); fi
export CPTLAB_CACHE=$(abs "${CPTLAB_CACHE:-$HOME/.cache/cptlab}")
export CPTLAB_RUNS=${CPTLAB_RUNS:-$RUN/store}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 HF_UPDATE_DOWNLOAD_COUNTS=0 TRANSFORMERS_OFFLINE=1
export PYTHONHASHSEED=0 PYTHONUNBUFFERED=1 MPLBACKEND=agg
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # this checkout's cptlab, for the kernels too
export CPTLAB_RUNS=$(abs "$CPTLAB_RUNS")
# A rerun writes every result again: none of an earlier run's may stand in for this one's.
(cd "$RUN" && rm -rf REPORT.md runs_summary.md runs_summary.json throughput*.json run_store.tar.gz \
    gpu_result.tar.gz environment.txt imports.txt gpu_reproduce.log STATUS ./[0-9][0-9]_*)
exec 3>&1 4>&2
exec > >(tee -a "$RUN/gpu_reproduce.log") 2>&1
TEE_PID=$!

left() { local s=$(( DEADLINE_S - ($(date +%s) - START) )); echo $(( s > 1 ? s : 1 )); }  # for timeout: >= 1
say() { echo "[gpu_reproduce $(( $(date +%s) - START ))s] $*"; }
STATUS="stopped before training"
MPS_STARTED=0

finish() {  # on every exit: the summary if no run got to write one, the tarball, the copies to OUT
    local rc=$?
    trap - EXIT
    if [ "$MPS_STARTED" = 1 ]; then echo quit | nvidia-cuda-mps-control; fi
    if [ ! -s "$RUN/runs_summary.md" ] && [ "$CHECK_ONLY" = 0 ]; then
        printf '# Runs summary\n\nno run trained: %s (exit %s; see gpu_reproduce.log)\n' "$STATUS" "$rc" \
            > "$RUN/runs_summary.md"
    fi
    echo "$STATUS (exit $rc)" > "$RUN/STATUS"
    say "done in $(( $(date +%s) - START ))s, exit $rc: $STATUS"
    exec 1>&3 2>&4 3>&- 4>&-
    wait "$TEE_PID" 2>/dev/null  # the log's last lines are written before it is packed
    if [ "$CHECK_ONLY" = 0 ]; then
        (cd "$RUN" && tar -czf gpu_result.tar.gz $(ls REPORT.md runs_summary.md \
            runs_summary.json throughput*.json run_store.tar.gz environment.txt imports.txt STATUS \
            gpu_reproduce.log 2>/dev/null))
        if [ -n "${OUT:-}" ]; then
            mkdir -p "$OUT"
            for f in gpu_result.tar.gz REPORT.md runs_summary.md gpu_reproduce.log; do
                if [ -f "$RUN/$f" ]; then cp "$RUN/$f" "$OUT/"; fi
            done
        fi
    fi
    exit "$rc"
}
trap finish EXIT

say "scale $SCALE, device $DEVICE, deadline ${DEADLINE_S}s, run folder $RUN, run store $CPTLAB_RUNS"

# 1. The bundle's wheels into SITE, then every import the run needs (a kernel started as papermill will).
if [ -d "$BUNDLE/wheels" ]; then
    rm -rf "$SITE"
    say "installing $(ls "$BUNDLE"/wheels/*.whl | wc -l) wheels from $BUNDLE into $SITE"
    timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$BUNDLE"/wheels/*.whl \
        || { STATUS="the bundle's wheels did not install"; exit 2; }
    export PYTHONPATH=$PYTHONPATH:$SITE
else
    say "no $BUNDLE/wheels: using the packages $PY has"
fi
timeout 120 "$PY" "$REPO/scripts/gpu_imports.py" > "$RUN/imports.txt" 2>&1
IMPORTS_RC=$?
cat "$RUN/imports.txt"
if [ "$IMPORTS_RC" != 0 ]; then STATUS="imports failed (imports.txt)"; exit 2; fi
if [ "$CHECK_ONLY" = 1 ]; then STATUS="imports checked"; exit 0; fi
{
    date -u; uname -a; nproc; free -g 2>/dev/null | head -2; df -h "$RUN" | tail -1
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$RUN/environment.txt" 2>&1
cat "$RUN/environment.txt"

# 2. The token cache: the bundle's (and PACK's) tarball, the docs pack from .deb files if given, then the
#    corpora the scale reads, tokenised with its vocabulary if not cached (that needs `datasets`).
CACHE=$CPTLAB_CACHE
for pack in "$BUNDLE/cache-$SCALE.tar.xz" ${PACK:-}; do
    if [ -f "$pack" ]; then
        say "unpacking $pack into $CACHE"
        timeout "$(left)" tar -xf "$pack" -C "$CACHE" || { STATUS="could not unpack $pack"; exit 2; }
    fi
done
if [ -n "${DEBS:-}" ]; then
    timeout "$(left)" "$PY" -m cptlab corpora fetch docs --debs "$DEBS" \
        || say "docs pack from $DEBS: FAILED or out of time (going on)"
fi
say "the scale's corpora (tokenised if not cached)"
timeout "$(left)" "$PY" -m cptlab corpora --scale "$SCALE" || { STATUS="token cache failed"; exit 2; }

# 3. CUDA MPS (MPS=1): a daemon of this job's own (pipes under /tmp), kept only if a CUDA process can
#    allocate through it.
if [ "${MPS:-0}" = 1 ]; then
    if command -v nvidia-cuda-mps-control >/dev/null; then
        export CUDA_MPS_PIPE_DIRECTORY=/tmp/cptlab-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/cptlab-mps/log
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; torch.ones(1, device='cuda')"; then
            MPS_STARTED=1
            say "CUDA MPS started and a CUDA allocation went through it"
        else
            echo quit | nvidia-cuda-mps-control 2>/dev/null
            unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
            say "CUDA MPS: could not start it or allocate through it (stopped; going on without)"
        fi
    else
        say "CUDA MPS: no nvidia-cuda-mps-control (going on without)"
    fi
fi

# 4. Throughput: one run of the scale, then as many side by side as the batch will train; with
#    BENCH_COMPILE=1 the same with torch.compile (throughput_compile.json).
bench() {  # bench FILE [ARGS...]
    local file=$1; shift
    say "throughput benchmark $* (at most ${BENCH_S}s) -> $file"
    timeout "$BENCH_S" "$PY" "$REPO/benchmarks/throughput.py" --device "$DEVICE" --scale "$SCALE" \
        --no-reference --steps 16 --rounds 4 --processes "${WORKERS:-0}" --out "$RUN/$file" "$@" \
        || say "throughput benchmark $*: FAILED or out of time (going on)"
}
if [ "$BENCH_S" -gt 0 ]; then
    bench throughput.json
    if [ "${BENCH_COMPILE:-0}" = 1 ]; then bench throughput_compile.json --compile; fi
fi

# 5. The batch: runs until the notebooks' time, the stop grace and the finish before the deadline, then
#    the notebooks and REPORT.md; no run's partial losses count as final.
TRAIN_S=$(( $(left) - NOTEBOOKS_S - STOP_GRACE_S - FINISH_S ))
if [ "$TRAIN_S" -le 0 ]; then STATUS="no time left to train (DEADLINE_S $DEADLINE_S)"; exit 3; fi
STATUS="training"
say "cptlab batch: training for at most ${TRAIN_S}s, then the notebooks"
timeout "$(( $(left) - FINISH_S > 10 ? $(left) - FINISH_S : 10 ))" "$PY" -m cptlab batch --scale "$SCALE" \
    --device "$DEVICE" --out "$RUN" --deadline "$TRAIN_S" ${WORKERS:+--workers "$WORKERS"}
BATCH_RC=$?
say "cptlab batch exited $BATCH_RC"
STATUS="batch exited $BATCH_RC"

# 6. What finished, kept small: the runs' small files, and a report if the batch did not get to write one.
(cd "$CPTLAB_RUNS" && find . -mindepth 3 -maxdepth 3 \( -name config.json -o -name labels.json \
    -o -name metrics.jsonl -o -name DONE -o -name run.yaml -o -name train.log \) -print0 \
    | tar --null -czf "$RUN/run_store.tar.gz" -T -)
if [ ! -s "$RUN/REPORT.md" ]; then
    say "no REPORT.md from the batch: writing it from the run store"
    timeout "$(( $(left) > 5 ? $(left) : 5 ))" "$PY" -m cptlab report "$RUN" --scale "$SCALE" \
        --device "$DEVICE" --runs "$CPTLAB_RUNS" || say "report: FAILED or out of time"
fi
ls -la "$RUN"
exit "$BATCH_RC"
