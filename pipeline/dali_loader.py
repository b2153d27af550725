"""The DALI backend: ``pipeline.dali_graph``'s pipeline -> ``DALIGenericIterator`` -> batches.

Before DALI reads a byte, the start-up check (``pipeline.verify``) checks every index entry,
member size and member header; every batch carries each sample's source and its blendshapes'
min/max are checked, so bad data stops with an error naming the shard and sample instead of
becoming silently wrong tensors. (Checking headers per batch in the graph instead cost ~30% of
the CPU path's throughput: DALI's per-sample slicing is not free.)

Each epoch (or resumed rest of one) builds a fresh pipeline whose reader follows exactly the
samples ``pipeline.sharding`` gives this rank from the loader's position on, through index
files written for it in a temporary folder. A resumed epoch starts at its first unconsumed
sample: nothing is replayed, so resuming at 90% of an epoch costs what resuming at 10% does.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.dali_graph import (
    DECODES,
    OUTPUTS,
    PARAMS,
    READER,
    Draws,
    build_pipeline,
    write_indexes,
)
from pipeline.errors import ConfigError, DatasetError
from pipeline.loading import DaliOptions, EpochLoader, Leg
from pipeline.manifest import verify_hint
from pipeline.storage import is_s3
from pipeline.verify import Depth, changed_shards, first_problem, sample_refs


class DaliLoader(EpochLoader):
    name = "dali"

    def __init__(self, *args, options: DaliOptions | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.options = options or DaliOptions()
        self.decode = self.options.decode
        if self.decode == "auto":
            self.decode = "gpu" if self.device.type == "cuda" else "cpu"
        if self.decode not in DECODES:
            raise ConfigError(f"decode must be 'auto', 'gpu' or 'cpu', not {self.decode!r}")
        m = self.manifest
        # a window, or the whole member where nothing is cropped (segments with crop=False)
        lay = m.layout(self.split)
        samples, frames = (m.clip_samples, m.frames) if self.crops else (lay.samples, lay.frames)
        self._wav_shape, self._arkit_shape = (samples,), (frames, m.num_blendshapes)
        if self.features == "mel":
            self._wav_shape = (self.mel.n_mels, self.mel.frames(samples))
        self.refs = sample_refs(m, self.split)  # after the start-up check: DALI reads next
        self._indexes: tempfile.TemporaryDirectory | None = None

    def make_pipeline(self, leg: Leg, folder: str | Path):
        """The pipeline reading ``leg``'s samples in order; its index files go in ``folder``."""
        order = leg.batches.ravel()
        draws = Draws(
            order, leg.epoch_seed, self.augment, self.manifest, self.split, self.batch_size
        )
        return build_pipeline(
            self.manifest,
            self.split,
            batch_size=self.batch_size,
            decode=self.decode,
            device_id=self.device.index if self.device.type == "cuda" else None,
            files=write_indexes([self.refs[i] for i in order], folder),
            draws=draws,
            # the graph draws nothing itself (the noise comes with the draws): seeded anyway
            seed=leg.epoch_seed,
            options=self.options,
            augment=self.augment,
            with_params=self.with_params,
            crop=self.crops,
            features=self.features,
            mel=self.mel,
        )

    def _error(self, what: str) -> DatasetError:
        return DatasetError(
            f"{what}. Run `{verify_hint(self.manifest.root)}` to list every bad shard and sample"
        )

    def _dali_failed(self, what: str, exc: BaseException, decode: bool = True) -> DatasetError:
        """Our error for a DALI failure: the sample that explains it, found by decoding the
        split as the Python readers do (``decode``: not for a pipeline that failed to build,
        which read no data, nor for a dataset in S3, where that would download the whole
        split before saying anything; ``--verify`` does it on request), or DALI's own first
        line when the data looks right."""
        culprit = changed_shards(self._stamps)
        if culprit is None and decode and not is_s3(self.manifest.root):
            culprit = first_problem(self.manifest, self.split, Depth.DECODE)
        if culprit is not None:
            return self._error(str(culprit))
        text = str(exc).strip()
        first_line = text.splitlines()[0][:300] if text else type(exc).__name__
        return self._error(f"{what} (DALI: {first_line})")

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
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        root, split = self.manifest.root, self.split
        try:
            pipe = self.make_pipeline(leg, folder)
            pipe.build()
            names = [self.features, *OUTPUTS[1:]] + (
                PARAMS if self.with_params and self.crops else []
            )
            it = DALIGenericIterator(
                [pipe],
                names,
                reader_name=READER,
                last_batch_policy=LastBatchPolicy.DROP,
                auto_reset=False,
            )
        except RuntimeError as exc:
            what = f"{root}: DALI could not build the {split} pipeline"
            raise self._dali_failed(what, exc, decode=False) from None
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
                except Exception as exc:  # noqa: BLE001 - DALI raises several types
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
