"""The DALI backend: ``fn.readers.webdataset`` -> decode -> batches -> ``DALIGenericIterator``.

Decode modes:
- ``gpu`` (default on CUDA): the raw member bytes go to the device; there they are
  reinterpreted (int16 / float32), the 44-byte WAV header and the npy header are sliced off,
  the audio is scaled by 1/32768 (the multiply casts to float32) and the npy body reshaped to
  [frames, 52]. Half the host->device bytes of float32.
  The same graph runs on CPU operators without CUDA (``device_id=None``), so CI checks its
  arithmetic.
- ``cpu``: ``fn.decoders.audio`` / ``fn.decoders.numpy`` on DALI's CPU threads (full WAV and
  npy parsing), then to the device. The default without CUDA. Shards must still be canonical:
  the loader checks member sizes and headers in both modes.

Before DALI reads a byte, the start-up check (``pipeline.verify``) checks every index entry,
member size and member header; every batch carries each sample's source and its blendshapes'
min/max are checked, so bad data stops with an error naming the shard and sample instead of
becoming silently wrong tensors. (Checking headers per batch in the graph instead cost ~30% of
the CPU path's throughput: DALI's per-sample slicing is not free.)

Each epoch builds a fresh pipeline reading the part of the split that ``pipeline.sharding``
assigns to this rank, its shuffle seeded by the epoch and its random crops and augmentation by
the epoch and the part: epochs are independent, ranks draw their own augmentation, and a
resumed epoch replays exactly (the consumed batches are skipped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from model.features import Mel, dali_log_mel
from pipeline.augment import NAMES as AUGMENT_NAMES
from pipeline.augment import Augment
from pipeline.errors import ConfigError, DatasetError
from pipeline.loading import DaliOptions, EpochLoader
from pipeline.manifest import Manifest, verify_hint
from pipeline.members import NPY_EXT, PCM16_SCALE, WAV_EXT
from pipeline.sharding import RankPlan, epoch_seed
from pipeline.verify import Depth, changed_shards, first_problem, sample_refs

READER = "Reader"
OUTPUTS = ["wav", "arkit", "source"]
PARAMS = ["offset", *AUGMENT_NAMES]  # with_params: what each sample drew
DECODES = ("gpu", "cpu")


def default_threads() -> int:
    return min(4, os.cpu_count() or 1)


def build_pipeline(
    m: Manifest,
    split: str,
    *,
    batch_size: int,
    decode: str = "gpu",
    device_id: int | None = None,
    gpu_ops: bool | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    draw_seed: int | None = None,
    shuffle_buffer: int | None = None,
    options: DaliOptions | None = None,
    augment: Augment | None = None,
    with_params: bool = False,
    crop: bool | None = None,
    features: str = "wav",
    mel: Mel | None = None,
):
    """The DALI graph over ``split`` of the dataset ``m``. ``device_id=None`` runs it on CPU
    operators only. ``options`` are the loader's knobs (threads, prefetch, read mode);
    ``shuffle_buffer`` overrides theirs. ``seed`` seeds the reader's shuffle, ``draw_seed``
    (default: ``seed``) the crops and augmentation. The train split is cropped (and
    augmented) when its members are longer than the window or ``augment`` enables something;
    ``with_params`` adds the drawn values to the outputs (``PARAMS``, after ``OUTPUTS``);
    ``crop`` (default: as the loaders decide, ``EpochLoader.crops``) forces it either way.
    ``features="mel"`` ends the audio's way in the log-mel (``model.features``, settings
    ``mel``), on the device the audio is on: GPU operators on CUDA.

    ``gpu_ops`` (default: whether ``device_id`` is set) places the decode on GPU operators;
    ``gpu_ops=True`` with ``device_id=None`` defines the CUDA graph on a machine without CUDA,
    which DALI can ``serialize()`` but not build.
    """
    to_gpu = device_id is not None if gpu_ops is None else gpu_ops
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    if decode not in DECODES:
        raise ConfigError(f"decode must be 'gpu' or 'cpu', not {decode!r}")
    o = options or DaliOptions()
    aug = augment or Augment()
    lay = m.layout(split)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=o.dali_threads or default_threads(),
        device_id=device_id,
        seed=seed if draw_seed is None else draw_seed,
        prefetch_queue_depth=o.dali_prefetch,
    )
    with pipe:
        wav, npy = fn.readers.webdataset(
            paths=m.tar_paths(split),
            index_paths=m.idx_paths(split),
            ext=[WAV_EXT, NPY_EXT],
            missing_component_behavior="error",
            random_shuffle=shuffle,
            initial_fill=shuffle_buffer or o.shuffle_buffer,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            # a memory-mapped tar that is cut short kills the process (SIGBUS): before DALI
            # opens them the start-up check makes sure every index entry lies inside its tar,
            # but only reading by copy (the default) also survives a shard truncated while
            # the run reads it
            dont_use_mmap=o.dont_use_mmap,
            prefetch_queue_depth=o.reader_prefetch,
            bytes_per_sample_hint=[lay.wav_bytes, lay.npy_bytes],
            name=READER,
        )
        source = fn.pad(fn.get_property(wav, key="source_info"), fill_value=0)
        if decode == "gpu":
            if to_gpu:
                wav, npy = wav.gpu(), npy.gpu()
            # reinterpret first and slice whole elements; int16 * float32 promotes to float32,
            # so the multiply is also the cast. Bit-identical to slice/cast/scale, and on CPU
            # operators half the work (a byte-wise slice and a separate cast pass cost the most).
            # Both headers end on a sample boundary: 44 bytes, and npy's 64-byte multiples.
            audio = fn.reinterpret(wav, dtype=types.INT16)[m.wav_header_bytes // 2 :]
            audio = audio * (1.0 / PCM16_SCALE)
            arkit = fn.reinterpret(npy, dtype=types.FLOAT)[lay.npy_header_bytes // 4 :]
            arkit = fn.reshape(arkit, shape=[lay.frames, lay.num_blendshapes])
        else:
            audio, _ = fn.decoders.audio(
                wav, dtype=types.FLOAT, downmix=True, sample_rate=m.sample_rate
            )
            arkit = fn.decoders.numpy(npy)  # float32 by contract (the header is checked)
            if to_gpu:
                audio, arkit = audio.gpu(), arkit.gpu()
        params = []
        if crop if crop is not None else split == "train" and (m.segmented or aug.enabled):
            audio, arkit, drawn = crop_and_augment(audio, arkit, m, aug, to_gpu)
            params = [drawn[name] for name in PARAMS] if with_params else []
        if features == "mel":
            audio = dali_log_mel(audio, mel or Mel(sample_rate=m.sample_rate))
        pipe.set_outputs(audio, arkit, source, *params)
    return pipe


def crop_and_augment(audio, arkit, m: Manifest, aug: Augment, to_gpu: bool):
    """The graph's part of ``pipeline.augment``: a frame-aligned random crop of each train
    member, after speed and before gain and noise, on the device the data is on. Returns the
    window's audio and arkit, and what was drawn (zeros for what is off)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    def on_data(node):  # per-sample values are drawn on the host; the data may be on the GPU
        return node.gpu() if to_gpu else node

    lay = m.layout("train")
    window, frames = m.clip_samples, m.frames
    rate, fps = m.sample_rate, m.fps
    # lo + (hi - lo) * U[0, 1): the same distribution as U[lo, hi), and a fixed value when
    # lo == hi (which DALI's uniform refuses)
    drawn = {}
    for n in aug.enabled:
        lo, hi = getattr(aug, n)
        drawn[n] = lo + (hi - lo) * fn.random.uniform(range=[0.0, 1.0])
    u = fn.random.uniform(range=[0.0, 1.0])
    if aug.speed:
        speed = drawn["speed"]
        top = dmath.floor(lay.frames / speed) - (frames + 1)  # as augment.max_offset
        audio = fn.audio_resample(audio, scale=1.0 / speed)
    else:
        top = lay.frames - frames
    offset = fn.cast(dmath.floor(u * (top + 1)), dtype=types.INT32)
    start = (offset * (2 * rate) + fps) // (2 * fps)  # round(offset * rate / fps)
    audio = fn.slice(audio, start=start, shape=[window], axes=[0])
    if aug.speed:
        # new frame k is the source at k * speed: a linear resize of [frames, 52] along time,
        # its region chosen so that output pixel centres land exactly there
        y0 = fn.cast(offset, dtype=types.FLOAT) * speed + 0.5 - 0.5 * speed
        image = fn.reshape(arkit, shape=[lay.frames, lay.num_blendshapes, 1], layout="HWC")
        image = fn.resize(
            image,
            size=[frames, lay.num_blendshapes],
            roi_start=fn.stack(y0, 0.0),
            roi_end=fn.stack(y0 + frames * speed, float(lay.num_blendshapes)),
            interp_type=types.INTERP_LINEAR,
            antialias=False,
        )
        arkit = fn.reshape(image, shape=[frames, lay.num_blendshapes], layout="")
    else:
        arkit = fn.slice(arkit, start=offset, shape=[frames], axes=[0])
    if aug.gain_db:
        audio = audio * on_data(dmath.pow(10.0, drawn["gain_db"] / 20.0))
    if aug.snr_db:
        scale = fn.reductions.rms(audio) / on_data(dmath.pow(10.0, drawn["snr_db"] / 20.0))
        audio = audio + fn.random.normal(audio) * scale
    drawn["offset"] = fn.cast(offset, dtype=types.INT64)
    for name in AUGMENT_NAMES:
        drawn.setdefault(name, fn.cast(u * 0.0, dtype=types.FLOAT))
    return audio, arkit, drawn


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
        sample_refs(m, self.split)  # the start-up check, before DALI reads a byte

    def make_pipeline(self, plan: RankPlan):
        o = self.options
        # DALI reads ``shuffle_buffer`` samples before the first batch and keeps its buffer
        # that full, reading on into later epochs (it never mixes epochs in the buffer). This
        # pipeline lives one epoch, so a buffer larger than the part only reads samples it never
        # yields (1024 over a 360-sample part read 4x the epoch's bytes); the part's size already
        # gives a uniform shuffle of the part.
        return build_pipeline(
            self.manifest,
            self.split,
            batch_size=self.batch_size,
            decode=self.decode,
            device_id=self.device.index if self.device.type == "cuda" else None,
            shard_id=plan.part,
            num_shards=self.world_size,
            shuffle=self.shuffle,
            seed=plan.epoch_seed,
            # every part draws its own crops and augmentation (the shuffle's seed is shared)
            draw_seed=epoch_seed(plan.epoch_seed, plan.part),
            shuffle_buffer=max(1, min(o.shuffle_buffer, plan.stop - plan.start)),
            options=o,
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
        which read no data), or DALI's own first line when the data looks right."""
        culprit = changed_shards(self._stamps)
        if culprit is None and decode:
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

    def _batches(self, plan: RankPlan, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        root, split = self.manifest.root, self.split
        try:
            pipe = self.make_pipeline(plan)
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
            for i in range(plan.steps):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise self._error(
                        f"{root}: the {split} shards ended after {i} batches, the manifest "
                        f"promises {plan.steps}"
                    ) from None
                except Exception as exc:  # noqa: BLE001 - DALI raises several types
                    what = f"{root}: DALI failed reading the {split} shards at batch {i}"
                    raise self._dali_failed(what, exc) from None
                if i < skip:
                    continue
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
                        host = torch.empty(2, dtype=bounds.dtype, pin_memory=True)
                        host.copy_(bounds, non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record()
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


def _shape(dims: tuple[int, ...]) -> str:
    return f"[B, {', '.join(map(str, dims))}]"
