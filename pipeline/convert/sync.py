"""How far a take's audio runs behind its animation: the lag estimate (pure functions, no I/O).

A take's lag is the time ``L`` by which its sound comes after the mouth that makes it: the
animation frame at ``t`` belongs to the audio at ``t + L`` (positive: the audio is late, as
with extra audio before the capture started; negative: the audio is early). It is measured by
the normalized cross-correlation of two envelopes at ``ENVELOPE_RATE``:

- the audio's loudness: its power over one animation frame around each instant, in dB above
  a floor 50 dB under the take's loudest frame (speech varies by tens of dB, noise by a few);
- the mouth's opening: jawOpen with its companions (lower lip down, upper lip up, funnel),
  read from the 30 fps frames and interpolated to the envelope's rate.

The lag with the highest Pearson correlation within ``+-search`` seconds is refined below a step
by a parabola through it and its neighbours. Its confidence is the peak's height and its
margin over the next peak (the highest other local maximum outside the main lobe). A take with
too little speech, too little mouth motion, too short a span, or a peak that is low or not
clearly above the next one gets no lag ("unknown", with the reason), never a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from core.arkit import INDEX

ENVELOPE_RATE = 200  # Hz: a step of 5 ms, refined below it by a parabola
SEARCH_SECONDS = 0.5  # lags tried either way
MAX_OFFSET_SECONDS = 0.05  # a take this far from the dataset's median lag is out of sync
# what speech explains: sound and jaw lead or lag each other by tens of ms, not hundreds
SPEECH_LAG_SECONDS = 0.15
CHUNK_STEPS = 60 * ENVELOPE_RATE  # envelope steps of audio squared at a time
FLOOR_DB = 50.0  # the loudness envelope's floor under the take's loudest frame
MIN_SECONDS = 2.0  # a shorter overlap cannot tell a lag
MIN_AUDIO_DB = 3.0  # the loudness must vary by at least this (its standard deviation) ...
MIN_MOUTH = 0.01  # ... and the mouth opening by this much, for a lag to be told
MIN_PEAK = 0.4  # the correlation's peak must reach this ...
MIN_MARGIN = 0.1  # ... and stand this far above the next peak
# the mouth's opening: (blendshape, weight)
MOUTH = (
    ("jawOpen", 1.0),
    ("mouthLowerDownLeft", 0.5),
    ("mouthLowerDownRight", 0.5),
    ("mouthUpperUpLeft", 0.25),
    ("mouthUpperUpRight", 0.25),
    ("mouthFunnel", 0.25),
)


@dataclass(frozen=True)
class Lag:
    """A take's measured lag (seconds, audio behind animation) and how sure it is; ``lag`` is
    None when the take cannot tell, with ``unknown`` saying why."""

    lag: float | None
    peak: float = 0.0  # the correlation at the lag
    margin: float = 0.0  # the peak minus the next peak's height
    unknown: str = ""  # why there is no lag

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict) -> Lag:
        return cls(doc["lag"], doc["peak"], doc["margin"], doc["unknown"])


def mouth_opening(frames: np.ndarray) -> np.ndarray:
    """The mouth's opening per frame of ``frames`` ``[T, 52]`` (canonical order)."""
    cols = [INDEX[name.lower()] for name, _ in MOUTH]
    weights = np.array([w for _, w in MOUTH])
    return (np.asarray(frames[:, cols], np.float64) * weights).sum(1) / weights.sum()


def loudness(audio: np.ndarray, rate: int, fps: float, n: int) -> np.ndarray:
    """The audio's power in dB (above a floor ``FLOOR_DB`` under its loudest point) at ``n``
    instants ``(k + 1/2) / ENVELOPE_RATE``, each over about one animation frame (``1 / fps``)
    around it: the mean power of the step, averaged over the steps within half a frame."""
    hop = rate // ENVELOPE_RATE
    power = np.zeros(n)
    for k in range(0, n, CHUNK_STEPS):  # bounded memory on hour-long takes
        x = np.asarray(audio[k * hop : min(k + CHUNK_STEPS, n) * hop], np.float32)
        x = x[: len(x) // hop * hop].reshape(-1, hop)
        power[k : k + len(x)] = np.einsum("ij,ij->i", x, x, dtype=np.float64) / hop
    half = max(0, int(round(ENVELOPE_RATE / fps / 2)))
    c = np.concatenate([[0.0], np.cumsum(power)])
    idx = np.arange(n)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, n)
    power = (c[hi] - c[lo]) / (hi - lo)
    floor = max(float(power.max(initial=0.0)), 1e-20) * 10 ** (-FLOOR_DB / 10)
    return 10 * np.log10(np.maximum(power, floor) / floor)


def correlation(a: np.ndarray, m: np.ndarray, max_lag: int) -> np.ndarray:
    """Pearson correlation of ``a[i + d]`` with ``m[i]`` over their overlap, for each
    ``d`` in ``-max_lag..max_lag`` (equal lengths). The sums of products come from one FFT
    (no BLAS: its threads cost more than the work on a busy machine)."""
    n = len(m)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    circular = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(m, size)), size)
    ca, cm = np.concatenate([[0.0], np.cumsum(a)]), np.concatenate([[0.0], np.cumsum(m)])
    ca2, cm2 = np.concatenate([[0.0], np.cumsum(a * a)]), np.concatenate([[0.0], np.cumsum(m * m)])
    out = np.empty(2 * max_lag + 1)
    for j, d in enumerate(range(-max_lag, max_lag + 1)):
        i0, i1 = max(0, -d), min(n, n - d)  # m[i0:i1] meets a[i0 + d:i1 + d]
        k = i1 - i0
        sa, sm = ca[i1 + d] - ca[i0 + d], cm[i1] - cm[i0]
        va = ca2[i1 + d] - ca2[i0 + d] - sa * sa / k
        vm = cm2[i1] - cm2[i0] - sm * sm / k
        cov = circular[d % size] - sa * sm / k  # sum_i a[i + d] m[i]
        out[j] = cov / np.sqrt(va * vm) if va > 1e-12 and vm > 1e-12 else 0.0
    return out


def estimate_lag(
    audio: np.ndarray,
    rate: int,
    frames: np.ndarray,
    fps: float,
    search_seconds: float = SEARCH_SECONDS,
) -> Lag:
    """The lag of ``audio`` (at ``rate``) behind ``frames`` (``[T, 52]`` at ``fps``, frame k at
    ``k / fps``), searched within ``+-search_seconds``; see the module's docstring."""
    seconds = min(len(audio) / rate, len(frames) / fps)
    if seconds < MIN_SECONDS:
        return Lag(None, unknown=f"too short ({seconds:.2f} s, under {MIN_SECONDS:g} s)")
    n = int(seconds * ENVELOPE_RATE) - 1  # every instant's step lies inside the audio
    mouth = mouth_envelope(frames, fps, n)
    loud = loudness(audio, rate, fps, n)
    if loud.std() < MIN_AUDIO_DB:
        return Lag(None, unknown=f"too little sound ({loud.std():.1f} dB of variation)")
    return best_lag(loud, mouth, search_seconds)


def mouth_envelope(frames: np.ndarray, fps: float, n: int) -> np.ndarray:
    """``mouth_opening`` of ``frames`` at ``fps``, interpolated to the ``n`` instants of
    ``loudness``."""
    t = (np.arange(n) + 0.5) / ENVELOPE_RATE
    return np.interp(t, np.arange(len(frames)) / fps, mouth_opening(frames))


def best_lag(late: np.ndarray, mouth: np.ndarray, search_seconds: float) -> Lag:
    """The lag of ``late`` behind ``mouth`` (both at ``ENVELOPE_RATE``, equal lengths): the
    correlation's peak within ``+-search_seconds``, refined by a parabola, or unknown."""
    if mouth.std() < MIN_MOUTH:
        return Lag(None, unknown=f"too little mouth motion ({mouth.std():.3f})")
    max_lag = min(int(round(search_seconds * ENVELOPE_RATE)), len(mouth) // 2)
    r = correlation(np.asarray(late, np.float64), np.asarray(mouth, np.float64), max_lag)
    best = int(np.argmax(r))
    peak = float(r[best])
    margin = peak - _next_peak(r, best)
    if best in (0, len(r) - 1):
        why = f"peak at the edge of the +-{search_seconds:g} s search"
        return Lag(None, peak, margin, why)
    if peak < MIN_PEAK or margin < MIN_MARGIN:
        why = f"no clear peak (correlation {peak:.2f}, {margin:.2f} above the next)"
        return Lag(None, peak, margin, why)
    y0, y1, y2 = r[best - 1], r[best], r[best + 1]
    den = y0 - 2 * y1 + y2
    delta = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    return Lag(float((best - max_lag + delta) / ENVELOPE_RATE), peak, margin)


def _next_peak(r: np.ndarray, best: int) -> float:
    """The highest local maximum of ``r`` outside the main lobe around ``best`` (where ``r``
    falls from the peak), or the lowest value when there is none (then the margin is the
    peak's own height above the curve's bottom)."""
    lo = best
    while lo > 0 and r[lo - 1] <= r[lo]:
        lo -= 1
    hi = best
    while hi < len(r) - 1 and r[hi + 1] <= r[hi]:
        hi += 1
    rest = np.concatenate([r[:lo], r[hi + 1 :]])
    return float(rest.max()) if len(rest) else float(r.min())
