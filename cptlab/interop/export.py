"""``cptlab export``: a run's model as a Hugging Face transformers folder that loads offline with
``AutoModelForCausalLM`` and ``AutoTokenizer``: ``config.json`` and ``model.safetensors`` of the model's
family (``GPTNeoXForCausalLM`` for the lab's own models; an imported Llama or Qwen2 model in its own class:
see ``cptlab.interop.families``), the run's tokenizer (``tokenizer.json`` and its config) and a model card
(``README.md``) that says how the model was trained.

Export checks its work: the two models' logits on a probe batch must agree within ``PROBE_TOLERANCE``, or it
refuses (``ExportError``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cptlab.analysis.metrics import final_losses
from cptlab.analysis.runs import eval_frame
from cptlab.config import ConfigError, RunConfig
from cptlab.files import atomic_folder
from cptlab.interop import families
from cptlab.interop.evaluate import load_model, run_tokenizer
from cptlab.interop.families import PROBE_TOLERANCE
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir


class ExportError(ConfigError):
    """The exported model would not compute what the run's model does."""


def to_transformers(model: GPT, eot_id: int, check: bool = True) -> Any:
    """A transformers model of ``model``'s family (``families.family_of``) with its weights; with
    ``check``, refuse (``ExportError``) unless both give the same logits on a probe batch."""
    hf = families.transformers_model(model, eot_id)
    if check:
        diff = families.logit_difference(model, hf)
        if not diff <= PROBE_TOLERANCE:
            raise ExportError(f"model: the transformers model's logits differ from the run's by {diff:.3g} "
                              f"(more than {PROBE_TOLERANCE}); refusing to export")
    return hf


def export_run(run_dir: str | Path, out: str | Path, stage: str | None = None, check: bool = True) -> Path:
    """Write ``out`` (see the module docstring) from the run's checkpoint at the end of ``stage`` (default:
    its last stage); returns ``out``. Everything is read and checked before anything is written, and the
    files are written into a temporary folder beside ``out`` renamed to ``out`` last: a kill leaves no
    half-written model."""
    out = Path(out)
    check_out(out)
    run = RunDir(run_dir)
    model, cfg, stage = load_model(run, stage)
    tokenizer = run_tokenizer(cfg)
    card = model_card(run, cfg, stage)  # reads metrics.jsonl: a bad line stops the export here
    hf = to_transformers(model, tokenizer.eot_id, check)
    hf_tokenizer = tokenizer.to_tokenizers()
    eot = hf_tokenizer.id_to_token(tokenizer.eot_id)
    fast = families.transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer, eos_token=eot, bos_token=eot, model_max_length=cfg.model.n_ctx)
    with atomic_folder(out) as tmp:
        hf.save_pretrained(str(tmp))
        fast.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def check_out(out: Path) -> None:
    """``out`` must be a new or empty folder that can be written (a one-line ``ConfigError`` otherwise)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a new or empty folder")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: {out} is not writable; give a new or empty folder you can write")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; give a new or empty folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out: {out} cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: {out} cannot be written: {parent} is not writable (the export is written "
                          "beside --out, then renamed into place)")


def model_card(run: RunDir, cfg: RunConfig, stage: str) -> str:
    """README.md of an exported model: shape, tokenizer, every stage up to ``stage``, final losses."""
    m = cfg.model
    n_params = GPT.count_params(m)
    lines = [f"# {run.path.name} (stage {stage})", "",
             f"A {families.CLASSES[families.family_of(m)]} trained with cptlab (a continual pre-training "
             f"lab): {m.n_layer} "
             f"layers x {m.d_model} dims, {m.n_head} heads, {n_params:,} parameters, context {m.n_ctx}, "
             f"tokenizer `{cfg.tokenizer.kind}` ({m.vocab_size} ids).", "",
             "## How it was trained", "", "| stage | data | replay | tokens | schedule | starts from |",
             "|---|---|---|---|---|---|"]
    for st in cfg.stages[: [s.name for s in cfg.stages].index(stage) + 1]:
        data = ", ".join(f"{k} {v:g}" for k, v in st.data.items())
        replay = f"{st.replay.fraction:.0%} of {', '.join(st.replay.weights())}" if st.replay else "-"
        s = st.schedule
        schedule = f"{s.kind}, max {s.max_lr:g}, min {s.min_lr:g}, warmup {s.warmup:.1%}"
        lines.append(f"| {st.name} | {data} | {replay} | {st.tokens:,} | {schedule} | {st.init_from} |")
    labels = run.labels()
    if labels.get("role") == "merge":  # written by cptlab merge: the stage above trained nothing
        parts = [f"{w:g} x {src['experiment']}/{src['run']} (stage {src['stage']})"
                 for src, w in zip(labels["sources"], labels["weights"])]
        lines += ["", f"The weights are an average: {', '.join(parts)}; "
                  f"{labels['compute_tokens']:,} training tokens are behind them."]
    t = cfg.train
    lines += ["", f"AdamW (betas {t.beta1}, {t.beta2}, weight decay {t.weight_decay}), batch "
              f"{t.batch_size} x {t.seq_len} tokens.", ""]
    frame = eval_frame(run)
    if len(frame):
        finals = final_losses(frame, stage=stage, finished_only=False)  # the stage ended: its checkpoint
        sets = [c for c in finals.columns if c.startswith("val_")]
        if len(finals) and sets:
            lines += ["## Final validation losses (mean of the stage's last 2 evaluations)", "",
                      "| set | loss | perplexity |", "|---|---|---|"]
            lines += [f"| {c[4:]} | {finals[c].iloc[0]:.4f} | {math.exp(finals[c].iloc[0]):.2f} |"
                      for c in sets]
    lines += ["", "Load it offline: `AutoModelForCausalLM.from_pretrained(DIR)`, "
              "`AutoTokenizer.from_pretrained(DIR)`. The tokenizer reads a literal `<|endoftext|>` in text "
              "as the end-of-text token (cptlab reads it as text).", "", "```json",
              json.dumps(cfg.to_dict(), indent=1), "```"]
    return "\n".join(lines) + "\n"
