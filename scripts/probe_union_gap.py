"""Probe finding 4 (continual + chosen replay vs the union baseline) at a candidate scale, before
committing a whole reproduction to it: trains the base model, 0% and chosen replay per shift and the two
union baselines, then prints final losses and each chosen run's gap to its union.

    python scripts/probe_union_gap.py --scale tiny --base-tokens 1500000 --new-tokens 1500000 \\
        [--vocab-size 2048] [--n-layer 3] [--d-model 128] [--max-lr 1e-3 --min-lr 1e-4] [--root runs/probe]

Runs go to the run store under ``--root``, so a second call with the same settings only reports.
"""

from __future__ import annotations

import argparse
import dataclasses

from cptlab.analysis import metrics as M
from cptlab.analysis.runs import load_runs
from cptlab.study import experiments as E
from cptlab.study import paper, runner
from cptlab.study.scales import SCALES, get_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--base-tokens", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--max-lr", type=float)
    parser.add_argument("--min-lr", type=float)
    parser.add_argument("--root", default="runs/probe")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()

    s = get_scale(args.scale)
    fields = {k: v for k, v in (("base_tokens", args.base_tokens), ("new_tokens", args.new_tokens),
                                ("vocab_size", args.vocab_size), ("max_lr", args.max_lr),
                                ("min_lr", args.min_lr)) if v is not None}
    model = {k: v for k, v in (("n_layer", args.n_layer), ("d_model", args.d_model)) if v is not None}
    s = dataclasses.replace(s, model_overrides=tuple(sorted(model.items())), **fields)
    runs = []
    for shift in paper.SHIFTS:
        frac = paper.CHOSEN_REPLAY[shift]
        runs += [E.continual_run("replay", f"{shift}-replay0", shift, s),
                 E.continual_run("replay", f"{shift}-replay{frac:g}", shift, s, replay=frac),
                 E.union_run(shift, s)]
    runner.run_all(runs, args.root, workers=args.workers)
    finals = M.add_forgetting(M.final_losses(load_runs([E.base_run(s), *runs], args.root)))
    print(f"scale {args.scale} with {fields} {model}")
    print(finals[["name", "D0", "D1", "avg", "forgetting"]].round(3).to_string(index=False))
    for shift in paper.SHIFTS:
        mine = finals[finals["shift"] == shift]
        chosen = mine[(mine["role"] == "continual") & (mine["replay"] == paper.CHOSEN_REPLAY[shift])]["avg"]
        union = mine[mine["role"] == "union"]["avg"]
        print(f"{shift}: chosen replay avg {chosen.mean():.3f} vs union {union.mean():.3f}: "
              f"{chosen.mean() / union.mean() - 1:+.1%}")


if __name__ == "__main__":
    main()
