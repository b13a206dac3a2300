"""The batch sampler: a stage's data mixture with compute-equivalent replay.

Each corpus is cut into non-overlapping windows of ``seq_len + 1`` tokens (stride ``seq_len``, so every
token is a target once per epoch). Its canonical order for a seed is, per epoch, a keyed pseudo-random
permutation of those windows: a Feistel network over the window index with keys from
sha256(seed, corpus, epoch), evaluated on demand, so it needs no memory however large the corpus and
any position can be reached at once. A stage reads each new corpus in that order from its start (or
``start``); replay with ``order: original`` reads the replay source in the same order from its start,
as it was read in pre-training; ``order: shuffled`` uses other keys.

Of the ``B`` sequences of step ``t``, replay supplies ``floor(f B (t+1)) - floor(f B t)``: exactly
``floor(f x all sequences so far)``, so the fraction is honoured over the stage whatever the batch size.
The rest go to the new corpora by largest deficit against their weights (the remainders carry from batch
to batch); replay from several corpora splits its sequences among them the same way. Only counts are
state, so ``state_dict`` holds plain integers.
"""

from __future__ import annotations

import hashlib
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from cptlab.config import ReplayConfig
from cptlab.data.checks import DataError

STATE_VERSION = 1
LOOKAHEAD = 4096  # window indices computed at a time per stream


@dataclass
class _Stream:
    key: str  # the corpus for new data, "replay:<corpus>" for replay
    corpus: str
    order: str  # "original" or "shuffled"
    tokens: np.ndarray
    n_windows: int
    start: int = 0  # first sequence index of the order read by this sampler
    count: int = 0  # sequences read so far
    ahead_from: int = 0  # window indices of the positions ahead_from, ahead_from + 1, ... (a cache)
    ahead: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def open(self) -> np.ndarray:
        """The tokens. A file memmap is mapped afresh for each batch: pages of a long-lived map stay
        counted in the process's RSS as they are touched, so RSS would creep up to the corpus size."""
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
            return np.memmap(t.filename, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape)
        return t


class BatchSampler:
    """(inputs, targets) batches of a stage; see the module docstring for the contract."""

    def __init__(self, sources: dict[str, np.ndarray], weights: dict[str, float],
                 replay: ReplayConfig | None, seq_len: int, batch_size: int, total_tokens: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: dict[str, int] | None = None):
        replay = _checked(weights, replay, seq_len, batch_size, total_tokens, seed, rank, world_size)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_steps = total_tokens // (batch_size * seq_len)
        self.step = 0
        replayed = replay.weights() if replay is not None else {}
        plan = [(name, name, "original") for name in sorted(weights)]
        plan += [(f"replay:{name}", name, replay.order) for name in sorted(replayed)]
        self.streams = [self._stream(sources, key, corpus, order, (start or {}).get(corpus, 0))
                        for key, corpus, order in plan]
        self._n_new = len(weights)
        # Each group's weights as exact integers: weight_c = num[c] / den.
        self._new_num, self._new_den = _exact_shares([weights[n] for n in sorted(weights)])
        self._replay_num, self._replay_den = _exact_shares([replayed[n] for n in sorted(replayed)])
        self._replay = Fraction(repr(float(replay.fraction))) if replay is not None else Fraction(0)
        self._keys: dict[tuple[str, str, int], np.ndarray] = {}

    def _stream(self, sources: dict[str, np.ndarray], key: str, corpus: str, order: str,
                start: int) -> _Stream:
        if corpus not in sources:
            raise DataError(f"unknown corpus {corpus!r}; known corpora: {', '.join(sources)}")
        tokens = sources[corpus]
        n_windows = (len(tokens) - 1) // self.seq_len
        if n_windows < 1:
            raise DataError(f"corpus {corpus!r} has {len(tokens)} tokens, too few for one sequence of "
                            f"seq_len={self.seq_len} (which needs {self.seq_len + 1}); use a shorter seq_len")
        if start < 0:
            raise DataError(f"start.{corpus}: must be >= 0, got {start}")
        return _Stream(key, corpus, order, tokens, n_windows, start)

    # -- allocation ----------------------------------------------------------------------------
    def _replayed_before(self, step: int) -> int:
        """Replay sequences in the first ``step`` steps: floor(fraction x sequences)."""
        return self._replay.numerator * step * self.batch_size // self._replay.denominator

    def _allocate(self) -> list[int]:
        """How many sequences of this step each stream supplies."""
        n_replay = self._replayed_before(self.step + 1) - self._replayed_before(self.step)
        new, replay = self.streams[:self._n_new], self.streams[self._n_new:]
        alloc = _split(self.batch_size - n_replay, [s.count for s in new], self._new_num, self._new_den)
        if replay:
            alloc += _split(n_replay, [s.count for s in replay], self._replay_num, self._replay_den)
        return alloc

    # -- batches ---------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), int64 tensors of shape (batch_size // world_size, seq_len)."""
        alloc = self._allocate()
        stream_of = np.repeat(np.arange(len(self.streams)), alloc)
        window = np.concatenate([self._next_windows(s, n) for s, n in zip(self.streams, alloc)])
        # Mix the sources within the global batch; every rank draws the same permutation.
        rows = np.random.Generator(np.random.PCG64([self.seed, self.step, 1])).permutation(self.batch_size)
        per_rank = self.batch_size // self.world_size
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        stream_of, first = stream_of[mine], window[mine] * self.seq_len

        out = np.empty((per_rank, self.seq_len + 1), dtype=np.int64)
        offsets = np.arange(self.seq_len + 1)
        for i in np.unique(stream_of):
            sel = stream_of == i
            out[sel] = self.streams[i].open()[first[sel, None] + offsets]
        for s, n in zip(self.streams, alloc):
            s.count += n
        self.step += 1
        batch = torch.from_numpy(out)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches left in the stage."""
        while self.step < self.num_steps:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.num_steps

    def _next_windows(self, s: _Stream, n: int) -> np.ndarray:
        """Window indices of the stream's next ``n`` sequences (epochs wrap around)."""
        p = s.start + s.count
        if not s.ahead_from <= p <= p + n <= s.ahead_from + len(s.ahead):
            position = np.arange(p, p + max(n, min(LOOKAHEAD, s.n_windows)))
            epoch, index = np.divmod(position, s.n_windows)
            s.ahead_from, s.ahead = p, np.empty_like(position)
            for e in np.unique(epoch):
                sel = epoch == e
                s.ahead[sel] = permute(index[sel], s.n_windows, self._order_keys(s.corpus, s.order, int(e)))
        return s.ahead[p - s.ahead_from:p - s.ahead_from + n]

    def _order_keys(self, corpus: str, order: str, epoch: int) -> np.ndarray:
        key = (corpus, order, epoch)
        if key not in self._keys:
            self._keys[key] = order_keys(self.seed, corpus, epoch, order)
        return self._keys[key]

    # -- accounting and resume -------------------------------------------------------------------
    @property
    def sequences_by_source(self) -> dict[str, int]:
        """Sequences consumed so far in the whole global batch (all ranks), by corpus."""
        out: dict[str, int] = {}
        for s in self.streams:
            out[s.corpus] = out.get(s.corpus, 0) + s.count
        return out

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens consumed so far (all ranks), by corpus: sequences x seq_len."""
        return {c: n * self.seq_len for c, n in self.sequences_by_source.items()}

    @property
    def epochs(self) -> dict[str, float]:
        """Position in each corpus's order, in epochs (1.0: one full pass over its windows)."""
        out: dict[str, float] = {}
        for s in self.streams:
            out[s.corpus] = max(out.get(s.corpus, 0.0), (s.start + s.count) / s.n_windows)
        return out

    @property
    def planned_epochs(self) -> dict[str, float]:
        """Where each corpus's order will be at the end of the stage, in epochs (what ``epochs`` will say
        after the last step): the stage's share of sequences per stream, from its start."""
        replayed = self._replayed_before(self.num_steps)
        new_total = self.num_steps * self.batch_size - replayed
        shares = ([new_total * n / self._new_den for n in self._new_num]
                  + [replayed * n / self._replay_den for n in self._replay_num])
        out: dict[str, float] = {}
        for s, n in zip(self.streams, shares):
            out[s.corpus] = max(out.get(s.corpus, 0.0), (s.start + n) / s.n_windows)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings: safe for ``torch.load(weights_only=True)``."""
        return dict(version=STATE_VERSION, step=self.step, seq_len=self.seq_len,
                    batch_size=self.batch_size, seed=self.seed,
                    start={s.key: s.start for s in self.streams},
                    count={s.key: s.count for s in self.streams})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the sampler that saved ``state`` stopped."""
        ours = dict(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
                    streams=sorted(s.key for s in self.streams))
        theirs = dict(seq_len=state.get("seq_len"), batch_size=state.get("batch_size"),
                      seed=state.get("seed"), streams=sorted(state.get("count", {})))
        if ours != theirs:
            raise DataError(f"sampler state does not match this sampler: saved {theirs}, here {ours}")
        self.step = int(state["step"])
        for s in self.streams:
            s.start, s.count = int(state["start"][s.key]), int(state["count"][s.key])
            s.ahead = np.zeros(0, dtype=np.int64)


def _checked(weights: dict[str, float], replay: ReplayConfig | None, seq_len: int, batch_size: int,
             total_tokens: int, seed: int, rank: int, world_size: int) -> ReplayConfig | None:
    """Check a sampler's arguments; the replay to use (None for none: an empty ``ReplayConfig`` too)."""
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if seed < 0:
        raise DataError(f"seed: must be >= 0, got {seed}")
    if world_size < 1 or batch_size % world_size:
        raise DataError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank}")
    if total_tokens < batch_size * seq_len:
        raise DataError(f"tokens: {total_tokens} is smaller than one batch "
                        f"(batch_size x seq_len = {batch_size * seq_len})")
    if not weights:
        raise DataError("data: at least one corpus with a weight is required")
    for name, w in weights.items():
        if not w > 0:
            raise DataError(f"data.{name}: weight must be > 0, got {w}")
    if replay is None or (not replay.source and replay.fraction == 0):
        return None
    for name, w in replay.weights().items():
        if not w > 0:
            raise DataError(f"replay.source.{name}: weight must be > 0, got {w}")
    if not 0.0 <= replay.fraction < 1.0:
        raise DataError(f"replay.fraction: must be in [0, 1), got {replay.fraction}")
    if replay.order not in ("original", "shuffled"):
        raise DataError(f"replay.order: {replay.order!r} not allowed; allowed: original, shuffled")
    if set(weights) == set(replay.weights()):
        raise DataError(f"replay.source: {replay.source!r} is also the only new corpus; "
                        "replay must come from another corpus")
    return replay


def _exact_shares(weights: list[float]) -> tuple[list[int], int]:
    """Weights normalised to sum 1, as exact integer numerators over a common denominator."""
    if not weights:
        return [], 1
    shares = [Fraction(repr(float(w))) for w in weights]
    total = sum(shares)
    shares = [s / total for s in shares]
    den = math.lcm(*(s.denominator for s in shares))
    return [int(s * den) for s in shares], den


def _split(n: int, counts: list[int], num: list[int], den: int) -> list[int]:
    """``n`` sequences for streams that have supplied ``counts`` so far, to each by its largest deficit
    against its share ``num[c] / den`` of all their sequences (remainders carry from step to step)."""
    total = sum(counts) + n
    deficit = [share * total - den * count for share, count in zip(num, counts)]
    alloc = [0] * len(counts)
    for _ in range(n):
        c = deficit.index(max(deficit))
        alloc[c] += 1
        deficit[c] -= den
    return alloc


# -- the keyed permutation -----------------------------------------------------------------------

def order_keys(seed: int, corpus: str, epoch: int, order: str = "original") -> np.ndarray:
    """Four 64-bit round keys of a corpus's window order in one epoch, from sha256."""
    tag = f"cptlab order/{seed}/{corpus}/{epoch}" + ("" if order == "original" else f"/{order}")
    return np.frombuffer(hashlib.sha256(tag.encode()).digest(), dtype="<u8").copy()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 values (wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    """A permutation of [0, 4**half): a balanced Feistel network, one round per key."""
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << np.uint64(half)) | right


def permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Entries ``index`` of a keyed pseudo-random permutation of range(n), without building it."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    x = _feistel(np.asarray(index, dtype=np.uint64), keys, half)
    # cycle-walking: a value outside [0, n) is permuted again until it lands inside
    outside = x >= np.uint64(n)
    while outside.any():
        x[outside] = _feistel(x[outside], keys, half)
        outside = x >= np.uint64(n)
    return x.astype(np.int64)
