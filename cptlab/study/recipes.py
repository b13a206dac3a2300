"""The paper's real-scale recipes as run configs, generated from one description.

``recipes(variant)`` builds every run of the paper's 405M setting (PAPER.md): the Pile base model, the
weak (Pile -> SlimPajama) and strong (Pile -> German web text) shifts with 0/1/5/10/25/50% replay, the
union baselines, and the schedules over three SlimPajama chunks (repeated cosine, infinite cosine,
infinite inverse-sqrt, WSD). A ``Variant`` says what changes between the full recipes and the smaller
single-GPU ones. ``python -m cptlab.study.recipes write`` writes them all to ``configs/paper/<variant>/``;
``check`` says whether the committed files are up to date; ``prepare CONFIG`` streams and tokenises a
config's corpora before training (see ``cptlab.data.shards``); ``estimate`` prints the time table of the
"How long" section of docs/gpus.md.

Choices made here (the paper does not fix them): the data are public Hugging Face copies that stream
(``CORPORA``); each corpus is tokenised up to 1% more tokens than its largest use (``MARGIN``); the GPT-NeoX
tokenizer is read from ``TOKENIZER_PATH`` (download it first, see docs/gpus.md); an infinite schedule or
WSD gets a model at the end of a chunk by annealing over the chunk's last ``ANNEAL`` fraction, in a branch
run for chunks 1 and 2 and in the main run for chunk 3. The tokenizer's path is relative to the
repository root, where the commands are run. Run ``X`` of a variant lives in the run store ``runs/paper``
as ``<variant>/X``; a run that starts from another names it by reference (``init_from: {experiment:
<variant>, run: X, stage: ...}``), found in the store that holds the run being trained.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cptlab.config import MODEL_PRESETS, ModelConfig, RunConfig, RunRef
from cptlab.schedules import default_const_lr
from cptlab.study import paper
from cptlab.study.paper import ANNEAL, CHUNK_SCHEDULES, COOLDOWN, REPLAY_FRACTIONS, WARMUP
from cptlab.training import store
from cptlab.training.model import GPT

CONFIG_ROOT = Path("configs/paper")
RUN_ROOT = "runs/paper"
TOKENIZER_PATH = "tokenizers/gpt-neox-20b/tokenizer.json"  # EleutherAI/gpt-neox-20b's tokenizer.json

# The data: public Hugging Face datasets that stream. Names, configs and fields checked against their
# hub pages (see docs/gpus.md, "The paper's scale").
CORPORA: dict[str, dict[str, Any]] = {
    "pile": dict(hf="monology/pile-uncopyrighted", split="train", text_field="text", language="en",
                 domain="The Pile (mixed English sources)",
                 description="The Pile without its copyrighted subsets (Books3, BookCorpus2, OpenSubtitles, "
                             "YTSubtitles, OWT2)"),
    "slimpajama": dict(hf="cerebras/SlimPajama-627B", split="train", text_field="text", language="en",
                       domain="English web mix",
                       description="SlimPajama: deduplicated RedPajama, 627B tokens"),
    "german": dict(hf="HuggingFaceFW/fineweb-2", config="deu_Latn", split="train", text_field="text",
                   language="de", domain="German web text",
                   description="FineWeb-2, German (deu_Latn): filtered, deduplicated Common Crawl"),
}
D0 = "pile"
SHIFTS = {"weak": "slimpajama", "strong": "german"}
CHUNKS_DATA = "slimpajama"

MARGIN = 1.01  # a corpus is tokenised up to this much more than its largest use
H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM


@dataclass(frozen=True)
class Variant:
    """What changes between the full recipes and their smaller versions."""

    name: str
    description: str
    model: str  # a MODEL_PRESETS name
    seq_len: int
    batch_size: int  # global, in sequences
    micro_batch_size: int  # per process; must divide batch_size / processes
    max_lr: float
    min_lr: float
    token_scale: float  # every token budget is the paper's times this
    eval_tokens: int  # validation tokens per set
    checkpoint_every_tokens: int
    mfu: float  # ASSUMED model FLOPs utilisation for the time estimates (not measured here)
    gpus: int = 8  # the GPUs of the example command in each file's header
    vocab_size: int = 50304  # the GPT-NeoX tokenizer's 50277, padded to a multiple of 64 (as the paper)
    start: tuple[str, str, str] | None = None  # an imported base (experiment, run, stage); None: pile-base
    tokenizer: str = TOKENIZER_PATH

    def tokens(self, key: str) -> int:
        return int(round(paper.TOKENS_405M[key] * self.token_scale))


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("405m", "the paper's setting: 405M model, batch 1104 x 2048 tokens, 300B/300B/200B tokens",
            model="paper-405m", seq_len=2048, batch_size=1104, micro_batch_size=6, max_lr=3e-4, min_lr=3e-5,
            token_scale=1.0, eval_tokens=4 * 2**20, checkpoint_every_tokens=5_000_000_000, mfu=0.40),
    Variant("405m-10x", "the paper's model and batch on 10x fewer tokens (30B/30B/20B)",
            model="paper-405m", seq_len=2048, batch_size=1104, micro_batch_size=6, max_lr=3e-4, min_lr=3e-5,
            token_scale=0.1, eval_tokens=4 * 2**20, checkpoint_every_tokens=1_000_000_000, mfu=0.40),
    Variant("small", "one GPU: the `small` model (51M), batch 256 x 1024, 100x fewer tokens (3B/3B/2B)",
            model="small", seq_len=1024, batch_size=256, micro_batch_size=32, max_lr=1e-3, min_lr=1e-4,
            token_scale=0.01, eval_tokens=2**20, checkpoint_every_tokens=250_000_000, mfu=0.25, gpus=1),
)}

# Continual runs from a pretrained model imported with `cptlab import` instead of the lab's own pile-base.
# Pythia-410M is the paper's 405M shape (the ``paper-405m`` preset) pretrained on the Pile for 300B tokens
# (EleutherAI/pythia, models/410M/pythia-410m.yml: max LR 3e-4, cosine to 3e-5, warmup 1%), so its recipes
# re-warm to the paper's (and Pythia's own) max LR 3e-4 and re-decay to 3e-5, on D1 budgets 1/300 of the
# paper's (1B weak, 0.67B strong): one H100 trains a weak-shift run in about 2 h at the assumed 40% MFU.
# There is no cheap stand-in for the union baseline here (it retrains 300B tokens from scratch); the 50%
# replay run is the closest. Import first (the recipes name the run id): `cptlab import
# EleutherAI/pythia-410m --out runs/paper --run-id pythia-410m --eval pile`.
PYTHIA_410M = Variant(
    "pythia-410m",
    "EleutherAI/pythia-410m imported, continued on 1/300 of the paper's D1 tokens (1B / 0.67B)",
    model="paper-405m", seq_len=2048, batch_size=256, micro_batch_size=8, max_lr=3e-4, min_lr=3e-5,
    token_scale=1 / 300, eval_tokens=2**20, checkpoint_every_tokens=100_000_000, mfu=0.40, gpus=1,
    start=("pretrained", "pythia-410m", "pretrained"),
    tokenizer="runs/paper/pretrained/pythia-410m/tokenizer.json")
IMPORTED_VARIANTS: dict[str, Variant] = {PYTHIA_410M.name: PYTHIA_410M}


@dataclass
class Recipe:
    """One run config of a variant, and the runs whose checkpoints it starts from (train those first)."""

    name: str
    config: dict[str, Any]
    needs: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Training tokens (the compute) of the run."""
        return sum(st["tokens"] for st in self.config["stages"])


# -- building blocks -----------------------------------------------------------------------------

def _corpora(v: Variant, names: set[str]) -> dict[str, dict[str, Any]]:
    """The hub specs of ``names``, streamed up to MARGIN x their largest use."""
    largest = {D0: v.tokens("pile"), "slimpajama": max(v.tokens("weak"), 3 * v.tokens("chunk")),
               "german": v.tokens("strong")}
    return {n: {**CORPORA[n], "streaming": True, "max_tokens": int(largest[n] * MARGIN)}
            for n in sorted(names)}


def _cosine(v: Variant) -> dict[str, Any]:
    return {"kind": "cosine", "max_lr": v.max_lr, "min_lr": v.min_lr, "warmup": WARMUP}


def _config(v: Variant, stages: list[dict[str, Any]], eval_sets: list[str]) -> dict[str, Any]:
    used = set(eval_sets)
    for st in stages:
        used |= set(st["data"]) | ({st["replay"]["source"]} if "replay" in st else set())
    model: dict[str, Any] = {"preset": v.model}
    if MODEL_PRESETS[v.model].get("vocab_size") != v.vocab_size:
        model["vocab_size"] = v.vocab_size
    return {
        "model": model,
        "tokenizer": {"kind": "file", "path": v.tokenizer},
        "train": {"seq_len": v.seq_len, "batch_size": v.batch_size, "micro_batch_size": v.micro_batch_size,
                  "seed": 0, "device": "auto", "precision": "bf16", "strategy": "ddp",
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0,
                  "checkpoint_every_tokens": v.checkpoint_every_tokens, "log_every_steps": 10},
        "eval": {"sets": eval_sets, "every_tokens": v.tokens("pile") // 100, "tokens": v.eval_tokens},
        "corpora": _corpora(v, used),
        "stages": stages,
    }


def _start_from(v: Variant, run: str, stage: str) -> dict[str, str]:
    """``init_from``: the end of ``stage`` of recipe ``run`` of the same variant."""
    return vars(RunRef(v.name, run, stage))


# -- the recipes ---------------------------------------------------------------------------------

def base(v: Variant) -> Recipe:
    """D0: pre-training on the Pile with warmup + cosine."""
    stage = {"name": "pretrain", "data": {D0: 1.0}, "tokens": v.tokens("pile"), "schedule": _cosine(v)}
    return Recipe("pile-base", _config(v, [stage], [D0]))


def continual(v: Variant, shift: str, replay: float) -> Recipe:
    """From the base model on D1 with re-warming, re-decaying and compute-equivalent replay of D0."""
    d1 = SHIFTS[shift]
    start = vars(RunRef(*v.start)) if v.start else _start_from(v, "pile-base", "pretrain")
    stage: dict[str, Any] = {"name": "continue", "data": {d1: 1.0}, "tokens": v.tokens(shift),
                             "schedule": _cosine(v), "reset_optimizer": True, "init_from": start}
    if replay > 0:
        stage["replay"] = {"source": D0, "fraction": replay, "order": "original"}
    needs = [] if v.start else ["pile-base"]
    return Recipe(f"{shift}-replay{round(replay * 100)}", _config(v, [stage], [D0, d1]), needs)


def union(v: Variant, shift: str) -> Recipe:
    """From scratch on D0 and D1 mixed in proportion to their budgets, one warmup + cosine."""
    d1 = SHIFTS[shift]
    n0, n1 = v.tokens("pile"), v.tokens(shift)
    stage = {"name": "union", "data": {D0: n0 / (n0 + n1), d1: n1 / (n0 + n1)}, "tokens": n0 + n1,
             "schedule": _cosine(v)}
    return Recipe(f"{shift}-union", _config(v, [stage], [D0, d1]))


def chunks(v: Variant, kind: str) -> list[Recipe]:
    """From scratch over three consecutive chunks of SlimPajama. Repeated cosine re-warms and re-decays
    (and resets the optimizer) per chunk. An infinite schedule warms up and cools down in chunk 1 and then
    stays at its constant LR; WSD stays at max_lr. Each chunk of those is split into a head and a tail of
    ANNEAL; the main run keeps the LR constant through the tails of chunks 1 and 2 and anneals (decays)
    in chunk 3's tail, and branch runs anneal from the heads of chunks 1 and 2 to give their models."""
    n = v.tokens("chunk")
    tail = int(n * ANNEAL)
    head = n - tail
    eval_sets = [CHUNKS_DATA, D0]
    name = f"chunks-{kind}"
    if kind == "cosine":
        stages = [{"name": f"chunk{c}", "data": {CHUNKS_DATA: 1.0}, "tokens": n, "schedule": _cosine(v),
                   "reset_optimizer": True} for c in (1, 2, 3)]
        return [Recipe(name, _config(v, stages, eval_sets))]
    lr = {"max_lr": v.max_lr, "min_lr": v.min_lr}
    if kind == "wsd":
        first = {"kind": "wsd", **lr, "warmup": WARMUP * n / head, "decay": 0.0}
        flat = {"kind": "wsd", **lr, "warmup": 0.0, "decay": 0.0}
        end = {"kind": "wsd", **lr, "warmup": 0.0, "decay": ANNEAL, "decay_shape": "1-sqrt"}
    else:
        const = {**lr, "const_lr": default_const_lr(v.max_lr, v.min_lr), "alpha": 10.0}
        first = {"kind": kind, **const, "warmup": WARMUP * n / head, "cooldown": COOLDOWN * n / head,
                 "anneal": 0.0}
        flat = {"kind": kind, **const, "warmup": 0.0, "cooldown": 0.0, "anneal": 0.0}
        end = {**flat, "anneal": ANNEAL}
    stage = lambda name, tokens, spec: {"name": name, "data": {CHUNKS_DATA: 1.0}, "tokens": tokens,  # noqa: E731
                                        "schedule": dict(spec), "reset_optimizer": False}
    stages = [stage("chunk1", head, first), stage("chunk1-tail", tail, flat),
              stage("chunk2", head, flat), stage("chunk2-tail", tail, flat), stage("chunk3", n, end)]
    runs = [Recipe(name, _config(v, stages, eval_sets))]
    anneal = {**end, "anneal": 1.0} if kind != "wsd" else {**end, "decay": 1.0}
    for c in (1, 2):
        branch = {**stage("anneal", tail, anneal), "init_from": _start_from(v, name, f"chunk{c}")}
        runs.append(Recipe(f"{name}-anneal{c}", _config(v, [branch], eval_sets), [name]))
    return runs


def recipes(variant: str | Variant) -> list[Recipe]:
    """Every recipe of a variant, runs that others start from before them."""
    v = variant if isinstance(variant, Variant) else {**VARIANTS, **IMPORTED_VARIANTS}[variant]
    if v.start:  # continual runs of an imported model: no base, union or chunk runs
        return [continual(v, shift, f) for shift in SHIFTS for f in REPLAY_FRACTIONS]
    out = [base(v)]
    for shift in SHIFTS:
        out += [continual(v, shift, f) for f in REPLAY_FRACTIONS] + [union(v, shift)]
    for kind in CHUNK_SCHEDULES:
        out += chunks(v, kind)
    return out


# -- files ---------------------------------------------------------------------------------------

def render(recipe: Recipe, v: Variant) -> str:
    """The YAML file of a recipe: a header that says how to run it, then the config."""
    RunConfig.from_dict(recipe.config).validate()  # fail here, not on the GPU machine
    path = CONFIG_ROOT / v.name / f"{recipe.name}.yaml"
    out = store.run_path(Path(RUN_ROOT), v.name, recipe.name)
    launch = f"torchrun --nproc_per_node {v.gpus} -m cptlab train" if v.gpus > 1 else "python -m cptlab train"
    lines = ["# Generated by `python -m cptlab.study.recipes write` from cptlab/study/recipes.py: edit that, "
             "not this.",
             f"# {v.name}: {v.description}.",
             f"# Run from the repository root (the paths below are relative to it), e.g. on {v.gpus} GPU"
             f"{'s' * (v.gpus > 1)}:", f"#   {launch} {path} --out {out}"]
    if v.start:
        lines.append(f"# Starts from the imported model {'/'.join(v.start[:2])} of the run store {RUN_ROOT}; "
                     "import it first:")
        lines.append(f"#   python -m cptlab import EleutherAI/{v.start[1]} --out {RUN_ROOT} "
                     f"--run-id {v.start[1]}")
    if recipe.needs:
        lines.append("# Starts from the checkpoint of " + ", ".join(
            str(store.run_path(Path(RUN_ROOT), v.name, n)) for n in recipe.needs) + " (train it first).")
    body = yaml.dump(recipe.config, Dumper=_Dumper, sort_keys=False, width=110)
    return "\n".join(lines) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """Block style, except short mappings and lists of plain values (``data: {pile: 1.0}``); no aliases."""

    def represent_mapping(self, tag, mapping, flow_style=None):
        short = len(mapping) <= 4 and all(not isinstance(x, (dict, list)) for x in mapping.values())
        return super().represent_mapping(tag, mapping, flow_style=short)

    def represent_sequence(self, tag, sequence, flow_style=None):
        plain = all(not isinstance(x, (dict, list)) for x in sequence)
        return super().represent_sequence(tag, sequence, flow_style=plain)

    def ignore_aliases(self, data):
        return True


def expected_files(root: Path = CONFIG_ROOT) -> dict[Path, str]:
    """Every recipe file of every variant: path -> content."""
    return {root / v.name / f"{r.name}.yaml": render(r, v) for v in all_variants() for r in recipes(v)}


def all_variants() -> list[Variant]:
    """The variants trained from scratch, then those continuing an imported model."""
    return [*VARIANTS.values(), *IMPORTED_VARIANTS.values()]


def write(root: Path = CONFIG_ROOT) -> list[Path]:
    """Write every recipe file (and remove stale YAML files from the variants' folders)."""
    files = expected_files(root)
    for v in all_variants():
        for stale in (root / v.name).glob("*.yaml"):
            if stale not in files:
                stale.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return sorted(files)


def stale_files(root: Path = CONFIG_ROOT) -> list[str]:
    """Files that differ from what ``write`` would write (missing, changed or extra); [] when up to date."""
    files = expected_files(root)
    bad = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
    for v in all_variants():
        bad += [str(p) for p in (root / v.name).glob("*.yaml") if p not in files]
    return sorted(bad)


# -- before and about running --------------------------------------------------------------------

def prepare(config_path: str | Path, cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Tokenise every corpus a run config trains or evaluates on (streamed corpora: incrementally, resuming
    an interrupted build), so that training starts at once; returns each corpus's shard metadata. Run it
    once per machine (or once on storage every node shares, via $CPTLAB_CACHE) before torchrun."""
    from cptlab import data

    cfg = RunConfig.load(config_path)
    registry = data.Registry(cfg.corpora)
    cfg.validate(registry.names())
    tokenizer = data.load_tokenizer(cfg.tokenizer, registry, cache_dir=cache_dir)
    names = set(cfg.eval.sets).union(*(st.sources() for st in cfg.stages))
    return {n: data.shard_meta(n, tokenizer, registry, cache_dir) for n in sorted(names)}


def flops_per_token(v: Variant) -> int:
    """Training FLOPs per token of the variant's model (``GPT.count_flops_per_token``)."""
    cfg = RunConfig(model=ModelConfig(preset=v.model, vocab_size=v.vocab_size)).resolve().model
    return GPT.count_flops_per_token(cfg, v.seq_len)


def days(tokens: int, v: Variant, gpus: int, peak_flops: float = H100_BF16_FLOPS) -> float:
    """Days of training ``tokens`` on ``gpus`` GPUs at the variant's assumed MFU (perfect scaling)."""
    return tokens * flops_per_token(v) / (gpus * peak_flops * v.mfu) / 86400


def estimate_table(gpus: tuple[int, ...] = (1, 8)) -> str:
    """A markdown table of training times on ``gpus`` H100s: one row per group of runs of the same size
    (time of each run), one per variant for all its runs."""
    head = " | ".join(f"{g} GPU{'s' * (g > 1)}" for g in gpus)
    rows = [f"| variant | runs | tokens | {head} |", "|---|---|---|" + "---|" * len(gpus)]
    for v in VARIANTS.values():
        groups: dict[str, list[Recipe]] = {}
        for r in recipes(v):
            groups.setdefault(_group(r.name), []).append(r)
        for name, runs in groups.items():
            times = " | ".join(_duration(days(runs[0].tokens, v, g)) for g in gpus)
            each = f"{len(runs)} x " if len(runs) > 1 else ""
            rows.append(f"| {v.name} | {name} | {each}{runs[0].tokens / 1e9:g}B | {times} |")
        total = sum(r.tokens for r in recipes(v))
        times = " | ".join(f"**{_duration(days(total, v, g))}**" for g in gpus)
        rows.append(f"| {v.name} | **all {len(recipes(v))} runs** | {total / 1e9:g}B | {times} |")
    return "\n".join(rows)


def _group(name: str) -> str:
    """Runs of one size: the replay sweeps, the chunk runs, their anneal branches."""
    if "-replay" in name:
        return name.split("-replay")[0] + "-replay{0,1,5,10,25,50}"
    if name.startswith("chunks-"):
        return "chunks-*-anneal{1,2}" if "-anneal" in name else "chunks-{" + ",".join(CHUNK_SCHEDULES) + "}"
    return name


def _duration(d: float) -> str:
    if d >= 1:
        return f"{d:.1f} d"
    if d * 24 >= 1:
        return f"{d * 24:.1f} h"
    return f"{d * 1440:.0f} min" if d * 1440 >= 1 else "<1 min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cptlab.study.recipes",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write", help="write every recipe to configs/paper/")
    sub.add_parser("check", help="exit 1 if the files in configs/paper/ differ from what write writes")
    p = sub.add_parser("prepare", help="stream and tokenise the corpora of a run config before training")
    p.add_argument("config")
    sub.add_parser("estimate", help="print the table of training times (assumed MFU)")
    args = parser.parse_args(argv)
    if args.command == "write":
        print(f"wrote {len(write())} files under {CONFIG_ROOT}/")
    elif args.command == "check":
        stale = stale_files()
        for path in stale:
            print(f"out of date: {path}")
        return 1 if stale else 0
    elif args.command == "prepare":
        for name, meta in prepare(args.config).items():
            tokens = meta["tokens"]
            print(f"{name}: {tokens['train']:,} training and {tokens['val']:,} validation tokens")
    else:
        print(estimate_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
