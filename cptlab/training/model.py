"""A GPT-NeoX-style decoder, as in the paper (405M: 24 layers, d 1024, 16 heads, context 2048).

- pre-LayerNorm blocks; a final LayerNorm before the output projection
- rotary position embedding (NeoX "rotate half") on the first ``rotary_pct`` of each head's dims
- optional parallel residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` (paper: on), else sequential
  ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``
- GELU MLP of width ``mlp_ratio * d_model``; biases on every Linear and LayerNorm, as in GPT-NeoX
- untied input and output embeddings by default (``tie_embeddings`` shares them)
- attention through ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``; on the CPU in
  bf16 with sequences up to ``BMM_ATTENTION_MAX_LEN``, through the same function written as blocked
  batched matmuls (``_BlockedCausalAttention``), about 2x faster there than the CPU flash kernel
- no dropout unless ``dropout > 0``

Options for imported Llama-family and Qwen2 models (``ModelConfig``; each a separate branch, the defaults
above take the code paths they always took): RMSNorm (``norm``), a SwiGLU MLP ``proj(silu(gate) * up)``
of width ``intermediate_size`` (``mlp``; gate and up fused in ``fc``, gate first), grouped-query attention
(``n_kv_head``: the fused projection holds all queries, then the ``n_kv_head`` keys, then the values, each
key/value head serving ``n_head / n_kv_head`` consecutive query heads), biases on every Linear and norm,
on none, or on the query/key/value projection only (``bias``), and Llama 3's rotary frequency scaling
(``rope_scaling``).

Parameter count and training FLOPs per token (``GPT.count_params``, ``GPT.count_flops_per_token``: from
the config, without building the model; every other part of the lab calls these), with V the vocab, d the
width, L the layers, r the MLP ratio:
    per block: attention 4d^2 + 4d, MLP 2r d^2 + (r + 1) d, two LayerNorms 4d
    total: L * per block + 2d (final LayerNorm) + V d (input) + V d (output, unless tied)
(the other options change the terms as their shapes do: see ``count_params``).
For ``paper-405m`` (L 24, d 1024, V 50304, r 4, untied) this is 405,334,016 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cptlab.config import ConfigError, ModelConfig


def _resolved(cfg: ModelConfig) -> ModelConfig:
    missing = [k for k in ("n_layer", "n_head", "d_model", "n_ctx", "vocab_size") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"ModelConfig is not resolved: {', '.join(missing)} unset "
                         "(use RunConfig.resolve(vocab_size=...))")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_head ({cfg.n_head})")
    return cfg


def rotary_dims(cfg: ModelConfig) -> int:
    """Dims of each head that are rotated: ``rotary_pct`` of the head size, rounded down to even."""
    head_dim = cfg.d_model // cfg.n_head
    return int(head_dim * cfg.rotary_pct) // 2 * 2


def rotary_tables(dims: int, n_ctx: int, base: float, scaling: dict[str, float] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos / base^(2i/dims), each of shape (n_ctx, dims // 2); with
    ``scaling``, the frequencies scaled as Llama 3's are (``llama3_frequencies``)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / max(dims, 1)))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(n_ctx, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3's rotary scaling: wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` are slowed by ``factor``, those shorter than ``... / high_freq_factor`` kept, and
    those between interpolated smoothly between the two."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_ctx / low, inv_freq / factor,
                       torch.where(wavelen < old_ctx / high, inv_freq, mixed))


def _rotate_plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX "rotate half" of the first 2 * cos.size(-1) channels of (B, H, T, hd) ``x`` (autograd's
    backward; the grouped-query path's)."""
    h = cos.size(-1)
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """NeoX "rotate half" of the first 2 * cos.size(-1) channels of ``x`` into the same channels of
    ``out``: (x1 cos - x2 sin, x2 cos + x1 sin) for ``sign`` 1; its transpose (the inverse rotation,
    as the backward needs) for ``sign`` -1."""
    h = cos.size(-1)
    x1, x2, o1, o2 = x[..., :h], x[..., h:2 * h], out[..., :h], out[..., h:2 * h]
    if torch.compiler.is_compiling():  # dynamo breaks the graph at out= into a view; inductor fuses this
        o1.copy_(x1 * cos - sign * x2 * sin)
        o2.copy_(x2 * cos + sign * x1 * sin)
        return
    torch.mul(x1, cos, out=o1)  # eager: no temporaries
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)


def _split_heads_rotary_traced(qkv: torch.Tensor, n_head: int, cos: torch.Tensor,
                               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_SplitHeadsRotary`` in plain differentiable ops, for ``torch.compile`` (which fuses them; the
    ``out=`` writes into strided views of the eager version would split its graph)."""
    b, t, three_d = qkv.shape
    src = qkv.view(b, t, 3, n_head, three_d // (3 * n_head))
    h = cos.size(-1)
    if h:
        x1, x2 = src[:, :, :2, :, :h], src[:, :, :2, :, h:2 * h]
        qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, src[:, :, :2, :, 2 * h:]], dim=-1)
        src = torch.cat([qk, src[:, :, 2:]], dim=2)
    out = src.permute(2, 0, 3, 1, 4).contiguous()
    return out[0], out[1], out[2]


class _SplitHeadsRotary(torch.autograd.Function):
    """(B, T, 3d) qkv -> q, k, v, each (B, H, T, hd) and contiguous, with q and k rotated.

    Splitting the heads needs a copy anyway; the rotation is done within that copy, and the backward
    writes the gradient of qkv in one pass (no zero-filled slice gradients, no ``cat``/``stack``).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int, cos: torch.Tensor, sin: torch.Tensor):
        b, t, three_d = qkv.shape
        src = qkv.view(b, t, 3, n_head, three_d // (3 * n_head))
        out = qkv.new_empty(3, b, n_head, t, src.size(-1))
        dst = out.permute(1, 3, 0, 2, 4)  # (B, T, 3, H, hd) view of out
        dst.copy_(src)
        if cos.numel():
            _rotate(src[:, :, :2], dst[:, :, :2], cos, sin, 1.0)
        ctx.save_for_backward(cos, sin)
        ctx.n_head = n_head
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq: torch.Tensor | None, gk: torch.Tensor | None, gv: torch.Tensor | None):
        cos, sin = (c.squeeze(1) for c in ctx.saved_tensors)  # (T, 1, dims/2): per head, not per q/k
        g = next(x for x in (gq, gk, gv) if x is not None)
        b, n_head, t, hd = g.shape
        grad = g.new_empty(b, t, 3, n_head, hd)
        for i, gi in enumerate((gq, gk, gv)):
            if gi is None:
                grad[:, :, i].zero_()
                continue
            gi = gi.transpose(1, 2)  # (B, T, H, hd)
            grad[:, :, i].copy_(gi)
            if i < 2 and cos.numel():
                _rotate(gi, grad[:, :, i], cos, sin, -1.0)
        return grad.view(b, t, 3 * n_head * hd), None, None, None


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal attention as batched matmuls over blocks of ``block`` query rows: query block i only
    meets keys 0 .. (i+1) * block, so the masked upper triangle is mostly skipped (3/4 of the full
    T x T work for 2 blocks, 5/8 for 4). Inputs (N, T, hd); the attention probabilities of each block
    are kept for the backward (about N * T^2 / 2 values in all)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int):
        n, t, hd = q.shape
        scale = hd**-0.5
        y = torch.empty_like(q)
        probs = []
        for r0 in range(0, t, block):
            r1 = min(r0 + block, t)
            # additive mask: 0 where key <= query, -inf above the diagonal
            mask = torch.full((r1 - r0, r1), float("-inf"), dtype=q.dtype, device=q.device).triu_(r0 + 1)
            scores = torch.baddbmm(mask.expand(n, -1, -1), q[:, r0:r1], k[:, :r1].transpose(1, 2),
                                   alpha=scale)
            p = torch.softmax(scores, dim=-1)
            y[:, r0:r1] = torch.bmm(p, v[:, :r1])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.block = block
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        n, t, hd = q.shape
        scale = hd**-0.5
        dy = dy.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for i, r0 in enumerate(range(0, t, ctx.block)):
            r1 = min(r0 + ctx.block, t)
            p, dy_i = probs[i], dy[:, r0:r1]
            dv[:, :r1].baddbmm_(p.transpose(1, 2), dy_i)
            dp = torch.bmm(dy_i, v[:, :r1].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[:, r0:r1] = torch.bmm(ds, k[:, :r1]).mul_(scale)
            dk[:, :r1].baddbmm_(ds.transpose(1, 2), q[:, r0:r1], alpha=scale)
        return dq, dk, dv, None


# Causal attention on the CPU in bf16 for sequences up to this length goes through
# _BlockedCausalAttention: at seq 256, head size 64 it is about 2x faster than the CPU flash kernel,
# whose bf16 backward is slow. It keeps the attention probabilities (~T^2/2 per head) for the backward,
# so longer sequences use the memory-efficient flash kernel.
BMM_ATTENTION_MAX_LEN = 512
ATTENTION_BLOCK = 128  # query rows per block


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v for (B, H, T, hd) inputs.

    ``scaled_dot_product_attention(is_causal=True)``, except for bf16 on the CPU with short sequences
    and no dropout, where blocked batched matmuls (the same function) are faster.
    """
    b, h, t, hd = q.shape
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if cpu_bf16 and dropout_p == 0.0 and t <= BMM_ATTENTION_MAX_LEN:
        y = _BlockedCausalAttention.apply(q.reshape(b * h, t, hd), k.reshape(b * h, t, hd),
                                          v.reshape(b * h, t, hd), ATTENTION_BLOCK)
        return y.view(b, h, t, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class Attention(nn.Module):
    """Causal self-attention with rotary embedding on the first ``rotary_dims`` of each head; grouped-query
    when ``n_kv_head < n_head``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads()
        head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * head_dim,
                             bias=cfg.bias in ("all", "qkv"))
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias == "all")
        self.proj.residual = True  # scaled init
        self.dropout = cfg.dropout
        cos, sin = rotary_tables(rotary_dims(cfg), cfg.n_ctx, cfg.rotary_base, cfg.rope_scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x)
        if self.n_kv_head != self.n_head:
            return self._forward_grouped(qkv)
        half = self.cos.size(-1)
        cos = self.cos[:t].to(qkv.dtype).view(t, 1, 1, half)  # broadcast over (B, T, 2, H, dims/2)
        sin = self.sin[:t].to(qkv.dtype).view(t, 1, 1, half)
        if torch.compiler.is_compiling():
            q, k, v = _split_heads_rotary_traced(qkv, self.n_head, cos, sin)
        else:
            q, k, v = _SplitHeadsRotary.apply(qkv, self.n_head, cos, sin)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def _forward_grouped(self, qkv: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: each key/value head repeated for its ``n_head / n_kv_head`` queries."""
        b, t, _ = qkv.shape
        hd = qkv.size(-1) // (self.n_head + 2 * self.n_kv_head)
        q, k, v = qkv.view(b, t, -1, hd).transpose(1, 2).split(
            [self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        half = self.cos.size(-1)
        if half:
            cos, sin = self.cos[:t].to(qkv.dtype), self.sin[:t].to(qkv.dtype)  # (T, dims/2)
            q, k = _rotate_plain(q, cos, sin), _rotate_plain(k, cos, sin)
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = causal_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                             self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * hd))


class MLP(nn.Module):
    """GELU (``proj(gelu(fc(x)))``) or SwiGLU (``proj(silu(gate) * up)``, ``fc`` = [gate; up])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width, bias = cfg.mlp_width(), cfg.bias == "all"
        self.swiglu = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.d_model, 2 * width if self.swiglu else width, bias=bias)
        self.proj = nn.Linear(width, cfg.d_model, bias=bias)
        self.proj.residual = True  # scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x)))


def norm_layer(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (with a bias unless ``bias`` is not ``all``) or RMSNorm, of ``norm_eps``."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias == "all")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1 = norm_layer(cfg)
        self.attn = Attention(cfg)
        self.ln2 = norm_layer(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return x + self.drop(self.attn(self.ln1(x))) + self.drop(self.mlp(self.ln2(x)))
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


# The output projection and the cross-entropy fused, for training on the CPU: the (tokens x vocab) logits
# are the largest tensors of a small model's step, and the unfused path streams them through memory
# about ten times (bf16 logits, fp32 log-probs, a zero-filled gradient, the softmax backward, a bf16
# copy). Here each chunk of rows computes its loss and its gradient (softmax - onehot) while the chunk is
# in cache, and the two backward matmuls run once over the whole bf16 gradient. The backward only
# scales what the forward computed, so the matmul count is the same as unfused.
HEAD_LOSS_CHUNK = 256  # rows per chunk: 256 x a 4096 vocab in fp32 is 4 MB


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        with torch.autocast("cpu", enabled=False):
            return _FusedHeadLoss._forward(ctx, h, weight, targets, dtype)

    @staticmethod
    def _forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        n = h.size(0)
        w = weight.to(dtype)
        hc = h.to(dtype)
        grad_logits = torch.empty(n, w.size(0), dtype=dtype)
        loss = torch.zeros((), dtype=torch.float32)
        for i in range(0, n, HEAD_LOSS_CHUNK):
            rows = slice(i, min(n, i + HEAD_LOSS_CHUNK))
            tgt = targets[rows].unsqueeze(1)
            # one fused softmax pass (max, exp, sum, scale): 4x faster here than logsumexp + exp. The
            # loss is -log p(target), with p floored at the smallest normal float (a loss cap of 87 nats).
            probs = torch.softmax((hc[rows] @ w.t()).float(), dim=1)
            loss -= probs.gather(1, tgt).clamp_min(torch.finfo(torch.float32).tiny).log().sum()
            probs.scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=probs.dtype))
            grad_logits[rows] = probs.div_(n)
        ctx.save_for_backward(hc, w, grad_logits)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hc, w, grad_logits = ctx.saved_tensors
        g = grad_logits if grad_out.item() == 1.0 else grad_logits * grad_out.to(grad_logits.dtype)
        grad_h = (g @ w).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ hc).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


class GPT(nn.Module):
    """The decoder. ``cfg`` must be resolved (every shape field set; see ``RunConfig.resolve``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = _resolved(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = norm_layer(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.fuse_head_loss = True  # see _FusedHeadLoss; False gives the plain path (tests compare them)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        """Normal(0, 0.02) weights, zero biases; residual output projections scaled by 1/sqrt(2L)."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` (B, T) token ids -> ``(logits (B, T, V), loss)``.

        ``loss`` is the mean cross-entropy over all positions when ``targets`` (B, T) is given, else
        None. ``return_logits=False`` (with targets) returns ``(None, loss)`` so that the logits are
        freed as soon as the loss has been computed (the training step uses it).
        """
        t = idx.size(1)
        if t > self.cfg.n_ctx:
            raise ValueError(f"sequence length {t} exceeds n_ctx {self.cfg.n_ctx}")
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None and not return_logits and self._fuse_head_loss(x):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            loss = _FusedHeadLoss.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        dtype)
            return None, loss
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            logp = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1, dtype=torch.float32)
            loss = F.nll_loss(logp, targets.reshape(-1))
            if not return_logits:
                logits = None
        return logits, loss

    def _fuse_head_loss(self, x: torch.Tensor) -> bool:
        """The fused head + loss: for eager training steps on the CPU (it computes the gradient eagerly, so
        not for evaluation; under ``torch.compile`` the plain path is traced and fused by the compiler),
        with the output projection a plain unsharded parameter."""
        return (x.device.type == "cpu" and torch.is_grad_enabled() and self.fuse_head_loss
                and type(self.lm_head.weight) is nn.Parameter and not torch.compiler.is_compiling())

    # -- accounting ------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (shared ones once). ``non_embedding=True`` leaves out the vocabulary matrices:
        the input embedding and the (untied) output projection, as in Kaplan et al."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    @staticmethod
    def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
        """The parameter count of ``GPT(cfg)`` by formula (see the module docstring)."""
        cfg = _resolved(cfg)
        d, w, v = cfg.d_model, cfg.mlp_width(), cfg.vocab_size
        qkv = (cfg.n_head + 2 * cfg.kv_heads()) * (d // cfg.n_head)
        full_bias = cfg.bias == "all"
        attention = d * qkv + d * d + (qkv if cfg.bias != "none" else 0) + (d if full_bias else 0)
        fc = 2 * w if cfg.mlp == "swiglu" else w
        mlp = d * fc + w * d + ((fc + d) if full_bias else 0)
        norm = d * (2 if cfg.norm == "layernorm" and full_bias else 1)
        per_block = attention + mlp + 2 * norm
        n = cfg.n_layer * per_block + norm
        if not non_embedding:
            n += v * d * (1 if cfg.tie_embeddings else 2)
        return n

    @staticmethod
    def count_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) of ``GPT(cfg)`` at ``seq_len``, PaLM / nanoGPT
        convention:

            6 * N_matmul + 12 * L * d * seq_len

        N_matmul = non-embedding parameters + V * d (the output projection is a matmul; the input
        embedding is a lookup and costs no FLOPs). Biases and LayerNorm gains are counted in N (a
        <0.1% overestimate). The attention term counts QK^T and AV over the full ``seq_len`` (no
        halving for the causal mask), 2 matmuls x 2 FLOPs x 3 (forward + backward).
        """
        cfg = _resolved(cfg)
        n_matmul = GPT.count_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.d_model
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * seq_len

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of this model at ``seq_len`` (``count_flops_per_token``)."""
        return GPT.count_flops_per_token(self.cfg, seq_len)


State = dict[str, torch.Tensor]


def average_states(states: Sequence[State], weights: Sequence[float]) -> State:
    """``sum_i weights[i] * states[i]`` tensor by tensor, accumulated in float64 and returned in each
    tensor's dtype, so that weights (1, 0), or a run averaged with itself, give its tensors back exactly.
    Tensors that are not floating point (none in a GPT today) are taken from the first state."""
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            differ = sorted(keys ^ set(state))[:3]
            raise ConfigError(f"model: the checkpoints hold different tensors ({', '.join(differ)}, ...)")
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            if w:  # skipped, so that a weight of 0 adds nothing, not even 0 * inf
                total += w * state[key].to(torch.float64)
        out[key] = total.to(first.dtype)
    return out
