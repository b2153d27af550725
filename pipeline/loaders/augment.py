"""Random crops and paired augmentation of training samples: one definition of what is drawn,
used by both loaders (the DALI graph on its operators, the DataLoader's workers in numpy).

A training sample is a member of ``segment_frames`` frames (a window, or a longer segment);
each epoch it yields a window cropped at a whole number of frames ``offset``, drawn uniformly
among the crops that fit, so the alignment rule holds inside every crop: audio starts at sample
``round(offset * rate / fps)``, animation at frame ``offset``. Augmentation, each off unless
given a ``[low, high]`` range (drawn uniformly per sample):

- ``speed``: the segment is played ``speed`` times faster, audio resampled and animation
  resampled along time by the same factor (new frame k is the source at ``k * speed``), so the
  mouth stays on its sound; the crop is taken after, so shapes never change. The audio is
  ``speed_audio``: resampled from ``rate`` to ``rate / speed`` by soxr's VHQ recipe (linear
  phase, sample j is the source at time ``j * speed``), which keeps everything below 0.92 of
  the lower Nyquist, ``min(1, 1 / speed) * rate / 2``, and removes everything above 0.98 of
  it; speed 1 exactly leaves the audio as it is. The DALI graph meets it within
  ``SPEED_TOLERANCE`` (``lowpass``);
- ``gain_db``: the crop's audio times ``10 ** (gain_db / 20)``;
- ``snr_db``: Gaussian noise added to the audio at that signal-to-noise ratio (its standard
  deviation is the crop's RMS over ``10 ** (snr_db / 20)``). The noise is a window of one
  fixed table of ``NOISE_SAMPLES`` standard normal values (``noise_table``) at a position drawn
  per sample, so it is as repeatable as the other draws (a DALI generator's noise depends on
  which batch slot a sample lands in, and could not be resumed without replaying the epoch).

The animation is only ever moved by the crop and by speed. Every value is drawn from the
sample's own generator (``sample_rng``: the epoch's seed and the sample's index in the split),
so a sample's crop and augmentation in an epoch are the same whichever loader, rank, world size
or resumed run reads it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError

NAMES = ("gain_db", "snr_db", "speed")
LIMITS = {"gain_db": (-60.0, 60.0), "snr_db": (-20.0, 120.0), "speed": (0.25, 4.0)}
NOISE_SAMPLES = 1 << 22  # the noise table: 16 MiB of float32, 262 s at 16 kHz
NOISE_SEED = 20261126
# The DALI graph's speed change: ``lowpass`` then fn.audio_resample at RESAMPLE_QUALITY (a
# Hann-windowed sinc at the source's Nyquist with round(0.007 q^2 - 0.09 q + 3) lobes: 23 at 60;
# the default 50 has 16, whose wider transition lets images of the top of the band through
# when slowing down), whose RMS distance to ``speed_audio`` stays within this fraction of the
# audio's RMS (docs/loaders.md has the measurements)
SPEED_TOLERANCE = 0.03
RESAMPLE_QUALITY = 60.0
LOWPASS_CUTOFF = 0.953  # of the lower Nyquist: half amplitude there, as soxr VHQ (~0.95)
LOWPASS_WIDTH = 0.04  # transition band, of the lower Nyquist: 0.933 to 0.973
LOWPASS_ATTENUATION_DB = 60.0


@dataclass(frozen=True)
class Augment:
    """Each augmentation's ``[low, high]`` range, or None (off); each range is checked once,
    here, and held as a tuple of floats."""

    gain_db: tuple[float, float] | None = None
    snr_db: tuple[float, float] | None = None
    speed: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in NAMES:
            value = getattr(self, name)
            if value is None:
                continue
            lo, hi = LIMITS[name]
            ok = isinstance(value, (list, tuple)) and len(value) == 2
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ok = ok and lo <= value[0] <= value[1] <= hi and all(math.isfinite(v) for v in value)
            if not ok:
                raise ConfigError(
                    f"augment.{name} must be [low, high] with {lo:g} <= low <= high <= {hi:g} "
                    f"or null (got {value!r})"
                )
            object.__setattr__(self, name, (float(value[0]), float(value[1])))

    @classmethod
    def from_dict(cls, section: Mapping | object | None) -> Augment:
        """From the config's ``augment:`` section: a mapping (YAML, a checkpoint's config) or
        the config's section object, whose attributes are ``NAMES`` (absent or empty: nothing,
        crops only)."""
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            return cls(**{n: getattr(section, n) for n in NAMES})
        unknown = sorted(set(section) - set(NAMES))
        if unknown:
            raise ConfigError(f"augment has no {', '.join(unknown)}; it has {', '.join(NAMES)}")
        return cls(**section)

    @property
    def enabled(self) -> list[str]:
        return [n for n in NAMES if getattr(self, n) is not None]

    def to_dict(self) -> dict:
        return {n: list(getattr(self, n)) for n in self.enabled}

    def check_fits(self, segment_frames: int, window_frames: int) -> None:
        """A window must fit in every sped-up segment."""
        if self.speed and max_offset(segment_frames, window_frames, self.speed[1], True) < 0:
            most = math.floor(1000 * segment_frames / (window_frames + 1)) / 1000
            raise ConfigError(
                f"augment.speed up to {self.speed[1]:g} needs train segments of at least "
                f"{math.ceil(self.speed[1] * (window_frames + 1))} frames, these hold "
                f"{segment_frames}: lower the speed to at most {most:g} or make the shards "
                "with a longer --segment-seconds"
            )


def max_offset(segment_frames: int, window_frames: int, speed: float, with_speed: bool) -> int:
    """The largest crop offset, in frames of the sped-up segment. With speed on, one frame of
    margin keeps the crop's last audio sample inside the resampled audio, whose length rounds."""
    return int(math.floor(segment_frames / speed)) - window_frames - (1 if with_speed else 0)


def start_sample(offset: int, rate: int, fps: int) -> int:
    """``round(offset * rate / fps)`` in integers, as the DALI graph computes it."""
    return (2 * offset * rate + fps) // (2 * fps)


@dataclass(frozen=True)
class Params:
    """What was drawn for one sample."""

    offset: int
    gain_db: float | None = None
    snr_db: float | None = None
    speed: float | None = None
    noise_at: int | None = None  # with snr_db: where the crop's noise starts in noise_table()


def sample_rng(epoch_seed: int, index: int) -> np.random.Generator:
    """The generator of one sample's draws in one epoch (``index``: its place in the split)."""
    return np.random.default_rng([epoch_seed, index])


@functools.cache
def noise_table() -> np.ndarray:
    """``NOISE_SAMPLES`` standard normal float32 values, the same in every process."""
    table = np.random.default_rng(NOISE_SEED).standard_normal(NOISE_SAMPLES, np.float32)
    table.flags.writeable = False
    return table


def draw(
    rng: np.random.Generator,
    aug: Augment,
    segment_frames: int,
    window_frames: int,
    window_samples: int,
) -> Params:
    """One sample's crop and augmentation (both loaders call this with ``sample_rng``)."""
    values = {}
    for n in aug.enabled:  # lo + (hi - lo) * U[0, 1), as the DALI graph draws
        lo, hi = getattr(aug, n)
        values[n] = lo + (hi - lo) * float(rng.uniform(0.0, 1.0))
    speed = values.get("speed", 1.0)
    top = max_offset(segment_frames, window_frames, speed, aug.speed is not None)
    offset = int(math.floor(rng.uniform(0.0, 1.0) * (top + 1)))
    if aug.snr_db is not None:
        values["noise_at"] = int(rng.integers(0, NOISE_SAMPLES - window_samples + 1))
    return Params(offset, **values)


def noise(p: Params, window_samples: int) -> np.ndarray:
    """The crop's unit noise: a read-only view of the table (``p`` drew ``snr_db``)."""
    return noise_table()[p.noise_at : p.noise_at + window_samples]


def speed_audio(audio: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """The audio of a speed change (the definition both loaders follow): ``audio`` resampled
    from ``rate`` to ``rate / speed`` by soxr's VHQ recipe, float32; speed 1 leaves it as is."""
    if speed == 1.0:
        return audio
    import soxr

    # soxr keeps sample 0 at time 0: new sample j is the source at j * speed
    return soxr.resample(audio, rate, rate / speed, quality="VHQ").astype(np.float32)


def lowpass(speed: float) -> np.ndarray:
    """The DALI graph's band limit before its resampler, float32 taps ``[1, n]`` (a row, for
    ``fn.filter``): a Kaiser-windowed sinc at ``LOWPASS_CUTOFF`` of the lower Nyquist, linear
    phase (odd length, symmetric), unit gain at DC. fn.audio_resample alone filters at the
    source's Nyquist only, so a speed-up would fold the band between the two Nyquists back into
    the audio; these taps remove it, and with them the graph's audio is ``speed_audio``'s within
    ``SPEED_TOLERANCE``. Speed 1: ``[[1]]``, the audio untouched, as soxr leaves it."""
    if speed == 1.0:
        return np.ones((1, 1), np.float32)
    scale = min(1.0, 1.0 / speed)
    a = LOWPASS_ATTENUATION_DB
    beta = 0.1102 * (a - 8.7)  # Kaiser's formulas for a stopband of ``a`` dB (a > 50)
    n = int(math.ceil((a - 8.0) / (2.285 * math.pi * LOWPASS_WIDTH * scale))) | 1
    cutoff = LOWPASS_CUTOFF * scale
    t = np.arange(n) - (n - 1) / 2
    taps = cutoff * np.sinc(cutoff * t) * np.kaiser(n, beta)
    return (taps / taps.sum()).astype(np.float32)[None, :]


def apply(
    audio: np.ndarray,
    arkit: np.ndarray,
    p: Params,
    window_samples: int,
    window_frames: int,
    rate: int,
    fps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A segment's (audio float32, arkit [frames, 52]) to the window ``p`` describes, in numpy
    (the DataLoader workers' side; the DALI graph does the same on its operators)."""
    if p.speed is not None:
        audio = speed_audio(audio, rate, p.speed)
        t = (p.offset + np.arange(window_frames)) * p.speed
        source = np.arange(len(arkit))
        arkit = np.stack([np.interp(t, source, arkit[:, j]) for j in range(arkit.shape[1])], 1)
    else:
        arkit = arkit[p.offset : p.offset + window_frames]
    s0 = start_sample(p.offset, rate, fps)
    audio = audio[s0 : s0 + window_samples]
    if len(audio) != window_samples:
        raise ValueError(f"crop at {s0} leaves {len(audio)} of {window_samples} samples")
    if p.gain_db is not None:
        audio = audio * np.float32(10 ** (p.gain_db / 20))
    if p.snr_db is not None:
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        audio = audio + noise(p, window_samples) * np.float32(rms / 10 ** (p.snr_db / 20))
    return audio.astype(np.float32), np.ascontiguousarray(arkit, np.float32)
