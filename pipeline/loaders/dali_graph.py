"""The DALI graph: ``fn.readers.webdataset`` over index files that fix the order -> decode ->
crops and augmentation fed by an external source -> (log-mel) -> outputs.

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

The reader reads unshuffled whatever (tar, index) pairs it is given: ``write_indexes`` turns a
list of samples into one small index per run of consecutive samples from the same tar (DALI
takes a tar more than once, and an index's samples in any order), so the reader follows an
order computed outside (``pipeline.loaders.plan``) and can start anywhere in it. The crops and
augmentation are drawn on the host per sample (``Draws``: ``pipeline.loaders.augment.draw`` with the
sample's own generator, as the DataLoader's workers draw them); the graph does the work on the
data's device. Each sample's window of the noise table comes from the host on CPU operators,
and on CUDA from one copy of the table on the GPU (``GpuNoise``), copied device to device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model.features import dali_log_mel
from pipeline.loaders.augment import (
    RESAMPLE_QUALITY,
    Augment,
    Params,
    draw,
    lowpass,
    noise,
    noise_table,
    sample_rng,
)
from pipeline.loaders.spec import DaliOptions, LoaderSpec
from pipeline.shards.index import SampleRef
from pipeline.shards.manifest import Manifest
from pipeline.shards.members import NPY_EXT, PCM16_SCALE, WAV_EXT
from pipeline.shards.tars import Member, index_text

READER = "Reader"
OUTPUTS = ["wav", "arkit", "source"]


def default_threads() -> int:
    return min(4, os.cpu_count() or 1)


def build_pipeline(
    spec: LoaderSpec,
    m: Manifest,
    *,
    device_id: int | None,
    files: tuple[list[str], list[str]],
    draws: Draws | None,
    seed: int,
):
    """The DALI graph of the loader ``spec`` over its split of the dataset ``m``, on GPU
    operators on CUDA device ``device_id`` (None: CPU operators only). ``files``: the (tars,
    indexes) the reader reads in order, unshuffled; ``draws``: the external source of each
    sample's crop and augmentation, in the same order (unused where ``spec.crops(m)`` is
    false), whose ``gpu_noise`` is set exactly when the graph is on GPU operators and draws
    noise; ``seed``: the pipeline's. Outputs: ``OUTPUTS`` (the audio, or its log-mel with
    ``features="mel"``, on the device the audio is on), then with ``with_params`` and crops
    the drawn values (``params_of``)."""
    from nvidia.dali.pipeline import Pipeline

    o: DaliOptions = spec.options
    on_cuda = device_id is not None
    aug, crops = spec.augment, spec.crops(m)
    pipe = Pipeline(
        batch_size=spec.batch_size,
        num_threads=o.dali_threads or default_threads(),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=o.dali_prefetch,
    )
    with pipe:
        wav, npy = _read(m, spec.split, o, files)
        source = _source_info(wav)
        audio, arkit = _decode(wav, npy, m, spec.split, o.decode_on(on_cuda), on_cuda)
        params = []
        if crops:
            if draws is None:
                raise ValueError("a graph that crops needs draws")
            if aug.snr_db and (draws.gpu_noise is not None) != on_cuda:
                need = "with" if on_cuda else "without"
                raise ValueError(f"this graph's noise needs draws {need} gpu_noise")
            drawn = _drawn(draws, aug, on_cuda)
            audio, arkit = crop_and_augment(audio, arkit, m, aug, on_cuda, drawn)
            params = [drawn[name] for name in params_of(aug)] if spec.with_params else []
        if spec.features == "mel":
            audio = dali_log_mel(audio, spec.mel)
        pipe.set_outputs(audio, arkit, source, *params)
    return pipe


def _read(m: Manifest, split: str, o: DaliOptions, files: tuple[list[str], list[str]]):
    """The reader: each sample's raw wav and npy member bytes, in the index files' order."""
    from nvidia.dali import fn

    lay = m.layout(split)
    tars, indexes = files
    return fn.readers.webdataset(
        paths=tars,
        index_paths=indexes,
        ext=[WAV_EXT, NPY_EXT],
        missing_component_behavior="error",
        random_shuffle=False,  # the order is the index files' (pipeline.loaders.plan)
        # a memory-mapped tar that is cut short kills the process (SIGBUS): before DALI opens
        # them the start-up check makes sure every index entry lies inside its tar, but only
        # reading by copy (the default) also survives a shard truncated while the run reads it
        dont_use_mmap=o.dont_use_mmap,
        prefetch_queue_depth=o.reader_prefetch,
        bytes_per_sample_hint=[lay.wav_bytes, lay.npy_bytes],
        name=READER,
    )


def _source_info(wav):
    """Each sample's source (``tar:member``), as zero-padded bytes."""
    from nvidia.dali import fn

    return fn.pad(fn.get_property(wav, key="source_info"), fill_value=0)


def _decode(wav, npy, m: Manifest, split: str, decode: str, on_cuda: bool):
    """The members' bytes to float32 audio [samples] and arkit [frames, 52], on the GPU with
    ``on_cuda`` (see the module's decode modes)."""
    from nvidia.dali import fn, types

    lay = m.layout(split)
    if decode == "gpu":
        if on_cuda:
            wav, npy = wav.gpu(), npy.gpu()
        # reinterpret first and slice whole elements; int16 * float32 promotes to float32, so
        # the multiply is also the cast. Bit-identical to slice/cast/scale, and on CPU operators
        # half the work (a byte-wise slice and a separate cast pass cost the most). Both
        # headers end on a sample boundary: 44 bytes, and npy's 64-byte multiples.
        audio = fn.reinterpret(wav, dtype=types.INT16)[m.wav_header_bytes // 2 :]
        audio = audio * (1.0 / PCM16_SCALE)
        arkit = fn.reinterpret(npy, dtype=types.FLOAT)[lay.npy_header_bytes // 4 :]
        return audio, fn.reshape(arkit, shape=[lay.frames, lay.num_blendshapes])
    audio, _ = fn.decoders.audio(wav, dtype=types.FLOAT, downmix=True, sample_rate=m.sample_rate)
    arkit = fn.decoders.numpy(npy)  # float32 by contract (the header is checked)
    return (audio.gpu(), arkit.gpu()) if on_cuda else (audio, arkit)


def _drawn(draws: Draws, aug: Augment, on_cuda: bool) -> dict:
    """The external sources of the draws, by name (``Draws.outputs``, and on the GPU the noise
    windows)."""
    from nvidia.dali import fn, types

    drawn = fn.external_source(source=draws, num_outputs=len(draws.outputs), batch=True)
    drawn = dict(zip(draws.outputs, drawn, strict=True))
    if aug.snr_db and on_cuda:
        # views of the table on the GPU, copied there on GpuNoise's own stream
        drawn["noise"] = fn.external_source(
            source=draws.gpu_windows,
            batch=True,
            device="gpu",
            dtype=types.FLOAT,
            ndim=1,
            cuda_stream=draws.gpu_noise,
        )
    return drawn


def params_of(aug: Augment) -> list[str]:
    """What a graph for ``aug`` draws per sample, in its outputs' order (``with_params``): the
    crop's ``offset`` and each augmentation ``aug`` enables."""
    return ["offset", *aug.enabled]


class GpuNoise:
    """``pipeline.loaders.augment.noise_table()`` on one GPU (``device_id``; None: the current one),
    for a graph whose data is there, with a CUDA stream of its own (``__cuda_stream__``: DALI's
    external source copies its input on it). At the first batch that needs them the table
    (16 MiB) is uploaded and synchronised, once for the life of this object, and never written
    after, so every copy that reads it, on any stream, finds it complete. A sample's noise is a
    view of the table (``windows``), which the graph's GPU external source copies device to
    device on this stream: the copies never wait for work queued on torch's current stream (the
    training step), and torch's views carry no stream for DALI to wait on either (their CUDA
    array interface is version 2)."""

    def __init__(self, device_id: int | None) -> None:
        self.device_id = device_id
        self._table = None
        self._stream = None

    def _ready(self):
        if self._table is None:
            import torch

            device = torch.device("cuda", self.device_id)
            stream = torch.cuda.Stream(device)
            table = torch.tensor(noise_table(), device=device)
            torch.cuda.synchronize(device)
            # torch's allocator keeps the memory until the copies queued here have run, should
            # this object go first
            table.record_stream(stream)
            self._table, self._stream = table, stream
        return self._table, self._stream

    def windows(self, drawn: list[Params], window: int) -> list:
        """Each sample's noise (``pipeline.loaders.augment.noise``) as a view of the table."""
        table, _ = self._ready()
        return [table[p.noise_at : p.noise_at + window] for p in drawn]

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self._ready()[1].cuda_stream


class Draws:
    """The graph's external source of crops and augmentation: for iteration ``k``, what
    ``pipeline.loaders.augment.draw`` gives the ``batch_size`` samples the reader hands out then
    (``order``, the samples of the index files in their order; the reader wraps around at its
    end, and so does this), each from its own generator (``sample_rng(epoch_seed, index)``).
    Outputs (``outputs``), each a batch, only what the graph uses (DALI warns of an output
    left unused, at every pipeline it builds): ``offset`` (int32), each enabled augmentation
    (float32), with ``speed`` the sample's ``lowpass`` taps and with ``snr_db`` its window of
    the noise table, unless ``gpu_noise`` is given: then the windows are views of the table on
    the GPU, from ``gpu_windows``, the source of a GPU external source of their own."""

    def __init__(
        self,
        order: np.ndarray,
        epoch_seed: int,
        aug: Augment,
        m: Manifest,
        split: str,
        B: int,
        gpu_noise: GpuNoise | None = None,
    ) -> None:
        self.order, self.epoch_seed, self.aug, self.B = np.asarray(order), epoch_seed, aug, B
        self.segment_frames, self.frames = m.layout(split).frames, m.frames
        self.window = m.clip_samples
        self.gpu_noise = gpu_noise
        self.outputs = params_of(aug)
        self.outputs += ["lowpass"] if aug.speed else []
        self.outputs += ["noise"] if aug.snr_db and gpu_noise is None else []
        self._last: tuple[int, list[Params]] | None = None

    def params(self, k: int) -> list[Params]:
        """What iteration ``k``'s samples draw (the last iteration's are kept: both external
        sources ask for them)."""
        if self._last is None or self._last[0] != k:
            at = (k * self.B + np.arange(self.B)) % len(self.order)
            drawn = [
                draw(
                    sample_rng(self.epoch_seed, int(i)),
                    self.aug,
                    self.segment_frames,
                    self.frames,
                    self.window,
                )
                for i in self.order[at]
            ]
            self._last = (k, drawn)
        return self._last[1]

    def __call__(self, info) -> tuple:
        drawn = self.params(getattr(info, "iteration", info))
        out = [np.array([p.offset for p in drawn], np.int32)]
        for name in self.aug.enabled:
            out.append(np.array([getattr(p, name) for p in drawn], np.float32))
        if self.aug.speed:
            out.append([lowpass(p.speed) for p in drawn])
        if self.aug.snr_db and self.gpu_noise is None:
            out.append([noise(p, self.window) for p in drawn])
        return tuple(out)

    def gpu_windows(self, info) -> list:
        """Iteration ``k``'s noise windows, views of ``gpu_noise``'s table."""
        return self.gpu_noise.windows(self.params(getattr(info, "iteration", info)), self.window)


def crop_and_augment(audio, arkit, m: Manifest, aug: Augment, to_gpu: bool, drawn: dict):
    """The graph's part of ``pipeline.loaders.augment``: a frame-aligned crop of each train member
    at the drawn ``offset``, after speed and before gain and noise, on the device the data is on.
    ``drawn``: the external source's nodes (``Draws``). Returns the window's audio and arkit;
    ``drawn["offset"]`` becomes int64 for the outputs."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    def on_data(node):  # per-sample values come from the host; the data may be on the GPU
        return node.gpu() if to_gpu else node

    lay = m.layout("train")
    window, frames = m.clip_samples, m.frames
    rate, fps = m.sample_rate, m.fps
    offset = drawn["offset"]
    if aug.speed:
        # pipeline.loaders.augment.speed_audio within SPEED_TOLERANCE: the band above the lower
        # Nyquist removed first (the resampler filters at the source's Nyquist only), then
        # resampled. fn.filter takes images: the audio is a [1, samples] one
        speed = drawn["speed"]
        audio = fn.reshape(audio, shape=[1, -1], layout="HW")
        audio = fn.filter(audio, on_data(drawn["lowpass"]), border="constant")
        audio = fn.reshape(audio, shape=[-1], layout="")
        audio = fn.audio_resample(audio, scale=1.0 / speed, quality=RESAMPLE_QUALITY)
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
        noise = drawn["noise"]  # from the GPU already where the data is there (GpuNoise)
        audio = audio + (noise if noise.device == "gpu" else on_data(noise)) * scale
    drawn["offset"] = fn.cast(offset, dtype=types.INT64)
    return audio, arkit


def write_indexes(refs: list[SampleRef], folder: str | Path) -> tuple[list[str], list[str]]:
    """The reader's files for reading ``refs`` in this order: for each run of consecutive
    samples from one tar, the tar and an index in ``folder`` listing that run (DALI's reader
    takes a tar more than once, and an index's samples in any order)."""
    tars: list[str] = []
    runs: list[list[list[Member]]] = []
    for ref in refs:
        sample = [
            Member(f"{ref.key}.{WAV_EXT}", *ref.wav),
            Member(f"{ref.key}.{NPY_EXT}", *ref.npy),
        ]
        if not tars or tars[-1] != ref.tar:
            tars.append(ref.tar)
            runs.append([])
        runs[-1].append(sample)
    indexes = []
    for k, run in enumerate(runs):
        path = Path(folder) / f"run-{k:06d}.idx"
        path.write_text(index_text(run))
        indexes.append(str(path))
    return tars, indexes
