"""``cptlab eval``: the mean next-token loss of a run's checkpoint on a text file or on a corpus's validation
split, with the run's tokenizer, computed exactly as the trainer evaluates (``training.train.evaluate``:
windows of ``train.seq_len`` tokens, the run's precision and evaluation batch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cptlab import data
from cptlab.config import ConfigError, RunConfig
from cptlab.training import runtime
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir, RunDirError, load_checkpoint
from cptlab.training.train import evaluate


def load_model(run: str | Path | RunDir, stage: str | None = None) -> tuple[GPT, RunConfig, str]:
    """The run's model at the end of ``stage`` (default: its last stage), its resolved config and the
    stage."""
    path, cfg, stage = find_checkpoint(run, stage)
    model = GPT(cfg.model)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.eval(), cfg, stage


def find_checkpoint(run: str | Path | RunDir, stage: str | None = None) -> tuple[Path, RunConfig, str]:
    """The end-of-``stage`` checkpoint of the run (default: its last stage), its resolved config and the
    stage, checked to exist without loading it."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.config_path.exists():
        raise RunDirError(f"{run.path} is not a run directory (no config.json)")
    cfg = run.load_config()
    names = [st.name for st in cfg.stages]
    stage = stage or names[-1]
    if stage not in names:
        raise ConfigError(f"--stage: {stage!r} is not a stage of {run.path}; its stages: {', '.join(names)}")
    path = run.stage_checkpoint(stage)
    if not path.exists():
        raise RunDirError(f"{run.path} has no checkpoint of stage {stage!r} ({path}): that stage has not "
                          "finished")
    return path, cfg, stage


def run_tokenizer(cfg: RunConfig) -> data.Tokenizer:
    """The tokenizer the run was trained with."""
    return data.load_tokenizer(cfg.tokenizer, data.Registry(cfg.corpora))


def text_tokens(path: str | Path, tokenizer: data.Tokenizer) -> np.ndarray:
    """The tokens of a text file read as one document (UTF-8)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--text: cannot read {path} as UTF-8 text ({exc})") from None
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def evaluate_run(run: str | Path, text: str | Path | None = None, corpus: str | None = None,
                 stage: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """Loss, perplexity and the tokens scored of the run's checkpoint (of ``stage``) on the text file
    ``text`` or the validation split of ``corpus`` (its first ``eval.tokens`` tokens, as the trainer reads
    it); ``precision`` defaults to the run's."""
    if (text is None) == (corpus is None):
        raise ConfigError("give one of --text FILE or --corpus NAME")
    model, cfg, stage = load_model(run, stage)
    registry = data.Registry(cfg.corpora)
    tokenizer = data.load_tokenizer(cfg.tokenizer, registry)
    if corpus is not None:
        registry.check(corpus)
        tokens = data.val_tokens(corpus, tokenizer, registry, cfg.eval.tokens)
    else:
        tokens = text_tokens(text, tokenizer)
    t = cfg.train
    if len(tokens) < t.seq_len + 1:
        raise ConfigError(f"--text: {text} holds {len(tokens)} tokens, fewer than one sequence of "
                          f"train.seq_len + 1 = {t.seq_len + 1}")
    device = runtime.pick_device("auto")
    model.to(device)
    autocast = runtime.autocast_context(device, runtime.pick_precision(precision or t.precision, device))
    batch = t.micro_batch_size or t.batch_size
    loss = evaluate(model, {"text": tokens}, t.seq_len, batch, device, autocast)["text"]
    n_seq = (len(tokens) - 1) // t.seq_len
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_seq * t.seq_len, "sequences": n_seq,
            "stage": stage, "source": str(text) if text is not None else f"{corpus} (validation)"}
