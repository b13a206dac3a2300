"""The parts of a small model's step that no Python change removes: its matmuls and its attention.

    .venv/bin/python benchmarks/step_parts.py [--scale tiny] [--threads 1] [--rounds 8] [--reps 5]

For the shapes of a scale's base run (``--scale``, default tiny) on ``--threads`` threads, in fp32:

1. every matmul of a training step, forward and backward (the linear layers and the output projection over
   ``batch x seq`` rows), timed alone: GFLOP/s per shape and the milliseconds they take together;
2. causal attention forward + backward for one layer at the model's head size, variant by variant,
   alternated in rounds: ``scaled_dot_product_attention`` (the CPU flash kernel), the same with the head
   zero-padded to a multiple of 8, and ``model._BlockedCausalAttention`` in blocks of 128, 64, 32 and 16
   query rows;
3. the floor those set: the matmuls plus ``n_layer`` times the fastest attention variant, beside the step
   time a given speed-up (``--target``, default 1.5x) of a measured step would allow (``--step-ms``: the
   lab step's best time from ``benchmarks/throughput.py``; without it the floor alone is printed).

A large square matmul gives the core's fp32 peak for comparison. Prints figures; never fails on timing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cptlab.study.scales import get_scale
from cptlab.training import runtime
from cptlab.training.model import _BlockedCausalAttention


def best_ms(fn, reps: int, rounds: int = 5) -> float:
    """The fastest of ``rounds`` means over ``reps`` calls, in milliseconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def step_matmuls(rows: int, d: int, ff: int, vocab: int,
                 n_layer: int) -> list[tuple[str, int, int, int, int]]:
    """(name, m, k, n, count per step) of every matmul of a GPT-NeoX step without the attention's own."""
    shapes = [("qkv", d, 3 * d), ("attention out", d, d), ("mlp up", d, ff), ("mlp down", ff, d)]
    out = []
    for name, k, n in shapes:
        out.append((f"{name} forward", rows, k, n, n_layer))
        out.append((f"{name} backward (input)", rows, n, k, n_layer))
        out.append((f"{name} backward (weight)", n, rows, k, n_layer))
    out += [("head forward", rows, d, vocab, 1), ("head backward (input)", rows, vocab, d, 1),
            ("head backward (weight)", vocab, rows, d, 1)]
    return out


def attention_variants(b: int, h: int, t: int, hd: int) -> dict:
    """One layer's causal attention forward + backward, as closures over the same inputs."""
    q, k, v = (torch.randn(b, h, t, hd, requires_grad=True) for _ in range(3))
    dy = torch.randn(b, h, t, hd)
    pad = -hd % 8

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy)

    def padded():
        p = [F.pad(x, (0, pad)) for x in (q, k, v)]
        F.scaled_dot_product_attention(*p, is_causal=True, scale=hd**-0.5)[..., :hd].backward(dy)

    def blocked(block: int):
        def run():
            flat = [x.reshape(b * h, t, hd) for x in (q, k, v)]
            _BlockedCausalAttention.apply(*flat, block).view(b, h, t, hd).backward(dy)
        return run

    variants = {"sdpa (flash kernel)": sdpa}
    if pad:
        variants[f"sdpa, head padded to {hd + pad}"] = padded
    variants.update({f"blocked, {n} rows": blocked(n) for n in (128, 64, 32, 16) if n <= t})
    return variants


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8, help="alternations of the attention variants")
    p.add_argument("--reps", type=int, default=5, help="calls per timing")
    p.add_argument("--step-ms", type=float, help="the lab step's best time (throughput.py) to compare with")
    p.add_argument("--target", type=float, default=1.5, help="the speed-up the floor is compared with")
    args = p.parse_args(argv)
    runtime.tune_malloc()
    runtime.set_threads(args.threads)
    s = get_scale(args.scale)
    m = s.model_config()
    d, n_layer, n_head, ff = m.d_model, m.n_layer, m.n_head, m.mlp_width()
    vocab, rows = m.vocab_size, s.batch_size * s.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.scale}: {n_layer} layers x {d} dims, "
          f"{n_head} heads, vocab {vocab}, {s.batch_size} x {s.seq_len} tokens a step")
    big = torch.randn(1024, 1024)
    peak_ms = best_ms(lambda: big @ big, 3)
    print(f"fp32 matmul 1024^3: {2 * 1024**3 / peak_ms / 1e6:.1f} GFLOP/s")

    matmul_ms = 0.0
    for name, mm, kk, nn, count in step_matmuls(rows, d, ff, vocab, n_layer):
        a, b = torch.randn(mm, kk), torch.randn(kk, nn)
        ms = best_ms(lambda a=a, b=b: a @ b, args.reps * 4)
        matmul_ms += ms * count
        rate = 2 * mm * kk * nn / ms / 1e6
        print(f"  {name:32s} {mm:5d} x {kk:5d} x {nn:5d} (x{count}): {rate:6.1f} GFLOP/s")
    print(f"the step's matmuls: {matmul_ms:.1f} ms")

    variants = attention_variants(s.batch_size, n_head, s.seq_len, d // n_head)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(best_ms(fn, args.reps, rounds=1))
    for name, ts in times.items():
        print(f"  attention, {name:26s} best {min(ts):6.2f} ms, median {sorted(ts)[len(ts) // 2]:6.2f} ms")
    attention_ms = min(min(ts) for ts in times.values())
    floor = matmul_ms + n_layer * attention_ms
    print(f"floor: the matmuls and {n_layer} x the fastest attention = {floor:.1f} ms a step "
          f"({rows / floor * 1e3:,.0f} tokens/s before any softmax, norm, activation, copy or "
          "optimizer step)")
    if args.step_ms:
        allowed = args.step_ms / args.target
        print(f"a {args.target:g}x faster step than {args.step_ms:.1f} ms: {allowed:.1f} ms for everything; "
              f"the floor is {floor / allowed:.2f}x that")


if __name__ == "__main__":
    main()
