"""One loader interface, two backends (``dali`` and ``torch``), chosen by name.

Iterating yields ``{"wav": float32 [B, clip_samples], "arkit": float32 [B, frames, 52]}`` on
the loader's device; with ``features="mel"``, ``"mel": float32 [B, n_mels, clip_samples // hop
+ 1]`` (``model.features``: the log-mel of the same audio, after crops and augmentation)
instead of ``"wav"``. ``len()`` is batches per epoch; iterating again starts the next epoch
(after an iteration stopped early it continues that epoch, unless ``set_epoch`` says otherwise);
``state_dict()`` / ``load_state_dict()`` resume mid-epoch with the same next batches, also at
another world size: the state is the epoch and the global position in its order. Which samples
a rank reads comes from ``pipeline.loaders.plan`` so both backends obey the same rules; a resumed
backend starts reading at the first unconsumed sample (nothing is replayed).

What a loader is made from is one ``LoaderSpec`` (``pipeline.loaders.spec``);
``pipeline.loaders.backends.build_loader`` makes the loader of a spec, or of keywords.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError, DatasetError, ResumeError
from pipeline.loaders.plan import (
    batch_shards,
    epoch_order,
    epoch_seed,
    position_after,
    rank_batches,
    shard_uses,
    steps_left,
)
from pipeline.loaders.spec import LoaderSpec
from pipeline.shards import storage
from pipeline.shards.cache import Kept, ShardCache, folder_for
from pipeline.shards.index import changed_shards, shard_stamps
from pipeline.shards.manifest import Manifest, Shard, load_manifest, verify_hint
from pipeline.shards.verify import Depth, check_shard

# the options are the config's data.* keys (train.config builds on them)
__all__ = ["EpochLoader", "Leg", "LoaderSpec"]


@dataclass(frozen=True)
class Leg:
    """What one rank reads from a position to the end of an epoch."""

    epoch: int
    batches: np.ndarray  # [steps, batch_size] sample indices of the split, in order
    # seeds each sample's crop and augmentation (pipeline.loaders.augment.sample_rng)
    epoch_seed: int

    @property
    def steps(self) -> int:
        return len(self.batches)


class EpochLoader:
    """Epoch and resume bookkeeping shared by the backends; they implement ``_batches``."""

    name = "base"
    cache_holds = 1  # batches' worth of shards the backend holds in the cache at once, at most

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.manifest: Manifest = load_manifest(spec.data_dir)
        self.manifest.check(**(spec.expect or {}))
        self.split = split = spec.split
        self.num_samples = self.manifest.num_samples(split)
        if self.num_samples == 0:
            raise DatasetError(f"{spec.data_dir} has no {split!r} samples")
        self.batch_size, self.device = spec.batch_size, spec.device
        self.shuffle, self.seed = spec.shuffle, spec.seed
        self.rank, self.world_size = spec.rank, spec.world_size
        self.augment, self.with_params = spec.augment, spec.with_params
        self.features, self.mel, self.options = spec.features, spec.mel, spec.options
        if self.features == "mel" and self.mel.sample_rate != self.manifest.sample_rate:
            raise ConfigError(
                f"log-mel settings are for {self.mel.sample_rate} Hz; {spec.data_dir} is at "
                f"{self.manifest.sample_rate} Hz"
            )
        self.crops = spec.crops(self.manifest)
        if self.crops:
            self.augment.check_fits(self.manifest.segment_frames, self.manifest.frames)
        if len(self) == 0:
            raise DatasetError(
                f"{spec.data_dir}: {self.num_samples} {split} samples over {self.world_size} "
                f"rank(s) make no whole batch of {self.batch_size}; use a smaller batch or more "
                "data"
            )
        self.shard_sizes = [s.samples for s in self.manifest.split_shards(split)]
        self._epoch = 0  # position: epoch in progress (or next) ...
        self._pos = 0  # ... and samples of its global order already consumed (all ranks)
        # what the shards looked like when the run started: checked again at every epoch
        self._stamps = shard_stamps(self.manifest, split)
        self.last_cache: ShardCache | None = None  # the latest leg's (its figures: peak, ...)
        self._kept = Kept()  # where the split fits in the cache: its copies, for the next leg
        weakref.finalize(self, self._kept.drop)
        if self.cached:  # a limit too small fails at once, not at a batch
            self.check_cache_limit(self.leg(0))

    def leg(self, epoch: int, position: int = 0) -> Leg:
        """This rank's batches of ``epoch`` from the global ``position`` on."""
        order = epoch_order(self.seed, epoch, self.shard_sizes, self.shuffle)
        batches = rank_batches(order, position, self.rank, self.world_size, self.batch_size)
        return Leg(epoch, batches, epoch_seed(self.seed, epoch))

    @property
    def cached(self) -> bool:
        """Whether the shards are streamed into a local cache: an s3:// dataset, a limit."""
        return storage.is_s3(self.manifest.root) and self.spec.cache_limit > 0

    @property
    def startup_depth(self) -> Depth:
        """How far the start-up check reads: through the cache, each shard's member headers
        are read from its verified local copy once downloaded (``check_copy``), not by two
        ranged GETs per sample when the loader is made."""
        return Depth.INDEX if self.cached else Depth.STARTUP

    def check_copy(self, shard: Shard, local: Path) -> str | None:
        """The start-up check of ``shard``'s members, on its verified local copy: the first
        problem with the way to check the dataset, or None."""
        problem = next(check_shard(self.manifest, shard, Depth.STARTUP, local), None)
        return None if problem is None else f"{problem}; {verify_hint(self.manifest.root)}"

    def check_cache_limit(self, leg: Leg) -> None:
        """ConfigError if the cache cannot hold what ``leg`` needs at once: the shards of its
        largest batch, ``cache_holds`` times over."""
        if not self.cached or leg.steps == 0:
            return
        shards, holds = self.manifest.split_shards(self.split), self.cache_holds
        per_batch = batch_shards(leg.batches, self.shard_sizes)
        need, k = max((sum(shards[s].bytes for s in b), k) for k, b in enumerate(per_batch))
        limit = self.spec.cache_limit
        if need * holds > limit:
            names = ", ".join(shards[s].name for s in per_batch[k])
            raise ConfigError(
                f"data.cache_limit={limit} bytes is too small for {self.manifest.root}: batch "
                f"{k} of epoch {leg.epoch} reads the shards {names} ({need} bytes)"
                + (f", and the {self.name} loader holds {holds} such sets" if holds > 1 else "")
                + f": raise it to at least {need * holds} (or 0 to read S3 directly)"
            )

    def open_cache(self, leg: Leg) -> tuple[ShardCache, list[tuple[str, int]]]:
        """The cache that fetches ``leg``'s shards, and each shard's name with the last batch
        that reads it, in the order they are needed."""
        self.check_cache_limit(leg)
        shards, limit = self.manifest.split_shards(self.split), self.spec.cache_limit
        uses = shard_uses(leg.batches, self.shard_sizes)
        root = self.manifest.root
        folder = folder_for(self.spec.cache_dir, root, self.manifest.identity)
        # a split that fits is kept whole between legs: downloaded once, not every epoch
        keep = sum(s.bytes for s in shards) <= limit
        kept = self._kept.take(folder)
        if not keep:
            self._kept.hold(kept)
            self._kept.drop()
            kept = {}
        needed = [shards[s] for s, _ in uses]
        cache = ShardCache(
            root, needed, folder, limit, self.spec.cache_prefetch, keep, kept, self.check_copy
        )
        self.last_cache = cache
        return cache, [(shards[s].name, last) for s, last in uses]

    def drop_kept(self) -> None:
        """Delete the shards' copies kept for the next leg (the next leg downloads them)."""
        self._kept.drop()

    def close_cache(self, cache: ShardCache) -> None:
        """The leg is over: stop its downloads; what the cache keeps waits for the next leg."""
        self._kept.hold(cache.close())

    def _steps_left(self, position: int) -> int:
        return steps_left(self.num_samples, position, self.world_size, self.batch_size)

    def __len__(self) -> int:
        return self._steps_left(0)

    def _position(self) -> tuple[int, int]:
        """(epoch, global position) of the next batch; an epoch with no whole global batch
        left is over."""
        if self._steps_left(min(self._pos, self.num_samples)) == 0:
            return self._epoch + 1, 0
        return self._epoch, self._pos

    @property
    def epoch(self) -> int:
        return self._position()[0]

    @property
    def position(self) -> int:
        """Samples of the current epoch's global order already consumed, over all ranks."""
        return self._position()[1]

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch this rank would have yielded by now at this world size
        (after a resume at another world size: the batches not left to yield)."""
        return len(self) - self._steps_left(self.position)

    def set_epoch(self, epoch: int, restart: bool = False) -> None:
        """Start ``epoch`` from its first batch, unless the position is already inside it
        (a resumed run) and ``restart`` is false. Like DistributedSampler.set_epoch, for loops
        that stop an epoch early.
        """
        if restart or self._position()[0] != epoch:
            self._epoch, self._pos = epoch, 0

    def check_unchanged(self) -> None:
        """DatasetError if a shard was rewritten or truncated since the loader was made."""
        problem = changed_shards(self._stamps)
        if problem is not None:
            raise DatasetError(str(problem))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Continue from the position: the rest of an epoch, or the next whole epoch."""
        self.check_unchanged()
        epoch, start = self._position()
        leg = self.leg(epoch, start)
        for i, batch in enumerate(self._batches(leg)):
            self._epoch = epoch
            self._pos = position_after(start, i + 1, self.world_size, self.batch_size)
            yield batch

    def _batches(self, leg: Leg) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``leg``, in order, starting with its first (no replay)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Where the next batch comes from: the epoch and the global position in its order
        (``batch``, this rank's batches done, is for people). Plain ints, safe for
        ``weights_only`` loading; ``world_size`` is recorded, not required on resume."""
        epoch, position = self._position()
        return {
            "backend": self.name,
            "epoch": epoch,
            "position": position,
            "batch": self.batches_done,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped, at this loader's world size (any)."""
        mine = self.state_dict()
        for key in ("backend", "seed", "batch_size", "num_samples", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ResumeError(
                    f"cannot resume: the checkpoint's loader had {key}={state[key]}, this one "
                    f"has {key}={mine[key]}; resume with the same loader, data and settings"
                )
        if "position" not in state:
            raise ResumeError(
                "cannot resume: the checkpoint's loader state has no position (samples of the "
                "epoch's global order consumed), only per-rank batches done; a loader resumes "
                "from a position only: start the run afresh"
            )
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ResumeError(
                f"cannot resume: the checkpoint's loader position {position} is outside an "
                f"epoch of {self.num_samples} samples"
            )
        self._epoch, self._pos = int(state["epoch"]), position
