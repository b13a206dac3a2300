"""Mirrors of metrics.jsonl in experiment trackers, asked for by ``train.loggers`` (none by default).

metrics.jsonl stays the source of truth; a logger sees each of its records as it is written:

- ``tensorboard``: event files in ``DIR/tensorboard/`` through ``torch.utils.tensorboard`` (the
  ``tensorboard`` package): the LR, the training loss, tokens per second, tokens by source and every eval
  set's loss, against tokens seen. A resumed run first drops what the crash left after its checkpoint.
  ``tensorboard --logdir runs`` shows a run store, each run named
  ``<experiment>/<name>-<hash>/tensorboard``.
- ``wandb``: Weights & Biases, offline (files in ``DIR/wandb/``) unless the user has set it up
  (``WANDB_MODE`` or ``WANDB_API_KEY``); the run is named after the run directory and grouped by
  experiment, so a replay sweep is one group; a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from cptlab.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """A one-line error naming what to install for each logger asked for whose package is missing."""
    for i, name in enumerate(names):
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise ConfigError(f"train.loggers[{i}]: {name} needs the {PACKAGES[name]} package: "
                              f"pip install {PACKAGES[name]}") from None


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_tokens: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events after the resumed point were written after the checkpoint (or, with no
        # checkpoint yet, by an earlier attempt): drop them, as metrics.jsonl was cut back
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_tokens + 1)

    def log(self, record: dict[str, Any]) -> None:
        at = record["tokens"]
        self.writer.add_scalar("lr", record["lr"], at)
        for name, loss in record.get("val", {}).items():
            self.writer.add_scalar(f"val/{name}", loss, at)
        if "train_loss" in record:
            self.writer.add_scalar("train/loss", record["train_loss"], at)
            self.writer.add_scalar("train/tokens_per_s", record["tokens_per_s"], at)
            for source, tokens in record["tokens_by_source"].items():
                self.writer.add_scalar(f"tokens_by_source/{source}", tokens, at)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        offline = not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
        run_id = run_dir.name
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cptlab"), group=run_dir.parent.name,
                              name=run_id, id=run_id, resume="allow", dir=str(run_dir), config=config,
                              mode="offline" if offline else None)

    def log(self, record: dict[str, Any]) -> None:
        values = {"lr": record["lr"], "tokens": record["tokens"]}
        values.update({f"val/{name}": loss for name, loss in record.get("val", {}).items()})
        if "train_loss" in record:
            values.update({"train/loss": record["train_loss"], "train/tokens_per_s": record["tokens_per_s"]})
            values.update({f"tokens_by_source/{s}": n for s, n in record["tokens_by_source"].items()})
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def make_loggers(names: list[str], run_dir: Path, config: dict[str, Any], resume_tokens: int) -> list[Any]:
    """The loggers ``names`` asks for, writing into ``run_dir``; ``resume_tokens``: where a resumed run
    continues (0 for a new run)."""
    made = {"tensorboard": lambda: TensorBoardLogger(run_dir, resume_tokens),
            "wandb": lambda: WandbLogger(run_dir, config)}
    return [made[name]() for name in names]
