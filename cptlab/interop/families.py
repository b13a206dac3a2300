"""The transformers model families cptlab converts to and from: GPT-NeoX (Pythia), Llama (Llama 3.x,
SmolLM2, TinyLlama) and Qwen2. Each has

- a reading of its ``config.json`` into one ``ModelConfig`` (``model_config``), refusing in one line an
  option cptlab's decoder does not compute (before any weight is read);
- the weights' names and layouts both ways (``to_cptlab``, ``from_cptlab``): cptlab fuses the query, key and
  value projections (all queries, then keys, then values) and SwiGLU's gate and up projections (gate
  first); GPT-NeoX stacks (query, key, value) head by head;
- its transformers class and config (``transformers_model``), for export and for the logit check
  (``logit_difference``) that import and export run.

Which family a cptlab model exports as follows from its options (``family_of``): a model imported from a
SmolLM2 checkpoint exports as ``LlamaForCausalLM``, the lab's own models as ``GPTNeoXForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch

from cptlab.config import ConfigError, ModelConfig
from cptlab.training.model import GPT, rotary_dims

# transformers class name -> family
ARCHITECTURES = {"GPTNeoXForCausalLM": "gpt_neox", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
CLASSES = {family: name for name, family in ARCHITECTURES.items()}
PROBE_TOLERANCE = 1e-3  # largest fp32 logit difference import and export accept
MAX_IMPORT_CTX = 8192  # the longest context an import keeps by default (rotary tables are per layer)
# Tensors of old checkpoints that are buffers, not weights (recomputed by the model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")

State = dict[str, torch.Tensor]


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise ConfigError("this needs the transformers package: pip install transformers") from None
    return transformers


# -- config.json -> ModelConfig -------------------------------------------------------------------------

def family_of_config(hf: dict[str, Any], where: str = "config.json") -> str:
    """The family of a transformers ``config.json`` (its ``architectures``), or a one-line error listing the
    supported ones."""
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(names) or f"none (model_type {hf.get('model_type')!r})"
    raise ConfigError(f"{where}: architecture {shown} is not supported; supported: "
                      f"{', '.join(ARCHITECTURES)}")


def _rope(hf: dict[str, Any]) -> tuple[float, float | None, dict[str, Any] | None]:
    """(theta, partial rotary factor or None, the scaling parameters or None), from transformers 5's
    ``rope_parameters`` or older configs' ``rope_theta`` / ``rotary_emb_base`` / ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), partial, (None if kind == "default" else {**scaling, "rope_type": kind})


def _require(hf: dict[str, Any], key: str, allowed: Any, where: str) -> None:
    value = hf.get(key, allowed)
    if value != allowed:
        raise ConfigError(f"{where}: {key} {value!r} is not supported (cptlab computes {key} {allowed!r})")


def model_config(hf: dict[str, Any], n_ctx: int | None = None, where: str = "config.json") -> ModelConfig:
    """The ``ModelConfig`` of a transformers ``config.json``; ``n_ctx`` defaults to the model's
    ``max_position_embeddings`` capped at ``MAX_IMPORT_CTX``."""
    family = family_of_config(hf, where)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, partial, scaling = _rope(hf)
    common = dict(preset=None, n_layer=hf["num_hidden_layers"], n_head=heads, d_model=d,
                  vocab_size=hf["vocab_size"], intermediate_size=hf["intermediate_size"], rotary_base=theta,
                  n_ctx=n_ctx or min(hf.get("max_position_embeddings", 2048), MAX_IMPORT_CTX),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", family != "gpt_neox")))
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        raise ConfigError(f"{where}: head_dim {hf.get('head_dim')} is not hidden_size / num_attention_heads "
                          f"({d} / {heads}); cptlab supports only that")
    if scaling is not None and (scaling["rope_type"] != "llama3" or family != "llama"):
        raise ConfigError(f"{where}: rope scaling {scaling['rope_type']!r} is not supported; supported: "
                          "llama3 (Llama)")
    if family == "gpt_neox":
        _require(hf, "hidden_act", "gelu", where)
        _require(hf, "attention_bias", True, where)
        pct = 1.0 if partial is None else float(partial)
        if int(d // heads * pct) % 2:
            raise ConfigError(f"{where}: partial rotary factor {pct} gives an odd number of rotary dims")
        return ModelConfig(**common, rotary_pct=pct,
                           parallel_residual=bool(hf.get("use_parallel_residual", True)),
                           norm_eps=float(hf.get("layer_norm_eps", 1e-5)))
    _require(hf, "hidden_act", "silu", where)
    if family == "llama":
        _require(hf, "attention_bias", False, where)
        _require(hf, "mlp_bias", False, where)
    else:
        _require(hf, "use_sliding_window", False, where)
    if partial not in (None, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor {partial} is not supported for {CLASSES[family]}")
    rope = None if scaling is None else {k: float(scaling[k]) for k in
                                         ("factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings")}
    return ModelConfig(**common, rotary_pct=1.0, parallel_residual=False, norm="rmsnorm", mlp="swiglu",
                       n_kv_head=hf.get("num_key_value_heads") or heads, norm_eps=float(hf["rms_norm_eps"]),
                       bias="qkv" if family == "qwen2" else "none", rope_scaling=rope)


# -- ModelConfig -> family and transformers config ---------------------------------------------------------

def family_of(m: ModelConfig) -> str:
    """The family a cptlab model exports as, or a one-line error when its options match none."""
    neox = (m.norm == "layernorm" and m.mlp == "gelu" and m.bias == "all" and m.kv_heads() == m.n_head
            and m.rope_scaling is None)
    llama_like = (m.norm == "rmsnorm" and m.mlp == "swiglu" and not m.parallel_residual
                  and rotary_dims(m) == m.d_model // m.n_head)
    if neox:
        return "gpt_neox"
    if llama_like and m.bias == "none":
        return "llama"
    if llama_like and m.bias == "qkv" and m.rope_scaling is None:
        return "qwen2"
    raise ConfigError(f"model: norm {m.norm}, mlp {m.mlp}, bias {m.bias} and these rotary settings match no "
                      f"transformers class cptlab writes ({', '.join(ARCHITECTURES)})")


def transformers_config(m: ModelConfig, eot_id: int) -> Any:
    """The transformers config of a resolved cptlab model, in its family's class."""
    tf, family = transformers_module(), family_of(m)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layer,
                  num_attention_heads=m.n_head, intermediate_size=m.mlp_width(),
                  max_position_embeddings=m.n_ctx,
                  tie_word_embeddings=m.tie_embeddings, attention_dropout=m.dropout, bos_token_id=eot_id,
                  eos_token_id=eot_id)
    if family == "gpt_neox":
        head = m.d_model // m.n_head
        # transformers takes int(head * factor) rotary dims: aim half a dim above cptlab's even count
        factor = (rotary_dims(m) + 0.5) / head
        return tf.GPTNeoXConfig(**common, hidden_act="gelu", layer_norm_eps=m.norm_eps,
                                use_parallel_residual=m.parallel_residual, hidden_dropout=m.dropout,
                                attention_bias=True, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": m.rotary_base,
                                                                      "partial_rotary_factor": factor})
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rotary_base}
    if m.rope_scaling is not None:
        rope = {**rope, **m.rope_scaling, "rope_type": "llama3"}
    common.update(num_key_value_heads=m.kv_heads(), hidden_act="silu", rms_norm_eps=m.norm_eps,
                  rope_parameters=rope)
    if family == "llama":
        return tf.LlamaConfig(**common, attention_bias=False, mlp_bias=False,
                              head_dim=m.d_model // m.n_head)
    return tf.Qwen2Config(**common, use_sliding_window=False)


def transformers_model(model: GPT, eot_id: int) -> Any:
    """A transformers model of ``model``'s family holding its weights (eval mode, fp32)."""
    tf, cfg = transformers_module(), model.cfg
    hf = getattr(tf, CLASSES[family_of(cfg)])(transformers_config(cfg, eot_id))
    state = from_cptlab({k: v.float() for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"model: the {CLASSES[family_of(cfg)]} does not take these weights "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.float().eval()


def logit_difference(model: GPT, hf: Any, seed: int = 0) -> float:
    """The largest absolute difference of the two models' fp32 logits on a random probe batch."""
    cfg = model.cfg
    probe = torch.randint(0, cfg.vocab_size, (2, min(cfg.n_ctx, 48)),
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model.float().eval()(probe)[0].float()
        theirs = hf(probe).logits.float()
    return float((ours - theirs).abs().max())


# -- weights both ways -----------------------------------------------------------------------------------

NEOX_NAMES = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.proj": "attention.dense",
              "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
LLAMA_NAMES = {"ln1.weight": "input_layernorm.weight", "ln2.weight": "post_attention_layernorm.weight",
               "attn.proj.weight": "self_attn.o_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"}


def from_cptlab(state: State, m: ModelConfig) -> State:
    """cptlab's ``GPT.state_dict()`` under the names and layouts of ``m``'s transformers family."""
    if family_of(m) == "gpt_neox":
        return _neox_from_cptlab(state, m)
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    hd = m.d_model // m.n_head
    sizes = [m.n_head * hd, m.kv_heads() * hd, m.kv_heads() * hd]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({theirs + b: state[ours + a] for a, b in LLAMA_NAMES.items()})
        for p in ("weight", "bias") if m.bias == "qkv" else ("weight",):
            for name, part in zip("qkv", state[f"{ours}attn.qkv.{p}"].split(sizes)):
                out[f"{theirs}self_attn.{name}_proj.{p}"] = part
        gate, up = state[f"{ours}mlp.fc.weight"].chunk(2)
        out[f"{theirs}mlp.gate_proj.weight"], out[f"{theirs}mlp.up_proj.weight"] = gate, up
    return out


def to_cptlab(tensors: State, m: ModelConfig) -> State:
    """The tensors of a transformers checkpoint of ``m``'s family as cptlab's ``GPT.state_dict()``;
    a missing tensor is a one-line ``ConfigError``."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    try:
        if family_of(m) == "gpt_neox":
            return _neox_to_cptlab(tensors, m)
        return _llama_to_cptlab(tensors, m)
    except KeyError as exc:
        raise ConfigError(f"weights: tensor {exc.args[0]} is missing from the checkpoint") from None


def _llama_to_cptlab(t: State, m: ModelConfig) -> State:
    out = {"wte.weight": t["model.embed_tokens.weight"], "ln_f.weight": t["model.norm.weight"]}
    out["lm_head.weight"] = out["wte.weight"] if m.tie_embeddings else t["lm_head.weight"]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({ours + a: t[theirs + b] for a, b in LLAMA_NAMES.items()})
        for p in ("weight", "bias") if m.bias == "qkv" else ("weight",):
            out[f"{ours}attn.qkv.{p}"] = torch.cat([t[f"{theirs}self_attn.{n}_proj.{p}"] for n in "qkv"])
        out[f"{ours}mlp.fc.weight"] = torch.cat([t[f"{theirs}mlp.gate_proj.weight"],
                                                 t[f"{theirs}mlp.up_proj.weight"]])
    return out


def _neox_from_cptlab(state: State, m: ModelConfig) -> State:
    h, hd, d = m.n_head, m.d_model // m.n_head, m.d_model
    out = {"gpt_neox.embed_in.weight": state["wte.weight"],
           "gpt_neox.final_layer_norm.weight": state["ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": state["ln_f.bias"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in NEOX_NAMES.items():
            for p in ("weight", "bias"):
                out[f"{theirs}{b}.{p}"] = state[f"{ours}{a}.{p}"]
        qkv_w, qkv_b = state[f"{ours}attn.qkv.weight"], state[f"{ours}attn.qkv.bias"]
        out[f"{theirs}attention.query_key_value.weight"] = (
            qkv_w.view(3, h, hd, d).transpose(0, 1).reshape(3 * d, d))
        out[f"{theirs}attention.query_key_value.bias"] = qkv_b.view(3, h, hd).transpose(0, 1).reshape(3 * d)
    return out


def _neox_to_cptlab(t: State, m: ModelConfig) -> State:
    h, hd, d = m.n_head, m.d_model // m.n_head, m.d_model
    head = t["lm_head.weight"] if "lm_head.weight" in t else t.get("embed_out.weight")
    out = {"wte.weight": t["gpt_neox.embed_in.weight"], "ln_f.weight": t["gpt_neox.final_layer_norm.weight"],
           "ln_f.bias": t["gpt_neox.final_layer_norm.bias"]}
    out["lm_head.weight"] = out["wte.weight"] if m.tie_embeddings else (
        head if head is not None else t["lm_head.weight"])
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in NEOX_NAMES.items():
            for p in ("weight", "bias"):
                out[f"{ours}{a}.{p}"] = t[f"{theirs}{b}.{p}"]
        qkv_w = t[f"{theirs}attention.query_key_value.weight"]
        qkv_b = t[f"{theirs}attention.query_key_value.bias"]
        out[f"{ours}attn.qkv.weight"] = qkv_w.view(h, 3, hd, d).transpose(0, 1).reshape(3 * d, d)
        out[f"{ours}attn.qkv.bias"] = qkv_b.view(h, 3, hd).transpose(0, 1).reshape(3 * d)
    return out
