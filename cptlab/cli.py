"""Command line: ``cptlab train | batch | report | corpora | eval | export | import | merge | worker``
(or ``python -m cptlab``)."""

from __future__ import annotations

import argparse
import os
import sys

# Offline by default: local data never needs the hub. Users with a network and a hub corpus set
# HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0.
for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")



def _cmd_train(args: argparse.Namespace) -> int:
    from cptlab.config import RunConfig
    from cptlab.training.train import train

    cfg = RunConfig.load(args.config, args.set)
    result = train(cfg, args.out, quiet=args.quiet, runs_root=args.runs, wait=args.wait)
    return 0 if result.status == "done" else 1


def _cmd_worker(args: argparse.Namespace) -> int:
    from cptlab.training.worker import main

    return main()


def _cmd_corpora(args: argparse.Namespace) -> int:
    from cptlab import data
    from cptlab.config import ConfigError, RunConfig, TokenizerConfig

    if args.action:
        return _fetch_pack(args)
    user = RunConfig.load(args.config).corpora if args.config else {}
    registry = data.Registry(user)
    names, vocab_size = None, args.vocab_size
    if args.scale:  # the scale's vocabulary and the corpora its experiments read, nothing else
        from cptlab.study import paper
        from cptlab.study.scales import get_scale

        try:
            vocab_size = get_scale(args.scale).vocab_size
        except ValueError as exc:
            raise ConfigError(f"--{exc}") from None
        names = list(paper.CORPORA)
    tok_cfg = TokenizerConfig(kind=args.tokenizer, vocab_size=vocab_size)
    tokenizer = data.load_tokenizer(tok_cfg, registry)
    data.print_corpora_table(registry, tokenizer, as_json=args.json, names=names)
    return 0


def _fetch_pack(args: argparse.Namespace) -> int:
    """``cptlab corpora fetch PACK``: build a corpus pack into the cache (see cptlab.data.packs)."""
    import time
    from pathlib import Path

    from cptlab.data import packs
    from cptlab.data.corpus import cache_root

    if len(args.action) != 2 or args.action[0] != "fetch":
        print(f"cptlab corpora: expected `fetch PACK` (PACK one of: {', '.join(packs.PACKS)}), got "
              f"{' '.join(args.action)!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    packs.fetch(args.action[1], cache_root(), workers=args.workers, rebuild=args.rebuild,
                debs=Path(args.debs) if args.debs else None)
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from cptlab.batch import run_batch

    params = {name: value for name, value in (args.param or [])}
    return run_batch(args.notebooks, scale=args.scale, device=args.device, out=args.out, params=params,
                     workers=args.workers, deadline=args.deadline, cluster=args.cluster, store=args.store,
                     keep_checkpoints=args.keep_checkpoints)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from cptlab.interop.evaluate import evaluate_run

    result = evaluate_run(args.run, text=args.text, corpus=args.corpus, stage=args.stage,
                          precision=args.precision)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['source']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over "
              f"{result['tokens']:,} tokens ({result['sequences']} sequences), stage {result['stage']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from cptlab.interop.export import export_run

    out = export_run(args.run, args.out, stage=args.stage, check=not args.no_check)
    kind = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.run} to {out} (transformers {kind}, tokenizer, README.md)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from cptlab.interop.pretrained import import_model

    result = import_model(args.src, args.out, name=args.name, eval_sets=args.eval or [],
                          stand_in=args.stand_in, n_ctx=args.n_ctx,
                          train={"seq_len": args.seq_len} if args.seq_len else None, run_id=args.run_id)
    done = "already there, not redone" if result["reused"] else "written"
    print(f"imported {args.src} ({result['family']}, {result['parameters']:,} parameters, logits within "
          f"{result['logit_diff']:.2g} of transformers') as {result['run']} ({done})")
    ref = f"{{experiment: pretrained, run: {result['run_id']}, stage: pretrained}}"
    print(f"continue it with init_from: {ref}")
    vals = "  ".join(f"{k} {v:.4f}" for k, v in result["val"].items())
    print(f"val {vals}" if vals else "no --eval corpora: nothing evaluated")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from cptlab.interop.merge import merge_runs, parse_weights

    stage = args.stage.split(",") if args.stage and "," in args.stage else args.stage
    result = merge_runs(args.runs, parse_weights(args.weights), args.out, stage=stage)
    weights = ", ".join(f"{w:g}" for w in result["weights"])
    done = "already there, not redone" if result["reused"] else "written"
    print(f"merged {len(args.runs)} runs (weights {weights}) into {result['out']} ({done}); "
          f"{result['tokens']:,} training tokens behind it, 0 trained by the merge")
    vals = "  ".join(f"{k} {v:.4f}" for k, v in result["val"].items())
    print(f"val {vals}" if vals else "no eval sets: nothing evaluated")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cptlab.analysis.report import write_report

    write_report(args.dir, scale=args.scale, runs=args.runs, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a run config; resumes if DIR holds the same run")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.1.replay.fraction=0.05")
    p.add_argument("--runs", default=None, metavar="ROOT",
                   help="run store in which a stage's init_from {experiment, run, stage} is found "
                        "(default: the store that holds DIR, i.e. DIR/../..)")
    p.add_argument("--wait", action="store_true",
                   help="if another trainer holds DIR, wait for it to finish instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("worker", help="train jobs read from stdin, one JSON line each, one after another "
                                      "(the runner's persistent trainer; see cptlab.training.worker)")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("corpora", help="list the corpora with their sizes in tokens; `fetch docs` builds the "
                                       "docs pack")
    p.add_argument("action", nargs="*", metavar="fetch PACK",
                   help="`fetch docs`: build the docs pack into the cache (Debian packages, apt-get)")
    p.add_argument("--config", help="a run config whose user corpora to include")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "byte"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--scale", help="only the corpora a scale's runs read, at its vocabulary size")
    p.add_argument("--json", action="store_true", help="one JSON object per corpus")
    p.add_argument("--workers", type=int, default=None, help="fetch: extracting processes (default: cores)")
    p.add_argument("--rebuild", action="store_true",
                   help="fetch: build again and check the files are byte-identical to the recorded ones")
    p.add_argument("--debs", help="fetch: a folder of .deb files to use (the pack's missing ones are "
                                  "downloaded into it; default: download into the cache)")
    p.set_defaults(func=_cmd_corpora)

    p = sub.add_parser("batch", help="execute notebooks with papermill")
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: all in notebooks/)")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/batch")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="extra notebook parameter")
    _add_run_options(p)
    p.set_defaults(func=_cmd_batch)

    _add_model_commands(sub)

    p = sub.add_parser("report", help="judge the paper's findings on a scale's runs; write DIR/REPORT.md")
    p.add_argument("dir", help="output directory (the batch's --out); figures are linked from under it")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--runs", default=None, help="run store root (default: $CPTLAB_RUNS or ./runs)")
    p.add_argument("--device", default="auto", help="device the runs were built for (part of their config)")
    p.set_defaults(func=_cmd_report)
    return parser


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """``cptlab eval | export | import | merge``: a run's model elsewhere, and runs' models averaged."""
    p = sub.add_parser("eval", help="a run's loss on a text file or a corpus's validation split")
    p.add_argument("run", help="run directory")
    p.add_argument("--text", help="a UTF-8 text file, read as one document")
    p.add_argument("--corpus", help="a corpus whose validation split to read (as the trainer evaluates)")
    p.add_argument("--stage", help="the stage whose end checkpoint to use (default: the last)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="default: the run's")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a sentence")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="a run's model as a Hugging Face transformers folder")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--stage", help="the stage whose end checkpoint to export (default: the last)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the two models' logits")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="a pretrained transformers model (folder or hub id) as a run to "
                                      "continue")
    p.add_argument("src", help="a transformers model folder (safetensors, single or sharded) or a hub id")
    p.add_argument("--out", help="the run store (default: $CPTLAB_RUNS, else ./runs); the run lands in "
                                 "OUT/pretrained/<name>-<hash>")
    p.add_argument("--name", help="the run's name (default: the source folder's name)")
    p.add_argument("--run-id", help="the run's whole id instead of <name>-<hash> (recipes name their base "
                                    "so)")
    p.add_argument("--eval", action="append", metavar="CORPUS", help="a corpus to evaluate on (repeatable)")
    p.add_argument("--stand-in", metavar="CORPUS",
                   help="the corpus standing in for the pretraining data (default: the first --eval)")
    p.add_argument("--n-ctx", type=int, help="the context kept (default: the model's, at most 8192)")
    p.add_argument("--seq-len", type=int, help="the evaluation's sequence length (default: 128)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("merge", help="the weighted average of runs' checkpoints, as a run directory")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (one model shape and tokenizer)")
    p.add_argument("--weights", required=True, metavar="W1,W2,...",
                   help="one weight >= 0 per run, summing to 1, e.g. 0.5,0.5")
    p.add_argument("--out", required=True, help="a new or empty folder (or this same merge: reused)")
    p.add_argument("--stage", metavar="NAME[,NAME...]",
                   help="the stage whose end checkpoint to use: one for every run, or one per run "
                        "(default: each run's last)")
    p.set_defaults(func=_cmd_merge)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``cptlab batch``'s options for the runs it trains first: side by side, within a deadline, on a Ray
    cluster (``--cluster`` and its options, docs/cluster.md)."""
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained side by side (default: 2 on a CPU, from free memory on a GPU)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="no run starts that would not finish within SECONDS of the start; the runs still "
                        "training then are stopped; the notebooks and report use what finished")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="train the runs as Ray tasks: auto (the cluster `ray start` started here), "
                        "ray://HOST:PORT, or local (a Ray started in this process); needs cptlab[cluster]")
    p.add_argument("--store", default="shared", choices=["shared", "node"],
                   help="--cluster: the run store is on a filesystem every node mounts (shared), or each "
                        "node trains into its own and sends finished runs back (node)")
    p.add_argument("--keep-checkpoints", default="final", choices=["final", "none", "all"],
                   help="--store node: the checkpoints a finished run brings back (stage ends, none, all)")


def _expected(exc: Exception) -> tuple[str, int] | None:
    """(what kind of failure, exit code) of an expected error, None for an unexpected one (which keeps its
    traceback). Imported here: the training modules load torch, which ``cptlab --help`` need not."""
    from cptlab.config import ConfigError
    from cptlab.training.rundir import RunDirError
    from cptlab.training.train import TrainingDiverged

    if isinstance(exc, ConfigError):
        return "config error", 2
    if isinstance(exc, RunDirError):
        return "run directory", 2
    if isinstance(exc, TrainingDiverged):
        return "diverged", 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"cptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        expected = _expected(exc)
        if expected is None:
            raise
        kind, code = expected
        print(f"cptlab {args.command}: {kind}: {exc}", file=sys.stderr)
        return code
