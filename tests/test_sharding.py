"""The rank plan (pipeline.sharding): pure arithmetic, no DALI, no data.

Per epoch a rank consumes ``epoch_order(plan, shuffle)[: plan.steps * batch]``; these tests hold
that to the promises in the module docstring and docs/loaders.md: equal steps on every rank,
disjoint parts that cover all but fewer than ``world_size * batch`` samples, parts cut exactly
as DALI cuts ``shard_id`` / ``num_shards``, rotation over epochs, and seeded, repeatable
shuffles.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.sharding import RankPlan, epoch_order, epoch_seed, part_bounds, rank_plan

WORLD_SIZES = (1, 2, 3, 4, 8)
NUM_SAMPLES = (7, 36, 100, 257, 1000)
BATCH_SIZES = (1, 4, 16)
CASES = list(itertools.product(WORLD_SIZES, NUM_SAMPLES, BATCH_SIZES))


def consumed(
    seed: int, epoch: int, rank: int, world: int, n: int, batch: int, shuffle: bool = True
) -> np.ndarray:
    plan = rank_plan(seed, epoch, rank, world, n, batch)
    return epoch_order(plan, shuffle)[: plan.steps * batch]


def left_out(seed: int, epoch: int, world: int, n: int, batch: int, shuffle: bool = True) -> set:
    used = set()
    for r in range(world):
        used.update(consumed(seed, epoch, r, world, n, batch, shuffle).tolist())
    return set(range(n)) - used


@pytest.mark.parametrize("world,n,batch", CASES)
def test_every_rank_runs_the_same_whole_batches(world, n, batch):
    for epoch in range(3):
        plans = [rank_plan(0, epoch, r, world, n, batch) for r in range(world)]
        assert {p.steps for p in plans} == {(n // world) // batch}
        for r, p in enumerate(plans):
            # the part always has enough samples for every step: no rank runs short
            assert len(epoch_order(p, shuffle=True)) >= p.steps * batch
            assert len(consumed(0, epoch, r, world, n, batch)) == p.steps * batch


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world,n,batch", CASES)
def test_ranks_are_disjoint_and_cover_all_but_a_tail(world, n, batch, shuffle):
    for epoch in range(3):
        parts = [consumed(5, epoch, r, world, n, batch, shuffle) for r in range(world)]
        everything = np.concatenate(parts)
        # no sample twice in an epoch, on one rank or across ranks; all are real indices
        assert len(np.unique(everything)) == len(everything)
        assert everything.min(initial=0) >= 0 and everything.max(initial=0) < n
        missed = n - len(everything)
        assert 0 <= missed <= world * batch - 1
        assert left_out(5, epoch, world, n, batch, shuffle) == set(range(n)) - set(
            everything.tolist()
        )


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("n", NUM_SAMPLES)
def test_parts_are_dalis_contiguous_cut(world, n):
    """Part i = [i*n // k, (i+1)*n // k): what DALI's reader gives shard_id=i of num_shards=k."""
    bounds = [part_bounds(n, world, i) for i in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, a1), (b0, _) in itertools.pairwise(bounds):
        assert a1 == b0  # contiguous, no gap, no overlap
    assert bounds == [(i * n // world, (i + 1) * n // world) for i in range(world)]
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    for epoch in range(2):
        for r in range(world):
            plan = rank_plan(3, epoch, r, world, n, 4)
            assert (plan.start, plan.stop) == bounds[plan.part]
            # unshuffled, a rank walks its part in file order
            assert epoch_order(plan, shuffle=False).tolist() == list(range(plan.start, plan.stop))
            assert sorted(epoch_order(plan, shuffle=True).tolist()) == list(
                range(plan.start, plan.stop)
            )


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_parts_rotate_over_ranks_across_epochs(world):
    n, batch = 100, 4
    for epoch in range(2 * world + 1):
        parts = [rank_plan(0, epoch, r, world, n, batch).part for r in range(world)]
        assert parts == [(r + epoch) % world for r in range(world)]
        assert sorted(parts) == list(range(world))  # a permutation: each part read once per epoch
    for r in range(world):
        # over `world` consecutive epochs a rank reads every part exactly once
        seen = [rank_plan(0, e, r, world, n, batch).part for e in range(world)]
        assert sorted(seen) == list(range(world))
        if world > 1:
            assert (
                rank_plan(0, 0, r, world, n, batch).part != rank_plan(0, 1, r, world, n, batch).part
            )


@pytest.mark.parametrize(
    "world,n,batch", [(1, 36, 8), (2, 36, 8), (3, 100, 16), (4, 257, 16), (8, 1000, 16), (1, 7, 4)]
)
def test_left_out_samples_change_between_epochs_when_shuffling(world, n, batch):
    epochs = 12
    gone = [left_out(11, e, world, n, batch) for e in range(epochs)]
    assert all(len(g) == len(gone[0]) for g in gone)  # the same count every epoch ...
    assert len(gone[0]) > 0
    assert len({frozenset(g) for g in gone}) > epochs // 2  # ... but mostly different samples
    assert gone[0] != gone[1]
    # over a run, no sample is starved: everything is consumed in some epoch
    used = set(range(n)) - set.intersection(*gone)
    assert used == set(range(n))
    # seeded and repeatable
    assert gone == [left_out(11, e, world, n, batch) for e in range(epochs)]
    assert gone != [left_out(12, e, world, n, batch) for e in range(epochs)]


def test_unshuffled_left_out_is_each_parts_tail():
    world, n, batch = 2, 36, 8  # parts of 18 and 2 steps of 8: each part's last 2 stay unread
    for epoch in range(4):
        assert left_out(0, epoch, world, n, batch, shuffle=False) == {16, 17, 34, 35}


def test_shuffles_are_seeded_repeatable_and_differ_by_seed_and_epoch():
    n, world, batch = 1000, 4, 16
    for r in range(world):
        a = consumed(7, 0, r, world, n, batch)
        assert np.array_equal(a, consumed(7, 0, r, world, n, batch))
        assert not np.array_equal(a, consumed(8, 0, r, world, n, batch))
        assert not np.array_equal(a, consumed(7, 0, r, world, n, batch, shuffle=False))
    # a rank that returns to the same part a `world` epochs later gets a new order
    a, b = consumed(7, 0, 0, world, n, batch), consumed(7, world, 0, world, n, batch)
    assert rank_plan(7, 0, 0, world, n, batch).part == rank_plan(7, world, 0, world, n, batch).part
    assert sorted(epoch_order(rank_plan(7, 0, 0, world, n, batch), True)) == sorted(
        epoch_order(rank_plan(7, world, 0, world, n, batch), True)
    )
    assert not np.array_equal(a, b)


def test_epoch_seed_is_a_fixed_31_bit_value_per_seed_and_epoch():
    seeds = {(s, e): epoch_seed(s, e) for s in range(5) for e in range(50)}
    assert all(isinstance(v, int) and 0 <= v < 2**31 for v in seeds.values())  # DALI's range
    assert len(set(seeds.values())) == len(seeds)
    # pinned: a changed derivation would silently change every shuffled run, and a checkpoint
    # written before the change would resume into a different order
    assert [epoch_seed(0, e) for e in range(3)] == [1484405855, 1982462498, 1570558271]
    assert epoch_seed(7, 2) == 504589498
    assert epoch_order(rank_plan(0, 0, 0, 1, 10, 4), True).tolist() == [
        5,
        0,
        8,
        4,
        3,
        2,
        1,
        9,
        6,
        7,
    ]


def test_plan_is_a_pure_function():
    args = [
        (s, e, r, k, n, b)
        for s in (0, 1)
        for e in (0, 1, 5)
        for k in (1, 3, 8)
        for r in range(k)
        for n in (36, 257)
        for b in (1, 16)
    ]
    state = np.random.get_state()
    first = [(rank_plan(*a), epoch_order(rank_plan(*a), True).tolist()) for a in args]
    # a different call order, interleaved with other plans, gives the same answers
    np.random.seed(1234)
    again = [(rank_plan(*a), epoch_order(rank_plan(*a), True).tolist()) for a in reversed(args)]
    assert first == list(reversed(again))
    assert all(isinstance(p, RankPlan) for p, _ in first)
    # and it leaves the global RNG alone
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    rank_plan(0, 0, 0, 1, 36, 4), epoch_order(rank_plan(0, 0, 0, 1, 36, 4), True)
    assert np.array_equal(np.random.get_state()[1], before)
    with pytest.raises(AttributeError):
        first[0][0].part = 99  # frozen


def test_concrete_plan_for_the_tiny_dataset():
    """36 samples, 2 ranks, batch 8: parts [0, 18) and [18, 36), 2 steps each, swap in epoch 1."""
    p = rank_plan(0, 0, 0, 2, 36, 8)
    assert (p.part, p.start, p.stop, p.steps) == (0, 0, 18, 2)
    p = rank_plan(0, 0, 1, 2, 36, 8)
    assert (p.part, p.start, p.stop, p.steps) == (1, 18, 36, 2)
    p = rank_plan(0, 1, 0, 2, 36, 8)
    assert (p.part, p.start, p.stop, p.steps) == (1, 18, 36, 2)
    p = rank_plan(0, 0, 2, 3, 37, 4)
    assert (p.part, p.start, p.stop, p.steps) == (2, 24, 37, 3)  # part sizes 12, 12, 13


def test_too_few_samples_make_zero_steps():
    p = rank_plan(0, 0, 0, 4, 20, 8)  # 5 samples per rank < one batch of 8
    assert p.steps == 0
    assert left_out(0, 0, 4, 20, 8) == set(range(20))


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (0, 0)])
def test_rank_outside_world_is_refused(rank, world):
    with pytest.raises(ValueError, match="outside world size"):
        rank_plan(0, 0, rank, world, 36, 4)


def test_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        rank_plan(0, 0, 0, 1, 36, 0)
