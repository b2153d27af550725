"""The baseline: the plain ``torch.utils.data.DataLoader`` over the same shards.

``DataLoader(batch_size=16, num_workers=4, pin_memory=True, drop_last=True)``, tensors moved
with ``.to(device, non_blocking=True)``. Samples are read straight from the tars at the offsets
in their DALI index (no pickle, no tar scanning), so a sampler can give this loader exactly
the order ``pipeline.loaders.plan`` plans, which keeps ranks disjoint and resume exact. Every rank
runs the same number of whole batches, so the last partial batch is always dropped. The shards
of an ``s3://`` dataset are streamed whole into a local cache (``pipeline.shards.cache``) by the
main process, ahead of the sampler's order; the workers read the verified local copies.

With ``features="mel"`` the workers also compute the model's own log-mel front end
(``model.features.LogMel``). Crops and augmentation (``pipeline.loaders.augment``) run in the
workers, in numpy and soxr, with the values the DALI graph gets: each sample's generator is seeded
by the epoch's seed and the sample's index, so an epoch replays exactly whatever the worker.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from core.errors import ArkitError, DatasetError, MemberError
from model.features import LogMel, Mel
from pipeline.loaders.augment import Augment, apply, draw, sample_rng
from pipeline.loaders.base import EpochLoader, Leg
from pipeline.loaders.spec import LoaderSpec, TorchOptions
from pipeline.shards import storage
from pipeline.shards.cache import cached_path, wait_for_file
from pipeline.shards.index import SampleRef, changed_shards, sample_refs, shard_stamps
from pipeline.shards.manifest import Manifest, verify_command, verify_hint
from pipeline.shards.members import decode_sample
from pipeline.shards.verify import Depth


class Failed:
    """A sample that could not be read, in place of its batch: a worker hands its
    ``ArkitError`` over as a value and the main process raises it as it is (raised in the
    worker, torch would re-raise it with the worker's traceback inside its message)."""

    def __init__(self, error: ArkitError) -> None:
        self.error = error


def collate(samples: list) -> dict | Failed:
    """torch's default collate, or the first ``Failed`` among the samples."""
    failed = next((s for s in samples if isinstance(s, Failed)), None)
    return failed if failed is not None else default_collate(samples)


class ShardSamples(Dataset):
    """Random access to a split's samples through the DALI indexes; with ``augment`` set (a
    train split to crop), each sample is cropped and augmented as ``pipeline.loaders.augment``
    says."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        augment: Augment | None = None,
        with_params: bool = False,
        mel: Mel | None = None,
        stamps: dict | None = None,
        depth: Depth = Depth.STARTUP,
    ) -> None:
        self.manifest = manifest
        self.mel = mel  # features "mel": the model's own front end, here in the worker
        self._front: LogMel | None = None
        self.layout = manifest.layout(split)
        self.items: list[SampleRef] = sample_refs(manifest, split, depth)
        # the shards' versions when the run started (the loader's, else taken now)
        self.stamps = stamps if stamps is not None else shard_stamps(manifest, split)
        self.augment, self.with_params = augment, with_params
        self._fds: dict[str, int] = {}
        self._pid = -1
        # (folder, pid) of the loader's shard cache (pipeline.shards.cache) while a leg reads
        # an s3:// dataset through it: the samples are read from the verified local copies
        self.cache: tuple[Path, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _fd(self, path: str):
        """A local tar's descriptor, or an s3:// tar's ``S3Url`` (``pipeline.shards.storage`` keeps
        one S3 client per process, made in the process that reads)."""
        if self._pid != os.getpid():  # a forked worker must not share the parent's descriptors
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            is_s3 = storage.is_s3(path)
            self._fds[path] = storage.location(path) if is_s3 else os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, i: int) -> tuple[bytes, bytes]:
        """The raw wav and npy member bytes of sample ``i``."""
        ref = self.items[i]
        if self.cache is not None:
            # opened per sample: a shard is deleted once consumed, and a descriptor kept open
            # would keep its bytes on disk
            path = wait_for_file(cached_path(*self.cache, storage.location(ref.tar).name))
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, ref.wav[1], ref.wav[0]), os.pread(fd, ref.npy[1], ref.npy[0])
            finally:
                os.close(fd)
        fd = self._fd(ref.tar)
        if isinstance(fd, int):
            return os.pread(fd, ref.wav[1], ref.wav[0]), os.pread(fd, ref.npy[1], ref.npy[0])
        # S3: one ranged GET over both members, which lie side by side in the tar
        (w, w_size), (n, n_size) = ref.wav, ref.npy
        lo = min(w, n)
        try:
            blob = storage.read_range(fd, lo, max(w + w_size, n + n_size) - lo)
        except storage.StorageError as exc:
            raise self._read_failed(ref, exc) from None
        return blob[w - lo : w - lo + w_size], blob[n - lo : n - lo + n_size]

    def _read_failed(self, ref: SampleRef, exc: storage.StorageError) -> DatasetError:
        """What a failed read of an S3 sample means: the object, the endpoint, what to do."""
        if isinstance(exc, storage.NotFound):
            return DatasetError(
                f"{ref.tar} (endpoint {storage.endpoint()}): sample {ref.key}: vanished while "
                "the run was reading it (no such object): put it back or make the dataset "
                f"again, check it with `{verify_command(self.manifest.root)}`, and resume from "
                "the last checkpoint"
            )
        return DatasetError(
            f"{exc} (reading sample {ref.key}); resume from the last checkpoint once it answers"
        )

    def __getitem__(self, item: int | tuple[int, int]) -> dict | Failed:
        try:
            return self._sample(*(item if isinstance(item, tuple) else (item, 0)))
        except ArkitError as exc:
            return Failed(exc)

    def __getitems__(self, items: list) -> list:
        """A batch's samples (torch's fetcher asks for them together), or its first failure:
        the batch is lost then, so the rest of it is not read."""
        out = []
        for item in items:
            out.append(self[item])
            if isinstance(out[-1], Failed):
                return [out[-1]]
        return out

    def _sample(self, i: int, epoch_seed: int) -> dict:
        wav, npy = self.read(i)
        try:
            audio, arkit = decode_sample(wav, npy, self.layout)
        except MemberError as exc:
            ref = self.items[i]
            changed = changed_shards({ref.tar: self.stamps[ref.tar]})
            reason = changed.reason if changed else exc
            raise DatasetError(
                f"{ref.tar}: sample {ref.key}: {reason}; {verify_hint(self.manifest.root)}"
            ) from None
        out: dict = {}
        if self.augment is not None:
            m = self.manifest
            rng = sample_rng(epoch_seed, i)
            p = draw(rng, self.augment, self.layout.frames, m.frames, m.clip_samples)
            audio, arkit = apply(audio, arkit, p, m.clip_samples, m.frames, m.sample_rate, m.fps)
            out["offset"] = p.offset
            out.update({n: torch.tensor(getattr(p, n)) for n in self.augment.enabled})
        elif self.with_params:
            out["offset"] = 0
        if self.with_params:
            out["key"] = self.items[i].key
        else:
            out = {}
        wav = torch.from_numpy(audio)
        if self.mel is None:
            return {"wav": wav, "arkit": torch.from_numpy(arkit), **out}
        if self._front is None:
            self._front = LogMel(**self.mel.to_dict())
        with torch.no_grad():
            feats = self._front(wav[None])[0]
        return {"mel": feats, "arkit": torch.from_numpy(arkit), **out}


class _EpochSampler(Sampler):
    """Yields whatever order the loader sets before each epoch (the plan's, from sharding),
    each index with the epoch's seed, which seeds the sample's crop and augmentation."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.seed = 0

    def __iter__(self):
        return iter([(i, self.seed) for i in self.order])

    def __len__(self) -> int:
        return len(self.order)


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT. A scheduler, torchrun or Ctrl-C signals the whole
    process group: a worker killed by it would end the run in the main process with
    "DataLoader worker ... killed by signal" before the trainer could save its checkpoint. The
    main process decides (the trainer saves and stops; elsewhere KeyboardInterrupt), and its
    iterator then shuts the workers down; one left behind exits when its watchdog sees the
    main process gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class TorchLoader(EpochLoader):
    name = "torch"

    options: TorchOptions

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        o = self.options
        augment = self.augment if self.crops else None
        mel = self.mel if self.features == "mel" else None
        self.dataset = ShardSamples(
            self.manifest,
            self.split,
            augment,
            self.with_params,
            mel,
            stamps=self._stamps,
            depth=self.startup_depth,
        )
        self._sampler = _EpochSampler()
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            num_workers=o.num_workers,
            pin_memory=o.pin_memory and self.device.type == "cuda",
            drop_last=True,
            collate_fn=collate,
            prefetch_factor=o.prefetch_factor if o.num_workers > 0 else None,
            worker_init_fn=_leave_stop_signals_to_the_main_process,
        )

    def _batches(self, leg: Leg) -> Iterator[dict]:
        if not self.cached:
            yield from self._read(leg)
            return
        # an s3:// dataset: the workers wait for each shard in the cache and read it there; a
        # shard is deleted once every batch reading it has come back
        cache, uses = self.open_cache(leg)
        done_at: dict[int, list[str]] = {}
        for name, last in uses:
            done_at.setdefault(last, []).append(name)
        self.dataset.cache = (cache.folder, cache.pid)
        batches = self._read(leg)
        try:
            for i, batch in enumerate(batches):
                for name in done_at.get(i, ()):
                    cache.release(name)
                yield batch
        finally:
            cache.stop_waiters()  # a worker waiting for a shard gives up ...
            batches.close()  # ... and the workers stop before their shards go
            self.dataset.cache = None
            self.close_cache(cache)

    def _read(self, leg: Leg) -> Iterator[dict]:
        self._sampler.order = leg.batches.ravel().tolist()
        self._sampler.seed = leg.epoch_seed
        # the workers are forked with the stop signals blocked, so that one sent before they
        # ignore it waits for them and is dropped, not delivered to a worker still taking
        # torch's default; the main process gets a signal sent meanwhile when it unblocks
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            batches = iter(self.loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _LIVE.add(batches)
        try:
            for batch in batches:
                if isinstance(batch, Failed):
                    raise batch.error
                yield {
                    k: v.to(self.device, non_blocking=True) if k in ("wav", "mel", "arkit") else v
                    for k, v in batch.items()
                }
        finally:
            _stop_workers(batches)


# DataLoader iterators whose workers may still run. The workers ignore SIGTERM, so the
# terminate-and-join that multiprocessing gives its children at interpreter exit would wait
# for them forever: an iterator still referenced then (by a pending generator, or an error's
# traceback kept by the caller) is shut down first, by the handler below (atexit runs
# handlers in reverse order, and multiprocessing registered its own when torch imported it).
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _stop_workers(batches) -> None:
    """Ask a DataLoader iterator's workers to finish and wait for them (the iterator's own
    shutdown: an end-of-work message on each worker's queue, then a join with a timeout)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@atexit.register
def _stop_live_workers() -> None:
    for batches in list(_LIVE):
        _stop_workers(batches)
