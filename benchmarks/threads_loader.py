"""The ``threads`` row: the loader an expert writes in an afternoon, as a reference.

A thread pool ``preadv``s each sample's members at their index offsets: the audio's int16 body
into the thread's staging buffer, converted into its slot of a preallocated float32 batch by one
``np.multiply`` (int16 / 32768, the shards' arithmetic), and the npy's float32 body straight into
its slot of the batch. Batches are filled ``depth`` ahead in a ring of ``depth + 1`` slots
(pinned on CUDA, copied without blocking; a slot is refilled only after its copy's event). The
GIL is released in ``preadv`` and in numpy's loop, so threads overlap on a multi-core CPU.
Sample order: the torch baseline's (``pipeline.loaders.plan``, rank 0 of 1, shuffled), so both give
the same tensors. No checks beyond the start-up check (``sample_refs``): not a product loader.
A segmented train split is read as its first window of each segment (a fixed crop).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from core.errors import DatasetError
from pipeline.loaders.plan import epoch_batches
from pipeline.shards.index import sample_refs
from pipeline.shards.manifest import Manifest
from pipeline.shards.members import PCM16_SCALE


class ThreadBatches:
    def __init__(
        self, m: Manifest, batch_size: int, device: torch.device, threads: int = 2, depth: int = 2
    ) -> None:
        lay = m.layout("train")
        self.B, self.device, self.depth = batch_size, device, depth
        self.samples, self.frames, self.nb = m.clip_samples, m.frames, m.num_blendshapes
        refs = sample_refs(m, "train")
        if len(refs) < batch_size:
            raise DatasetError(f"{m.root}: {len(refs)} train samples make no batch of {batch_size}")
        self.fds = {t: os.open(t, os.O_RDONLY) for t in m.tar_paths("train")}
        wav_body, npy_body = m.wav_header_bytes, lay.npy_header_bytes
        self.items = [(self.fds[r.tar], r.wav[0] + wav_body, r.npy[0] + npy_body) for r in refs]
        self.sizes = [s.samples for s in m.split_shards("train")]
        pin = device.type == "cuda"
        self.slots = [
            (
                torch.empty(batch_size, self.samples, dtype=torch.float32, pin_memory=pin),
                torch.empty(batch_size, self.frames, self.nb, dtype=torch.float32, pin_memory=pin),
            )
            for _ in range(depth + 1)
        ]
        self.copied: list[torch.cuda.Event | None] = [None] * (depth + 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="threads-row")
        self.local = threading.local()
        self.scale = np.float32(1 / PCM16_SCALE)

    def _read(self, slot: int, b: int, i: int) -> None:
        """Sample ``i`` into row ``b`` of ``slot``."""
        staging = getattr(self.local, "pcm", None)
        if staging is None:
            staging = self.local.pcm = np.empty(self.samples, dtype=np.int16)
        fd, wav_at, npy_at = self.items[i]
        wav, arkit = self.slots[slot]
        os.preadv(fd, [memoryview(staging).cast("B")], wav_at)
        np.multiply(staging, self.scale, out=wav[b].numpy())
        os.preadv(fd, [memoryview(arkit[b].numpy()).cast("B")], npy_at)

    def _fill(self, slot: int, indexes: list[int]) -> list[Future]:
        if self.copied[slot] is not None:  # the previous copy out of this slot is done
            self.copied[slot].synchronize()
        return [self.pool.submit(self._read, slot, b, i) for b, i in enumerate(indexes)]

    def stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches from ``epoch`` on, continuing into the next epochs."""
        jobs: list[tuple[int, list[Future]]] = []
        k = 0

        def batches():
            e = epoch
            while True:
                for batch in epoch_batches(0, e, self.sizes, self.B):
                    yield batch.tolist()
                e += 1

        upcoming = batches()
        try:
            for _ in range(self.depth):
                slot, k = k % len(self.slots), k + 1
                jobs.append((slot, self._fill(slot, next(upcoming))))
            while True:
                slot, futures = jobs.pop(0)
                for f in futures:
                    f.result()
                nxt, k = k % len(self.slots), k + 1
                jobs.append((nxt, self._fill(nxt, next(upcoming))))
                wav, arkit = self.slots[slot]
                if self.device.type == "cuda":
                    wav = wav.to(self.device, non_blocking=True)
                    arkit = arkit.to(self.device, non_blocking=True)
                    self.copied[slot] = torch.cuda.Event()
                    self.copied[slot].record()
                yield {"wav": wav, "arkit": arkit}
        finally:  # a closed stream leaves no read running into the slots a new one fills
            for _, futures in jobs:
                for f in futures:
                    f.cancel()
            for _, futures in jobs:
                for f in futures:
                    if not f.cancelled():
                        f.exception()  # waits; its error, if any, is the abandoned batch's

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)


def threads_row(spec, args, m: Manifest, device: torch.device):
    """The benchmark's ``threads`` row (``benchmarks.rows``)."""
    loader = ThreadBatches(m, args.batch_size, device, threads=args.threads)
    pinned = " pinned" if device.type == "cuda" else ""
    what = (
        f"thread pool of {args.threads}, preadv into a preallocated{pinned} batch, int16 -> "
        "float32 in place, 2 batches ahead"
    )
    return spec.row(what, loader.stream, loader.close)
