"""Data pipeline benchmark: tokenisation throughput, cache hits, batch sampling rate, memory while sampling.

    .venv/bin/python benchmarks/data_pipeline.py [--quick]
    .venv/bin/python benchmarks/data_pipeline.py --pack docs   # the docs pack (`cptlab corpora fetch docs`)

Uses the shipped corpora when they are built (synthetic text otherwise) and a fresh temporary cache,
so "from scratch" really is from scratch. Prints figures; never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cptlab.config import ReplayConfig, TokenizerConfig
from cptlab.data import BatchSampler, Registry, load_tokenizer, shard_meta, token_shard
from cptlab.data.corpus import CORPORA_DIR, SEPARATOR, SHIPPED

TINY_TOKENS_PER_S = 27_000  # the tiny model's training rate on a 2-core CPU (DESIGN.md)


def corpora(tmp: Path) -> tuple[dict, bool, list[str]]:
    """(user corpora, include shipped, names): the shipped corpora, or three synthetic ~3 MB corpora
    if they are not built yet."""
    if all((CORPORA_DIR / f"{n}.txt.xz").exists() for n in SHIPPED):
        return {}, True, list(SHIPPED)
    print("shipped corpora not built: using synthetic text")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    user = {}
    for name in ("syn-a", "syn-b", "syn-c"):
        docs = [" ".join(rng.choices(words, k=rng.randint(50, 1500))) for _ in range(1000)]
        (tmp / f"{name}.txt").write_text(SEPARATOR.join(docs))
        user[name] = {"path": str(tmp / f"{name}.txt")}
    return user, False, list(user)


def tokenisation(user: dict, shipped: bool, names: list[str], cache: str) -> dict:
    print("\n== tokenisation (fresh cache) ==")
    registry = Registry(user, cache_dir=cache, include_shipped=shipped)
    t0 = time.perf_counter()
    bpe = load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=8192), registry, cache)
    print(f"BPE 8192 trained in {time.perf_counter() - t0:.1f} s (once; cached after)")
    tokenizers = {"byte": load_tokenizer(TokenizerConfig(kind="byte")), "bpe-8192": bpe}
    for label, tok in tokenizers.items():
        for name in names:
            text_mb = sum(len(t.encode()) for t in registry.documents(name)["text"]) / 1e6
            t0 = time.perf_counter()
            meta = shard_meta(name, tok, registry, cache)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()  # a cache hit, as a new process sees it: new registry, load, map
            token_shard(name, "train", tok, Registry(user, cache_dir=cache, include_shipped=shipped), cache)
            hit = time.perf_counter() - t0
            tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
            print(f"{label:9s} {name:9s} {text_mb:6.2f} MB -> {tokens / 1e6:6.2f} M tokens in {build:5.1f} s "
                  f"= {text_mb / build:5.2f} MB/s; cache hit {hit * 1000:5.1f} ms")
    return tokenizers


def sampling(user: dict, shipped: bool, names: list[str], tok, cache: str, quick: bool) -> None:
    print("\n== batch sampling (new data + 5% replay, BPE shards) ==")
    registry = Registry(user, cache_dir=cache, include_shipped=shipped)
    sources = {n: token_shard(n, "train", tok, registry, cache) for n in names}
    for seq_len, batch in ((128, 32), (512, 64)):
        sampler = BatchSampler(sources, {names[1]: 1.0}, ReplayConfig(names[0], 0.05), seq_len, batch,
                               10**12, seed=0)
        n = 300 if quick else 2000
        sampler.next_batch()
        t0 = time.perf_counter()
        for _ in range(n):
            sampler.next_batch()
        dt = time.perf_counter() - t0
        rate = n * batch * seq_len / dt
        print(f"seq {seq_len:4d} x batch {batch:3d}: {n / dt:8.0f} batches/s, {rate / 1e6:6.2f} M tokens/s "
              f"= {rate / TINY_TOKENS_PER_S:5.0f}x the tiny model's {TINY_TOKENS_PER_S:,} tokens/s "
              f"(need >= 50x)")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def rss_child(path: str, n_tokens: int, batches: int) -> None:
    """Sample from a synthetic memmap of n_tokens; print memory figures as JSON."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tokens,))
    other = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tokens // 2,))
    before = _status_kb("RssAnon")
    sampler = BatchSampler({"big": tokens, "old": other}, {"big": 1.0}, ReplayConfig("old", 0.25), 128, 32,
                           10**12, seed=0)
    for _ in range(batches):
        sampler.next_batch()
    anon = _status_kb("RssAnon")
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's peak, kept across exec)
    print(json.dumps(dict(peak_rss_mb=_status_kb("VmHWM") / 1024, anon_mb=anon / 1024,
                          anon_growth_mb=(anon - before) / 1024, file_mb=_status_kb("RssFile") / 1024)))


def memory(tmp: Path, quick: bool) -> None:
    print("\n== memory while sampling from a synthetic memmap (seq 128 x batch 32, 25% replay) ==")
    batches = 500 if quick else 3000
    sizes = (16, 128) if quick else (16, 128, 1024)
    print(f"{batches} batches each, in a fresh process per size. RssAnon: private memory; RssFile: mapped "
          "file pages (libraries, and the memmap pages of the batch being read)")
    for m in sizes:
        n = m * 2**20
        path = tmp / f"big-{m}M.bin"
        with open(path, "wb") as f:
            chunk = (np.arange(2**22) % 8192).astype(np.uint16)
            for _ in range(n // len(chunk)):
                chunk.tofile(f)
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), str(n), str(batches)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"corpus {m:5d} M tokens ({2 * m:5d} MB): peak RSS {r['peak_rss_mb']:7.1f} MB, "
              f"RssAnon {r['anon_mb']:6.1f} MB (+{r['anon_growth_mb']:.1f} while sampling), "
              f"RssFile {r['file_mb']:6.1f} MB")
        path.unlink()


def pack(tmp: Path) -> None:
    """Tokenise the built docs pack from scratch with the BPE 8192 of the shipped corpora; time, tokens/s,
    peak RSS of this process and of its tokenising processes."""
    import resource

    from cptlab.data import cache_root, packs

    real = cache_root()
    if packs.verified(real, packs.PACKS["docs"]) is None:
        sys.exit(f"the docs pack is not built in {real}: run `cptlab corpora fetch docs`")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "packs").symlink_to(real / "packs")  # the pack's text; its shards are built afresh under tmp
    bpe = load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=8192), Registry(cache_dir=str(real)))
    registry = Registry(cache_dir=str(cache), include_shipped=False)
    print(f"\n== tokenising the docs pack (BPE 8192, fresh shard cache, {os.cpu_count()} cpus) ==")
    start = time.perf_counter()
    total = 0
    for name in packs.CORPORA:
        t0 = time.perf_counter()
        meta = shard_meta(name, bpe, registry, cache)
        tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
        total += tokens
        dt = time.perf_counter() - t0
        print(f"{name:14s} {sum(meta['characters'].values()) / 1e6:7.1f} M chars -> {tokens / 1e6:6.2f} M "
              f"tokens (train {meta['tokens']['train'] / 1e6:.2f} M) in {dt:6.1f} s = "
              f"{tokens / dt / 1e3:6.0f}k tokens/s")
    dt = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"whole pack: {total / 1e6:.1f} M tokens in {dt:.1f} s = {total / dt / 1e3:.0f}k tokens/s; "
          f"peak RSS {own:.0f} MB (this process), {children:.0f} MB (largest tokenising process)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and smaller synthetic corpora")
    p.add_argument("--pack", choices=["docs"], help="only tokenise a built corpus pack")
    p.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return
    if args.pack:
        with tempfile.TemporaryDirectory(prefix="cptlab-bench-") as tmp:
            pack(Path(tmp))
        return
    with tempfile.TemporaryDirectory(prefix="cptlab-bench-") as tmp:
        cache = str(Path(tmp) / "cache")
        user, shipped, names = corpora(Path(tmp))
        tokenizers = tokenisation(user, shipped, names, cache)
        sampling(user, shipped, names, tokenizers["bpe-8192"], cache, args.quick)
        memory(Path(tmp), args.quick)
    print(f"\ncpus: {os.cpu_count()}; load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
