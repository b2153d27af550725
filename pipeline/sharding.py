"""Which samples each rank reads in an epoch: a pure function of (seed, epoch, rank, world size,
dataset size, batch size), shared by both loaders and tested without DALI.

The split's samples (shards in manifest order, samples in tar order) are cut into
``world_size`` contiguous parts exactly as DALI's reader cuts them for ``shard_id`` /
``num_shards`` (part i = ``[i*n // k, (i+1)*n // k)``). In epoch e, rank r reads part
``(r + e) % k``, so the parts rotate over ranks. Every rank runs the same number of steps,
``(n // k) // batch_size`` (the smallest part's whole batches), so no rank waits for another
at the end of an epoch; the samples a rank does not reach are left out for this epoch only.
At most ``k * batch_size - 1`` samples are left out per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankPlan:
    part: int  # DALI shard_id this rank reads this epoch
    start: int  # first sample index of the part
    stop: int  # one past its last
    steps: int  # batches every rank yields this epoch
    epoch_seed: int  # seed of this epoch's shuffle


def part_bounds(num_samples: int, parts: int, part: int) -> tuple[int, int]:
    return part * num_samples // parts, (part + 1) * num_samples // parts


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed per (seed, epoch); DALI wants a non-negative int."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def rank_plan(
    seed: int, epoch: int, rank: int, world_size: int, num_samples: int, batch_size: int
) -> RankPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    part = (rank + epoch) % world_size
    start, stop = part_bounds(num_samples, world_size, part)
    steps = (num_samples // world_size) // batch_size
    return RankPlan(part, start, stop, steps, epoch_seed(seed, epoch))


def epoch_order(plan: RankPlan, shuffle: bool) -> np.ndarray:
    """Sample indices a rank visits this epoch, in order (``steps * batch`` are used)."""
    idx = np.arange(plan.start, plan.stop)
    if shuffle:
        idx = np.random.default_rng(plan.epoch_seed).permutation(idx)
    return idx


def epoch_batches(plan: RankPlan, shuffle: bool, batch_size: int) -> np.ndarray:
    """The rank's whole batches this epoch, ``[steps, batch_size]`` sample indices in order
    (the rest of ``epoch_order`` is left out)."""
    order = epoch_order(plan, shuffle)[: plan.steps * batch_size]
    return order.reshape(plan.steps, batch_size)
