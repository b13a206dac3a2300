"""Run a RunConfig stage by stage: data, model, schedule, evaluation, checkpoints, exact resume, DDP / FSDP.

``train(cfg, out_dir)`` is what ``cptlab train`` calls. A ``Trainer`` reads top to bottom:

1. set up (``Trainer.__init__``): check the config, load the tokenizer and token shards, claim the run
   directory (refuse a different config), build the model and optimizer, resume from the newest good
   checkpoint, and check that every checkpoint a stage still has to start from exists;
2. for each stage (``run``): ``start_stage`` sets the starting weights (previous stage, scratch, a
   checkpoint file or another run's stage, ``init_from``), resets the optimizer if asked, builds the replay
   sampler (a corpus read as new data continues where earlier stages, or the checkpoint's run, stopped; a
   replayed corpus is read again from the start of its original order), the stage's LR schedule and its
   regularizer (EWC / LwF against the stage's starting model, ``cptlab.training.regularizers``);
   ``run_stage`` then takes steps, logging a training line every ``train.log_every_steps`` steps,
   evaluating every ``eval.every_tokens`` tokens and at the stage end (``evaluate_if_due``), writing a
   rolling checkpoint every ``train.checkpoint_every_tokens`` (``checkpoint_if_due``) and a kept one at the
   stage end (``finish_stage``);
3. ``finish`` marks the run done.

The LR is a pure function of (stage, step), the sampler's position is saved, and so are the RNG states:
a run killed at any moment and resumed writes the same metrics.jsonl as one never interrupted. Several
processes (torchrun) and the checkpoint format are ``cptlab.training.distributed``'s.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cptlab import data, schedules
from cptlab.config import ConfigError, RunConfig, RunRef, Stage
from cptlab.training import distributed, loggers, regularizers, runtime
from cptlab.training.model import GPT, average_states
from cptlab.training.rundir import RunDir, RunDirError, load_checkpoint
from cptlab.training.store import RunStore

# Beyond this many passes over a corpus a stage warns: the first `small` design read en-man 26 times and
# its D0 validation loss rose from 3.67 (after ~5 passes) to 6.11.
MAX_EPOCHS_BEFORE_WARNING = 5

Record = dict[str, Any]
# Where a trainer's time goes, besides the rest (model set-up, resume, stage starts): loading the tokenizer,
# shards and validation sets, optimizer steps, evaluations, checkpoint writes.
SECTIONS = ("data", "steps", "eval", "checkpoint")
# Settings a resumed run may change: they change how it is run and logged, not what it computes.
RESUME_MAY_CHANGE = ("train.threads", "train.checkpoint_every_tokens", "train.log_every_steps",
                     "train.loggers")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


@dataclass
class TrainResult:
    out_dir: Path
    status: str  # "done" | "stopped"
    final_val: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # where this call's time went (SECTIONS)


@dataclass
class _Progress:
    """Counters that a checkpoint saves and a resume restores."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in the current stage
    step: int = 0  # optimizer steps in the whole run
    tokens: int = 0  # tokens trained on in the whole run
    tokens_by_source_done: dict[str, int] = field(default_factory=dict)  # finished stages
    sequences_done: dict[str, int] = field(default_factory=dict)  # new data read by finished stages
    next_eval_tokens: int = 0
    next_ckpt_tokens: int = 0
    window_loss: float = 0.0  # train loss summed since the last training line
    window_steps: int = 0
    window_regularizer: float = 0.0  # regularizer penalty summed since the last training line
    extra_flops: int = 0  # FLOPs beyond training: regularizers' Fisher passes and teacher forwards


@dataclass
class _StageRun:
    """The stage being trained: its config, sampler and LR schedule, and the training line's clock."""

    index: int
    stage: Stage
    sampler: data.BatchSampler
    lr_at: Callable[[int], float]
    regularizer: regularizers.Regularizer | None = None
    bar: Any = None  # tqdm progress bar (rank 0, not quiet)
    window_start: float = 0.0  # when the current training line's window began
    window_start_steps: int = 0  # progress.window_steps then (steps of a window resumed from a checkpoint)
    merge_steps: list[int] = field(default_factory=list)  # stage steps whose weights the stage end averages

    @property
    def n_steps(self) -> int:
        return self.sampler.num_steps


def train(cfg: RunConfig, out_dir: str | Path, *, quiet: bool = False,
          stop: Callable[[], bool] | None = None, on_record: Callable[[Record], None] | None = None,
          cache_dir: str | Path | None = None, runs_root: str | Path | None = None,
          wait: bool = False) -> TrainResult:
    """Run (or resume) ``cfg`` in ``out_dir``. ``stop()`` returning True ends the run at the next step
    with a checkpoint (resume by calling again); ``on_record`` sees every metrics line as it is written.
    A stage whose ``init_from`` names another run finds it in the run store ``runs_root`` (default: the
    store that holds ``out_dir``, its grandparent folder: ``<root>/<experiment>/<run id>``). A run
    directory another trainer holds is refused, or waited for with ``wait``."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world = distributed.setup()
    trainer = None
    try:
        trainer = Trainer(cfg, out_dir, rank, world, quiet=quiet, stop=stop, on_record=on_record,
                          cache_dir=cache_dir, runs_root=runs_root, wait=wait)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        # A process group left to the interpreter's exit can abort it ("terminate called without an
        # active exception" from gloo's threads), so the group this call created ends with it; the model
        # and optimizer go first, with the collectives' work objects (FSDP's) that hold their tensors,
        # which the interpreter would otherwise free only while it shuts down.
        trainer = None
        if world > 1 and owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


class Trainer:
    """One run being trained, set up once and then trained stage by stage (see the module docstring)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, rank: int = 0, world: int = 1, *,
                 quiet: bool = False, stop: Callable[[], bool] | None = None,
                 on_record: Callable[[Record], None] | None = None, cache_dir: str | Path | None = None,
                 runs_root: str | Path | None = None, wait: bool = False):
        self.rank, self.world, self.quiet, self.stop, self.on_record = rank, world, quiet, stop, on_record
        self.loggers: list[Any] = []  # tensorboard / wandb mirrors of metrics.jsonl (rank 0)
        self.out_dir = Path(out_dir)
        self.store = RunStore(runs_root if runs_root is not None else self.out_dir.absolute().parent.parent)
        self.seconds = dict.fromkeys(SECTIONS, 0.0)
        with self.timed("data"):
            self._check_and_load(cfg, cache_dir)
        self.run_dir = RunDir(self.out_dir)
        if rank == 0:  # the other processes of a torchrun wait for rank 0 (see _claim)
            self.run_dir.check_usable()
            if not self.run_dir.config_path.exists():  # a new run: nothing is written before this check
                self._starting_checkpoints(_Progress(), None)
            self.run_dir.lock(wait)
        try:
            self._claim()
            self._build_model()
            self._resume()
            self.start_from = self._starting_checkpoints(self.progress, self.sampler_state)
            if rank == 0:
                self.loggers = loggers.make_loggers(self.t.loggers, self.out_dir, self.cfg.to_dict(),
                                                    self.progress.tokens)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close metrics.jsonl and the loggers, and let go of the run directory (also after an error)."""
        for logger in self.loggers:
            logger.close()
        self.loggers = []
        self.run_dir.close()
        self.run_dir.unlock()

    # -- set-up ----------------------------------------------------------------------------------
    def _check_and_load(self, cfg: RunConfig, cache_dir: str | Path | None) -> None:
        """Check the config, then load the tokenizer, the training shards and the validation sets."""
        registry = data.Registry(cfg.corpora)
        cfg.validate(registry.names())
        t = cfg.train
        if t.batch_size % self.world:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be divisible by the {self.world} processes")
        self.share = t.batch_size // self.world
        self.micro = t.micro_batch_size or self.share
        if self.share % self.micro:
            raise ConfigError(f"train.micro_batch_size ({self.micro}) must divide the per-process batch "
                              f"({self.share})")
        loggers.check_installed(t.loggers)
        runtime.set_threads(t.threads)
        runtime.tune_malloc()  # glibc keeps freed memory: far fewer page faults per step (see runtime)
        tokenizer = data.load_tokenizer(cfg.tokenizer, registry, cache_dir=cache_dir)
        self.cfg = cfg.resolve(vocab_size=tokenizer.vocab_size)
        self.t = self.cfg.train
        if self.cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the "
                              f"tokenizer's ({tokenizer.vocab_size})")
        names = {n for st in self.cfg.stages for n in st.sources()}
        names |= {n for i, st in enumerate(self.cfg.stages) if st.regularizer and st.regularizer.kind == "ewc"
                  for n in self.cfg.fisher_data(i)}
        self.shards = {n: data.token_shard(n, "train", tokenizer, registry, cache_dir=cache_dir)
                       for n in sorted(names)}
        self._check_shards()
        self.val_sets = {n: data.val_tokens(n, tokenizer, registry, self.cfg.eval.tokens, cache_dir=cache_dir)
                         for n in self.cfg.eval_sets()}
        for name, tokens in self.val_sets.items():
            if len(tokens) < self.t.seq_len + 1:
                raise ConfigError(f"eval.sets: {name!r} has {len(tokens)} validation tokens, fewer than one "
                                  f"sequence of train.seq_len + 1 = {self.t.seq_len + 1}")
        # batched once per run: every evaluation reads the same rows
        self.val_batches = {name: eval_sequences(tokens, self.t.seq_len)
                            for name, tokens in self.val_sets.items()}

    def _check_shards(self) -> None:
        """Every corpus a stage reads holds at least one training sequence (else no stage would start)."""
        need = self.t.seq_len + 1
        for i, stage in enumerate(self.cfg.stages):
            for name in stage.sources():
                n = len(self.shards[name])
                if n < need:
                    key = "replay.source" if name not in stage.data else f"data.{name}"
                    raise ConfigError(f"stages[{i}] ({stage.name}).{key}: corpus {name!r} has {n} training "
                                      f"tokens, fewer than one sequence of train.seq_len + 1 = {need}")

    def _claim(self) -> None:
        """Write or check config.json (rank 0; the others wait for it). A resumed run may change the
        settings that do not change its result (``RESUME_MAY_CHANGE``, and the device while both are the
        CPU); any other change is refused."""
        if self.rank == 0:
            tolerated = RESUME_MAY_CHANGE
            if self.run_dir.config_path.exists() and _both_cpu(self.run_dir.load_config().train.device,
                                                               self.t.device):
                tolerated += ("train.device",)
            self.run_dir.claim(self.cfg, tolerated)
        if self.world > 1:
            dist.barrier()

    def _build_model(self) -> None:
        t = self.t
        self.device = runtime.pick_device(t.device)
        precision = runtime.pick_precision(t.precision, self.device)
        self.autocast = runtime.autocast_context(self.device, precision)
        torch.manual_seed(t.seed)
        self.model = GPT(self.cfg.model).to(self.device)
        self.fsdp = self.world > 1 and t.strategy == "fsdp"
        if t.activation_checkpointing:
            distributed.checkpoint_blocks(self.model)
        if self.fsdp:
            distributed.shard(self.model)
        self.optimizer = runtime.make_optimizer(self.model, t, kind=self.cfg.stages[0].optimizer)
        wrapped = self.model
        if self.world > 1 and not self.fsdp:
            wrapped = torch.nn.parallel.DistributedDataParallel(self.model)
        self.step_model = torch.compile(wrapped) if t.compile else wrapped

    def _resume(self) -> None:
        """Restore the newest good checkpoint, if any, and open metrics.jsonl where it left off."""
        self.progress = _Progress(next_eval_tokens=self.cfg.eval.every_tokens,
                                  next_ckpt_tokens=self.t.checkpoint_every_tokens)
        self.sampler_state: dict[str, Any] | None = None
        self.last_val: dict[str, float] = {}
        ckpt = self.run_dir.latest_checkpoint() if self.run_dir.config_path.exists() else None
        if ckpt is None and self.run_dir.done:
            raise RunDirError(f"{self.out_dir} is a finished run (DONE) whose checkpoints are gone; it is "
                              f"not trained again: delete {self.out_dir} (or its DONE and metrics.jsonl) to "
                              "retrain it")
        if ckpt is not None:
            distributed.load_model(self.model, ckpt["model"])
            self.progress = _Progress(**ckpt["progress"])
            self.sampler_state = ckpt["sampler"]
            p = self.progress  # the optimizer of the stage that wrote the checkpoint
            inside = p.stage_step > 0 or self.sampler_state is not None
            writer = p.stage_index if inside else p.stage_index - 1
            kind = self.cfg.stages[min(max(writer, 0), len(self.cfg.stages) - 1)].optimizer
            self.optimizer = runtime.make_optimizer(self.model, self.t, kind=kind)
            distributed.load_optimizer(self.model, self.optimizer, ckpt["optimizer"])
            self._restore_training_weights(ckpt)
            self.last_val = dict(ckpt.get("last_val", {}))
            _set_rng_state(ckpt["rng"])
        if self.rank == 0:
            self.run_dir.open_metrics(ckpt["metrics_bytes"] if ckpt is not None else 0)

    def _starting_checkpoints(self, p: _Progress, sampler_state: dict[str, Any] | None) -> dict[int, Path]:
        """The checkpoint file of every stage still to start (after ``p``) that starts from one; a missing
        one is a config error now, before any step is spent."""
        out = {}
        for i in range(p.stage_index, len(self.cfg.stages)):
            stage = self.cfg.stages[i]
            started = i == p.stage_index and (p.stage_step > 0 or sampler_state is not None)
            if started or stage.init_from in ("previous", "scratch"):
                continue
            where = f"stages[{i}] ({stage.name}).init_from"
            if isinstance(stage.init_from, RunRef):
                path = self.store.checkpoint(stage.init_from)
                if not path.exists():
                    raise ConfigError(f"{where}: run {stage.init_from} has no checkpoint {path} in the run "
                                      f"store {self.store.root} (train it first, or pass --runs ROOT)")
            else:
                path = Path(stage.init_from)
                earlier = {self.run_dir.stage_checkpoint(s.name).absolute() for s in self.cfg.stages[:i]}
                if not path.exists() and path.absolute() not in earlier:  # an earlier stage may write it
                    raise ConfigError(f"{where}: checkpoint {path} does not exist")
            out[i] = path
        return out

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train every stage not finished yet; stop early (with a checkpoint) when ``stop()`` says so."""
        status = "done"
        for si in range(self.progress.stage_index, len(self.cfg.stages)):
            current = self.start_stage(si)
            finished = self.run_stage(current)
            if current.bar is not None:
                current.bar.close()
            if not finished:
                status = "stopped"
                break
            if self.rank == 0 and not self.quiet and self.last_val:
                vals = "  ".join(f"{k} {v:.4f}" for k, v in self.last_val.items())
                print(f"stage {current.stage.name} done at {self.progress.tokens:,} tokens: val {vals}",
                      flush=True)
        return self.finish(status)

    def start_stage(self, si: int) -> _StageRun:
        """Set the stage's starting weights and optimizer (unless resuming inside it), and build its
        sampler and schedule."""
        stage, p = self.cfg.stages[si], self.progress
        base = None
        if p.stage_step == 0 and self.sampler_state is None:
            base = self._starting_weights(si)
            if stage.reset_optimizer or si == 0:
                self.optimizer = runtime.make_optimizer(self.model, self.t, kind=stage.optimizer)
            if base is not None and not stage.reset_optimizer:
                self._load_starting_optimizer(si, base)
            if base is not None and si == 0:  # continue the base model's counters so curves line up
                p.step, p.tokens = base["progress"]["step"], base["progress"]["tokens"]
                p.sequences_done = dict(base["progress"].get("sequences_done", {}))
                p.next_eval_tokens = p.tokens + self.cfg.eval.every_tokens
                p.next_ckpt_tokens = p.tokens + self.t.checkpoint_every_tokens
        if runtime.is_schedule_free(self.optimizer):
            self.optimizer.train()  # a checkpoint holds its evaluation weights; train from its training ones
        resumed = base is None and (p.stage_step > 0 or self.sampler_state is not None)
        sampler = self._sampler(stage)
        current = _StageRun(si, stage, sampler, schedules.build(stage.schedule.to_spec(), sampler.num_steps))
        if stage.merge is not None:
            current.merge_steps = stage.merge.steps(sampler.num_steps)
        if stage.regularizer is not None:
            current.regularizer = self._regularizer(si, resumed)
        if base is not None and si == 0 and self.val_sets:  # where the base model starts from
            self.last_val = self._evaluate()
            self.log({"step": p.step, "tokens": p.tokens, "stage": stage.name, "lr": current.lr_at(0),
                      "val": self.last_val})
        if not self.quiet and self.rank == 0:
            from tqdm.auto import tqdm

            print(f"stage {stage.name}: {_mixture(stage)}", flush=True)
            batch_tokens = self.t.batch_size * self.t.seq_len
            current.bar = tqdm(total=current.n_steps * batch_tokens, initial=p.stage_step * batch_tokens,
                               desc=f"[{si + 1}/{len(self.cfg.stages)}] {stage.name}", unit="tok",
                               unit_scale=True, leave=True, dynamic_ncols=True)
        current.window_start, current.window_start_steps = time.perf_counter(), p.window_steps
        return current

    def _load_starting_optimizer(self, si: int, base: dict[str, Any]) -> None:
        """Continue the optimizer state of the checkpoint stage ``si`` starts from (``reset_optimizer``
        false); one of another optimizer is a config error."""
        try:
            distributed.load_optimizer(self.model, self.optimizer, base["optimizer"])
        except (ValueError, KeyError) as exc:
            stage = self.cfg.stages[si]
            raise ConfigError(f"stages[{si}] ({stage.name}).reset_optimizer: the checkpoint's optimizer "
                              f"state does not fit {stage.optimizer} ({str(exc).splitlines()[0]}); set "
                              "reset_optimizer: true") from None
        self._restore_training_weights(base)

    def _restore_training_weights(self, ckpt: dict[str, Any]) -> None:
        """A schedule-free checkpoint saved inside a stage holds its evaluation weights x as ``model`` and
        its training weights y apart: continue from y exactly."""
        if "training_weights" in ckpt and runtime.is_schedule_free(self.optimizer):
            named = dict(self.model.named_parameters())
            order = {id(p): name for name, p in named.items()}
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            runtime.resume_training(self.optimizer, [ckpt["training_weights"][order[id(p)]] for p in params])

    def _starting_weights(self, si: int) -> dict[str, Any] | None:
        """Set the model's weights for stage ``si``: kept from the previous stage, from scratch, or from a
        checkpoint (returned, for its optimizer state and counters)."""
        stage = self.cfg.stages[si]
        if stage.init_from == "scratch" and si > 0:
            torch.manual_seed(self.t.seed + si)
            distributed.load_model(self.model, GPT(self.cfg.model).state_dict())
        if si not in self.start_from:
            return None
        path = self.start_from[si]
        state = load_checkpoint(path)
        try:
            distributed.load_model(self.model, state["model"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"stages[{si}] ({stage.name}).init_from: {path} does not fit this model: "
                              f"{str(exc).splitlines()[0]}") from None
        return state

    def _regularizer(self, si: int, resumed: bool) -> regularizers.Regularizer:
        """Stage ``si``'s regularizer against its starting model: the model now, at the stage's start, or,
        when resuming inside the stage, the checkpoint it started from (the same Fisher is estimated
        again; its FLOPs are counted once)."""
        stage = self.cfg.stages[si]
        start = GPT(self.cfg.model).to(self.device)
        if resumed:
            start.load_state_dict(load_checkpoint(self._start_checkpoint(si))["model"])
        else:
            start.load_state_dict(self.model.state_dict())
        fisher_sampler = None
        if stage.regularizer.kind == "ewc":
            weights = self.cfg.fisher_data(si)
            n_tokens = stage.regularizer.fisher_batches * self.t.batch_size * self.t.seq_len
            fisher_sampler = data.BatchSampler({n: self.shards[n] for n in weights}, weights, None,
                                               self.t.seq_len, self.t.batch_size, n_tokens, seed=self.t.seed)
        reg = regularizers.build(stage.regularizer, start, fisher_sampler, self.device, self.autocast,
                                 self.model.flops_per_token(self.t.seq_len))
        if not resumed:
            self.progress.extra_flops += reg.setup_flops
        return reg

    def _start_checkpoint(self, si: int) -> Path:
        """The checkpoint stage ``si`` started from (a stage that does not start from scratch)."""
        stage = self.cfg.stages[si]
        if isinstance(stage.init_from, RunRef):
            return self.store.checkpoint(stage.init_from)
        if stage.init_from == "previous":
            return self.run_dir.stage_checkpoint(self.cfg.stages[si - 1].name)
        return Path(stage.init_from)

    def _sampler(self, stage: Stage) -> data.BatchSampler:
        """The stage's batch sampler, where the checkpoint left it if resuming inside the stage."""
        p, t = self.progress, self.t
        sampler = data.BatchSampler(
            {n: self.shards[n] for n in stage.sources()}, stage.data, stage.replay, t.seq_len,
            t.batch_size, stage.tokens, seed=t.seed, rank=self.rank, world_size=self.world,
            start={n: p.sequences_done.get(n, 0) for n in stage.data})
        if self.sampler_state is not None:
            sampler.load_state_dict(self.sampler_state)
            self.sampler_state = None
        for corpus, epochs in sampler.planned_epochs.items():
            if epochs > MAX_EPOCHS_BEFORE_WARNING and self.rank == 0:
                warnings.warn(f"stage {stage.name!r} reads corpus {corpus!r} {epochs:.1f} times over (more "
                              f"than {MAX_EPOCHS_BEFORE_WARNING}): expect it to overfit, its validation loss "
                              "to rise", stacklevel=2)
        return sampler

    def run_stage(self, current: _StageRun) -> bool:
        """Train the stage's remaining steps; False when ``stop()`` ended it (a checkpoint is written)."""
        p = self.progress
        while True:
            if self.stop is not None and self.stop():
                self.save_rolling(current.sampler)
                return False
            lr = current.lr_at(p.stage_step)
            with self.timed("steps"):
                self.step(current, lr)
            last = p.stage_step == current.n_steps
            if last and runtime.is_schedule_free(self.optimizer):
                self.optimizer.eval()  # the stage's model is the schedule-free average from here on
            if p.stage_step in current.merge_steps:
                self.snapshot_for_merge(current, last)
            if p.stage_step % self.t.log_every_steps == 0 or last:
                self.log_training_line(current, lr)
            self.evaluate_if_due(current, lr, last)
            if last:
                self.finish_stage(current)
                return True
            self.checkpoint_if_due(current)

    def step(self, current: _StageRun, lr: float) -> None:
        """One optimizer step on the sampler's next batch; counts it (a NaN loss raises)."""
        p, t = self.progress, self.t
        x, y = current.sampler.next_batch()
        micro_batches = [(x[i:i + self.micro].to(self.device), y[i:i + self.micro].to(self.device))
                         for i in range(0, self.share, self.micro)]
        reg = current.regularizer
        loss = runtime.train_step(self.step_model, self.optimizer, micro_batches, lr, t.grad_clip,
                                  self.autocast, workers=1 if self.fsdp else None,
                                  loss_fn=reg.loss_fn if reg else None,
                                  grad_hook=reg.add_penalty_grad if reg else None)
        if self.world > 1:
            loss_t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(loss_t)
            loss = float(loss_t) / self.world
        if not math.isfinite(loss):
            kept = self.run_dir.checkpoints()
            left = (f"the last good checkpoint, {kept[0]}, is kept" if kept else
                    "no checkpoint had been written yet")
            raise TrainingDiverged(f"loss is {loss} at step {p.step + 1} (stage {current.stage.name!r}, "
                                   f"stage step {p.stage_step + 1}, lr {lr:.3g}); {left}")
        batch_tokens = t.batch_size * t.seq_len
        p.stage_step += 1
        p.step += 1
        p.tokens += batch_tokens
        if reg is not None:
            p.extra_flops += reg.step_flops(batch_tokens)
            p.window_regularizer += reg.take_penalty()
        p.window_loss += loss
        p.window_steps += 1
        if current.bar is not None:
            current.bar.update(batch_tokens)

    def log_training_line(self, current: _StageRun, lr: float) -> None:
        """The training line: mean loss since the last one, tokens by source, tokens per second."""
        p = self.progress
        elapsed = time.perf_counter() - current.window_start
        by_source = _add_counts(p.tokens_by_source_done, current.sampler.tokens_by_source)
        mean_loss = p.window_loss / p.window_steps
        tokens_per_s = ((p.window_steps - current.window_start_steps) * self.t.batch_size * self.t.seq_len
                        / max(elapsed, 1e-9))
        record = {"step": p.step, "tokens": p.tokens, "stage": current.stage.name, "lr": lr,
                  "train_loss": mean_loss, "tokens_by_source": by_source, "tokens_per_s": tokens_per_s}
        if current.regularizer is not None:
            record["regularizer_loss"] = p.window_regularizer / p.window_steps
        if p.extra_flops:
            record["extra_flops"] = p.extra_flops
        self.log(record)
        if current.bar is not None:
            current.bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        p.window_loss, p.window_steps, p.window_regularizer = 0.0, 0, 0.0
        current.window_start, current.window_start_steps = time.perf_counter(), 0

    def evaluate_if_due(self, current: _StageRun, lr: float, last: bool) -> None:
        """Evaluate every ``eval.every_tokens`` tokens and at the stage's last step."""
        p, every = self.progress, self.cfg.eval.every_tokens
        due = every and p.tokens >= p.next_eval_tokens
        if self.val_sets and (due or last):
            self.last_val = self._evaluate()
            self.log({"step": p.step, "tokens": p.tokens, "stage": current.stage.name, "lr": lr,
                      "val": self.last_val})
        while every and p.next_eval_tokens <= p.tokens:
            p.next_eval_tokens += every

    def checkpoint_if_due(self, current: _StageRun) -> None:
        """A rolling checkpoint every ``train.checkpoint_every_tokens`` tokens."""
        p, every = self.progress, self.t.checkpoint_every_tokens
        if every and p.tokens >= p.next_ckpt_tokens:
            while p.next_ckpt_tokens <= p.tokens:
                p.next_ckpt_tokens += every
            self.save_rolling(current.sampler)

    def snapshot_for_merge(self, current: _StageRun, last: bool) -> None:
        """Keep the weights of this step for the stage's merge; at its last step, replace the model by the
        average of the kept weights (``Stage.merge``)."""
        stage, index = current.stage.name, current.merge_steps.index(self.progress.stage_step)
        with runtime.eval_weights(self.optimizer):
            model_state, _ = distributed.full_state(self.model, self.optimizer)
            if self.rank == 0:
                self.run_dir.save_merge_snapshot({k: v.clone() for k, v in model_state.items()}, stage, index)
        if not last:
            return
        if self.world > 1:
            dist.barrier()
        states = [load_checkpoint(self.run_dir.merge_snapshot(stage, i))["model"]
                  for i in range(len(current.merge_steps))]
        distributed.load_model(self.model, average_states(states, [1 / len(states)] * len(states)))

    def finish_stage(self, current: _StageRun) -> None:
        """Count what the stage read, move on to the next stage and keep the stage's checkpoint."""
        p, sampler = self.progress, current.sampler
        p.tokens_by_source_done = _add_counts(p.tokens_by_source_done, sampler.tokens_by_source)
        read = sampler.sequences_by_source
        p.sequences_done = {**p.sequences_done, **{
            n: p.sequences_done.get(n, 0) + read.get(n, 0) for n in current.stage.data}}
        p.stage_index, p.stage_step = current.index + 1, 0
        with self.timed("checkpoint"):
            state = self._checkpoint_state(None)
            if state is not None:
                self.run_dir.save_stage_checkpoint(state, current.stage.name, p.step)
                if current.merge_steps:
                    self.run_dir.clear_merge_snapshots(current.stage.name)

    def finish(self, status: str) -> TrainResult:
        if self.rank == 0:
            if status == "done":
                self.run_dir.mark_done()
            self.run_dir.close()
        p = self.progress
        return TrainResult(self.out_dir, status, self.last_val, p.step, p.tokens, dict(self.seconds))

    # -- helpers ---------------------------------------------------------------------------------
    def log(self, record: Record) -> None:
        if self.rank == 0:
            self.run_dir.log(record)
            for logger in self.loggers:
                logger.log(record)
        if self.on_record is not None:
            self.on_record(record)

    @contextlib.contextmanager
    def timed(self, section: str) -> Iterator[None]:
        """Add the time the block takes to ``self.seconds[section]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[section] += time.perf_counter() - start

    def _evaluate(self) -> dict[str, float]:
        with self.timed("eval"), runtime.eval_weights(self.optimizer):
            return evaluate(self.model, self.val_batches, self.t.seq_len, self.micro, self.device,
                            self.autocast)

    def save_rolling(self, sampler: data.BatchSampler) -> None:
        with self.timed("checkpoint"):
            state = self._checkpoint_state(sampler)
            if state is not None:
                self.run_dir.save_rolling_checkpoint(state, self.progress.step)

    def _checkpoint_state(self, sampler: data.BatchSampler | None) -> dict[str, Any] | None:
        """Everything a resume needs (on rank 0; None on the others). Under fsdp every rank takes part."""
        extra = {}
        if runtime.is_schedule_free(self.optimizer) and self.optimizer.param_groups[0]["train_mode"]:
            extra["training_weights"] = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        with runtime.eval_weights(self.optimizer):  # schedule-free: its average, copied before it switches
            model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
            if runtime.is_schedule_free(self.optimizer):
                model_state = {k: v.clone() for k, v in model_state.items()}
        if self.rank != 0:
            return None
        return {
            "model": model_state, "optimizer": optimizer_state,
            "progress": vars(self.progress).copy(), "sampler": sampler.state_dict() if sampler else None,
            "rng": _rng_state(), "last_val": self.last_val, "metrics_bytes": self.run_dir.metrics_size(),
            "config_hash": self.cfg.hash(), **extra,
        }


def eval_sequences(tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation set's tokens as (inputs, targets) rows of ``seq_len``: the whole sequences it holds."""
    n_seq = (len(tokens) - 1) // seq_len
    arr = torch.from_numpy(np.asarray(tokens[: n_seq * seq_len + 1], dtype=np.int64))
    return arr[:-1].view(n_seq, seq_len), arr[1:].view(n_seq, seq_len)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_sets: dict[str, np.ndarray | tuple[torch.Tensor, torch.Tensor]],
             seq_len: int, batch_size: int, device: torch.device,
             autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Mean next-token loss over the same fixed validation tokens of each set (its tokens, or the
    ``eval_sequences`` of them, which the trainer makes once per run)."""
    was_training = model.training
    model.eval()
    out = {}
    for name, tokens in val_sets.items():
        x_all, y_all = tokens if isinstance(tokens, tuple) else eval_sequences(tokens, seq_len)
        n_seq = len(x_all)
        losses, rows = [], []
        for i in range(0, n_seq, batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            with autocast:
                _, loss = model(x, y, return_logits=False)
            losses.append(loss.detach())
            rows.append(len(x))
        # one device sync per set; the same float sums as adding each batch's loss as it comes
        total = 0.0
        for loss, n in zip(torch.stack(losses).tolist(), rows):
            total += loss * n
        out[name] = total / n_seq
    model.train(was_training)
    return out


def _mixture(stage: Stage) -> str:
    """What the stage's batches are made of: each corpus's share of the sequences (data weights rescaled
    to sum to 1 over the new data, replay taken first)."""
    replay = stage.replay.fraction if stage.replay is not None else 0.0
    total = sum(stage.data.values())
    parts = [f"{name} {100 * (1 - replay) * w / total:.4g}%" for name, w in stage.data.items()]
    if replay > 0:
        replayed = stage.replay.weights()
        parts += [f"{name} {100 * replay * w / sum(replayed.values()):.4g}% (replay)"
                  for name, w in replayed.items()]
    note = f" (data weights sum to {total:g}: rescaled)" if abs(total - 1) > 1e-9 else ""
    return "sequences from " + ", ".join(parts) + note


def _both_cpu(a: str, b: str) -> bool:
    """Whether devices ``a`` and ``b`` are both this machine's CPU."""
    try:
        return runtime.pick_device(a).type == runtime.pick_device(b).type == "cpu"
    except RuntimeError:  # a device this machine lacks
        return False


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-corpus counts of finished stages plus the current stage's."""
    return {name: a.get(name, 0) + int(b.get(name, 0)) for name in {**a, **b}}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
