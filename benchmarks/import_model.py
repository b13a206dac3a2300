"""Import time and peak memory of ``cptlab import`` on a random model of a real model's shape.

    .venv/bin/python benchmarks/import_model.py [--shape smollm2-135m|pythia-160m|tiny] [--shards 2]
        [--keep DIR]

Builds a randomly initialised transformers model of the shape (from its config class, never downloaded),
saves it with ``save_pretrained`` (``--shards N``: split in about N safetensors files) and a byte-level
tokenizer, then runs ``python -m cptlab import`` on it in a child process and prints its wall time and
peak resident memory (``ru_maxrss`` of the child). The import reads the headers, converts the weights,
loads the model a second time through transformers and compares the logits (the check every import runs).
Prints figures; never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config: 30 layers x 576, 9 heads, 3 key/value heads, SwiGLU 1536, tied
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 100000.0})),
    # EleutherAI/pythia-160m's: 12 layers x 768, 12 heads, rotary 25%, parallel residual, untied
    "pythia-160m": ("GPTNeoXConfig", dict(vocab_size=50304, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12,
                                          max_position_embeddings=2048, use_parallel_residual=True)),
    "tiny": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
}


def save_model(shape: str, folder: Path, shards: int) -> int:
    """Save a random model of ``shape`` and a byte tokenizer in ``folder``; returns its parameter count."""
    import transformers

    from cptlab.data.tokenizer import Tokenizer

    config_class, kwargs = SHAPES[shape]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    size = f"{max(1, n * 4 // shards // 2**20 + 1)}MB" if shards > 1 else None
    model.save_pretrained(str(folder), **({"max_shard_size": size} if size else {}))
    Tokenizer("byte").to_tokenizers().save(str(folder / "tokenizer.json"))
    return n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=tuple(SHAPES))
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--keep", help="save the model and the run store here instead of a temporary folder")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="cptlab-import-bench-"))
    src = work / args.shape
    t0 = time.perf_counter()
    n = save_model(args.shape, src, args.shards)
    saved_s = time.perf_counter() - t0
    files = sorted(src.glob("*.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cptlab", "import", str(src), "--out", str(work / "runs")],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"shape": args.shape, "parameters": n, "safetensors_files": len(files),
           "safetensors_bytes": sum(f.stat().st_size for f in files), "save_s": saved_s,
           "import_s": wall, "import_peak_rss_bytes": peak_kib * 1024, "returncode": done.returncode,
           "import_output": done.stdout.strip().splitlines()[:1] or done.stderr.strip().splitlines()[-1:]}
    print(f"{args.shape}: {n:,} parameters in {len(files)} safetensors file(s) "
          f"({out['safetensors_bytes'] / 2**20:.0f} MiB, saved in {saved_s:.1f} s)")
    print(f"cptlab import: {wall:.1f} s wall, peak RSS {peak_kib / 2**20:.2f} GiB (exit {done.returncode})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
