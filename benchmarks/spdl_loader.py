"""The ``spdl`` row: the shards through Meta's SPDL pipeline (``pip install spdl``, which pulls
spdl-core and spdl-io): threads on an asyncio event loop instead of worker processes.

Built as SPDL 0.8.0's docs teach (https://facebookresearch.github.io/spdl/0.8.0/ : Getting
Started, "Building and Running Pipeline", "Concurrency", "Execution Models": MT):

- source: the train split's sample indexes in the torch baseline's order, each epoch cut to
  whole batches, ``add_source(..., continuous=True)``: one pipeline serves epoch after epoch
  (no rebuild, no bubble at the boundary), one ``get_iterator()`` per epoch;
- ``aggregate(B, drop_last=True)`` of the indexes, then ``pipe(load_batch, concurrency=threads,
  output_order="input")``: per sample ``os.pread`` of the two members at their index offsets
  and our parser (``decode_sample``: checked, no pickle; spdl.io's load_wav/load_npy were no
  faster and skip its checks), ``np.stack`` into torch tensors. ``output_order="input"`` keeps
  the baseline's order bit for bit (the default, "completion", does not);
- on CUDA, ``pipe(spdl.io.transfer_tensor_h2d)`` on one dedicated thread: ``pin_memory`` and a
  ``non_blocking`` copy on SPDL's own stream, synchronized before the batch is yielded (it
  copies to cuda:$LOCAL_RANK, so ``device`` must be that GPU);
- ``add_sink(SINK_BUFFER)``, ``build(num_threads=threads, max_failures=0)``: the first sample
  that fails to decode stops the pipeline and is raised (SPDL's default logs and drops it).

Tuning (2 CPUs, data/bench, batch 16, 5 + 40 batches): a stage per batch ran ~1.4x a stage per
sample (SPDL's event-loop hop per item), and a separate read stage was slower still; more
tasks than threads gained nothing; the sink size changed nothing (as SPDL's docs say: the stage
concurrency is the prefetch). Threads 1, 2, 4 were within noise of each other and of torch
(~1.9-2.0k samples/s, at ~1.1-1.3 cores against torch's 2); over 200 batches 1 thread led
(~1.9k vs ~1.6k and ~1.2k) as system time grew with threads: the GIL and one address space.

Stopping: the generator runs the pipeline inside ``auto_stop()``, so ``close()`` on it (the
benchmark closes every stream it abandons) or its garbage collection stops the event loop, the
thread pool and the source thread, and closes the tars. A stream kept alive but never closed
is stopped by SPDL's own GC finalizer or its interpreter-exit hook.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from core.errors import DatasetError, MemberError
from pipeline.loaders.plan import epoch_batches
from pipeline.shards.index import sample_refs
from pipeline.shards.manifest import Manifest, verify_hint
from pipeline.shards.members import decode_sample

SINK_BUFFER = 4  # batches decoded ahead of the consumer, at the end of the pipeline


def available() -> str | None:
    """None if SPDL imports, else why not (the row's "skipped" note)."""
    try:
        from spdl.io import transfer_tensor_h2d  # noqa: F401 - the names the row uses (0.8)
        from spdl.pipeline import PipelineBuilder  # noqa: F401
    except Exception as exc:  # missing, too old or broken: the row is left out
        return f"spdl is not installed ({exc}); pip install 'arkit-dali[bench]'"
    return None


class _EpochOrders:
    """The continuous source: each ``iter()`` is the next epoch's order, in whole batches."""

    def __init__(self, sizes: list[int], batch_size: int, epoch: int) -> None:
        self.sizes, self.batch_size, self.epoch = sizes, batch_size, epoch

    def __iter__(self) -> Iterator[int]:
        batches = epoch_batches(0, self.epoch, self.sizes, self.batch_size)
        self.epoch += 1
        return iter(batches.ravel().tolist())


def spdl_batches(
    m: Manifest, batch_size: int, device: torch.device, epoch: int, threads: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless: epoch after epoch, the train split in the torch baseline's order
    (``epoch_batches(0, epoch, shard_sizes, B)``), batches of B (last
    partial dropped), wav/arkit float32 on ``device`` (pinned + non_blocking copy on CUDA)."""
    from spdl.io import transfer_tensor_h2d
    from spdl.pipeline import PipelineBuilder

    refs = sample_refs(m, "train")
    if len(refs) < batch_size:
        raise ValueError(f"{m.root}: {len(refs)} train samples, fewer than a batch")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if index != int(os.environ.get("LOCAL_RANK", "0")):
            raise ValueError(f"spdl's transfer_tensor_h2d copies to cuda:$LOCAL_RANK, not {device}")
    layout = m.layout("train")
    fds = {tar: os.open(tar, os.O_RDONLY) for tar in m.tar_paths("train")}

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        ref = refs[i]
        fd = fds[ref.tar]
        wav, npy = os.pread(fd, ref.wav[1], ref.wav[0]), os.pread(fd, ref.npy[1], ref.npy[0])
        try:
            audio, arkit = decode_sample(wav, npy, layout)
            return audio[: m.clip_samples], arkit[: m.frames]  # a segment's first window
        except MemberError as exc:
            raise DatasetError(
                f"{ref.tar}: sample {ref.key}: {exc}; {verify_hint(m.root)}"
            ) from None

    def load_batch(indexes: list[int]) -> dict[str, torch.Tensor] | dict[str, str]:
        try:
            samples = [load(i) for i in indexes]
        except DatasetError as exc:  # raised by the reader, not in a stage: SPDL logs those
            return {"error": str(exc)}
        return {
            "wav": torch.from_numpy(np.stack([s[0] for s in samples])),
            "arkit": torch.from_numpy(np.stack([s[1] for s in samples])),
        }

    try:
        builder = (
            PipelineBuilder()
            .add_source(
                _EpochOrders([s.samples for s in m.split_shards("train")], batch_size, epoch),
                continuous=True,
            )
            .aggregate(batch_size, drop_last=True)
            .pipe(load_batch, concurrency=threads, output_order="input")
        )
        h2d = ThreadPoolExecutor(1, thread_name_prefix="spdl_h2d")  # one stream, one copy at a time
        if device.type == "cuda":
            # a bad sample's {"error": ...} passes on to be raised in the consumer
            builder.pipe(lambda b: b if "error" in b else transfer_tensor_h2d(b), executor=h2d)
        pipeline = builder.add_sink(SINK_BUFFER).build(num_threads=threads, max_failures=0)
        with h2d, pipeline.auto_stop():
            while True:  # one iterator per epoch (SPDL's contract for a continuous source)
                empty = True
                for batch in pipeline.get_iterator():
                    empty = False
                    if "error" in batch:
                        raise DatasetError(batch["error"])
                    yield batch
                if empty:  # every epoch has a batch: the pipeline was stopped
                    raise RuntimeError("the spdl pipeline stopped")
    finally:
        for fd in fds.values():
            os.close(fd)


def spdl_row(spec, args, m: Manifest, device: torch.device):
    """The benchmark's ``spdl`` row (``benchmarks.rows``)."""
    what = (
        f"SPDL pipeline: aggregate, pipe(load batch, concurrency {args.spdl_threads}, "
        f"output_order=input), sink {SINK_BUFFER}, our parsers"
    )
    return spec.row(
        what, lambda epoch: spdl_batches(m, args.batch_size, device, epoch, args.spdl_threads)
    )
