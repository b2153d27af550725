"""Streaming inference: audio in as it arrives, each frame out as soon as its audio is in.

    stream = Stream(Predictor.from_checkpoint("runs/demo/best.pt", "cpu"))
    for chunk in chunks:                  # any sizes: one sample to minutes
        frames = stream.push(chunk)       # [n, 52]: the frames whose audio has all arrived
    frames = stream.flush()               # the rest: the audio is followed by silence

The frames, whatever the chunking, are the offline ones (``Predictor.predict`` of the whole
audio) to float rounding. Frame k of a sequence model depends on the samples from
``reach.first(k)`` to ``reach.needs(k)`` (``model.reach``: its lookahead is at most
``model.lookahead_seconds``); it comes out of the first ``push`` after which ``needs(k)``
samples have arrived. A ``first_frame`` model's frame k reads ``clip_samples`` from its own
sample, so it comes out ``context_seconds`` after its time.

Each push runs the model once on the audio the new frames depend on, from a sample on the
reach's grid (there the frames fall as they do in the whole file), so a frame's history is
computed again for each chunk: the price of a model that needs no state of its own, in
PyTorch or ONNX Runtime alike (``benchmarks/latency.py`` measures it). A push is small work:
run it on one thread (``torch.set_num_threads(1)``, ``Predictor.from_onnx(path, threads=1)``),
one stream per core.
"""

from __future__ import annotations

import numpy as np
import torch

from core.errors import ConfigError


class Stream:
    """Frames of ``predictor``'s model for audio pushed in pieces (mono, at its sample rate)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.sample_rate, self.fps = predictor.sample_rate, predictor.fps
        self.reach = (
            getattr(predictor.model, "reach", None) if predictor.target == "sequence" else None
        )
        if predictor.target == "sequence" and self.reach is None:
            raise ConfigError("this sequence model does not say which audio its frames read")
        self.samples = 0  # pushed so far
        self.emitted = 0  # frames given out so far
        self._buf = np.zeros(0, np.float32)  # the audio from sample _base on
        self._base = 0
        self._closed = False

    # ------------------------------------------------------------ what a frame reads
    def needs(self, frame: int) -> int:
        """Frame ``frame`` is ready once this many samples have arrived."""
        if self.reach is not None:
            return self.reach.needs(frame)
        return self.predictor.sample(frame) + self.predictor.model.clip_samples

    def _first(self, frame: int) -> int:
        """The first sample of the span a push computes frame ``frame`` from."""
        if self.reach is None:
            return self.predictor.sample(frame)
        grid = self.reach.grid
        return max(0, self.reach.first(frame) // grid * grid)

    @property
    def lookahead_seconds(self) -> float:
        """How long after its own time a frame can come out, at most (before compute)."""
        if self.reach is not None:
            return self.reach.lookahead_seconds
        # a frame's first sample is its time rounded: up to half a sample later
        return (self.predictor.model.clip_samples + 0.5) / self.sample_rate

    def ready(self, samples: int) -> int:
        """The frames whose audio has all arrived once ``samples`` have."""
        k = self.emitted
        while self.needs(k) <= samples:
            k += 1
        return k

    # ------------------------------------------------------------ audio in, frames out
    def push(self, pcm) -> np.ndarray:
        """Take the next piece of audio (1-D: int16 PCM, or float in [-1, 1]); the frames it
        completes, ``[n, num_blendshapes]`` (n may be 0). A piece holding NaN or infinite
        values is refused (a ValueError) and the stream goes on as if it never came."""
        if self._closed:
            raise RuntimeError("this stream was flushed: start a new one")
        chunk = _as_audio(pcm, self.samples)
        self._buf = np.concatenate([self._buf, chunk]) if len(self._buf) else chunk
        self.samples += len(chunk)
        return self._emit(self.ready(self.samples))

    def flush(self) -> np.ndarray:
        """The remaining frames, up to every frame time inside the audio (the offline count),
        the audio followed by silence; the stream takes no more audio after it."""
        if self._closed:
            raise RuntimeError("this stream was flushed already")
        self._closed = True
        total = self.predictor.frames_for(self.samples)
        if self.emitted >= total:
            return self._emit(self.emitted)
        pad = max(0, self.needs(total - 1) - self.samples)
        self._buf = np.concatenate([self._buf, np.zeros(pad, np.float32)])
        return self._emit(total)

    @torch.inference_mode()
    def _emit(self, upto: int) -> np.ndarray:
        first = self.emitted
        if upto <= first:
            return np.zeros((0, self.predictor.model.num_blendshapes), np.float32)
        if self.reach is None:
            out = self._slide(first, upto)
        else:
            out = self._span(first, upto)
        self.emitted = upto
        keep = self._first(upto)  # the audio the next frames start from
        self._buf, self._base = self._buf[keep - self._base :], keep
        return out

    def _span(self, first: int, upto: int) -> np.ndarray:
        start = self._first(first)
        # a hop of silence after the audio: the model gives frames only up to its last mel
        # frame, and these frames do not read past needs(upto - 1) <= the audio's end
        wav = np.concatenate(
            [self._buf[start - self._base :], np.zeros(self.reach.hop, np.float32)]
        )
        offset = start // self.reach.grid * self.reach.period  # the span's first frame
        got = self.predictor._net(torch.from_numpy(wav).to(self.predictor.device)[None])[0]
        if got.shape[0] < upto - offset:
            raise RuntimeError(f"the model gave {got.shape[0]} frames for {len(wav)} samples")
        return got[first - offset : upto - offset].cpu().numpy()

    def _slide(self, first: int, upto: int) -> np.ndarray:
        starts = [self.predictor.sample(k) - self._base for k in range(first, upto)]
        audio = torch.from_numpy(self._buf).to(self.predictor.device)
        return self.predictor._slide(audio, starts).cpu().numpy()


def _as_audio(pcm, at: int) -> np.ndarray:
    """``pcm`` as float32 mono; int16 is scaled by 1 / 32768."""
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise ValueError(f"a stream takes mono audio, 1-D; got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype.kind != "f" and len(a):  # other integers: which scale, 16-bit or 32-bit?
        raise ValueError(f"a stream takes int16 PCM or float audio in [-1, 1]; got {a.dtype}")
    a = a.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(a))
    if len(bad):
        raise ValueError(
            f"a piece of {len(a)} samples holds NaN or infinite values (the first at sample "
            f"{at + int(bad[0])} of the stream); it was not taken and the stream goes on from "
            f"sample {at}"
        )
    return a
