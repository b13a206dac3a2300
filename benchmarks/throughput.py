"""Training throughput: this machine's matmul peak, the lab's training step, a plain GPT-2 reference.

    .venv/bin/python benchmarks/throughput.py [--n-layer 4 --n-head 4 --d-model 256 --seq-len 256
        --batch-size 16 --vocab-size 512] [--precision auto|fp32|bf16] [--steps 32] [--rounds 8]
        [--threads N] [--workers N] [--malloc tuned|asis] [--compile]
        [--reference-attention sdpa|manual] [--no-reference] [--device cpu] [--json]
        [--scale small] [--processes N] [--out FILE.json] [--baseline GIT_REF] [--no-peak]
        [--family gpt-neox|llama [--n-kv-head N] [--intermediate-size N]] [--profile N]
    # the tiny step as the runner trains it (one thread) against main's step, alternated in one process
    .venv/bin/python benchmarks/throughput.py --scale tiny --threads 1 --no-reference --no-peak \
        --baseline main
    # where the tiny step's time goes: operators' own CPU time over 10 profiled steps, by kind
    .venv/bin/python benchmarks/throughput.py --scale tiny --threads 1 --no-reference --no-peak --profile 10
    # a Llama-shaped model of the same width
    .venv/bin/python benchmarks/throughput.py --family llama --no-reference --no-peak
    # on a GPU: one run of a scale, then as many side by side as `cptlab batch` would train (0: its choice)
    .venv/bin/python benchmarks/throughput.py --device cuda --scale small --no-reference --processes 0 \
        --out bench.json

1. Matmul peak: best of large square matmuls, fp32 and bf16 (GFLOP/s), sampled at the start, between
   rounds and at the end; the best sample is kept.
2. The lab's step (``--family llama``: a Llama-shaped model of the same width, see ``family_options``),
   as ``cptlab train`` runs it: ``cptlab.data.sampler.BatchSampler`` over random tokens, the
   LR from ``cptlab.schedules``, then ``cptlab.training.runtime.train_step`` (GPT-NeoX model, loss, backward,
   clip, fused AdamW; on a multi-core CPU the batch split across ``runtime.step_workers`` threads) at
   the chosen precision.
3. A plain fp32 GPT-2-style step of the same size (written below: learned positions, sequential
   residual, tied embeddings, SDPA or manual softmax attention, stock AdamW, clip, ``loss.item()``).

The two steps alternate in rounds in one process (same threads, same malloc settings), so that a
machine shared with other work slows both alike; each figure is the fastest step, with the median
beside it. FLOPs per token use the PaLM convention (see ``GPT.flops_per_token``); MFU is achieved
FLOP/s over the measured peak of the precision used. Minor page faults and system CPU time per step
show what ``runtime.tune_malloc`` saves (``--malloc asis`` leaves glibc as launched). Prints figures;
never fails on timing.

On CUDA, MFU is also given against the GPU's dense bf16 tensor-core peak from NVIDIA's data sheets
(``DENSE_BF16_PEAKS``, named in the output; an unknown GPU is said to be unknown). ``--scale`` takes the
model and batch shapes of that scale's base run. ``--processes N`` then runs N copies of the measurement
side by side (as ``cptlab batch`` trains runs; 0: ``runner.default_workers`` for the scale's runs) and
reports their tokens/s, FLOP/s and MFU together. ``--profile N`` then runs N more lab steps under
``torch.profiler`` and splits each step's CPU time by kind of operator (``profile_split``: matmuls,
attention, softmax and loss, norms and activations, copies, optimizer, the rest) with the costliest
operators. ``--out`` writes the JSON to a file. ``--baseline REF``
also times the step of git revision REF's ``model.py`` and ``runtime.py`` (eager), alternating with the
lab's step in rounds, from the same seed on the same batches: the speed-up over it, and whether the final
losses are identical (a change that keeps every number) or not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a file from a checkout: this checkout's cptlab, installed or not
    sys.path.insert(0, REPO)

from cptlab.config import ModelConfig, TrainConfig  # noqa: E402
from cptlab.schedules import ScheduleConfig  # noqa: E402
from cptlab.study import scheduler  # noqa: E402
from cptlab.training import runtime  # noqa: E402
from cptlab.training.model import GPT  # noqa: E402

# -- 1. matmul peak --------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (SXM parts unless named):
# (substring of torch.cuda.get_device_name, the part they are quoted for, FLOP/s); the first match wins.
DENSE_BF16_PEAKS = (
    ("H200 NVL", "NVIDIA H200 NVL", 835e12),
    ("GH200", "NVIDIA GH200 (H100/H200 SXM die)", 989e12),
    ("H200", "NVIDIA H200 SXM", 989e12),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756e12),
    ("H100 NVL", "NVIDIA H100 NVL", 835e12),
    ("H100", "NVIDIA H100 SXM", 989e12),
    ("H800", "NVIDIA H800 SXM", 989e12),
    ("B200", "NVIDIA B200", 2250e12),
    ("A100", "NVIDIA A100", 312e12),
    ("A800", "NVIDIA A800", 312e12),
    ("L40S", "NVIDIA L40S", 362e12),
    ("L40", "NVIDIA L40", 181e12),
    ("L4", "NVIDIA L4", 121e12),
)


def dense_bf16_peak(device_name: str) -> tuple[str, float] | None:
    """(the part, its dense bf16 FLOP/s) for a ``torch.cuda.get_device_name``, None for an unknown GPU."""
    for key, part, flops in DENSE_BF16_PEAKS:
        if key.lower() in device_name.lower():
            return part, flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s x training FLOPs per token) over the peak."""
    return tokens_per_s * flops_per_token / peak_flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...] = (1024, 2048),
                repeats: int = 6) -> float:
    """Best FLOP/s of square ``n x n`` matmuls over ``sizes`` and ``repeats``."""
    if device.type == "cuda":
        sizes = tuple(4 * n for n in sizes)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        c = torch.empty(n, n, dtype=dtype, device=device)
        torch.mm(a, b, out=c)  # warm-up
        sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def update_peak(peak: dict[str, float], device: torch.device, skip: bool = False, **kw) -> None:
    """Sample the fp32 and bf16 matmul peaks, keeping the best; ``skip``: set them to NaN instead."""
    if skip:
        peak.update(fp32=math.nan, bf16=math.nan)
        return
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak[name] = max(peak.get(name, 0.0), matmul_peak(dtype, device, **kw))


# -- 3. the reference: a minimal GPT-2 -------------------------------------------------------------


class RefAttention(nn.Module):
    def __init__(self, d: int, n_head: int, manual: bool) -> None:
        super().__init__()
        self.n_head, self.manual = n_head, manual
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int, manual: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = RefAttention(d, n_head, manual)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    """GPT-2: token + learned position embeddings, sequential pre-LN blocks, tied output head."""

    def __init__(self, n_layer: int, n_head: int, d: int, n_ctx: int, vocab: int, manual: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_ctx, d)
        self.h = nn.ModuleList([RefBlock(d, n_head, manual) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, seq_len: int) -> int:
        """``GPT.count_flops_per_token`` of the same shape: its blocks hold as many parameters as the lab's
        (12 d^2 + 13 d each), its head is the tied embedding and its position table is a lookup."""
        d, vocab = self.ln_f.weight.numel(), self.wte.weight.size(0)
        shape = ModelConfig(preset=None, n_layer=len(self.h), n_head=self.h[0].attn.n_head, d_model=d,
                            n_ctx=self.wpe.weight.size(0), vocab_size=vocab, tie_embeddings=True)
        return GPT.count_flops_per_token(shape, seq_len)


# -- measurement -----------------------------------------------------------------------------------


class Timer:
    """Wall time, minor page faults and system CPU time (all threads) of each call."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.faults: list[int] = []
        self.sys_times: list[float] = []

    def __call__(self, fn) -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn()
        self.times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.faults.append(r1.ru_minflt - r0.ru_minflt)
        self.sys_times.append(r1.ru_stime - r0.ru_stime)

    def best(self) -> float:
        return min(self.times)

    def median(self) -> float:
        return statistics.median(self.times)


def family_options(args: argparse.Namespace) -> dict:
    """The ``ModelConfig`` options of ``--family``: none for gpt-neox (the lab's default block); for llama
    RMSNorm, SwiGLU of width ``--intermediate-size`` (default 8/3 d, rounded up to a multiple of 8),
    ``--n-kv-head`` key/value heads (default n_head / 2), no biases, full rotary, sequential residual."""
    if args.family == "gpt-neox":
        return {}
    width = args.intermediate_size or -(-8 * args.d_model // 3 // 8) * 8
    return dict(norm="rmsnorm", mlp="swiglu", intermediate_size=width, bias="none", rotary_pct=1.0,
                parallel_residual=False, n_kv_head=args.n_kv_head or max(1, args.n_head // 2))


def baseline_modules(ref: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``cptlab/training/model.py`` and ``runtime.py`` as they are at git revision ``ref`` of this
    repository, loaded as modules of their own (``baseline_model``, ``baseline_runtime``)."""
    root = Path(__file__).resolve().parents[1]
    out = []
    for name in ("model", "runtime"):
        where = f"{ref}:cptlab/training/{name}.py"
        source = subprocess.run(["git", "-C", str(root), "show", where], capture_output=True, text=True,
                                check=True).stdout
        module = types.ModuleType(f"baseline_{name}")
        module.__file__ = where
        sys.modules[module.__name__] = module  # dataclasses and pickling look modules up by name
        exec(compile(source, where, "exec"), module.__dict__)
        out.append(module)
    return out[0], out[1]


def lab_step_fn(args: argparse.Namespace, precision: str, device: torch.device, gpt: type = GPT,
                rt: types.ModuleType = runtime, compile_model: bool | None = None):
    """The lab's step (sampler + schedule + train_step) as a closure; plus the model and a note.
    ``gpt`` and ``rt`` are the model class and runtime module to time (``--baseline``: an older one)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=None, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                      n_ctx=args.seq_len, vocab_size=args.vocab_size,
                      **(family_options(args) if gpt is GPT else {}))  # a --baseline model: GPT-NeoX
    model = gpt(cfg).to(device)
    train_cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, precision=precision)
    optimizer = rt.make_optimizer(model, train_cfg)
    step_model = torch.compile(model) if (args.compile if compile_model is None else compile_model) else model
    autocast = runtime.autocast_context(device, precision)
    total_steps = 10_000
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, size=4_000_000, dtype=np.uint16)
    try:
        from cptlab.data.sampler import BatchSampler

        sampler = BatchSampler({"random": tokens}, {"random": 1.0}, None, args.seq_len, args.batch_size,
                               total_steps * args.batch_size * args.seq_len, seed=0)
        next_batch = sampler.next_batch
        note = "batches from cptlab.data.sampler.BatchSampler over random tokens"
    except (ImportError, TypeError, ValueError) as exc:
        gen = torch.Generator().manual_seed(0)

        def next_batch():
            xy = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
            return xy[:, :-1], xy[:, 1:]

        note = f"random batches (cptlab BatchSampler not usable: {exc!r})"
    try:
        from cptlab import schedules

        spec = ScheduleConfig(kind="cosine", max_lr=3e-4, min_lr=3e-5).to_spec()
        lr_at = schedules.build(spec, total_steps)
    except (ImportError, AttributeError, ValueError):
        def lr_at(step: int) -> float:
            return 3e-5 + 1.35e-4 * (1 + math.cos(math.pi * step / total_steps))
    probe = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long, device=device)
    workers = args.workers if args.workers is not None else rt.step_workers(step_model, [(probe, probe)])
    state = {"step": 0, "loss": float("nan"), "sample_s": 0.0, "workers": workers}

    def step() -> None:
        t0 = time.perf_counter()
        x, y = next_batch()
        lr = lr_at(state["step"])
        state["sample_s"] += time.perf_counter() - t0
        state["loss"] = rt.train_step(step_model, optimizer, [(x.to(device), y.to(device))], lr,
                                      train_cfg.grad_clip, autocast, workers=workers)
        state["step"] += 1

    return step, model, note, state


def ref_step_fn(args: argparse.Namespace, device: torch.device):
    model = RefGPT(args.n_layer, args.n_head, args.d_model, args.seq_len, args.vocab_size,
                   manual=args.reference_attention == "manual").to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    state = {"loss": float("nan")}

    def step() -> None:
        xy = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
        x, y = xy[:, :-1].to(device), xy[:, 1:].to(device)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = loss.item()
        sync(device)

    return step, model, state


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--family", default="gpt-neox", choices=("gpt-neox", "llama"),
                   help="the lab's GPT-NeoX block, or a Llama-shaped one of the same width (family_options)")
    p.add_argument("--n-kv-head", type=int, default=None, help="llama: key/value heads (default n_head / 2)")
    p.add_argument("--intermediate-size", type=int, default=None, help="llama: SwiGLU width (default 8/3 d)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--steps", type=int, default=32, help="timed steps of each kind (after 3 warm-up)")
    p.add_argument("--rounds", type=int, default=8, help="alternations of lab and reference steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--malloc", default="tuned", choices=("tuned", "asis"),
                   help="tuned: glibc malloc tuned in-process (runtime.tune_malloc); asis: as launched")
    p.add_argument("--workers", type=int, default=None,
                   help="threads train_step splits each batch across; default: runtime.step_workers")
    p.add_argument("--compile", action="store_true", help="torch.compile the lab's model")
    p.add_argument("--reference-attention", default="sdpa", choices=("sdpa", "manual"))
    p.add_argument("--no-reference", action="store_true", help="skip the reference step")
    p.add_argument("--baseline", metavar="GIT_REF",
                   help="also time the step of this git revision's model.py and runtime.py (eager), "
                        "alternating with the lab's step, and report the speed-up")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the matmul peak (MFU is then NaN): less time, less load on a shared machine")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a report")
    p.add_argument("--scale", help="take the model and batch shapes of this scale's base run (e.g. small)")
    p.add_argument("--processes", type=int, default=None,
                   help="then measure N copies side by side (0: as many as cptlab batch would train)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N lab steps (torch.profiler) and split a step's time by operator kind")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one of --processes' copies
    p.add_argument("--barrier", help=argparse.SUPPRESS)  # a copy's start line: a folder (see side_by_side)
    args = p.parse_args(argv)
    if args.scale:
        apply_scale(args)
    if args.child:
        args.json, args.no_reference = True, True

    malloc_tuned = runtime.tune_malloc() if args.malloc == "tuned" else False
    runtime.set_threads(args.threads)
    device = runtime.pick_device(args.device)
    precision = runtime.pick_precision(args.precision, device)
    say = (lambda *a: None) if args.json else print
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, precision "
        f"{precision}, malloc {'tuned' if malloc_tuned else 'as launched'}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 native: {runtime.cpu_supports_bf16()}")

    peak: dict[str, float] = {}
    update_peak(peak, device, args.no_peak)
    say(f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s "
        "(sampled again between rounds; the best is kept)")

    torch.manual_seed(0)
    lab_step, model, note, lab_state = lab_step_fn(args, precision, device)
    workers = lab_state["workers"]
    say(f"lab model: {model.num_params():,} parameters; {note}; train_step workers: {workers}")
    t0 = time.perf_counter()
    for _ in range(3):
        lab_step()
    say(f"lab warm-up (3 steps{', compile' if args.compile else ''}): {time.perf_counter() - t0:.1f} s")
    timers = {"lab": Timer()}
    steps = {"lab": lab_step}
    if args.baseline:
        base_gpt, base_rt = baseline_modules(args.baseline)
        base_step, _, _, base_state = lab_step_fn(args, precision, device, base_gpt.GPT, base_rt, False)
        for _ in range(3):
            base_step()
        timers["base"], steps["base"] = Timer(), base_step
    if not args.no_reference:
        ref_step, ref_model, ref_state = ref_step_fn(args, device)
        for _ in range(3):
            ref_step()
        timers["ref"], steps["ref"] = Timer(), ref_step
    per_round = max(1, args.steps // args.rounds)
    lab_state["sample_s"] = 0.0
    if args.barrier:  # the copies side by side start their timed steps together
        wait_at_barrier(args.barrier)
    timed_from = time.time()
    for _ in range(args.rounds):
        for name in steps:
            for _ in range(per_round):
                timers[name](steps[name])
        if not (args.child or args.no_peak):  # side by side, sampling the peak would slow the other copies
            update_peak(peak, device, sizes=(2048,), repeats=2)  # a shared machine slows any one sample
    timed_until = time.time()
    if not (args.child or args.no_peak):
        update_peak(peak, device)

    tokens = args.batch_size * args.seq_len
    fpt = model.flops_per_token(args.seq_len)
    lab = timers["lab"]
    out = {
        "tokens_per_s": tokens / lab.best(), "tokens_per_s_median": tokens / lab.median(),
        "flops_per_token": fpt, "precision": precision, "threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned, "compile": args.compile, "workers": workers,
        "sampler_ms_per_step": 1e3 * lab_state["sample_s"] / len(timers["lab"].times),
        "peak_flops": peak[precision], "peak_flops_fp32": peak["fp32"], "peak_flops_bf16": peak["bf16"],
        "minor_faults_per_step": statistics.median(lab.faults), "final_loss": lab_state["loss"],
        "sys_ms_per_step": 1e3 * statistics.mean(lab.sys_times),
        "timed_from": timed_from, "timed_until": timed_until, "tokens_timed": tokens * len(lab.times),
        "dims": {k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "seq_len", "batch_size",
                                               "vocab_size")},
        "family": args.family, "model_options": family_options(args), "parameters": model.num_params(),
    }
    out["flops_per_s"] = out["tokens_per_s"] * fpt
    out["mfu"] = out["flops_per_s"] / peak[precision]
    out["mfu_bf16_peak"] = out["flops_per_s"] / peak["bf16"]
    say(f"\nlab step ({precision}): {out['tokens_per_s']:,.0f} tokens/s best, "
        f"{out['tokens_per_s_median']:,.0f} median ({len(lab.times)} steps)")
    say(f"  FLOPs/token {fpt / 1e6:.2f} M; achieved {out['flops_per_s'] / 1e9:.1f} GFLOP/s; MFU "
        f"{out['mfu']:.1%} of the {precision} peak ({out['mfu_bf16_peak']:.1%} of the bf16 peak)")
    share = out["sampler_ms_per_step"] / 1e3 / lab.median()
    say(f"  minor page faults per step: {out['minor_faults_per_step']:.0f} (system CPU time "
        f"{out['sys_ms_per_step']:.1f} ms per step); batch sampling + LR: "
        f"{out['sampler_ms_per_step']:.2f} ms per step ({share:.1%} of the median step)")
    if "base" in timers:
        out.update(baseline_figures(args, timers, base_state, lab_state, tokens))
        say(f"baseline step ({args.baseline}'s model.py and runtime.py, eager, timed alternately): "
            f"{out['baseline_tokens_per_s']:,.0f} tokens/s best, {out['baseline_tokens_per_s_median']:,.0f} "
            f"median; speed-up {out['speedup_over_baseline']:.2f}x best, "
            f"{out['speedup_over_baseline_median']:.2f}x median; final loss {out['baseline_final_loss']:.6f} "
            f"(lab {lab_state['loss']:.6f}: {'identical' if out['same_loss_as_baseline'] else 'different'})")
    if "ref" in timers:
        ref = timers["ref"]
        out["reference_tokens_per_s"] = tokens / ref.best()
        out["reference_tokens_per_s_median"] = tokens / ref.median()
        out["reference_flops_per_token"] = ref_model.flops_per_token(args.seq_len)
        out["reference_minor_faults_per_step"] = statistics.median(ref.faults)
        out["reference_sys_ms_per_step"] = 1e3 * statistics.mean(ref.sys_times)
        out["speedup"] = out["tokens_per_s"] / out["reference_tokens_per_s"]
        out["speedup_median"] = out["tokens_per_s_median"] / out["reference_tokens_per_s_median"]
        ref_fps = out["reference_tokens_per_s"] * out["reference_flops_per_token"]
        say(f"reference GPT-2 step (fp32, {args.reference_attention} attention): "
            f"{out['reference_tokens_per_s']:,.0f} tokens/s best, "
            f"{out['reference_tokens_per_s_median']:,.0f} median; "
            f"{ref_fps / 1e9:.1f} GFLOP/s, MFU {ref_fps / peak['fp32']:.1%} of the fp32 peak; "
            f"minor page faults per step: {out['reference_minor_faults_per_step']:.0f} "
            f"(system CPU time {out['reference_sys_ms_per_step']:.1f} ms per step)")
        say(f"speed-up over the reference: {out['speedup']:.2f}x best, {out['speedup_median']:.2f}x median")
    if args.profile > 0:
        out["profile"] = profile_split(lab_step, args.profile)
        say(f"profile ({args.profile} steps, operators' own CPU time per step): " + ", ".join(
            f"{kind} {ms:.1f} ms" for kind, ms in out["profile"]["ms_per_step"].items()))
        say("  costliest operators (ms per step): " + ", ".join(
            f"{name} {ms:.1f}" for name, ms in out["profile"]["top"]))
    if device.type == "cuda":
        out.update(gpu_peak(torch.cuda.get_device_name(device), out["flops_per_s"]))
        say(f"  GPU {out['gpu']}: {gpu_peak_line(out)}")
    if args.processes is not None and not args.child:
        out["concurrent"] = side_by_side(args, out)
        c = out["concurrent"]
        say(f"{c['processes']} processes side by side: {c['tokens_per_s']:,.0f} tokens/s together "
            f"({c['flops_per_s'] / 1e12:.2f} TFLOP/s" + (f", MFU {c['mfu_dense_bf16']:.1%} of the "
                                                         f"{out['peak_dense_bf16_part']} dense bf16 peak)"
                                                         if "mfu_dense_bf16" in c else ")")
            + (f"; timed steps overlapping {c['overlap']:.0%}" if "overlap" in c else "")
            + (f"; {len(c['failed'])} FAILED: {c['failed'][0]}" if c["failed"] else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    if args.json:
        print(json.dumps(out))
    return out


# Operator kinds for --profile, by the first pattern found in the operator's name (lower case)
PROFILE_KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "blockedcausalattention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("softmax + loss", ("softmax", "nll_loss", "gather", "scatter", "aten::log", "fusedheadloss")),
    ("norm + activation", ("layer_norm", "rms_norm", "gelu", "silu", "aten::tanh")),
    ("copies", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::fill_", "aten::zero_")),
    ("optimizer", ("adam", "optimizer", "clip", "norm", "aten::_foreach")),
)


def profile_split(step, steps: int, top: int = 8) -> dict:
    """Run ``steps`` calls of ``step`` under ``torch.profiler`` (CPU): each operator's own time per step,
    summed by kind (``PROFILE_KINDS``; the rest is ``other``), and the ``top`` costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    own = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}  # ms per step
    split = {kind: 0.0 for kind, _ in PROFILE_KINDS} | {"other": 0.0}
    for name, ms in own.items():
        low = name.lower()
        kind = next((k for k, pats in PROFILE_KINDS if any(p in low for p in pats)), "other")
        split[kind] += ms
    costliest = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return {"steps": steps, "ms_per_step": {k: round(v, 2) for k, v in split.items()},
            "total_ms_per_step": round(sum(own.values()), 2),
            "top": [(name, round(ms, 2)) for name, ms in costliest]}


def baseline_figures(args: argparse.Namespace, timers: dict[str, Timer], base_state: dict,
                     lab_state: dict, tokens: int) -> dict:
    """The ``--baseline`` step's tokens/s and the lab step's speed-up over it (same steps, alternated)."""
    base, lab = timers["base"], timers["lab"]
    return {
        "baseline": args.baseline, "baseline_tokens_per_s": tokens / base.best(),
        "baseline_tokens_per_s_median": tokens / base.median(),
        "speedup_over_baseline": base.best() / lab.best(),
        "speedup_over_baseline_median": base.median() / lab.median(),
        "baseline_final_loss": base_state["loss"],
        "same_loss_as_baseline": base_state["loss"] == lab_state["loss"],
    }


def apply_scale(args: argparse.Namespace) -> None:
    """Set the model and batch dims to those of ``args.scale``'s base run."""
    from cptlab.study.experiments import base_run

    cfg = base_run(args.scale).config
    m = cfg.resolve(vocab_size=cfg.tokenizer.vocab_size).model
    args.n_layer, args.n_head, args.d_model, args.vocab_size = m.n_layer, m.n_head, m.d_model, m.vocab_size
    args.seq_len, args.batch_size = cfg.train.seq_len, cfg.train.micro_batch_size or cfg.train.batch_size


def gpu_peak(name: str, flops_per_s: float) -> dict:
    """The GPU's name, its dense bf16 peak (part and FLOP/s, None if unknown) and the MFU against it."""
    found = dense_bf16_peak(name)
    if found is None:
        return {"gpu": name, "peak_dense_bf16_part": None, "peak_dense_bf16": None}
    part, peak = found
    return {"gpu": name, "peak_dense_bf16_part": part, "peak_dense_bf16": peak,
            "mfu_dense_bf16": flops_per_s / peak}


def gpu_peak_line(out: dict) -> str:
    if out["peak_dense_bf16"] is None:
        return "unknown GPU: no data-sheet dense bf16 peak (add it to DENSE_BF16_PEAKS); MFU above is " \
               "against the measured matmul peak"
    return (f"MFU {out['mfu_dense_bf16']:.1%} of the {out['peak_dense_bf16_part']} dense bf16 peak "
            f"({out['peak_dense_bf16'] / 1e12:.0f} TFLOP/s)")


def wait_at_barrier(folder: str, timeout: float = 300.0) -> None:
    """Say this copy is warmed up (a file ``ready-<pid>`` in ``folder``), then wait for ``folder``/go."""
    open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
    end = time.monotonic() + timeout
    while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < end:
        time.sleep(0.005)


def side_by_side(args: argparse.Namespace, single: dict) -> dict:
    """Run ``args.processes`` copies of this measurement at once (``--child``), their timed steps started
    together once every copy has warmed up; the concurrent rate is all their timed tokens over the time
    from the first start to the last end (a copy that fails is reported; the others still count)."""
    import tempfile

    n = args.processes or default_processes(args)
    dims = ("n_layer", "n_head", "d_model", "seq_len", "batch_size", "vocab_size", "steps", "rounds")
    threads = args.threads or (scheduler.threads_per_worker(os.cpu_count() or 1, n)
                               if args.device.startswith("cuda") else 1)  # as the runner's processes
    with tempfile.TemporaryDirectory(prefix="cptlab-bench-") as barrier:
        cmd = [sys.executable, __file__, "--child", "--barrier", barrier, "--device", args.device,
               "--precision", args.precision, "--malloc", args.malloc, "--threads", str(threads),
               *["--compile"] * args.compile]
        cmd += [a for k in dims for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(n)]
        # Go when every copy is ready, or when those not ready have exited (failed).
        while sum(f.startswith("ready-") for f in os.listdir(barrier)) + sum(
                p.poll() is not None for p in procs) < n:
            time.sleep(0.01)
        open(os.path.join(barrier, "go"), "w").close()
        results = [_child_result(p) for p in procs]
    ok = [r for r in results if "error" not in r]
    out = {"processes": n, "threads_each": threads, "failed": [r["error"] for r in results if "error" in r]}
    if not ok:
        return {**out, "tokens_per_s": 0.0, "flops_per_s": 0.0}
    window = max(r["timed_until"] for r in ok) - min(r["timed_from"] for r in ok)
    overlap = min(r["timed_until"] for r in ok) - max(r["timed_from"] for r in ok)
    out.update({"tokens_per_s": sum(r["tokens_timed"] for r in ok) / window,
                "tokens_per_s_each": [r["tokens_per_s_median"] for r in ok],
                "tokens_per_s_sum_of_medians": sum(r["tokens_per_s_median"] for r in ok),
                "overlap": max(0.0, overlap) / window})
    out["flops_per_s"] = out["tokens_per_s"] * single["flops_per_token"]
    if single.get("peak_dense_bf16"):
        out["mfu_dense_bf16"] = mfu(out["tokens_per_s"], single["flops_per_token"], single["peak_dense_bf16"])
    return out


def _child_result(proc: subprocess.Popen) -> dict:
    """A copy's JSON line, or {"error": why} if it failed."""
    stdout, stderr = proc.communicate()
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " / ".join(stderr.strip().splitlines()[-2:])
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}


def default_processes(args: argparse.Namespace) -> int:
    """As many as ``cptlab batch`` would train side by side: ``runner.default_workers`` for the scale."""
    from cptlab.analysis.results import experiment_runs
    from cptlab.study import runner

    runs = [r for g in experiment_runs(args.scale or "small", args.device).values() for r in g]
    return runner.default_workers(args.device, runs)


if __name__ == "__main__":
    main()
