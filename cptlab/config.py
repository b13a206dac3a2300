"""Run configuration: one set of dataclasses drives the CLI, the notebooks, the widgets and the tests.

A run config (YAML or dict) has top-level ``model``, ``tokenizer``, ``train``, ``eval``, ``stages``
and optional ``corpora``. Anything omitted takes the defaults below; ``resolve`` fills them in and
``validate`` checks them, raising ``ConfigError`` that names the dotted key and what is allowed. Each
section checks its own fields (its ``validate``); ``RunConfig.validate`` calls them and checks what
involves several sections.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cptlab.files import atomic_write_text
from cptlab.schedules import ScheduleConfig


class ConfigError(ValueError):
    """A bad config value; the message names the dotted key and what is allowed."""


# Model presets by name. n_ctx is the longest sequence the model accepts (rotary tables).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(n_layer=2, n_head=2, d_model=32, n_ctx=256),
    "tiny": dict(n_layer=2, n_head=4, d_model=48, n_ctx=512),
    "small": dict(n_layer=8, n_head=8, d_model=512, n_ctx=1024),
    "paper-405m": dict(n_layer=24, n_head=16, d_model=1024, n_ctx=2048, vocab_size=50304),
}
DEVICES = ("auto", "cpu", "cuda", "mps")  # or cuda:N
LOGGERS = ("tensorboard", "wandb")


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
BIASES = ("all", "none", "qkv")  # every Linear and LayerNorm (GPT-NeoX), none (Llama), q/k/v only (Qwen2)
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """The decoder's shape and options. ``preset`` fills the shape fields left unset (None).

    The defaults are the paper's GPT-NeoX block; the other options serve imported Llama-family and Qwen2
    models (``cptlab import``): ``norm``, ``mlp`` (``swiglu`` with ``intermediate_size``), ``n_kv_head``
    (grouped-query attention), ``bias``, ``rotary_pct`` / ``rotary_base`` and Llama 3's ``rope_scaling``
    (``ROPE_SCALING_KEYS``). A field left at its default is left out of the config hash, so these options
    do not change the id of any run that does not set them.
    """

    preset: str | None = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    n_ctx: int | None = None
    vocab_size: int | None = None  # None: taken from the tokenizer
    mlp_ratio: int = 4
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    tie_embeddings: bool = False
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    intermediate_size: int | None = None  # the MLP's hidden width; None: mlp_ratio * d_model
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    bias: str = "all"  # all | none | qkv
    rope_scaling: dict[str, float] | None = None  # Llama 3's: ROPE_SCALING_KEYS; None: plain rotary

    def validate(self) -> None:
        """Check the fields, and the shape they make with the preset's (the one the model is built with)."""
        if self.preset is not None:
            _check_choice("model.preset", self.preset, tuple(MODEL_PRESETS), "preset")
        preset = MODEL_PRESETS.get(self.preset or "", {})
        shape = {key: getattr(self, key) if getattr(self, key) is not None else preset.get(key)
                 for key in ("n_layer", "n_head", "d_model", "n_ctx", "vocab_size")}
        for key, value in shape.items():
            if value is not None and value < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {value}")
        d_model, n_head = shape["d_model"], shape["n_head"]
        if d_model and n_head and d_model % n_head:
            raise ConfigError(f"model.d_model ({d_model}) must be divisible by model.n_head ({n_head})")
        _check_range("model.rotary_pct", self.rotary_pct, 0.0, 1.0)
        _check_range("model.dropout", self.dropout, 0.0, 1.0)
        self._validate_options(n_head)

    def _validate_options(self, n_head: int | None) -> None:
        _check_choice("model.norm", self.norm, NORMS)
        _check_choice("model.mlp", self.mlp, MLPS)
        _check_choice("model.bias", self.bias, BIASES)
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(f"model.intermediate_size: must be >= 1 or null, got {self.intermediate_size}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or (n_head and n_head % self.n_kv_head)):
            raise ConfigError(f"model.n_kv_head: must divide model.n_head ({n_head}), got {self.n_kv_head}")
        if self.rope_scaling is not None:
            if sorted(self.rope_scaling) != sorted(ROPE_SCALING_KEYS):
                raise ConfigError("model.rope_scaling: needs exactly the keys "
                                  f"{', '.join(ROPE_SCALING_KEYS)}, "
                                  f"got {', '.join(self.rope_scaling) or 'none'}")
            for key, value in self.rope_scaling.items():
                if not value > 0:
                    raise ConfigError(f"model.rope_scaling.{key}: must be > 0, got {value}")

    def mlp_width(self) -> int:
        """The MLP's hidden width: ``intermediate_size``, else ``mlp_ratio * d_model`` (resolved shapes)."""
        return self.intermediate_size if self.intermediate_size is not None else self.mlp_ratio * self.d_model

    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, else ``n_head``."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    def context(self) -> int | None:
        """The longest sequence the model takes: ``n_ctx``, else the preset's (None if neither says)."""
        return self.n_ctx if self.n_ctx is not None else MODEL_PRESETS.get(self.preset or "", {}).get("n_ctx")


@dataclass
class TokenizerConfig:
    """``kind``: ``bpe`` (trained offline on the shipped corpora), ``byte`` (256 symbols) or ``file``
    (a saved Hugging Face ``tokenizers`` JSON at ``path``)."""

    kind: str = "bpe"
    vocab_size: int = 8192
    path: str | None = None

    def validate(self) -> None:
        _check_choice("tokenizer.kind", self.kind, ("bpe", "byte", "file"))
        if self.kind == "bpe" and not 257 <= self.vocab_size <= 2**32:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 257, got {self.vocab_size}")
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.path: required when tokenizer.kind is 'file'")


@dataclass
class TrainConfig:
    seq_len: int = 128
    batch_size: int = 32  # global batch, in sequences
    micro_batch_size: int | None = None  # per process and step; None: the whole share of the batch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    strategy: str = "ddp"  # ddp | fsdp (with several processes)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    checkpoint_every_tokens: int = 0  # rolling checkpoint; 0: only at stage ends
    log_every_steps: int = 10
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    loggers: list[str] = field(default_factory=list)  # mirrors of metrics.jsonl: tensorboard, wandb

    def validate(self) -> None:
        for key in ("seq_len", "batch_size", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size: must be >= 1 or null, got {self.micro_batch_size}")
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train.strategy", self.strategy, ("ddp", "fsdp"))
        if not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"train.device: {self.device!r} not allowed; allowed: {', '.join(DEVICES)}, "
                              "cuda:N")
        for key in ("weight_decay", "eps", "grad_clip", "checkpoint_every_tokens", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        _check_range("train.beta1", self.beta1, 0.0, 1.0)
        _check_range("train.beta2", self.beta2, 0.0, 1.0)
        for i, name in enumerate(self.loggers):
            _check_choice(f"train.loggers[{i}]", name, LOGGERS)
            if name in self.loggers[:i]:
                raise ConfigError(f"train.loggers[{i}]: {name!r} is named twice; name each logger once")


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=list)  # corpora whose validation split is evaluated
    every_tokens: int = 0  # 0: only at stage ends
    tokens: int = 65536  # validation tokens per set (fixed, the same at every evaluation)

    def validate(self, known: set[str] | None = None) -> None:
        if self.every_tokens < 0:
            raise ConfigError(f"eval.every_tokens: must be >= 0, got {self.every_tokens}")
        for i, name in enumerate(self.sets):
            _check_corpus(f"eval.sets[{i}]", name, known)


@dataclass
class ReplayConfig:
    """Compute-equivalent replay: ``fraction`` of the stage's sequences come from ``source``, a corpus or a
    mapping corpus -> weight (replay from several earlier datasets, split by weight)."""

    source: str | dict[str, float] = ""
    fraction: float = 0.0
    order: str = "original"  # original | shuffled

    def weights(self) -> dict[str, float]:
        """The replayed corpora and their weights (one corpus: weight 1)."""
        return dict(self.source) if isinstance(self.source, dict) else {self.source: 1.0}

    def validate(self, where: str, known: set[str] | None = None) -> None:
        if isinstance(self.source, dict):
            if not self.source:
                raise ConfigError(f"{where}.source: an empty mapping; give a corpus or corpus -> weight")
            for name, weight in self.source.items():
                _check_corpus(f"{where}.source", name, known)
                if not weight > 0:
                    raise ConfigError(f"{where}.source.{name}: weight must be > 0, got {weight}")
        else:
            _check_corpus(f"{where}.source", self.source, known)
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"{where}.fraction: must be in [0, 1), got {self.fraction}")
        _check_choice(f"{where}.order", self.order, ("original", "shuffled"))


REGULARIZERS = ("ewc", "lwf")
REGULARIZER_FIELDS = {"ewc": ("weight", "fisher_batches", "data"), "lwf": ("weight", "temperature")}


@dataclass
class RegularizerConfig:
    """A continual-learning baseline that protects what the model knew at the start of the stage.

    - ``ewc`` (Kirkpatrick et al. 2017): ``weight / 2 * sum_i F_i (theta_i - theta*_i)^2`` added to the loss,
      with ``theta*`` the stage's starting weights and ``F`` the diagonal empirical Fisher estimated on
      them over ``fisher_batches`` batches of ``data`` (default: every corpus the earlier stages of the
      config read; required on a first stage, whose earlier data this config does not know).
    - ``lwf`` (Li & Hoiem 2017): ``weight * temperature^2 * KL(teacher || student)`` on the stage's own
      batches, the teacher being the frozen model of the stage's start, both softened by ``temperature``.
    """

    kind: str = "ewc"
    weight: float = 1.0
    temperature: float = 2.0  # lwf
    fisher_batches: int = 8  # ewc
    data: dict[str, float] = field(default_factory=dict)  # ewc: corpus -> weight to estimate F on

    def validate(self, where: str, known: set[str] | None = None) -> None:
        _check_choice(f"{where}.kind", self.kind, REGULARIZERS, "regularizer")
        own = REGULARIZER_FIELDS[self.kind]
        default = RegularizerConfig()
        for f in dataclasses.fields(self):  # another kind's field, set: it would be stored and never used
            if f.name not in ("kind", *own) and getattr(self, f.name) != getattr(default, f.name):
                raise ConfigError(f"{where}.{f.name}: not a field of {self.kind}; {self.kind} takes: "
                                  f"{', '.join(own)}")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight: must be > 0 (leave the regularizer out for none), "
                              f"got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if self.fisher_batches < 1:
            raise ConfigError(f"{where}.fisher_batches: must be >= 1, got {self.fisher_batches}")
        for name, weight in self.data.items():
            _check_corpus(f"{where}.data", name, known)
            if not weight > 0:
                raise ConfigError(f"{where}.data.{name}: weight must be > 0, got {weight}")


@dataclass
class RunRef:
    """A run of the run store and one of its stages: ``experiment``, ``run`` (its id, ``<name>-<hash>``)
    and ``stage``. As a stage's ``init_from`` it names the end-of-stage checkpoint the stage starts from,
    found in the run store that holds the run being trained; so a run store can move, and a run's
    identity does not depend on where its store is."""

    experiment: str = ""
    run: str = ""
    stage: str = ""

    def validate(self, where: str) -> None:
        for key in ("experiment", "run", "stage"):
            value = getattr(self, key)
            if not value or "/" in value or value in (".", ".."):
                raise ConfigError(f"{where}.{key}: must be a non-empty name without '/', got {value!r}")

    def __str__(self) -> str:
        return f"{self.experiment}/{self.run} (stage {self.stage})"


OPTIMIZERS = ("adamw", "schedulefree_adamw")


@dataclass
class MergeConfig:
    """End a stage with the average of its last ``count`` checkpoints instead of its final weights: the
    snapshots are taken at ``count`` evenly spaced steps of the stage's last ``window`` fraction, the last
    one at its final step (checkpoint averaging along a constant LR emulates a decay: WSM, arXiv
    2507.17634; Hägele et al. 2405.18392)."""

    window: float = 0.2
    count: int = 4

    def validate(self, where: str) -> None:
        if not 0 < self.window <= 1:
            raise ConfigError(f"{where}.window: must be in (0, 1], got {self.window}")
        if self.count < 1:
            raise ConfigError(f"{where}.count: must be >= 1, got {self.count}")

    def steps(self, total_steps: int) -> list[int]:
        """The stage steps (1-based: after that many optimizer steps) whose weights are averaged."""
        span = self.window * total_steps
        picked = {max(1, total_steps - round(span * (self.count - 1 - k) / self.count))
                  for k in range(self.count)}
        return sorted(picked)


INIT_FROM = "previous, scratch, a checkpoint path ending in .pt, or a run {experiment, run, stage}"


@dataclass
class Stage:
    name: str = "stage"
    data: dict[str, float] = field(default_factory=dict)  # corpus -> weight
    tokens: int = 0  # compute budget of the stage, replay included
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    replay: ReplayConfig | None = None
    reset_optimizer: bool = True
    init_from: str | RunRef = "previous"  # previous | scratch | a checkpoint path | a run of the store
    regularizer: RegularizerConfig | None = None  # ewc | lwf, against the stage's starting model
    optimizer: str = "adamw"  # adamw | schedulefree_adamw (Defazio et al. 2024; the `schedulefree` package)
    merge: MergeConfig | None = None  # end the stage with the average of its last checkpoints

    def sources(self) -> list[str]:
        """The corpora the stage reads: its data, then its replay sources (at 0% too: the sampler keeps
        replay streams that supply no sequence, so a 0% run counts 0 tokens from them)."""
        names = list(self.data)
        if self.replay is not None:
            names += [n for n in self.replay.weights() if n not in names]
        return names

    def validate(self, where: str, known: set[str] | None, batch_tokens: int) -> None:
        """Check the stage; ``where`` names it in messages (``stages[1] (continue)``)."""
        if not self.name or "/" in self.name:
            raise ConfigError(f"{where}.name: must be a non-empty name without '/'")
        if not self.data:
            raise ConfigError(f"{where}.data: at least one corpus with a weight is required")
        for name, weight in self.data.items():
            _check_corpus(f"{where}.data", name, known)
            if not weight > 0:
                raise ConfigError(f"{where}.data.{name}: weight must be > 0, got {weight}")
        if self.tokens < batch_tokens:
            raise ConfigError(f"{where}.tokens: {self.tokens} is smaller than one batch "
                              f"(train.batch_size x train.seq_len = {batch_tokens})")
        if self.replay is not None:
            self.replay.validate(f"{where}.replay", known)
            if set(self.data) == set(self.replay.weights()):
                raise ConfigError(f"{where}.replay.source: {self.replay.source!r} is also the only new "
                                  "corpus; replay must come from another corpus")
        if self.regularizer is not None:
            self.regularizer.validate(f"{where}.regularizer", known)
        if isinstance(self.init_from, RunRef):
            self.init_from.validate(f"{where}.init_from")
        elif not (self.init_from in ("previous", "scratch") or self.init_from.endswith((".pt", ".pth"))):
            raise ConfigError(f"{where}.init_from: {self.init_from!r} not allowed; allowed: {INIT_FROM}")
        try:
            self.schedule.resolved().validate()
        except ValueError as exc:
            raise ConfigError(f"{where}.schedule.{exc}") from None
        self._validate_update(where)

    def _validate_update(self, where: str) -> None:
        """The optimizer and the merge: schedule-free AdamW takes a constant schedule (it has no decay)."""
        _check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS, "optimizer")
        if self.optimizer == "schedulefree_adamw" and self.schedule.kind != "constant":
            raise ConfigError(f"{where}.schedule.kind: schedule-free AdamW takes a constant schedule (its "
                              f"warmup re-warms), got {self.schedule.kind!r}")
        if self.merge is not None:
            self.merge.validate(f"{where}.merge")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[Stage] = field(default_factory=list)
    corpora: dict[str, dict[str, Any]] = field(default_factory=dict)  # user corpora by name

    # -- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a (partial) mapping; unknown keys and wrong types raise ``ConfigError``."""
        return _build(cls, data, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON, atomically."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else json.dumps(
            self.to_dict(), indent=2, sort_keys=True)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Load a YAML/JSON config, apply ``dotted.key=value`` overrides, resolve relative corpus
        paths against the file's folder."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = apply_overrides(data, overrides or [])
        for spec in (data.get("corpora") or {}).values():
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                p = Path(spec["path"]).expanduser()
                if not p.is_absolute():
                    spec["path"] = str(path.parent.resolve() / p)
        return cls.from_dict(data)

    # -- resolution and checks ---------------------------------------------------------------
    def resolve(self, vocab_size: int | None = None) -> RunConfig:
        """A copy with every default filled in: preset shapes, schedule const_lr, vocab size."""
        cfg = copy.deepcopy(self)
        m = cfg.model
        if m.preset is not None:
            _check_choice("model.preset", m.preset, tuple(MODEL_PRESETS), "preset")
            for key, value in MODEL_PRESETS[m.preset].items():
                if getattr(m, key) is None:
                    setattr(m, key, value)
        if m.vocab_size is None and vocab_size is not None:
            m.vocab_size = vocab_size
        for st in cfg.stages:
            st.schedule = st.schedule.resolved()
        return cfg

    def validate(self, known_corpora: typing.Iterable[str] | None = None) -> None:
        """Check values before any work is done: each section, then what ties sections together.
        ``known_corpora``: names corpora may take (shipped + registered); None skips that check."""
        known = None if known_corpora is None else set(known_corpora) | set(self.corpora)
        _check_finite(self, "")
        self.model.validate()
        self.tokenizer.validate()
        self.train.validate()
        self.eval.validate(known)
        t = self.train
        n_ctx = self.model.context()
        if n_ctx is not None and t.seq_len > n_ctx:
            raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.n_ctx ({n_ctx})")
        if self.eval.tokens < t.seq_len:
            raise ConfigError(
                f"eval.tokens ({self.eval.tokens}) must be at least one sequence (train.seq_len={t.seq_len})")
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        names = [st.name for st in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: stage names must be unique, got {names}")
        for i, st in enumerate(self.stages):
            st.validate(f"stages[{i}] ({st.name})", known, t.batch_size * t.seq_len)
        self._validate_sequence()

    def _validate_sequence(self) -> None:
        """What a stage may take from the stages before it: replay only of corpora read earlier, and a
        regularizer only where there is an earlier model (and, for EWC, earlier data) to protect."""
        for i, st in enumerate(self.stages):
            where = f"stages[{i}] ({st.name})"
            seen, complete = self.read_before(i)
            fresh = st.init_from == "scratch" or (i == 0 and st.init_from == "previous")
            if st.replay is not None and complete and i > 0:
                for name in st.replay.weights():
                    if name not in seen:
                        raise ConfigError(f"{where}.replay.source: {name!r} was not read before this stage "
                                          f"(read before it: {', '.join(sorted(seen)) or 'nothing'})")
            if (i > 0 and st.init_from == "previous" and not st.reset_optimizer
                    and st.optimizer != self.stages[i - 1].optimizer):
                raise ConfigError(f"{where}.reset_optimizer: must be true when the optimizer changes "
                                  f"({self.stages[i - 1].optimizer} -> {st.optimizer})")
            if (st.optimizer != "adamw" or st.merge is not None) and self.train.strategy == "fsdp":
                raise ConfigError(f"{where}: schedule-free AdamW and merge are not supported with "
                                  "train.strategy fsdp; use ddp")
            reg = st.regularizer
            if reg is None:
                continue
            if fresh:
                raise ConfigError(f"{where}.regularizer: the stage starts from scratch, so there is no "
                                  "earlier model to protect; put it on a later stage")
            if reg.kind == "ewc" and not reg.data and not seen:
                raise ConfigError(f"{where}.regularizer.data: required: no earlier stage of this config "
                                  "read data to estimate the Fisher on; name the corpora to protect")
            if self.train.strategy == "fsdp":
                raise ConfigError(f"{where}.regularizer: not supported with train.strategy fsdp; use ddp")

    def read_before(self, index: int) -> tuple[list[str], bool]:
        """The corpora the stages before ``index`` read since the model last started (from scratch or
        from a checkpoint), and whether that is all the model read (False when it started from a
        checkpoint or another run, whose data this config does not know)."""
        names: list[str] = []
        complete = True
        for i, st in enumerate(self.stages[:index + 1]):
            if st.init_from == "scratch" or i == 0 or st.init_from != "previous":
                names, complete = [], st.init_from in ("scratch", "previous")
            if i < index:
                names += [n for n in st.sources() if n not in names]
        return names, complete

    def fisher_data(self, index: int) -> dict[str, float]:
        """The corpora (and weights) EWC estimates stage ``index``'s Fisher on: its ``regularizer.data``,
        else every corpus the earlier stages read since the model last started, weighted equally."""
        reg = self.stages[index].regularizer
        if reg is not None and reg.data:
            return dict(reg.data)
        return {name: 1.0 for name in self.read_before(index)[0]}

    def eval_sets(self) -> list[str]:
        """The corpora evaluated: ``eval.sets``, then every other corpus a stage reads (data or replay),
        so that every dataset of a sequence is evaluated at every stage end."""
        names = list(dict.fromkeys(self.eval.sets))
        for st in self.stages:
            names += [n for n in st.sources() if n not in names]
        return names

    def hash(self) -> str:
        """Short content hash of the resolved config (what makes two runs the same run). Values equal to
        their field's default are left out, so adding a field with a default keeps every existing hash."""
        text = json.dumps(_non_default(self.resolve()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- helpers -------------------------------------------------------------------------------------

def _non_default(value: Any) -> Any:
    """A dataclass as a plain mapping of only the fields that differ from their defaults (recursively)."""
    if dataclasses.is_dataclass(value):
        default = type(value)()
        return {f.name: _non_default(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default, f.name)}
    if isinstance(value, list):
        return [_non_default(v) for v in value]
    if isinstance(value, dict):
        return {k: _non_default(v) for k, v in value.items()}
    return value


def _check_finite(value: Any, where: str) -> None:
    """Every float in ``value`` (a config section, walked through its fields, mappings and lists) is finite:
    one rule for all fields, so an inf or nan stops the run before any work rather than after a stage."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            named = f" ({item.name})" if isinstance(item, Stage) else ""
            _check_finite(item, f"{where}[{i}]{named}")


def _check_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: must be in [{lo}, {hi}], got {value}")


def _check_choice(key: str, value: Any, allowed: tuple[str, ...], what: str = "") -> None:
    """``value`` must be one of ``allowed``; the error says "unknown <what>" when ``what`` is given."""
    if value not in allowed:
        shown = f"unknown {what} {value!r};" if what else f"{value!r} not allowed;"
        raise ConfigError(f"{key}: {shown} allowed: {', '.join(allowed)}")


def _check_corpus(key: str, name: str, known: set[str] | None) -> None:
    if known is not None and name not in known and name.startswith("docs-"):
        raise ConfigError(f"{key}: corpus {name!r} is not built (or not a docs pack corpus): "
                          "run `cptlab corpora fetch docs`")
    if known is not None and name not in known:
        raise ConfigError(f"{key}: unknown corpus {name!r}; known corpora: {', '.join(sorted(known))}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Recursively build dataclass ``cls`` from a mapping, checking keys and types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; allowed: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        inner = [a for a in args if a is not type(None)]
        classes = [a for a in inner if dataclasses.is_dataclass(a)]
        if classes and isinstance(value, (dict, *classes)):  # a mapping where a section may stand
            return _coerce(classes[0], value, path)
        mappings = [a for a in inner if typing.get_origin(a) is dict]
        if mappings and isinstance(value, dict):  # a name or a mapping of names (replay.source)
            return _coerce(mappings[0], value, path)
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 2.0e6 in YAML
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML); list items by index:
    ``stages.1.replay.fraction=0.05``."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if node is None:
                        raise ConfigError(f"--set {key}: {part!r} is null")
    return data


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys where two config dicts differ, as 'key: a -> b' lines."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, path)
        elif isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            for i, (x, y) in enumerate(zip(va, vb)):
                if isinstance(x, dict) and isinstance(y, dict):
                    out += diff(x, y, f"{path}[{i}]")
                elif x != y:
                    out.append(f"{path}[{i}]: {x!r} -> {y!r}")
        elif va != vb:
            out.append(f"{path}: {va!r} -> {vb!r}")
    return out
