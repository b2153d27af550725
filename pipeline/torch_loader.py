"""The baseline: the seed's ``torch.utils.data.DataLoader`` over the same shards.

``DataLoader(batch_size=16, num_workers=4, pin_memory=True, drop_last=True)``, tensors moved
with ``.to(device, non_blocking=True)``. Samples are read straight from the tars at the offsets
in their DALI index (no pickle, no tar scanning), so a sampler can give this loader exactly
the order ``pipeline.sharding`` plans, which keeps ranks disjoint and resume exact. Every rank
runs the same number of whole batches, so the last partial batch is always dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import DatasetError, MemberError
from pipeline.loading import EpochLoader, TorchOptions
from pipeline.manifest import Manifest, verify_hint
from pipeline.members import decode_sample
from pipeline.sharding import RankPlan, epoch_order
from pipeline.verify import SampleRef, changed_shards, sample_refs, shard_stamps


class ShardSamples(Dataset):
    """Random access to a split's samples through the DALI indexes."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        self.manifest = manifest
        self.items: list[SampleRef] = sample_refs(manifest, split)
        self.stamps = shard_stamps(manifest, split)
        self._fds: dict[str, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.items)

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker must not share the parent's descriptors
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, i: int) -> tuple[bytes, bytes]:
        """The raw wav and npy member bytes of sample ``i``."""
        ref = self.items[i]
        fd = self._fd(ref.tar)
        return os.pread(fd, ref.wav[1], ref.wav[0]), os.pread(fd, ref.npy[1], ref.npy[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        wav, npy = self.read(i)
        try:
            audio, arkit = decode_sample(wav, npy, self.manifest)
        except MemberError as exc:
            ref = self.items[i]
            changed = changed_shards({ref.tar: self.stamps[ref.tar]})
            reason = changed.reason if changed else exc
            raise DatasetError(
                f"{ref.tar}: sample {ref.key}: {reason}; run `{verify_hint(self.manifest.root)}`"
            ) from None
        return {"wav": torch.from_numpy(audio), "arkit": torch.from_numpy(arkit)}


class _EpochSampler(Sampler[int]):
    """Yields whatever order the loader sets before each epoch (the plan's, from sharding)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TorchLoader(EpochLoader):
    name = "torch"

    def __init__(self, *args, options: TorchOptions | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.options = o = options or TorchOptions()
        self.dataset = ShardSamples(self.manifest, self.split)
        self._sampler = _EpochSampler()
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            num_workers=o.num_workers,
            pin_memory=o.pin_memory and self.device.type == "cuda",
            drop_last=True,
            prefetch_factor=o.prefetch_factor if o.num_workers > 0 else None,
        )

    def _batches(self, plan: RankPlan, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        order = epoch_order(plan, self.shuffle)[: plan.steps * self.batch_size]
        self._sampler.order = order[skip * self.batch_size :].tolist()
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
