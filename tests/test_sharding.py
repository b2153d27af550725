"""The epoch order and the rank plan (pipeline.loaders.plan): pure arithmetic, no DALI, no data.

The promises of the module docstring and docs/loaders.md: one global order per epoch whatever
the world size, grouped by shard; equal steps on every rank; ranks disjoint; fewer than
``world_size * batch`` samples left out; a run stopped at world size N and resumed at M from its
global position consumes exactly the samples not yet consumed; seeded, repeatable shuffles.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.loaders.plan import (
    batch_shards,
    epoch_batches,
    epoch_order,
    epoch_seed,
    pieces,
    position_after,
    rank_batches,
    shard_uses,
    steps_left,
)

WORLD_SIZES = (1, 2, 3, 4, 8)
SHARDINGS = ([7], [16, 16, 4], [100], [64] * 4 + [1], [256] * 3 + [232], [3, 5, 2, 9, 1, 13])
BATCH_SIZES = (1, 4, 16)


def run(order: np.ndarray, position: int, world: int, batch: int) -> tuple[list, int]:
    """Every rank's batches from ``position`` to the epoch's end, and the position after."""
    per_rank = [rank_batches(order, position, r, world, batch) for r in range(world)]
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, "ranks run different numbers of steps"
    return per_rank, position_after(position, steps.pop(), world, batch)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(
    "world,sizes,batch", list(itertools.product(WORLD_SIZES, SHARDINGS, BATCH_SIZES))
)
def test_ranks_run_equal_steps_disjoint_and_leave_out_less_than_a_global_batch(
    world, sizes, batch, shuffle
):
    n = sum(sizes)
    for epoch in range(3):
        order = epoch_order(5, epoch, sizes, shuffle)
        assert sorted(order.tolist()) == list(range(n))  # a permutation of the split
        per_rank, end = run(order, 0, world, batch)
        assert len(per_rank[0]) == n // (world * batch) == steps_left(n, 0, world, batch)
        everything = np.concatenate([b.ravel() for b in per_rank])
        assert len(np.unique(everything)) == len(everything)  # no sample twice
        assert 0 <= n - len(everything) <= world * batch - 1
        # the consumed samples are exactly a prefix of the order: the position says which
        assert set(everything.tolist()) == set(order[:end].tolist())
        # global batch s is order[s*W*B : (s+1)*W*B], rank r its r-th slice
        for s in range(len(per_rank[0])):
            glob = np.concatenate([per_rank[r][s] for r in range(world)])
            assert np.array_equal(glob, order[s * world * batch : (s + 1) * world * batch])


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    n_world=st.integers(1, 8),
    m_world=st.integers(1, 8),
    batch=st.integers(1, 8),
    steps_done=st.integers(0, 60),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 50),
    shuffle=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_resume_at_any_world_size_consumes_exactly_what_is_left(
    sizes, n_world, m_world, batch, steps_done, seed, epoch, shuffle
):
    """A run at N ranks stops after some steps; the rest of the epoch at M ranks reads exactly
    the samples not yet consumed, none twice, fewer than M*B left out, with equal steps."""
    n = sum(sizes)
    order = epoch_order(seed, epoch, sizes, shuffle)
    steps_done = min(steps_done, steps_left(n, 0, n_world, batch))
    first = [rank_batches(order, 0, r, n_world, batch)[:steps_done] for r in range(n_world)]
    position = position_after(0, steps_done, n_world, batch)
    before = np.concatenate([b.ravel() for b in first])
    assert len(before) == position
    rest, end = run(order, position, m_world, batch)
    after = np.concatenate([b.ravel() for b in rest])
    assert len(rest[0]) == (n - position) // (m_world * batch)
    seen = np.concatenate([before, after])
    assert len(np.unique(seen)) == len(seen)  # none twice across the two runs
    assert set(seen.tolist()) == set(order[:end].tolist())
    assert 0 <= n - len(seen) <= m_world * batch - 1  # the documented tail, at the new size
    # the same order whoever reads it: resuming is a pure function of the position
    again = epoch_order(seed, epoch, sizes, shuffle)
    assert np.array_equal(order, again)


@pytest.mark.parametrize("sizes", SHARDINGS)
def test_shuffled_order_takes_shards_whole_in_a_drawn_order(sizes):
    """Grouped by shard: each shard's samples are one contiguous run of the order (so DALI's
    reader follows it with one index per shard), shards and samples both shuffled."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard_of = np.searchsorted(starts, np.arange(sum(sizes)), side="right") - 1
    orders = [epoch_order(3, e, sizes, True) for e in range(6)]
    for order in orders:
        runs = [k for k, _ in itertools.groupby(shard_of[order])]
        assert sorted(runs) == list(range(len(sizes)))  # each shard exactly one run
    if len(sizes) > 2:
        assert len({tuple(shard_of[o][np.r_[0, np.cumsum(sizes)[:-1]]]) for o in orders}) > 1
    if max(sizes) > 3:
        assert len({tuple(o) for o in orders}) == len(orders)  # every epoch its own order
    assert epoch_order(3, 0, sizes, False).tolist() == list(range(sum(sizes)))


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 8), (3, 16), (4, 16), (8, 16), (1, 4)])
def test_left_out_samples_change_between_epochs_when_shuffling(world, batch):
    sizes = [64, 64, 64, 65]
    n = sum(sizes)

    def left_out(seed, e):
        per_rank, _ = run(epoch_order(seed, e, sizes, True), 0, world, batch)
        return set(range(n)) - set(np.concatenate([b.ravel() for b in per_rank]).tolist())

    epochs = 12
    gone = [left_out(11, e) for e in range(epochs)]
    assert all(len(g) == len(gone[0]) > 0 for g in gone)  # the same count every epoch ...
    assert len({frozenset(g) for g in gone}) > epochs // 2  # ... but mostly different samples
    assert set(range(n)) - set.intersection(*gone) == set(range(n))  # nothing starves
    assert gone == [left_out(11, e) for e in range(epochs)]  # seeded and repeatable
    assert gone != [left_out(12, e) for e in range(epochs)]


def test_unshuffled_left_out_is_the_splits_tail():
    assert epoch_batches(0, 0, [16, 16, 4], 8, 0, 2, shuffle=False).tolist() == [
        list(range(0, 8)),
        list(range(16, 24)),
    ]
    assert epoch_batches(0, 0, [16, 16, 4], 8, 1, 2, shuffle=False).tolist() == [
        list(range(8, 16)),
        list(range(24, 32)),
    ]


def test_epoch_seed_is_a_fixed_31_bit_value_per_seed_and_epoch():
    seeds = {(s, e): epoch_seed(s, e) for s in range(5) for e in range(50)}
    assert all(isinstance(v, int) and 0 <= v < 2**31 for v in seeds.values())  # DALI's range
    assert len(set(seeds.values())) == len(seeds)
    # pinned: a changed derivation would silently change every shuffled run, and a checkpoint
    # written before the change would resume into a different order
    assert [epoch_seed(0, e) for e in range(3)] == [1484405855, 1982462498, 1570558271]
    assert epoch_seed(7, 2) == 504589498
    assert epoch_order(0, 0, [4, 6], True).tolist() == [0, 3, 2, 1, 8, 4, 9, 7, 6, 5]


def test_the_order_is_a_pure_function_and_leaves_the_global_rng_alone():
    args = [(s, e, sz) for s in (0, 1) for e in (0, 1, 5) for sz in SHARDINGS]
    first = [epoch_order(s, e, sz, True).tolist() for s, e, sz in args]
    np.random.seed(1234)
    again = [epoch_order(s, e, sz, True).tolist() for s, e, sz in reversed(args)]
    assert first == list(reversed(again))
    before = np.random.get_state()[1].copy()
    epoch_batches(0, 0, [36], 4)
    assert np.array_equal(np.random.get_state()[1], before)


def test_bad_arguments_are_refused():
    order = epoch_order(0, 0, [10], True)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        rank_batches(order, 0, 2, 2, 4)
    with pytest.raises(ValueError, match="position 11 is outside"):
        rank_batches(order, 11, 0, 1, 4)
    with pytest.raises(ValueError, match=">= 1"):
        steps_left(10, 0, 1, 0)


@pytest.mark.parametrize("sizes", SHARDINGS)
@pytest.mark.parametrize("world,batch", [(1, 4), (3, 4), (2, 16)])
def test_a_rank_reads_each_shard_in_one_run_and_pieces_cover_its_batches(sizes, world, batch):
    """What the shard cache relies on: a rank's batches read each shard in one run of
    consecutive batches (so a shard is deleted after its last one); DALI's pieces are
    consecutive, cover every batch once, start with the first batch's shards and hold at most
    the budget (unless one batch alone needs more)."""
    for rank in range(world):
        at = min(batch * world, sum(sizes))  # resumed after a global batch
        b = epoch_batches(5, 1, sizes, batch, rank, world, position=at)
        per_batch = batch_shards(b, sizes)
        uses = shard_uses(b, sizes)
        assert len({s for s, _ in uses}) == len(uses)
        for shard, last in uses:
            reads = [k for k, shards in enumerate(per_batch) if shard in shards]
            assert reads == list(range(reads[0], last + 1))
        owner = np.repeat(np.arange(len(sizes)), sizes)
        assert [s for s, _ in uses] == list(dict.fromkeys(owner[b.ravel()].tolist()))
        sizes_b = [1000 + 10 * s for s in sizes]
        budget = 3 * max(sizes_b)
        cut = pieces(per_batch, sizes_b, budget)
        if not len(b):
            assert cut == []
            continue
        assert cut[0][0] == 0 and cut[-1][1] == len(b)
        assert all(a[1] == c[0] and a[0] < a[1] for a, c in zip(cut, cut[1:], strict=False))
        first = sum(sizes_b[s] for s in per_batch[0])
        for k, (lo, hi) in enumerate(cut):
            held = {s for shards in per_batch[lo:hi] for s in shards}
            cap = first if k == 0 else budget
            assert hi - lo == 1 or sum(sizes_b[s] for s in held) <= cap


def test_pieces_grow_from_the_first_batchs_shards_by_doubling():
    per_batch = [[0], [0], [1], [2], [3], [4], [5], [6], [7], [8]]
    assert pieces(per_batch, [10] * 9, budget=40) == [(0, 2), (2, 4), (4, 8), (8, 10)]
    assert pieces(per_batch, [10] * 9, budget=15) == [
        (0, 2),
        (2, 3),
        (3, 4),
        (4, 5),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
        (9, 10),
    ]
