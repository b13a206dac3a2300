"""The paper's constants in one place: its design (replay fractions, warmups, max-LR factors, schedules,
token budgets), the lab's stand-ins for its data, and its published final losses.

"Simple and Scalable Strategies to Continually Pre-train Large Language Models" (Ibrahim et al., arXiv
2403.08763; see PAPER.md). Numbers are the 405M model's unless the name says otherwise. This module
imports nothing from cptlab: the experiments, the real-scale recipes, the metrics, the report and the
widgets all read it.
"""

from __future__ import annotations

import math
from typing import Any

# -- the lab's stand-ins for the paper's data (shipped corpora) -----------------------------------
D0 = "en-man"  # the paper's Pile
SHIFTS = {"weak": "en-docs", "strong": "de-man"}  # the paper's SlimPajama and German Common Crawl
CORPORA = (D0, *SHIFTS.values())  # every corpus the experiments read (``cptlab corpora --scale``)

# -- the design of the experiments ---------------------------------------------------------------
REPLAY_FRACTIONS = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50)  # compute-equivalent replay of D0
CHOSEN_REPLAY = {"weak": 0.05, "strong": 0.25}  # the paper's choice per shift
WARMUPS = (0.0, 0.005, 0.01, 0.02)  # re-warming lengths, fractions of the continual stage
LR_FACTORS = (0.5, 1.0, 2.0)  # max LR of the re-warming ablation, times the scale's max LR
CHUNK_SCHEDULES = ("cosine", "infinite_cosine", "infinite_inv_sqrt", "wsd")  # compared over 3 chunks
WARMUP = 0.01  # of each stage (of the first chunk for infinite schedules and WSD)
COOLDOWN = 0.6  # infinite schedules: from max_lr to const_lr over this fraction of the first chunk
ANNEAL = 0.1  # infinite schedules and WSD: a model at a chunk's end anneals over its last fraction

# -- the 405M setting ----------------------------------------------------------------------------
TOKENS_405M = {"pile": 300e9, "weak": 300e9, "strong": 200e9, "chunk": 100e9}
LR_405M: dict[str, float] = dict(max_lr=3e-4, min_lr=3e-5, const_lr=1.65e-4, warmup=WARMUP,
                                 cooldown=COOLDOWN, alpha=10.0)
# Schedule specs (``cptlab.schedules``). The paper gives no wsd numbers: decay 10% follows MiniCPM and the
# 1-sqrt shape Hägele et al.; "constant" is the ablation that keeps the LR at min_lr.
SCHEDULES_405M: dict[str, dict[str, Any]] = {
    "cosine": dict(kind="cosine", max_lr=3e-4, min_lr=3e-5, warmup=WARMUP),
    "constant": dict(kind="constant", max_lr=3e-5, min_lr=3e-5, warmup=0.0),
    "infinite_cosine": dict(kind="infinite_cosine", **LR_405M, anneal=0.0),
    "infinite_inv_sqrt": dict(kind="infinite_inv_sqrt", **LR_405M, anneal=0.0),
    "wsd": dict(kind="wsd", max_lr=3e-4, min_lr=3e-5, warmup=WARMUP, decay=0.1, decay_shape="1-sqrt"),
}

# -- the paper's final losses, as (D0, D1, avg) --------------------------------------------------
BASE_D0 = 2.17  # Pile-only base model on the Pile; its SlimPajama loss is 2.70
REPLAY_TABLES: dict[str, dict[str, tuple[float, float, float]]] = {
    "weak": {  # Pile -> SlimPajama, 300B new tokens
        "0%": (2.44, 2.50, 2.47), "1%": (2.26, 2.50, 2.38), "5%": (2.23, 2.51, 2.37),
        "10%": (2.21, 2.51, 2.36), "50%": (2.16, 2.54, 2.35), "union": (2.17, 2.53, 2.35),
        "base": (2.17, 2.70, math.nan),
    },
    "strong": {  # Pile -> German Common Crawl, 200B new tokens
        "0%": (3.56, 1.11, 2.34), "1%": (2.83, 1.12, 1.97), "5%": (2.57, 1.12, 1.85),
        "10%": (2.46, 1.13, 1.80), "25%": (2.33, 1.16, 1.75), "50%": (2.24, 1.22, 1.73),
        "union": (2.26, 1.25, 1.75), "base": (2.17, math.nan, math.nan),
    },
}
WEAK_10B: dict[str, tuple[float, float, float]] = {
    "0%": (1.98, 2.00, 1.99), "5%": (1.79, 2.00, 1.89), "union": (1.72, 2.02, 1.87)}
MAX_LR_ROWS = ("constant at min", "re-warm, no re-decay", "0.5x", "1x", "2x")
MAX_LR_TABLES: dict[str, dict[str, tuple[float, float]]] = {  # no replay, (D0, D1)
    "weak": {"constant at min": (2.42, 2.55), "0.5x": (2.43, 2.51), "1x": (2.44, 2.50), "2x": (2.48, 2.50)},
    "strong": {"constant at min": (3.22, 1.21), "0.5x": (3.47, 1.13), "1x": (3.56, 1.11), "2x": (3.63, 1.11)},
}
# Transient rise of D0 loss after re-warming, in nats: on D0 itself and when switching to SlimPajama.
D0_REWARM_RISE = {"same data": {"1x": 0.10, "2x": 0.20}, "switch to D1 (weak)": {"1x": 0.35, "2x": 0.45}}
