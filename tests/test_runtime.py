"""Device/precision choice, the optimizer, the training step (accumulation, threads), malloc tuning."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cptlab.config import ModelConfig, TrainConfig
from cptlab.training import runtime
from cptlab.training.model import GPT


def make_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(preset=None, n_layer=2, n_head=2, d_model=32, n_ctx=32, vocab_size=61)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def batch(n: int = 4, t: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 61, (n, t + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


# -- device and precision ------------------------------------------------------------------------


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.pick_device("auto") == torch.device("cpu")
    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        runtime.pick_device("cuda:0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("cuda")


def test_pick_precision(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.pick_precision("fp32", cuda) == "fp32"
    assert runtime.pick_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.pick_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert runtime.pick_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.pick_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.pick_precision("auto", cuda) == "fp32"
    assert runtime.pick_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ValueError, match="allowed"):
        runtime.pick_precision("fp16", cpu)


def test_cpu_supports_bf16_follows_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert runtime.cpu_supports_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_autocast_context():
    cpu = torch.device("cpu")
    assert isinstance(runtime.autocast_context(cpu, "fp32"), contextlib.nullcontext)
    ctx = runtime.autocast_context(cpu, "bf16")
    with ctx:
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    with ctx:  # reusable
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


# -- optimizer -----------------------------------------------------------------------------------


def test_optimizer_groups_and_hyperparameters():
    model = make_model(tie_embeddings=True)
    opt = runtime.make_optimizer(model, TrainConfig(weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-7))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # the tied matrix once
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-7


# -- the step ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_train_step_decreases_loss_on_a_repeated_batch(workers):
    model = make_model()
    opt = runtime.make_optimizer(model, TrainConfig())
    x, y = batch()
    losses = [runtime.train_step(model, opt, [(x, y)], 3e-3, 1.0, workers=workers) for _ in range(25)]
    assert isinstance(losses[0], float)
    assert losses[-1] < losses[0] - 1.0
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


def test_train_step_bf16_autocast():
    model = make_model()
    opt = runtime.make_optimizer(model, TrainConfig())
    x, y = batch()
    ctx = runtime.autocast_context(torch.device("cpu"), "bf16")
    losses = [runtime.train_step(model, opt, [(x, y)], 3e-3, 1.0, ctx) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _one_sgd_step(micro_batches, workers: int) -> tuple[float, list[torch.Tensor]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = runtime.train_step(model, opt, micro_batches, 0.5, 0.0, workers=workers)
    return loss, [p.detach().clone() for p in model.parameters()]


def test_gradient_accumulation_equals_full_batch():
    x, y = batch(n=4)
    full_loss, full = _one_sgd_step([(x, y)], workers=1)
    acc_loss, acc = _one_sgd_step([(x[:2], y[:2]), (x[2:], y[2:])], workers=1)
    assert acc_loss == pytest.approx(full_loss, abs=1e-6)
    for a, b in zip(full, acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # unequal micro-batches are weighted by their tokens
    uneq_loss, uneq = _one_sgd_step([(x[:1], y[:1]), (x[1:], y[1:])], workers=1)
    assert uneq_loss == pytest.approx(full_loss, abs=1e-6)
    for a, b in zip(full, uneq):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_threaded_step_equals_single_thread_and_is_deterministic():
    x, y = batch(n=6)
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]
    ref_loss, ref = _one_sgd_step(micro, workers=1)
    loss_a, a = _one_sgd_step(micro, workers=2)
    loss_b, b = _one_sgd_step(micro, workers=2)
    assert loss_a == pytest.approx(ref_loss, abs=1e-6)
    for r, p, q in zip(ref, a, b):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0)
        assert torch.equal(p, q)  # bit for bit the same every time
    assert loss_a == loss_b


def test_step_workers_choice():
    model = make_model()
    x, y = batch(n=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert runtime.step_workers(model, [(x, y)]) == 2
        assert runtime.step_workers(model, [(x[:1], y[:1])]) == 1  # one row: nothing to split
        assert runtime.step_workers(make_model(dropout=0.1), [(x, y)]) == 1
        torch.set_num_threads(1)
        assert runtime.step_workers(model, [(x, y)]) == 1
    finally:
        torch.set_num_threads(threads)


def test_worker_threads_run_single_threaded_ops():
    threads = torch.get_num_threads()
    pool = runtime._worker_pool(2, 1)
    assert list(pool.map(lambda _: torch.get_num_threads(), range(4))) == [1, 1, 1, 1]
    assert torch.get_num_threads() == threads  # the main thread keeps its count


# -- malloc ----------------------------------------------------------------------------------------


def test_malloc_env_helpers():
    env = runtime.tune_malloc_env()
    assert set(env) == {"MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"}
    assert all(isinstance(v, str) and int(v) >= 0 for v in env.values())
    sub = runtime.malloc_subprocess_env({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
    assert sub["PATH"] == "/bin" and sub["MALLOC_ARENA_MAX"] == "4"  # kept
    assert sub["MALLOC_TOP_PAD_"] == env["MALLOC_TOP_PAD_"]
    assert runtime.malloc_env_is_tuned(runtime.malloc_subprocess_env({}))
    assert not runtime.malloc_env_is_tuned({})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_in_process():
    assert runtime.tune_malloc() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reexec_with_tuned_malloc(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from cptlab.training import runtime
        runtime.reexec_with_tuned_malloc()
        print(os.environ.get("MALLOC_TOP_PAD_"), runtime.malloc_env_is_tuned(), sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CPTLAB_MALLOC_TUNED"}
    out = subprocess.run([sys.executable, str(script), "a b"], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")[0]
    assert out == f"{runtime.tune_malloc_env()['MALLOC_TOP_PAD_']} True ['a b']"
