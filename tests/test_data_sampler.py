"""The batch sampler: compute-equivalent replay, mixtures, canonical order, resume and rank sharding.

Sources are synthetic: corpus k holds the tokens k*10000 + 0, 1, 2, ..., so the first token of a
sequence tells which corpus and which window it came from.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cptlab.config import ReplayConfig
from cptlab.data import BatchSampler, DataError
from cptlab.data.sampler import permute

SEQ = 8


def source(k: int, n_tokens: int = 8001) -> np.ndarray:
    return (k * 10000 + np.arange(n_tokens)).astype(np.uint16)


SOURCES = {"old": source(0), "new": source(1), "web": source(2), "book": source(3, 4001)}
NAMES = ["old", "new", "web", "book"]


def origin(x: torch.Tensor) -> tuple[list[str], np.ndarray]:
    """The corpus and window index of every row of a batch."""
    first = x[:, 0].numpy()
    assert np.all(first % 10000 % SEQ == 0)  # rows start at window boundaries
    return [NAMES[v // 10000] for v in first], first % 10000 // SEQ


def run(sampler: BatchSampler, steps: int) -> list[torch.Tensor]:
    return [sampler.next_batch()[0] for _ in range(steps)]


def make(weights=None, replay=None, batch=16, steps=50, **kw) -> BatchSampler:
    weights = weights or {"new": 1.0}
    return BatchSampler(SOURCES, weights, replay, SEQ, batch, steps * batch * SEQ, seed=0, **kw)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05, 0.25, 0.5])
def test_replay_fraction_is_realised_within_one_sequence(fraction):
    steps, batch = 157, 16
    sampler = make(replay=ReplayConfig("old", fraction), batch=batch, steps=steps)
    assert sampler.num_steps == steps
    counts = {"old": 0, "new": 0}
    for _ in range(steps):
        for name in origin(sampler.next_batch()[0])[0]:
            counts[name] += 1
    total = steps * batch
    assert abs(counts["old"] - fraction * total) < 1
    assert abs(counts["new"] - (1 - fraction) * total) < 1
    assert sampler.sequences_by_source == counts
    assert sampler.tokens_by_source == {k: v * SEQ for k, v in counts.items()}


def test_small_fraction_is_carried_across_batches_not_rounded_per_batch():
    sampler = make(replay=ReplayConfig("old", 0.05), batch=16, steps=20)
    per_batch = [origin(x)[0].count("old") for x in run(sampler, 20)]
    assert set(per_batch) == {0, 1} and sum(per_batch) == 16  # 0.8 a batch: 16 over 320 sequences


def test_mixture_follows_weights_with_replay():
    steps, batch = 101, 12
    sampler = make({"new": 3, "web": 1.5, "book": 0.5}, ReplayConfig("old", 0.1), batch=batch, steps=steps)
    seen = {n: 0 for n in NAMES}
    for x in run(sampler, steps):
        for name in origin(x)[0]:
            seen[name] += 1
    total = steps * batch
    replayed = int(0.1 * total)
    assert seen["old"] == replayed
    for name, w in {"new": 0.6, "web": 0.3, "book": 0.1}.items():
        assert abs(seen[name] - w * (total - replayed)) < 1, (name, seen)


def test_inputs_and_targets_are_shifted_windows():
    x, y = make().next_batch()
    assert x.shape == y.shape == (16, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert len(set(origin(x)[1].tolist())) == 16  # distinct windows


def test_every_epoch_is_a_permutation_of_the_windows():
    small = {"tiny": (10000 + np.arange(10 * SEQ + 1)).astype(np.uint16)}  # exactly 10 windows
    sampler = BatchSampler(small, {"tiny": 1}, None, SEQ, 5, 6 * 5 * SEQ, seed=3)
    epochs = [np.concatenate([origin(x)[1] for x in run(sampler, 2)]) for _ in range(3)]
    for windows in epochs:
        assert sorted(windows.tolist()) == list(range(10))
    assert sampler.epochs == {"tiny": 3.0}
    assert not np.array_equal(np.sort(epochs[0][:5]), np.sort(epochs[1][:5]))  # a new order each epoch


def test_planned_epochs_say_where_each_order_ends():
    small = {"tiny": (10000 + np.arange(10 * SEQ + 1)).astype(np.uint16), "old": SOURCES["old"]}
    replay = ReplayConfig(source="old", fraction=0.2)
    sampler = BatchSampler(small, {"tiny": 1}, replay, SEQ, 5, 6 * 5 * SEQ, seed=3, start={"tiny": 5})
    planned = sampler.planned_epochs
    run(sampler, 6)
    assert planned == pytest.approx(sampler.epochs)
    assert planned["tiny"] == pytest.approx((5 + 24) / 10)  # 30 sequences, 6 of them replayed


def test_replay_in_original_order_repeats_pretraining_from_its_start():
    pretrain = BatchSampler(SOURCES, {"old": 1}, None, SEQ, 16, 10**6, seed=7)
    pre = [set(origin(x)[1].tolist()) for x in run(pretrain, 2)]
    original = BatchSampler(SOURCES, {"new": 1}, ReplayConfig("old", 0.5), SEQ, 16, 10**6, seed=7)
    replayed = [set(w for n, w in zip(*origin(x)) if n == "old") for x in run(original, 4)]
    assert replayed[0] | replayed[1] == pre[0] and replayed[2] | replayed[3] == pre[1]
    shuffled = BatchSampler(SOURCES, {"new": 1}, ReplayConfig("old", 0.5, "shuffled"), SEQ, 16, 10**6, seed=7)
    other = set().union(*(set(w for n, w in zip(*origin(x)) if n == "old") for x in run(shuffled, 2)))
    assert other != pre[0]


def test_start_begins_a_corpus_at_a_position_of_its_order():
    pretrain = BatchSampler(SOURCES, {"old": 1}, None, SEQ, 16, 10**6, seed=1)
    third = set(origin(run(pretrain, 3)[2])[1].tolist())
    later = BatchSampler(SOURCES, {"old": 1}, None, SEQ, 16, 10**6, seed=1, start={"old": 32})
    assert set(origin(later.next_batch()[0])[1].tolist()) == third
    assert later.epochs["old"] == pytest.approx(48 / 1000)


def test_seed_decides_the_order():
    a, b = make(), make()
    c = BatchSampler(SOURCES, {"new": 1.0}, None, SEQ, 16, 10**6, seed=1)
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_state_dict_round_trip_continues_identically():
    replay = ReplayConfig("old", 0.05)
    weights = {"new": 2, "web": 1}
    straight = make(weights, replay, batch=16, steps=30)
    expected = run(straight, 17)
    first = make(weights, replay, batch=16, steps=30)
    run(first, 7)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make(weights, replay, batch=16, steps=30)
    resumed.load_state_dict(state)
    assert resumed.tokens_by_source == first.tokens_by_source and resumed.step == 7
    for want, got in zip(expected[7:], run(resumed, 10)):
        assert torch.equal(want, got)
    assert resumed.tokens_by_source == straight.tokens_by_source
    with pytest.raises(DataError, match="sampler state does not match this sampler"):
        BatchSampler(SOURCES, weights, replay, 16, 16, 10**6, seed=0).load_state_dict(state)


def test_rank_shards_make_up_the_single_process_batch():
    replay = ReplayConfig("old", 0.25)
    single = make({"new": 1, "web": 1}, replay, batch=16)
    ranks = [make({"new": 1, "web": 1}, replay, batch=16, rank=r, world_size=4) for r in range(4)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert all(p[0].shape == (4, SEQ) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert ranks[3].tokens_by_source == single.tokens_by_source  # whole global batch, all ranks


def test_iteration_stops_at_the_stage_budget():
    sampler = BatchSampler(SOURCES, {"new": 1}, None, SEQ, 4, 4 * SEQ * 5 + 7, seed=0)
    assert len(sampler) == 5 and len(list(sampler)) == 5


def test_permutation_is_a_bijection():
    keys = np.arange(4, dtype=np.uint64)
    for n in (1, 2, 3, 7, 100, 4097):
        assert sorted(permute(np.arange(n), n, keys).tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, keys), np.arange(1000))


@pytest.mark.parametrize("kwargs, message", [
    (dict(replay=ReplayConfig("old", 1.0)), r"replay\.fraction: must be in \[0, 1\), got 1\.0"),
    (dict(replay=ReplayConfig("old", -0.1)), r"replay\.fraction: must be in \[0, 1\), got -0\.1"),
    (dict(weights={"new": 0}), r"data\.new: weight must be > 0, got 0"),
    (dict(weights={"new": 1, "web": -2}), r"data\.web: weight must be > 0, got -2"),
    (dict(weights={"old": 1}, replay=ReplayConfig("old", 0.1)),
     r"replay\.source: 'old' is also the only new corpus; replay must come from another corpus"),
    (dict(replay=ReplayConfig("old", 0.1, "random")), r"replay\.order: 'random' not allowed"),
    (dict(weights={"nope": 1}), r"unknown corpus 'nope'; known corpora: old, new, web, book"),
    (dict(replay=ReplayConfig("gone", 0.1)), r"unknown corpus 'gone'; known corpora: old, new"),
    (dict(world_size=3), r"batch_size \(16\) must be divisible by world_size \(3\)"),
    (dict(world_size=4, rank=4), r"rank must be in \[0, 4\), got 4"),
    (dict(total_tokens=100), r"tokens: 100 is smaller than one batch \(batch_size x seq_len = 128\)"),
    (dict(seq_len=8001, total_tokens=10**6),
     r"corpus 'new' has 8001 tokens, too few for one sequence of seq_len=8001 \(which needs 8002\)"),
])
def test_bad_input_is_refused_with_a_clear_message(kwargs, message):
    args = dict(sources=SOURCES, weights={"new": 1.0}, replay=None, seq_len=SEQ, batch_size=16,
                total_tokens=10**5, seed=0)
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        BatchSampler(**args)
