"""The DALI backend: ``pipeline.loaders.dali_graph``'s pipeline -> ``DALIGenericIterator`` ->
batches.

Before DALI reads a byte, the start-up check (``pipeline.shards.verify``) checks every index entry,
member size and member header; every batch carries each sample's source and its blendshapes'
min/max are checked, so bad data stops with an error naming the shard and sample instead of
becoming silently wrong tensors. (Checking headers per batch in the graph instead cost ~30% of
the CPU path's throughput: DALI's per-sample slicing is not free.)

Each epoch (or resumed rest of one) builds a fresh pipeline whose reader follows exactly the
samples ``pipeline.loaders.plan`` gives this rank from the loader's position on, through index
files written for it in a temporary folder. A resumed epoch starts at its first unconsumed
sample: nothing is replayed, so resuming at 90% of an epoch costs what resuming at 10% does.
An ``s3://`` dataset's leg is read in pieces, one pipeline each, over shards streamed whole
into a local cache (``pipeline.shards.cache``; see ``_read``).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from core.errors import DatasetError
from pipeline.loaders.base import EpochLoader, Leg
from pipeline.loaders.dali_graph import (
    OUTPUTS,
    READER,
    Draws,
    GpuNoise,
    build_pipeline,
    params_of,
    write_indexes,
)
from pipeline.loaders.plan import batch_shards, pieces
from pipeline.loaders.spec import DaliOptions, LoaderSpec
from pipeline.shards.index import changed_shards, sample_refs
from pipeline.shards.manifest import verify_hint
from pipeline.shards.storage import is_s3
from pipeline.shards.verify import Depth, first_problem


class DaliLoader(EpochLoader):
    name = "dali"
    cache_holds = 2  # a piece being read and the next one (see _read)

    options: DaliOptions

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        self.decode = self.options.decode_on(self.device.type == "cuda")
        m = self.manifest
        # a window, or the whole member where nothing is cropped (segments with crop=False)
        lay = m.layout(self.split)
        samples, frames = (m.clip_samples, m.frames) if self.crops else (lay.samples, lay.frames)
        self._wav_shape, self._arkit_shape = (samples,), (frames, m.num_blendshapes)
        if self.features == "mel":
            self._wav_shape = (self.mel.n_mels, self.mel.frames(samples))
        # after the start-up check: DALI reads next
        self.refs = sample_refs(m, self.split, self.startup_depth)
        # on CUDA, the noise table on the GPU: uploaded at the first batch, kept for every epoch
        self._gpu_noise = None
        if self.device.type == "cuda" and self.crops and self.augment.snr_db:
            self._gpu_noise = GpuNoise(self.device.index)
        self._indexes: tempfile.TemporaryDirectory | None = None

    def make_pipeline(self, leg: Leg, folder: str | Path, local: dict[str, str] | None = None):
        """The pipeline reading ``leg``'s samples in order; its index files go in ``folder``;
        ``local``: local copies of tars, by their path in the dataset."""
        order = leg.batches.ravel()
        refs = [self.refs[i] for i in order]
        if local:
            refs = [dataclasses.replace(r, tar=local.get(r.tar, r.tar)) for r in refs]
        draws = Draws(
            order,
            leg.epoch_seed,
            self.augment,
            self.manifest,
            self.split,
            self.batch_size,
            self._gpu_noise,
        )
        return build_pipeline(
            self.spec,
            self.manifest,
            device_id=self.device.index if self.device.type == "cuda" else None,
            files=write_indexes(refs, folder),
            draws=draws,
            # the graph draws nothing itself (the noise comes with the draws): seeded anyway
            seed=leg.epoch_seed,
        )

    def _error(self, what: str) -> DatasetError:
        return DatasetError(f"{what}; {verify_hint(self.manifest.root)}")

    def _dali_failed(self, what: str, exc: BaseException, decode: bool = True) -> DatasetError:
        """Our error for a DALI failure: the sample that explains it, found by decoding the
        split as the Python readers do (``decode``: not for a pipeline that failed to build,
        which read no data, nor for a dataset in S3, where that would download the whole
        split before saying anything; ``--verify`` does it on request), or DALI's own cause.
        ``--verify`` is suggested only where the data may be the cause: not for a pipeline that
        failed to build over shards unchanged since the start-up check, nor for DALI's S3
        client failing to reach the store."""
        culprit = changed_shards(self._stamps)
        if culprit is None and decode and not is_s3(self.manifest.root):
            culprit = first_problem(self.manifest, self.split, Depth.DECODE)
        if culprit is not None:
            return self._error(str(culprit))
        cause = dali_cause(str(exc)).rstrip(".") or type(exc).__name__
        if is_s3(self.manifest.root) and _NETWORK.search(cause):
            return DatasetError(f"{what}: {cause}. {_store_hint(cause, self.manifest.root)}")
        if not decode:
            return DatasetError(
                f"{what}: {cause}. The shards are as the start-up check found them, so the "
                "cause is not the data; the torch loader (--loader torch) reads the same shards"
            )
        return self._error(f"{what} (DALI: {cause})")

    @staticmethod
    def _source(batch: dict[str, torch.Tensor], i: int) -> str:
        return bytes(batch["source"][i].numpy()).rstrip(b"\0").decode(errors="replace")

    def _params(self, out: dict) -> dict:
        """The samples' keys (from the member names DALI read) and what each drew."""
        n = out["arkit"].shape[0]
        keys = [self._source(out, i).rpartition("/")[2].rpartition(":")[2] for i in range(n)]
        params = {"key": [k.partition(".")[0] for k in keys]}
        if not self.crops:
            params["offset"] = torch.zeros(n, dtype=torch.int64)
            return params
        params["offset"] = out["offset"].reshape(n).cpu()
        for name in self.augment.enabled:
            params[name] = out[name].reshape(n).float().cpu()
        return params

    def _check_values(self, arkit: torch.Tensor, bounds: torch.Tensor, batch) -> None:
        """Raise if a batch held blendshapes that are NaN, inf or outside [0, 1]."""
        lo, hi = bounds.tolist()
        if lo >= 0 and hi <= 1:  # NaN fails both comparisons
            return
        ok = ((arkit >= 0) & (arkit <= 1)).flatten(1).all(1)
        i = int((~ok).nonzero()[0, 0]) if not bool(ok.all()) else 0
        raise self._error(
            f"{self.manifest.root}: sample {self._source(batch, i)}: blendshape values are NaN, "
            "inf or outside [0, 1]"
        )

    def _batches(self, leg: Leg) -> Iterator[dict[str, torch.Tensor]]:
        if leg.steps == 0:
            return
        # the leg's index files, in a folder of the loader's that goes with it (also at exit)
        if self._indexes is None:
            self._indexes = tempfile.TemporaryDirectory(prefix="arkit-dali-")
        folder = tempfile.mkdtemp(dir=self._indexes.name)
        try:
            yield from self._read(leg, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _read(self, leg: Leg, folder: str) -> Iterator[dict[str, torch.Tensor]]:
        if not self.cached:
            yield from self._iterate(leg, *self._open(leg, folder))
            return
        # an s3:// dataset, its shards streamed into the cache: DALI's reader opens every tar
        # it is given when its pipeline is built, so the leg is read in pieces, each over a
        # bounded set of shards (the first small, for a quick start; then larger, up to half
        # the cache), the next one built in the background while one runs
        cache, uses = self.open_cache(leg)
        shards = self.manifest.split_shards(self.split)
        per_batch = batch_shards(leg.batches, self.shard_sizes)
        cut = pieces(per_batch, [s.bytes for s in shards], self.spec.cache_limit // 2)
        if not cache.to_fetch:  # every shard kept from the previous legs: one pipeline
            cut = [(0, leg.steps)]
        root = self.manifest.root

        def prepare(k: int):
            a, b = cut[k]
            names = {shards[s].name for batch in per_batch[a:b] for s in batch}
            local = {str(root / n): str(cache.wait(n)) for n in names}
            piece = Leg(leg.epoch, leg.batches[a:b], leg.epoch_seed)
            sub = tempfile.mkdtemp(dir=folder)
            return piece, *self._open(piece, sub, local)

        nxt = None
        with ThreadPoolExecutor(1, thread_name_prefix="dali-piece") as ahead:
            try:
                nxt = ahead.submit(prepare, 0)
                for k, (_, end) in enumerate(cut):
                    piece, pipe, it = nxt.result()
                    nxt = ahead.submit(prepare, k + 1) if k + 1 < len(cut) else None
                    yield from self._iterate(piece, pipe, it)
                    del pipe, it
                    for name, last in uses:
                        if last < end:
                            cache.release(name)
            finally:
                self.close_cache(cache)
                if nxt is not None:
                    nxt.cancel()

    def _open(self, leg: Leg, folder: str, local: dict[str, str] | None = None):
        """The built pipeline reading ``leg`` and its iterator; ``local``: the tars' local
        copies by their URL."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        try:
            pipe = self.make_pipeline(leg, folder, local)
            pipe.build()
            names = [self.features, *OUTPUTS[1:]] + (
                params_of(self.augment) if self.with_params and self.crops else []
            )
            it = DALIGenericIterator(
                [pipe],
                names,
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.DROP,
                auto_reset=False,
            )
        except RuntimeError as exc:
            what = f"{self.manifest.root}: DALI could not build the {self.split} pipeline"
            raise self._dali_failed(what, exc, decode=False) from None
        return pipe, it

    def _iterate(self, leg: Leg, pipe, it) -> Iterator[dict[str, torch.Tensor]]:
        root, split = self.manifest.root, self.split
        pending = None  # on CUDA: the previous batch's value check, read one batch later
        try:
            for i in range(leg.steps):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise self._error(
                        f"{root}: the {split} shards ended after {i} batches, the manifest "
                        f"promises {leg.steps}"
                    ) from None
                except Exception as exc:  # DALI raises several types
                    what = f"{root}: DALI failed reading the {split} shards at batch {i}"
                    raise self._dali_failed(what, exc) from None
                wav, arkit = out[self.features], out["arkit"]
                if wav.shape[1:] != self._wav_shape or arkit.shape[1:] != self._arkit_shape:
                    raise self._error(
                        f"{root}: batch {i} decoded to {tuple(wav.shape)} and "
                        f"{tuple(arkit.shape)}, expected {_shape(self._wav_shape)} and "
                        f"{_shape(self._arkit_shape)}"
                    )
                if self.options.check_values:
                    # one min/max per batch. On CUDA it is copied to pinned memory behind an
                    # event and read a batch later, waiting on that event only, so the host
                    # never waits for the training step queued in between
                    bounds = torch.stack(torch.aminmax(arkit))
                    if arkit.is_cuda:
                        host, ready = _to_host_behind_event(bounds)
                        if pending is not None:
                            pending[3].synchronize()
                            self._check_values(*pending[:3])
                        pending = (arkit, host, out, ready)
                    else:
                        self._check_values(arkit, bounds, out)
                if wav.device != self.device:
                    wav = wav.to(self.device, non_blocking=True)
                    arkit = arkit.to(self.device, non_blocking=True)
                batch = {self.features: wav, "arkit": arkit}
                if self.with_params:
                    batch.update(self._params(out))
                yield batch
            if pending is not None:
                pending[3].synchronize()
                self._check_values(*pending[:3])
        finally:
            del it, pipe


# DALI's S3 client (the AWS SDK over curl) failing to reach the endpoint
_NETWORK = re.compile(r"curlCode|Could not resolve|Couldn't connect|Connection refused|timed out")


def dali_cause(text: str) -> str:
    """What DALI says went wrong, on one line: the lines after ``encountered:`` (or the whole
    text), without its headers, the pipeline's Python traceback and the C++ context/stack."""
    lines = text.strip().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "encountered:":
            lines = lines[i + 1 :]
    keep = []
    for line in lines:
        line = line.strip().lstrip(":").strip()
        if not line or line.startswith(_DALI_NOISE) or re.match(r"\[frame \d+\]", line):
            continue
        keep.append(line.rstrip(":"))
    return ": ".join(keep)[:600]


_DALI_NOISE = (
    "Critical error when building pipeline",
    "Error in CPU operator",
    "Error in GPU operator",
    "Error in MIXED operator",
    "which was used in the pipeline definition",
    'File "',
    "C++ context:",
    "Stacktrace (",
    "Current pipeline object is no longer valid",
)


def _store_hint(cause: str, root: object) -> str:
    """What to do when DALI's own S3 client cannot reach the store that boto3 reaches."""
    bucket = str(root).removeprefix("s3://").partition("/")[0]
    host = re.search(r"Could not resolve host: (\S+)", cause)
    if host and host[1].startswith(f"{bucket}."):
        return (
            f"DALI's S3 client addresses the bucket as the host {host[1]} (virtual-hosted style, "
            "for an AWS_ENDPOINT_URL given by name): make that name resolve, give "
            "AWS_ENDPOINT_URL as an IP address, or use the torch loader (--loader torch)"
        )
    return (
        "DALI's own S3 client (it reads AWS_ENDPOINT_URL once per process) could not reach the "
        "endpoint: check AWS_ENDPOINT_URL and the network, or use the torch loader "
        "(--loader torch)"
    )


def _to_host_behind_event(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """``t`` (on a CUDA device) copied into pinned host memory without waiting, and an event
    recorded behind the copy on the stream it was queued on: the current stream of ``t``'s
    device, which is not the current device's when the loader runs on another GPU (``infer
    --device cuda:1``). The host reads ``host`` only once the event has completed."""
    with torch.cuda.device(t.device):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(t.device))
    return host, ready


def _shape(dims: tuple[int, ...]) -> str:
    return f"[B, {', '.join(map(str, dims))}]"
