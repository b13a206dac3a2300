"""``cptlab export``: a run's model as a Hugging Face transformers folder that loads offline with
``AutoModelForCausalLM`` and ``AutoTokenizer``: ``config.json`` and ``model.safetensors`` of a
``GPTNeoXForCausalLM``, the run's tokenizer (``tokenizer.json`` and its config) and a model card
(``README.md``) that says how the model was trained.

cptlab's decoder is GPT-NeoX-shaped, so every option maps: parallel or sequential residual, rotary on the
first dims of each head, untied or tied embeddings, biases everywhere, exact GELU, LayerNorm eps 1e-5. The
one layout difference is the fused query/key/value projection: cptlab stacks all queries, then all keys,
then all values; GPT-NeoX stacks (query, key, value) head by head. Export checks its work: the two models'
logits on a probe batch must agree, or it refuses (``ExportError``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from cptlab.analysis.metrics import final_losses
from cptlab.analysis.runs import eval_frame
from cptlab.config import ConfigError, ModelConfig, RunConfig
from cptlab.files import atomic_folder
from cptlab.interop.evaluate import load_model, run_tokenizer
from cptlab.training.model import GPT, rotary_dims
from cptlab.training.rundir import RunDir

PROBE_TOLERANCE = 1e-3  # largest logit difference (fp32) between the two models that export accepts


class ExportError(ConfigError):
    """The exported model would not compute what the run's model does."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("cptlab export needs the transformers package: pip install transformers") from None
    return transformers


def neox_config(model: ModelConfig, eot_id: int) -> Any:
    """The ``GPTNeoXConfig`` of a resolved cptlab model."""
    head = model.d_model // model.n_head
    # transformers takes int(head * factor) rotary dims: aim half a dim above cptlab's even count
    factor = (rotary_dims(model) + 0.5) / head
    return _transformers().GPTNeoXConfig(
        vocab_size=model.vocab_size, hidden_size=model.d_model, num_hidden_layers=model.n_layer,
        num_attention_heads=model.n_head, intermediate_size=model.mlp_ratio * model.d_model,
        hidden_act="gelu", max_position_embeddings=model.n_ctx, layer_norm_eps=1e-5,
        tie_word_embeddings=model.tie_embeddings, use_parallel_residual=model.parallel_residual,
        attention_dropout=model.dropout, hidden_dropout=model.dropout, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": model.rotary_base,
                         "partial_rotary_factor": factor},
        bos_token_id=eot_id, eos_token_id=eot_id)


def neox_state_dict(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """cptlab's ``GPT.state_dict()`` under GPT-NeoX's names, the fused qkv regrouped head by head."""
    h, hd, d = model.n_head, model.d_model // model.n_head, model.d_model
    out = {"gpt_neox.embed_in.weight": state["wte.weight"],
           "gpt_neox.final_layer_norm.weight": state["ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": state["ln_f.bias"],
           "lm_head.weight": state["lm_head.weight"]}
    names = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.proj": "attention.dense",
             "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    for i in range(model.n_layer):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{theirs}{b}.{p}"] = state[f"{ours}{a}.{p}"]
        qkv_w, qkv_b = state[f"{ours}attn.qkv.weight"], state[f"{ours}attn.qkv.bias"]
        out[f"{theirs}attention.query_key_value.weight"] = (
            qkv_w.view(3, h, hd, d).transpose(0, 1).reshape(3 * d, d))
        out[f"{theirs}attention.query_key_value.bias"] = qkv_b.view(3, h, hd).transpose(0, 1).reshape(3 * d)
    return out


def to_transformers(model: GPT, eot_id: int, check: bool = True) -> Any:
    """A ``GPTNeoXForCausalLM`` with ``model``'s weights; with ``check``, refuse (``ExportError``) unless
    both give the same logits on a probe batch."""
    cfg = model.cfg
    hf = _transformers().GPTNeoXForCausalLM(neox_config(cfg, eot_id))
    hf.load_state_dict(neox_state_dict(model.state_dict(), cfg), strict=True)
    hf.eval()
    if check:
        probe = torch.randint(0, cfg.vocab_size, (2, min(cfg.n_ctx, 48)),
                              generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model.eval()(probe)[0].float()
            theirs = hf(probe).logits.float()
        diff = float((ours - theirs).abs().max())
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
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.to_tokenizers(), eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        model_max_length=cfg.model.n_ctx)
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
             f"A GPT-NeoX-style decoder trained with cptlab (a continual pre-training lab): {m.n_layer} "
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
