"""``cptlab import``: a pretrained transformers model (a local folder, single or sharded safetensors, or a
hub id when the network is there) as an ordinary run directory of the run store, that continual runs start
from with a run reference (``init_from: {experiment: pretrained, run: <id>, stage: pretrained}``).

    <store>/pretrained/<name>-<hash>/
        config.json      the resolved config: the model's ``ModelConfig``, its own tokenizer (``kind: file``,
                         the copy below) and one stage ``pretrained`` that reads no data and trains 0 tokens
        tokenizer.json   the model's tokenizer
        labels.json      role ``pretrained``; the source, its family and class, its digest, the
                         logit check's difference; ``d0``: the corpus that stands in for the pretraining data
                         (``d0_stand_in`` true); ``past``: its published training schedule where known
        checkpoints/stage-pretrained.pt   the converted weights (fp32)
        metrics.jsonl    one evaluation line (step 0, tokens 0, lr 0) on the ``--eval`` corpora
        DONE             written last

Everything that can be checked is checked before a weight is read, each a one-line error: a folder that is
not a model, an architecture not supported (listing the supported ones), missing or truncated weight files
(from the safetensors headers), a tokenizer whose vocabulary does not fit the embedding, a model larger
than the memory this machine has. Then the weights are converted (``families.to_cptlab``) and the two
models' fp32 logits compared on a probe batch: more than ``PROBE_TOLERANCE`` apart, the import is refused.
The run id is the source's name and a hash of the model config, the tokenizer and the weight files, so
importing the same source twice gives the same run (the second import reuses the first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import psutil
import torch

from cptlab import data
from cptlab.config import ConfigError, EvalConfig, ModelConfig, RunConfig, Stage, TokenizerConfig, TrainConfig
from cptlab.interop import families
from cptlab.interop.merge import evaluate_model, val_sets, write_untrained_run
from cptlab.schedules import ScheduleConfig
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir, RunDirError
from cptlab.training.store import RunStore

STAGE = "pretrained"
EXPERIMENT = "pretrained"
# Memory an import needs per parameter: cptlab's fp32 copy, transformers' fp32 copy for the check, and the
# tensors as read (fp32 at most).
BYTES_PER_PARAM = 12
PROCESS_BYTES = 2**29  # the process itself (torch, transformers): 0.45 GiB measured for a tiny model's import

# What is known of a model's own pretraining, by the source's last path part. Pythia: EleutherAI/pythia,
# models/410M/pythia-410m.yml (commit ddad623): Adam lr 3e-4, min_lr 3e-5, cosine over 143,000 iterations,
# warmup 0.01, 32 GPUs x micro-batch 32 (1,024 sequences) x seq-length 2,048, on the Pile.
PASTS: dict[str, dict[str, Any]] = {
    "pythia-410m": dict(max_lr=3e-4, min_lr=3e-5, schedule="cosine", warmup=0.01, steps=143_000,
                        batch_size=1024, seq_len=2048, tokens=143_000 * 1024 * 2048, data="the Pile",
                        source="https://github.com/EleutherAI/pythia/blob/main/models/410M/pythia-410m.yml"),
}


@dataclasses.dataclass
class Source:
    """A transformers model folder, read up to (not including) its weights."""

    path: Path
    hf_config: dict[str, Any]
    family: str
    model: ModelConfig
    weight_files: list[Path]
    shapes: dict[str, tuple[int, ...]]

    @property
    def n_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())


# -- reading the source -----------------------------------------------------------------------------------

def resolve_source(src: str | Path) -> Path:
    """A local folder as it is; a hub id (``owner/name``) downloaded (config, tokenizer, safetensors)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"SRC: {path} is a file; give a transformers model folder or a hub id")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        raise ConfigError(f"SRC: {src} does not exist and is not a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # offline, unknown repository, gated model: one line either way
        raise ConfigError(f"SRC: cannot download {src} from the hub ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_source(path: Path, n_ctx: int | None = None) -> Source:
    """The model's config and the shapes in its weight files' headers; refuse what cptlab cannot import."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"SRC: {path} is not a transformers model folder (no config.json)")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"SRC: {config_path} is not a JSON file ({exc})") from None
    family = families.family_of_config(hf, str(config_path))
    model = families.model_config(hf, n_ctx, str(config_path))
    model.validate()
    files = weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    source = Source(path, hf, family, model, files, shapes)
    expected = {k: tuple(v.shape) for k, v in _meta_state(model).items()}
    got = families.to_cptlab({k: torch.empty(s, device="meta") for k, s in shapes.items()}, model)
    for key, shape in expected.items():
        if tuple(got[key].shape) != shape:
            raise ConfigError(f"weights: {key} has shape {tuple(got[key].shape)} in the checkpoint, the "
                              "config "
                              f"says {shape}")
    return source


def _meta_state(model: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return GPT(model).state_dict()


def weight_files(path: Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` names (each must be there)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConfigError(f"weights: {len(missing)} shard(s) of {index.name} are missing: "
                              f"{', '.join(missing[:3])}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")):
        raise ConfigError(f"weights: {path} holds PyTorch .bin weights; cptlab imports safetensors only "
                          "(save the model again with save_pretrained(safe_serialization=True))")
    raise ConfigError(f"weights: {path} has no model.safetensors or model.safetensors.index.json")


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; refuse a file shorter than its header says."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ConfigError(f"weights: {file.name} is not a safetensors file (or is truncated)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < 8 + n + end:
        raise ConfigError(f"weights: {file.name} is truncated: {size:,} bytes, its header needs "
                          f"{8 + n + end:,}")
    return {name: tuple(t["shape"]) for name, t in header.items()}


def available_memory() -> int:
    """Bytes of memory this machine has available now (where the import runs)."""
    return int(psutil.virtual_memory().available)


def check_memory(source: Source) -> None:
    """Refuse a model whose import needs more memory than the machine has available (``BYTES_PER_PARAM``
    per parameter and ``PROCESS_BYTES``; a SmolLM2-135M-shaped import peaked at 1.78 GiB, this says 2.0)."""
    need, have = BYTES_PER_PARAM * source.n_params + PROCESS_BYTES, available_memory()
    if need > have:
        raise ConfigError(f"SRC: importing {source.n_params:,} parameters needs about {need / 2**30:.1f} GiB "
                          "of "
                          f"memory; this machine has {have / 2**30:.1f} GiB available")


def check_tokenizer(path: Path, model: ModelConfig) -> data.Tokenizer:
    """The model's ``tokenizer.json``, checked to fit its embedding."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"tokenizer: {path} has no tokenizer.json (save a fast tokenizer with the model)")
    tokenizer = data.load_tokenizer(TokenizerConfig(kind="file", path=str(file)))
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"tokenizer: {file} has {tokenizer.vocab_size} ids, more than the model's "
                          "embedding "
                          f"holds (vocab_size {model.vocab_size})")
    return tokenizer


# -- converting and checking --------------------------------------------------------------------------------

def load_weights(source: Source) -> GPT:
    """cptlab's model (fp32) holding the source's weights."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in source.weight_files:
        tensors.update(load_file(str(file)))
    state = {k: v.float() for k, v in families.to_cptlab(tensors, source.model).items()}
    del tensors
    model = GPT(source.model)
    model.load_state_dict(state)
    return model.eval()


def check_logits(model: GPT, source: Source) -> float:
    """The largest fp32 logit difference between ``model`` and transformers' own reading of the folder;
    refuse more than ``PROBE_TOLERANCE``."""
    tf = families.transformers_module()
    tf.utils.logging.disable_progress_bar()  # the import prints its own one-line result
    hf = getattr(tf, families.CLASSES[source.family]).from_pretrained(str(source.path), dtype=torch.float32)
    diff = families.logit_difference(model, hf.eval())
    if not diff <= families.PROBE_TOLERANCE:
        raise ConfigError(f"weights: cptlab's logits differ from transformers' by {diff:.3g} (more than "
                          f"{families.PROBE_TOLERANCE}); refusing to import")
    return diff


# -- the run directory -------------------------------------------------------------------------------------

def import_config(source: Source, eval_sets: list[str], train: dict[str, Any] | None = None,
                  corpora: dict[str, dict[str, Any]] | None = None,
                  eval_tokens: int | None = None) -> RunConfig:
    """The imported run's config (its tokenizer path is set where the run directory's copy will lie):
    ``train`` settings (as a run config's; ``seq_len`` defaults to 128 or the context if shorter) say how
    the evaluation line is computed."""
    nothing = ScheduleConfig(kind="constant", max_lr=0.0, min_lr=0.0, warmup=0.0)
    train = RunConfig.from_dict({"train": {"seq_len": min(TrainConfig.seq_len, source.model.n_ctx),
                                           **(train or {})}}).train
    ev = EvalConfig(sets=list(eval_sets), tokens=eval_tokens or EvalConfig.tokens)
    return RunConfig(model=source.model, tokenizer=TokenizerConfig(kind="file", path="tokenizer.json"),
                     train=train, eval=ev, corpora=dict(corpora or {}),
                     stages=[Stage(name=STAGE, data={}, tokens=0, schedule=nothing)])


def source_digest(source: Source, cfg: RunConfig, tokenizer: data.Tokenizer) -> str:
    """A hash of the model config, the tokenizer and the weight files' bytes: the run id's suffix."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode() + tokenizer.fingerprint.encode())
    for file in source.weight_files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


def default_name(src: str | Path) -> str:
    return re.sub(r"[^\w.]+", "-", Path(str(src).rstrip("/")).name).strip("-") or "model"


def import_model(src: str | Path, out: str | Path | None = None, name: str | None = None,
                 eval_sets: list[str] | None = None, stand_in: str | None = None, n_ctx: int | None = None,
                 train: dict[str, Any] | None = None, corpora: dict[str, dict[str, Any]] | None = None,
                 eval_tokens: int | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Import ``src`` into the run store ``out`` (default: ``$CPTLAB_RUNS``) as experiment ``pretrained``
    (see the module docstring); ``eval_sets`` may name user ``corpora`` (as a run config's), evaluated
    with ``train`` settings (``import_config``) on ``eval_tokens`` tokens. ``run_id`` replaces the id
    ``<name>-<hash>`` (recipes name their base so; another model there is refused). Returns run (its
    directory),
    run_id, family, parameters, logit_diff,
    val ({set: loss}) and reused."""
    path = resolve_source(src)
    source = read_source(path, n_ctx)
    tokenizer = check_tokenizer(path, source.model)
    check_memory(source)
    cfg = import_config(source, eval_sets or [], train, corpora, eval_tokens)
    digest = source_digest(source, cfg, tokenizer)
    run = RunStore(out).run(EXPERIMENT, run_id or f"{name or default_name(src)}-{digest}")
    if run.done:
        labels = run.labels()
        if labels.get("digest") != digest:
            raise RunDirError(f"{run.path} holds another imported model; refusing to overwrite it: give "
                              "another --run-id")
        return _result(run, labels, reused=True)
    copy = TokenizerConfig(kind="file", path=str(run.path / "tokenizer.json"))
    cfg = dataclasses.replace(cfg, tokenizer=copy)
    sets = val_sets(cfg, tokenizer, cfg.eval.sets)
    model = load_weights(source)
    diff = check_logits(model, source)
    stand_in = stand_in or (cfg.eval.sets[0] if cfg.eval.sets else None)
    labels = {"role": "pretrained", "experiment": EXPERIMENT, "name": run.name, "source": str(src),
              "family": source.family, "class": families.CLASSES[source.family],
              "parameters": source.n_params,
              "digest": digest, "logit_diff": diff, "d0": stand_in,
              "d0_stand_in": True, "past": PASTS.get(default_name(src))}
    _write(run, cfg, labels, model, path / "tokenizer.json", evaluate_model(model, cfg, sets))
    return _result(run, labels, reused=False)


def _write(run: RunDir, cfg: RunConfig, labels: dict[str, Any], model: GPT, tokenizer_file: Path,
           val: dict[str, float]) -> None:
    """Tokenizer, labels, config, checkpoint, the evaluation line, then DONE: each file atomic, DONE last."""
    run.check_usable()
    run.lock()
    try:  # an import killed half-way is done again over its own files (the same config)
        write_untrained_run(run, cfg, labels, model.state_dict(), val, STAGE, 0,
                            {"tokenizer.json": tokenizer_file.read_text(encoding="utf-8")})
    finally:
        run.unlock()


def base_settings(run: str | Path | RunDir) -> dict[str, Any]:
    """The ``model`` and ``tokenizer`` sections (as mappings) a run config that continues the imported
    ``run`` must hold, and its ``init_from`` reference: ``{"model", "tokenizer", "init_from"}``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.done or run.labels().get("role") != "pretrained":
        raise RunDirError(f"{run.path} is not a finished import (cptlab import)")
    cfg = run.load_config()
    return {"model": dataclasses.asdict(cfg.model), "tokenizer": dataclasses.asdict(cfg.tokenizer),
            "init_from": {"experiment": run.experiment, "run": run.run_id, "stage": STAGE}}


def _result(run: RunDir, labels: dict[str, Any], reused: bool) -> dict[str, Any]:
    line = [r for r in run.read_metrics() if "val" in r][-1]
    if not run.done:
        raise RunDirError(f"{run.path}: the import did not finish")
    return {"run": run.path, "run_id": run.run_id, "family": labels["family"],
            "parameters": labels["parameters"],
            "logit_diff": labels["logit_diff"], "val": line["val"], "reused": reused}
