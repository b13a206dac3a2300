"""The scales of the lab: everything about the paper's experiments that changes with the compute at hand.

- ``smoke``: the smallest model and budgets that exercise every code path in seconds (tests, nbmake); no
  science.
- ``tiny``: the 2-core CPU default, every finding in minutes. 2 layers x 4 heads x 48 dims (57k
  non-embedding parameters, 155k in all), BPE vocab 1024, sequences of 128 in batches of 32, max LR 2e-3
  (min 2e-4), B0 = 3M tokens of D0 for the base model, B1 = 2M tokens per continual stage, chunks of 1M
  tokens for the infinite schedules, 8 evaluations per stage. A model this small saturates within B0, as
  the paper's over-trained 405M model did, which is what lets continual pre-training with replay meet the
  union baseline (docs/design-notes.md says how it was chosen).
- ``small``: one GPU, 8 layers x 512 dims, vocab 8192, B0 = 5M, B1 = 3.3M, chunks of 1.6M, max LR 1e-3.
  The shipped corpora bound it (B0 is 4 epochs of en-man); its union rows do not reproduce yet.

The scale study trains a ladder of narrower models of a scale's shape (``ladder_scales``); token budgets
scale as (N / N_scale) ** ``ladder_token_power`` in non-embedding parameters N: ``tiny`` uses one budget
for every size, as the paper's 405M and 10B models both saw 300B tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cptlab.config import MODEL_PRESETS, ModelConfig, RunConfig
from cptlab.study import paper
from cptlab.training.model import GPT


@dataclass(frozen=True)
class Scale:
    """Everything that changes with scale: model, tokenizer, batch, budgets, LRs, evaluation."""

    model: str
    vocab_size: int
    seq_len: int
    batch_size: int
    base_tokens: int  # B0: pre-training on D0
    new_tokens: int  # B1: each continual stage (replay included)
    chunk_tokens: int  # each of the 3 chunks of the infinite-schedule experiment
    max_lr: float
    min_lr: float
    warmup: float = paper.WARMUP
    evals_per_stage: int = 10
    eval_tokens: int = 32768
    precision: str = "auto"
    seeds: tuple[int, ...] = (0,)
    union_factors: tuple[float, ...] = (1.5, 2.0)  # extra union baselines at more compute (figure 1)
    model_overrides: tuple[tuple[str, int], ...] = ()  # model fields set over the preset (ladder rungs)
    ladder: tuple[int, ...] = ()  # d_model of the scale study's smaller rungs, smallest first
    ladder_token_power: float = 0.5  # rung budgets scale as (N / N_scale) ** power; 0: one budget for all

    def eval_every(self, stage_tokens: int) -> int:
        """Tokens between evaluations of a stage of ``stage_tokens`` (at least one batch)."""
        return max(self.seq_len * self.batch_size, stage_tokens // self.evals_per_stage)

    def model_config(self, **dims: int) -> ModelConfig:
        """The resolved model of this scale (its overrides, then ``dims``, over the preset)."""
        fields = {"preset": self.model, **dict(self.model_overrides), **dims}
        return RunConfig.from_dict({"model": fields}).resolve(vocab_size=self.vocab_size).model


SCALES: dict[str, Scale] = {
    "smoke": Scale(model="smoke", vocab_size=1024, seq_len=64, batch_size=8, base_tokens=16384,
                   new_tokens=8192, chunk_tokens=4096, max_lr=3e-3, min_lr=3e-4, evals_per_stage=4,
                   eval_tokens=2048, ladder=(16,)),
    "tiny": Scale(model="tiny", vocab_size=1024, seq_len=128, batch_size=32, base_tokens=3_000_000,
                  new_tokens=2_000_000, chunk_tokens=1_000_000, max_lr=2e-3, min_lr=2e-4, evals_per_stage=8,
                  union_factors=(), ladder=(24, 32), ladder_token_power=0.0),
    "small": Scale(model="small", vocab_size=8192, seq_len=256, batch_size=64, base_tokens=5_000_000,
                   new_tokens=3_300_000, chunk_tokens=1_600_000, max_lr=1e-3, min_lr=1e-4,
                   eval_tokens=65536, ladder=(128, 256)),
}


def get_scale(scale: str | Scale) -> Scale:
    """``scale`` itself, or the scale of that name (a ``ValueError`` naming the allowed ones if none)."""
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"scale: unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    return SCALES[scale]


def ladder_scales(scale: str | Scale = "tiny") -> list[Scale]:
    """The rungs of the scale study, smallest first: the scale's ``ladder`` widths (same layers, heads
    of 32 dims or more, at least 2), then the scale itself. Token budgets scale with (N / N_scale) **
    ``ladder_token_power`` in non-embedding parameters N, rounded to whole batches."""
    s = get_scale(scale)
    heads = MODEL_PRESETS[s.model]["n_head"]
    top = GPT.count_params(s.model_config(), non_embedding=True)
    step = s.seq_len * s.batch_size
    rungs = []
    for width in s.ladder:
        dims = {"d_model": width, "n_head": max(2, min(heads, width // 32))}
        factor = (GPT.count_params(s.model_config(**dims), non_embedding=True) / top) ** s.ladder_token_power

        def scaled(n: int, factor: float = factor) -> int:
            return max(step, round(n * factor / step) * step)

        rungs.append(dataclasses.replace(s, model_overrides=tuple(sorted(dims.items())),
                                         base_tokens=scaled(s.base_tokens), new_tokens=scaled(s.new_tokens)))
    return [*rungs, s]
