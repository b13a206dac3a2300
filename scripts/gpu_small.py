"""Train a scale's runs (default ``small``) on one GPU within a hard wall-clock deadline, then write its
report from whatever finished: a thin wrapper over ``cptlab.study.runner.run_all`` (which owns the
scheduling: runs side by side, the deadline, the experiments' priority, the runs summary), no notebooks.

    PYTHONUNBUFFERED=1 CPTLAB_CACHE=.gpucache python3 scripts/gpu_small.py --deadline-s 500 \\
        --root /tmp/cptlab-small-runs --out "$OUT" [--workers 3]
    # on a CPU, end to end in a minute or two:
    python scripts/gpu_small.py --scale smoke --device cpu --workers 1 --deadline-s 60 --out /tmp/smoke

``--out`` gets runs_summary.md and runs_summary.json (``cptlab.study.scheduler.write_summary``),
run_store.tar.gz (the run store's small files: config.json, labels.json, metrics.jsonl, DONE, run.yaml; no
checkpoints; unpack anywhere and ``cptlab report DIR --scale small --runs WHERE --device cuda``) and
REPORT.md. With the notebooks too: ``cptlab batch --scale small --device cuda --deadline S --out DIR``, or
``scripts/gpu_reproduce.sh``. The token shards and tokenizer must be in ``$CPTLAB_CACHE`` already
(``--build-cache`` builds them where ``datasets`` is installed); this is checked before any training.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the deadline counts from here, before the slow imports

import argparse  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cptlab import data  # noqa: E402
from cptlab.analysis.report import write_report  # noqa: E402
from cptlab.analysis.results import experiment_runs  # noqa: E402
from cptlab.config import TokenizerConfig  # noqa: E402
from cptlab.study import runner, scheduler  # noqa: E402
from cptlab.study.scales import SCALES, get_scale  # noqa: E402

SMALL_FILES = ("config.json", "labels.json", "metrics.jsonl", "DONE", "run.yaml", "train.log")


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def check_cache(scale: str) -> None:
    """The tokenizer and every corpus's shards must be cached already (a GPU machine may lack
    ``datasets``); exit with a message if not."""
    s = get_scale(scale)
    registry = data.Registry()
    try:
        tokenizer = data.load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=s.vocab_size), registry)
        metas = {name: data.shard_meta(name, tokenizer, registry) for name in registry.names()}
    except ImportError as exc:
        sys.exit(f"cache {data.cache_root()} lacks the vocab {s.vocab_size} tokenizer or shards and they "
                 f"cannot be built here ({exc}); build them with --build-cache where datasets is installed")
    sizes = ", ".join(f"{n} {m['tokens']['train']:,}" for n, m in metas.items())
    say(f"cache {data.cache_root()}: tokenizer {tokenizer.fingerprint} (vocab {tokenizer.vocab_size}), "
        f"train tokens {sizes}")


def write_tar(root: Path, out: Path) -> Path:
    """run_store.tar.gz: the small files of every run directory under ``root`` (no checkpoints)."""
    path = out / "run_store.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for run_dir in sorted(p.parent for p in root.glob("*/*/labels.json")):
            for name in SMALL_FILES:
                if (run_dir / name).exists():
                    tar.add(run_dir / name, arcname=str((run_dir / name).relative_to(root)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--device", default="cuda", help="the runs' train.device (part of their config)")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="wall-clock seconds from start by which all is done, the report included")
    parser.add_argument("--reserve-s", type=float, default=runner.STOP_GRACE_S + 30.0,
                        help="seconds before the deadline at which training stops: the runner's stop grace "
                        f"({runner.STOP_GRACE_S:.0f} s for a trainer to exit) and the summary and report")
    parser.add_argument("--root", default="/tmp/cptlab-small-runs", help="run store")
    parser.add_argument("--out", default="gpu_small_out", help="where the report, summary and tarball go")
    parser.add_argument("--workers", type=int, default=None, help="runs side by side (default: from memory)")
    parser.add_argument("--order", default=",".join(scheduler.PRIORITY),
                        help="experiments whose runs start first, comma-separated (then the others); "
                        f"default {','.join(scheduler.PRIORITY)}")
    parser.add_argument("--build-cache", action="store_true",
                        help="only build the scale's tokenizer and shards in $CPTLAB_CACHE, then exit")
    args = parser.parse_args()
    if args.build_cache:
        check_cache(args.scale)
        return
    if args.reserve_s < runner.STOP_GRACE_S:
        sys.exit(f"--reserve-s: must hold the runner's stop grace, >= {runner.STOP_GRACE_S:.0f}, got "
                 f"{args.reserve_s:g}")
    root, out = Path(args.root).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_cache(args.scale)
    runs = [r for group in experiment_runs(args.scale, args.device).values() for r in group]
    order = tuple(g.strip() for g in args.order.split(",") if g.strip())
    train_s = args.deadline_s - args.reserve_s - (time.monotonic() - T0)
    if train_s <= 0:
        sys.exit(f"--deadline-s: no time left to train after --reserve-s ({time.monotonic() - T0:.0f}s gone)")
    try:
        runner.run_all(runs, root, workers=args.workers, log=say, deadline=train_s, order=order, summary=out)
    except RuntimeError as exc:  # failed runs: reported, the report is still written
        say(f"runs: FAILED ({exc})")
    tar = write_tar(root, out)
    say(f"wrote {out / 'runs_summary.md'}, {tar} ({tar.stat().st_size:,} bytes)")
    write_report(out, scale=args.scale, runs=root, device=args.device, log=say)
    say("finished")


if __name__ == "__main__":
    main()
