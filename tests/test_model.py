"""The GPT-NeoX-style decoder: shapes, parameter counts, rotary, residual form, tying, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cptlab.config import MODEL_PRESETS, ModelConfig, RunConfig
from cptlab.training import model as M
from cptlab.training.model import GPT


def small_cfg(**kw) -> ModelConfig:
    base = dict(preset=None, n_layer=2, n_head=2, d_model=32, n_ctx=64, vocab_size=97)
    base.update(kw)
    return ModelConfig(**base)


def resolved(preset: str, vocab_size: int = 512) -> ModelConfig:
    return RunConfig(model=ModelConfig(preset=preset)).resolve(vocab_size=vocab_size).model


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_every_preset_builds_and_matches_its_formula(preset):
    cfg = resolved(preset)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == GPT.count_params(cfg)
    assert model.num_params(non_embedding=True) == GPT.count_params(cfg, non_embedding=True)
    assert model.flops_per_token(cfg.n_ctx) > 6 * model.num_params(non_embedding=True)


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_small_presets_run_forward(preset):
    cfg = resolved(preset, vocab_size=300)
    model = GPT(cfg)
    idx = torch.randint(0, 300, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 300) and loss.ndim == 0


def test_paper_405m_has_405m_parameters():
    cfg = resolved("paper-405m")
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_params()
    # 24 x (12 d^2 + 13 d) + 2 d + 2 x 50304 x 1024 with d = 1024: GPT-NeoX 405M
    assert n == 405_334_016
    assert abs(n - 405e6) / 405e6 < 0.01
    assert model.num_params(non_embedding=True) == 302_311_424
    assert all(p.device.type == "meta" for p in model.parameters())


def test_rotary_only_on_configured_fraction():
    cfg = small_cfg(d_model=64, n_head=2, rotary_pct=0.25)  # head 32: 8 rotated dims
    assert M.rotary_dims(cfg) == 8
    attn = GPT(cfg).blocks[0].attn
    b, t, d, hd = 2, 10, 64, 32
    qkv = torch.randn(b, t, 3 * d)
    cos = attn.cos[:t].view(t, 1, 1, -1)
    sin = attn.sin[:t].view(t, 1, 1, -1)
    q, k, v = M._SplitHeadsRotary.apply(qkv, 2, cos, sin)
    raw_q, raw_k, raw_v = (z.transpose(1, 2) for z in qkv.view(b, t, 3, 2, hd).unbind(2))
    torch.testing.assert_close(q[..., 8:], raw_q[..., 8:], rtol=0, atol=0)  # pass-through dims
    torch.testing.assert_close(k[..., 8:], raw_k[..., 8:], rtol=0, atol=0)
    torch.testing.assert_close(v, raw_v, rtol=0, atol=0)  # v is never rotated
    torch.testing.assert_close(q[:, :, 0], raw_q[:, :, 0])  # position 0: angle 0
    assert not torch.allclose(q[:, :, 1:, :8], raw_q[:, :, 1:, :8])  # rotated dims move
    # a rotation keeps the norm of each (x_i, x_{i+4}) pair
    pair = lambda z: z[..., :4] ** 2 + z[..., 4:8] ** 2  # noqa: E731
    torch.testing.assert_close(pair(q), pair(raw_q))


@pytest.mark.parametrize("split", [M._SplitHeadsRotary.apply, M._split_heads_rotary_traced],
                         ids=["eager", "traced"])
def test_rotary_matches_reference_rotate_half(split):
    """NeoX rotate-half on the first r dims, written out naively; values and gradients agree, for the
    eager autograd function and the plain-ops version ``torch.compile`` traces."""
    b, t, h, hd, r = 2, 7, 3, 16, 4
    cos, sin = M.rotary_tables(r, 32, 10000.0)
    cos, sin = cos[:t].double().view(t, 1, 1, -1), sin[:t].double().view(t, 1, 1, -1)
    qkv = torch.randn(b, t, 3 * h * hd, dtype=torch.float64, requires_grad=True)
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv).repeat(1, 2)[:, None, :]

    def reference(x):
        xr, rest = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        return torch.cat([xr * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin(), rest], -1)

    q, k, v = split(qkv, h, cos, sin)
    rq, rk, rv = qkv.view(b, t, 3, h, hd).unbind(2)
    torch.testing.assert_close(q, reference(rq).transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(k, reference(rk).transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(v, rv.transpose(1, 2), atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda x: split(x, h, cos, sin), (qkv,))


def test_no_rotary():
    cfg = small_cfg(rotary_pct=0.0)
    model = GPT(cfg)
    idx = torch.randint(0, 97, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_blocked_attention_equals_sdpa(block):
    q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = M._BlockedCausalAttention.apply(*(z.reshape(6, 13, 8) for z in (q, k, v)), block).view(2, 3, 13, 8)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


def test_bf16_cpu_attention_path_is_close_to_fp32():
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    out = M.causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=3e-2, rtol=3e-2)


def test_parallel_and_sequential_residual_differ():
    torch.manual_seed(0)
    par = GPT(small_cfg(parallel_residual=True))
    for blk in par.blocks:  # an attention output large enough to change what the MLP sees
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.5)
    seq = GPT(small_cfg(parallel_residual=False))
    seq.load_state_dict(par.state_dict())
    idx = torch.randint(0, 97, (2, 12))
    lp, _ = par(idx)
    ls, _ = seq(idx)
    assert not torch.allclose(lp, ls, atol=1e-4)
    # and the parallel block computes exactly x + attn(ln1(x)) + mlp(ln2(x))
    blk = par.blocks[0]
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(blk(x), x + blk.attn(blk.ln1(x)) + blk.mlp(blk.ln2(x)))


def test_tie_embeddings_shares_weights():
    untied, tied = GPT(small_cfg()), GPT(small_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.num_params() == GPT.count_params(small_cfg(tie_embeddings=True))
    idx = torch.randint(0, 97, (2, 5))
    _, loss = tied(idx, idx)
    loss.backward()
    assert tied.wte.weight.grad is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal(precision):
    torch.manual_seed(0)
    model = GPT(small_cfg()).eval()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (idx[:, 12] + 1) % 97
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:].float(), b[:, 12:].float())


def test_initial_loss_is_about_log_vocab():
    torch.manual_seed(0)
    model = GPT(small_cfg(vocab_size=512))
    idx = torch.randint(0, 512, (4, 32))
    logits, loss = model(idx, torch.randint(0, 512, (4, 32)))
    assert abs(loss.item() - math.log(512)) < 0.05
    assert logits.shape == (4, 32, 512)
    none, loss2 = model(idx, idx, return_logits=False)
    assert none is None and loss2.ndim == 0
    logits3, loss3 = model(idx)
    assert loss3 is None and logits3.shape == (4, 32, 512)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(small_cfg(n_layer=8, d_model=128, n_head=4))
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_flops_per_token_from_the_config_is_the_models_own():
    cfg = ModelConfig(preset=None, n_layer=2, n_head=2, d_model=32, n_ctx=64, vocab_size=300)
    expected = GPT(cfg).flops_per_token(64)
    assert GPT.count_flops_per_token(cfg, 64) == expected
    n = GPT.count_params(cfg, non_embedding=True) + 300 * 32
    assert expected == 6 * n + 12 * 2 * 32 * 64


def test_flops_per_token_formula():
    cfg = small_cfg()
    model = GPT(cfg)
    n_matmul = model.num_params() - 97 * 32  # the input embedding is a lookup
    assert model.flops_per_token(64) == 6 * n_matmul + 12 * 2 * 32 * 64
    tied = GPT(small_cfg(tie_embeddings=True))
    assert tied.flops_per_token(64) == model.flops_per_token(64)  # the head is still a matmul


def test_errors():
    with pytest.raises(ValueError, match="not resolved"):
        GPT(ModelConfig(preset="tiny"))
    model = GPT(small_cfg())
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_option():
    model = GPT(small_cfg(dropout=0.1))
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in GPT(small_cfg()).modules())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [5, 256])
def test_fused_head_loss_matches_plain_path(tie, chunk, monkeypatch):
    """The training path's fused projection + cross-entropy gives the plain path's loss and gradients, in
    fp32 exactly (up to summation order), with tied embeddings, chunks that do not divide the rows, and a
    loss weight (gradient accumulation)."""
    monkeypatch.setattr(M, "HEAD_LOSS_CHUNK", chunk)
    torch.manual_seed(0)
    model = GPT(small_cfg(tie_embeddings=tie))
    x, y = torch.randint(0, 97, (3, 17)), torch.randint(0, 97, (3, 17))
    grads = []
    for fused in (True, False):
        model.fuse_head_loss = fused
        model.zero_grad()
        _, loss = model(x, y, return_logits=False)
        (0.25 * loss).backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_f, grad_f), (loss_p, grad_p) = grads
    torch.testing.assert_close(loss_f, loss_p)
    for name in grad_p:
        torch.testing.assert_close(grad_f[name], grad_p[name], msg=name)
    # evaluation (no gradients) and return_logits=True never take the fused path
    with torch.no_grad():
        assert model(x, y, return_logits=False)[1] == pytest.approx(float(loss_p), abs=1e-5)
    assert model(x, y)[0].shape == (3, 17, 97)


def test_fused_head_loss_bf16_is_close_to_plain():
    torch.manual_seed(0)
    model = GPT(small_cfg(vocab_size=300))
    x, y = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    out = []
    for fused in (True, False):
        model.fuse_head_loss = fused
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        out.append((float(loss.detach()), model.lm_head.weight.grad.clone(), model.wte.weight.grad.clone()))
    assert out[0][0] == pytest.approx(out[1][0], abs=2e-2)
    for a, b in zip(out[0][1:], out[1][1:]):
        assert a.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 5e-2
