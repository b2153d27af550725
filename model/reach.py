"""Which audio samples each output frame of a sequence model depends on, counted exactly.

Frame k of a ``SequenceModel`` sits at k / fps s. Its value depends on the audio from sample
``first(k)`` up to, but not including, sample ``needs(k)``: the frame-rate convolutions look
``context`` frames to each side, frame j reads the encoder at the mel frame at or after its own
time, the mel-rate encoder looks ``encoder`` mel frames to each side, and mel frame m is the
windowed FFT around sample ``m * hop`` (torch's ``stft``: the window centred in ``n_fft``, its
first value zero). ``model.lookahead_seconds`` bounds the right-hand reaches (``fit``), so a stream
can emit frame k once ``needs(k)`` samples have arrived; a span of audio that starts on the
``grid`` computes the frames it fully contains exactly as the whole file does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from core.errors import ConfigError


@dataclass(frozen=True)
class Reach:
    sample_rate: int
    hop: int  # samples per mel frame
    window_first: int  # mel frame m reads samples m * hop + window_first ...
    window_end: int  # ... to m * hop + window_end (not included)
    fps_num: int  # the frame rate, fps_num / fps_den
    fps_den: int
    encoder_left: tuple[int, ...]  # mel frames each mel-rate convolution looks back
    encoder_right: tuple[int, ...]  # ... and ahead
    context_left: tuple[int, ...]  # frames each frame-rate convolution looks back
    context_right: tuple[int, ...]  # ... and ahead

    @property
    def fps(self) -> float:
        return self.fps_num / self.fps_den

    def _mel_of(self, frame: int, up: bool) -> int:
        """The mel frame at (``up``: at or after, else at or before) frame ``frame``'s time."""
        num, den = frame * self.sample_rate * self.fps_den, self.hop * self.fps_num
        return -((-num) // den) if up else num // den

    def needs(self, frame: int) -> int:
        """Frame ``frame`` depends on the audio before this sample (and on nothing after it)."""
        mel = self._mel_of(frame + sum(self.context_right), up=True) + sum(self.encoder_right)
        return mel * self.hop + self.window_end

    def first(self, frame: int) -> int:
        """The first sample frame ``frame`` depends on (negative: the file's start is in reach)."""
        mel = self._mel_of(frame - sum(self.context_left), up=False) - sum(self.encoder_left)
        return mel * self.hop + self.window_first

    def time(self, frame: int) -> float:
        """Frame ``frame``'s time in samples (not rounded)."""
        return frame * self.sample_rate * self.fps_den / self.fps_num

    @property
    def period(self) -> int:
        """Frames after which the pattern of frame times against mel frames repeats."""
        den = self.hop * self.fps_num
        return den // math.gcd(self.sample_rate * self.fps_den, den)

    @property
    def grid(self) -> int:
        """Samples between the frames that fall exactly on a mel frame's centre: a span of audio
        starting at a multiple of it computes its frames as the whole file does."""
        return round(self.time(self.period))

    @property
    def lookahead_samples(self) -> float:
        """How far past its own time a frame reads, at most (samples)."""
        return max(self.needs(k) - self.time(k) for k in range(self.period))

    @property
    def history_samples(self) -> float:
        """How far before its own time a frame reads, at most (samples)."""
        return max(self.time(k) - self.first(k) for k in range(self.period))

    @property
    def lookahead_seconds(self) -> float:
        return self.lookahead_samples / self.sample_rate

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict) -> Reach:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


def fps_fraction(fps: float) -> tuple[int, int]:
    f = Fraction(fps).limit_denominator(1001)
    return f.numerator, f.denominator


def fit(
    limit_seconds: float | None,
    sample_rate: int,
    hop: int,
    n_fft: int,
    win_length: int,
    fps: float,
    encoder: tuple[int, ...],
    context: tuple[int, ...],
) -> Reach:
    """The reaches of convolutions whose symmetric reaches are ``encoder`` (mel frames) and
    ``context`` (frames): all of them for no limit; else each one's right reach grown in turn,
    encoder first, as far as the lookahead stays within ``limit_seconds``, and what a layer
    does not look ahead it looks back (its kernel's span is the same)."""
    num, den = fps_fraction(fps)
    start = (n_fft - win_length) // 2 - n_fft // 2  # the window's first sample from the centre
    layers = [*encoder, *context]
    right = list(layers) if limit_seconds is None else [0] * len(layers)

    def reach() -> Reach:
        n = len(encoder)
        left = [2 * s - r for s, r in zip(layers, right, strict=True)]
        return Reach(
            sample_rate,
            hop,
            start + 1,  # a periodic Hann window's first value is 0
            start + win_length,
            num,
            den,
            tuple(left[:n]),
            tuple(right[:n]),
            tuple(left[n:]),
            tuple(right[n:]),
        )

    if limit_seconds is None:
        return reach()
    limit = limit_seconds * sample_rate
    if reach().lookahead_samples > limit + 1e-9:
        least = reach().lookahead_seconds
        raise ConfigError(
            f"model.lookahead_seconds {limit_seconds:g} is less than the {least:.4f} s that the "
            f"log-mel window and the frame rate need: choose at least {math.ceil(least * 1000)} ms"
        )
    for i, most in enumerate(layers):
        while right[i] < most:
            right[i] += 1
            if reach().lookahead_samples > limit + 1e-9:
                right[i] -= 1
                break
    return reach()
