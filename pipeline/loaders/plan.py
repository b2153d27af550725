"""Which samples each rank reads: pure functions of (seed, epoch, shard sizes, batch size, world
size, position), shared by both loaders and tested without DALI.

**The epoch's global order** does not depend on the number of ranks. Shuffled, it is the
split's shards in an order drawn for the epoch, each shard's samples in an order drawn for the
epoch and the shard (MosaicML Streaming calls this "py1s"); unshuffled, the split in tar order.
Grouping by shard lets DALI's reader follow the order with one index file per shard a rank
touches (``pipeline.loaders.dali_graph.write_indexes``); ``make_shards`` shuffles samples across
takes before it cuts shards, so a shard is a random subset of the split, as a batch should be.

**The position** is how many samples of that order are consumed; it is the loader's whole
resume state. From position ``p`` with ``world_size`` ranks of ``batch_size``, global batch
``s`` is ``order[p + s*W*B : p + (s+1)*W*B]`` and rank ``r`` takes its ``r``-th slice of
``batch_size``: every rank runs ``(n - p) // (W*B)`` steps, the position after step ``s`` is
``p + s*W*B`` whatever ``W`` is, and fewer than ``W*B`` samples at the end of the order are left
out for this epoch. So a run stopped at world size N resumes at any world size M with exactly
the samples not yet consumed (none twice), and a resumed reader starts at the first of them
instead of replaying the consumed ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed per (seed, epoch); DALI wants a non-negative int."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def epoch_order(seed: int, epoch: int, shard_sizes: Sequence[int], shuffle: bool) -> np.ndarray:
    """Every sample index of the split (shards in manifest order, samples in tar order), in the
    order the epoch consumes them."""
    sizes = [int(s) for s in shard_sizes]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if not shuffle:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    pieces = []
    for shard in rng.permutation(len(sizes)):
        pieces.append(starts[shard] + rng.permutation(sizes[shard]))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def check_args(position: int, world_size: int, batch_size: int, num_samples: int) -> None:
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    if not 0 <= position <= num_samples:
        raise ValueError(f"position {position} is outside an epoch of {num_samples} samples")


def steps_left(num_samples: int, position: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields from ``position`` to the end of the epoch."""
    check_args(position, world_size, batch_size, num_samples)
    return (num_samples - position) // (world_size * batch_size)


def rank_batches(
    order: np.ndarray, position: int, rank: int, world_size: int, batch_size: int
) -> np.ndarray:
    """Rank ``rank``'s batches from ``position`` on: ``[steps_left, batch_size]`` sample
    indices, in the order it yields them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    steps = steps_left(len(order), position, world_size, batch_size)
    rest = order[position : position + steps * world_size * batch_size]
    return rest.reshape(steps, world_size, batch_size)[:, rank, :]


def position_after(position: int, steps: int, world_size: int, batch_size: int) -> int:
    """The global position once every rank has yielded ``steps`` more batches."""
    return position + steps * world_size * batch_size


def epoch_batches(
    seed: int,
    epoch: int,
    shard_sizes: Sequence[int],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    position: int = 0,
    shuffle: bool = True,
) -> np.ndarray:
    """A rank's batches of an epoch from ``position`` on (``[steps, batch_size]`` indices)."""
    order = epoch_order(seed, epoch, shard_sizes, shuffle)
    return rank_batches(order, position, rank, world_size, batch_size)


def shard_of(shard_sizes: Sequence[int]) -> np.ndarray:
    """Each sample index's shard (shards in manifest order, samples in tar order)."""
    return np.repeat(np.arange(len(shard_sizes)), [int(s) for s in shard_sizes])


def batch_shards(batches: np.ndarray, shard_sizes: Sequence[int]) -> list[list[int]]:
    """The shards each batch reads from, in the order it first reads them."""
    owner = shard_of(shard_sizes)
    return [list(dict.fromkeys(owner[b].tolist())) for b in batches]


def shard_uses(batches: np.ndarray, shard_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """The shards ``batches`` read, in the order they are first needed, each with the last
    batch that reads it: ``[(shard, last batch)]``. The epoch's order is grouped by shard, so
    a rank reads each shard in one run of consecutive batches."""
    last: dict[int, int] = {}
    for k, shards in enumerate(batch_shards(batches, shard_sizes)):
        for s in shards:
            last[s] = k
    return list(last.items())


def pieces(
    per_batch: list[list[int]], shard_bytes: Sequence[int], budget: int
) -> list[tuple[int, int]]:
    """Batches (``per_batch``: each one's shards, ``batch_shards``) cut at batch boundaries
    into consecutive pieces ``(start, end)``: the first piece holds the first batch's shards
    only, and each next piece may hold twice the bytes of shards its predecessor could, up to
    ``budget`` (a batch whose own shards exceed that is a piece alone)."""
    sizes = [int(b) for b in shard_bytes]
    out: list[tuple[int, int]] = []
    start, held = 0, set()
    cap = sum(sizes[s] for s in per_batch[0]) if per_batch else 0
    for k, shards in enumerate(per_batch):
        grown = held | set(shards)
        if k > start and sum(sizes[s] for s in grown) > cap:
            out.append((start, k))
            start, grown, cap = k, set(shards), min(budget, 2 * cap)
        held = grown
    if len(per_batch) > start:
        out.append((start, len(per_batch)))
    return out
