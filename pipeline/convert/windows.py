"""Cutting a take into aligned training windows (pure functions, no I/O).

Alignment rule: animation frame k (at ``fps``) starts at audio sample ``round(k * rate / fps)``.
A window that starts at frame f therefore starts at sample ``round(f * rate / fps)``, holds
``window_frames`` frames and ``window_samples`` samples.

The animation is resampled to ``fps`` by time (``resample_frames``), trimmed with the audio to
the shorter of the two, and checked: lengths that differ by more than an absolute plus a
relative tolerance reject the take (with a hint when the ratio is NTSC's 1000/1001), and a
window that overlaps a gap in the capture longer than ``max_gap_seconds`` is dropped, never
filled in by interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import TakeError
from pipeline.shards.manifest import FPS


class LengthError(TakeError):
    """Audio and animation of different lengths, beyond the tolerances."""

    def __init__(self, message: str, audio_seconds: float, anim_seconds: float) -> None:
        super().__init__(message)
        self.audio_seconds = audio_seconds
        self.anim_seconds = anim_seconds


NTSC = 1000 / 1001
# The audio may end at most this many seconds away from the capture's last frame. Nothing tells
# where extra time sits, and at the start it shifts every frame, so the default is the
# alignment promise itself (20 ms).
TOLERANCE_SECONDS = 0.02
# However large that tolerance is set, a difference beyond 20 ms may not exceed this share of
# the take: a raised tolerance must not let long takes drift (59.94 fps read as 60 drifts 0.1%).
TOLERANCE_RATIO = 0.0005
ALIGNMENT_SECONDS = 0.02  # what the project promises: animation within 20 ms of its sound
MAX_GAP_SECONDS = 0.1  # a longer hole between capture rows is not bridged
CHUNK_FRAMES = 8192  # output frames resampled at a time


def resample_frames(times: np.ndarray, values: np.ndarray, fps: float, n_out: int) -> np.ndarray:
    """``values`` sampled at ``times`` (seconds, increasing) onto ``n_out`` frames at ``fps``.

    Frame k is at k / fps seconds, and takes a weighted straight-line fit of the input rows
    within one output frame period of it (a triangle of weights, as image scalers filter
    before they shrink). That is the anti-aliasing low-pass of down-sampling: 60 -> 30 fps
    weighs rows (2k-1, 2k, 2k+1) by (1/4, 1/2, 1/4) instead of keeping row 2k and folding
    frame-to-frame capture jitter into the result. A straight line is kept exactly, at the
    ends too, irregular or dropped rows weigh by their true times, and where fewer than two
    rows lie that close (up-sampling, 30 -> 30 fps, a short gap) it is linear interpolation.
    """
    times = np.asarray(times, np.float64)
    values = np.asarray(values, np.float64)
    out = np.empty((n_out, values.shape[1]), np.float32)
    for k in range(0, n_out, CHUNK_FRAMES):  # bounded memory on hour-long takes
        t_out = np.arange(k, min(k + CHUNK_FRAMES, n_out)) / fps
        out[k : k + len(t_out)] = _fit(times, values, t_out, 1.0 / fps)
    return out


def _fit(times: np.ndarray, values: np.ndarray, t_out: np.ndarray, half: float) -> np.ndarray:
    """``resample_frames`` at the times ``t_out``, within ``half`` seconds of each."""
    out = np.empty((len(t_out), values.shape[1]), np.float64)
    for j in range(values.shape[1]):
        out[:, j] = np.interp(t_out, times, values[:, j])
    lo = np.searchsorted(times, t_out - half, side="right")
    hi = np.searchsorted(times, t_out + half, side="left")
    width = int((hi - lo).max(initial=0))
    if width >= 2:
        idx = lo[:, None] + np.arange(width)[None, :]  # [n_out, width]
        inside = idx < hi[:, None]
        idx = np.minimum(idx, len(times) - 1)
        d = times[idx] - t_out[:, None]
        w = np.where(inside, 1.0 - np.abs(d) / half, 0.0)
        sw = w.sum(1)
        mean_d = (w * d).sum(1) / np.maximum(sw, 1e-300)
        var_d = (w * (d - mean_d[:, None]) ** 2).sum(1) / np.maximum(sw, 1e-300)
        fit = (inside.sum(1) >= 2) & (var_d > 1e-18)
        rows = np.nonzero(fit)[0]
        if len(rows):
            v = values[idx[rows]]  # [n, width, 52]
            wr = w[rows][:, :, None]
            mean_v = (wr * v).sum(1) / sw[rows][:, None]
            dr = (d[rows] - mean_d[rows][:, None])[:, :, None]
            slope = (wr * dr * (v - mean_v[:, None, :])).sum(1) / (sw[rows] * var_d[rows])[:, None]
            out[rows] = mean_v - slope * mean_d[rows][:, None]  # the line's value at d = 0
    return out


def frame_to_sample(frame: int, rate: int, fps: int) -> int:
    return int(round(frame * rate / fps))


def window_starts(total_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """Start frames of every whole window that fits in ``total_frames``."""
    if stride_frames <= 0:
        raise ValueError("stride must be positive")
    return list(range(0, total_frames - window_frames + 1, stride_frames))


def check_lengths(
    audio_seconds: float,
    anim_seconds: float,
    tolerance_seconds: float,
    tolerance_ratio: float,
    frame_seconds: float = 0.0,
) -> None:
    """Refuse a take whose streams differ in length by more than the tolerances: one of them
    holds time the other does not, and nothing says where. The capture's last row lasts up to
    one frame (``frame_seconds``), so the audio may end anywhere in it."""
    last = anim_seconds - frame_seconds
    diff = max(0.0, last - audio_seconds, audio_seconds - anim_seconds)
    longest = max(anim_seconds, audio_seconds)
    if diff > tolerance_seconds:
        why = f"more than --tolerance-seconds {tolerance_seconds:g}"
    elif diff > ALIGNMENT_SECONDS and diff > tolerance_ratio * longest:
        why = f"more than --tolerance-ratio {tolerance_ratio:g} of the take"
    else:
        return
    msg = (
        f"audio is {audio_seconds:.3f} s but animation is {anim_seconds:.3f} s (they differ by "
        f"{diff:.3f} s, {why}; extra time at the start would shift every frame)"
    )
    ratio = anim_seconds / audio_seconds
    near = frame_seconds / longest + 1e-4
    if longest * (1 - NTSC) < 2 * frame_seconds:
        pass  # too short for 1000/1001 to show beyond a frame or two
    elif abs(ratio - NTSC) <= near:
        msg += (
            ": the animation is 1000/1001 of the audio, as a 59.94 or 29.97 fps capture read "
            "at 60 or 30 fps is; pass --csv-fps 59.94 (or 29.97)"
        )
    elif abs(ratio - 1 / NTSC) <= near:
        msg += (
            ": the animation is 1001/1000 of the audio, as a 60 or 30 fps capture read at "
            "59.94 or 29.97 fps is; check --csv-fps"
        )
    raise LengthError(msg, audio_seconds, anim_seconds)


def gaps(times: np.ndarray, max_gap_seconds: float) -> list[tuple[float, float]]:
    """(last row before, first row after) of every hole longer than ``max_gap_seconds``."""
    where = np.nonzero(np.diff(times) > max_gap_seconds)[0]
    return [(float(times[i]), float(times[i + 1])) for i in where]


@dataclass(frozen=True)
class PreparedTake:
    """A take checked and on the shards' clocks, before it is cut: the audio (16 kHz float32)
    and ``total_frames`` frames at ``fps`` (the animation resampled by time, in [0, 1]), trimmed
    to the shorter stream; the capture's gaps, which no piece may overlap."""

    audio: np.ndarray
    frames: np.ndarray  # float32 [total_frames, 52]
    rate: int
    fps: int
    gaps: list[tuple[float, float]]
    max_gap_seconds: float

    @property
    def total_frames(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class Piece:
    """Where a window or segment lies in its take: frames ``[start_frame, +frames)`` and
    samples ``[start_sample, +samples)``, ``start_sample = round(start_frame * rate / fps)``."""

    index: int
    start_frame: int
    frames: int
    start_sample: int
    samples: int


def prepare_take(
    audio: np.ndarray,
    rate: int,
    times: np.ndarray,
    values: np.ndarray,
    *,
    fps: int = FPS,
    window_seconds: float = 10.0,
    tolerance_seconds: float = TOLERANCE_SECONDS,
    tolerance_ratio: float = TOLERANCE_RATIO,
    max_gap_seconds: float = MAX_GAP_SECONDS,
    whole: bool = False,
) -> PreparedTake:
    """Check the lengths, resample the animation to ``fps`` by time and trim both streams to the
    shorter one. Raises TakeError when the lengths differ by more than the tolerances or the
    take is shorter than one window. ``whole``: no check, nothing trimmed (every frame of the
    animation is kept, for ``retime`` to cut once the lag is known)."""
    if len(times) < 2:
        raise TakeError("animation has fewer than 2 frames")
    step = float(np.median(np.diff(times)))
    anim_seconds = float(times[-1]) + step  # the last frame lasts one frame period
    audio_seconds = len(audio) / rate
    if whole:
        frames = resample_frames(times, values, fps, int(np.floor(anim_seconds * fps + 1e-6)))
        gaps_ = gaps(times, max_gap_seconds)
        return PreparedTake(audio, np.clip(frames, 0.0, 1.0), rate, fps, gaps_, max_gap_seconds)
    check_lengths(audio_seconds, anim_seconds, tolerance_seconds, tolerance_ratio, step)
    seconds = min(anim_seconds, audio_seconds)
    window_frames = int(round(window_seconds * fps))
    window_samples = int(round(window_seconds * rate))
    # the small epsilon absorbs float error in times (timecodes are large numbers of seconds)
    total_frames = int(np.floor(seconds * fps + 1e-6))
    # the last window's audio must fit as well as its frames
    while total_frames >= window_frames and frame_to_sample(
        total_frames - window_frames, rate, fps
    ) + window_samples > len(audio):
        total_frames -= 1
    if total_frames < window_frames:
        raise TakeError(f"take is {seconds:.2f} s, shorter than one {window_seconds:g} s window")
    frames = np.clip(resample_frames(times, values, fps, total_frames), 0.0, 1.0)
    return PreparedTake(audio, frames, rate, fps, gaps(times, max_gap_seconds), max_gap_seconds)


def retime(take: PreparedTake, shift_seconds: float) -> PreparedTake:
    """``take`` with its audio moved ``shift_seconds`` earlier against its frames (positive: the
    audio ran late), both streams cut to their overlap. The cut falls on whole frames and whole
    samples: ``k`` frames and ``s`` samples dropped at the start, with ``s / rate = shift + k /
    fps``, so frame k' of the result sits on sample ``round(k' * rate / fps)`` as before."""
    k = max(0, int(np.ceil(-shift_seconds * take.fps - 1e-9)))
    s = int(round((shift_seconds + k / take.fps) * take.rate))
    audio = take.audio[s:]
    n = min(len(take.frames) - k, int(np.floor(len(audio) / take.rate * take.fps + 1e-6)))
    frames = take.frames[k : k + max(n, 0)]
    moved = [(a - k / take.fps, b - k / take.fps) for a, b in take.gaps]
    return PreparedTake(audio, frames, take.rate, take.fps, moved, take.max_gap_seconds)


def window_pieces(take: PreparedTake, seconds: float, stride_seconds: float | None) -> list[Piece]:
    """Windows of ``seconds`` every ``stride_seconds`` (default: back to back)."""
    frames = int(round(seconds * take.fps))
    stride = int(round((stride_seconds or seconds) * take.fps))
    starts = window_starts(take.total_frames, frames, stride)
    return _pieces(take, starts, frames, int(round(seconds * take.rate)))


def segment_pieces(take: PreparedTake, seconds: float, window_seconds: float) -> list[Piece]:
    """Segments of ``seconds`` that overlap by one window, the last one ending with the take, so
    that every window-long stretch of the take lies inside some segment: a random crop of the
    segments can reach every frame."""
    frames = int(round(seconds * take.fps))
    samples = int(round(seconds * take.rate))
    step = frames - int(round(window_seconds * take.fps))
    if step < 1:
        raise ValueError("a segment must be longer than a window")
    starts = list(range(0, take.total_frames - frames + 1, step))
    if starts and starts[-1] + frames < take.total_frames:
        last = take.total_frames - frames
        while frame_to_sample(last, take.rate, take.fps) + samples > len(take.audio):
            last -= 1
        starts.append(last)
    return _pieces(take, starts, frames, samples)


def _pieces(take: PreparedTake, starts: list[int], frames: int, samples: int) -> list[Piece]:
    out = []
    for i, f0 in enumerate(starts):
        s0 = frame_to_sample(f0, take.rate, take.fps)
        if s0 + samples <= len(take.audio):
            out.append(Piece(i, f0, frames, s0, samples))
    return out


def outside_gaps(
    take: PreparedTake, pieces: list[Piece], kind: str
) -> tuple[list[Piece], list[str]]:
    """The pieces that overlap no gap of the capture, and a reason for each one left out."""
    kept, dropped = [], []
    for p in pieces:
        t0, t1 = p.start_frame / take.fps, (p.start_frame + p.frames) / take.fps
        hole = next(((a, b) for a, b in take.gaps if a < t1 and b > t0), None)
        if hole is None:
            kept.append(p)
            continue
        a, b = hole
        dropped.append(
            f"{kind} {p.index} ({t0:.2f}-{t1:.2f} s) left out: the capture has no rows from "
            f"{a:.2f} to {b:.2f} s (a {b - a:.2f} s gap, tracking lost?), longer than "
            f"--max-gap-seconds {take.max_gap_seconds:g}"
        )
    return kept, dropped
