"""Cutting a take into aligned training windows (pure functions, no I/O).

Alignment rule: animation frame k (at ``fps``) starts at audio sample ``round(k * rate / fps)``.
A window that starts at frame f therefore starts at sample ``round(f * rate / fps)``, holds
``window_frames`` frames and ``window_samples`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import TakeError
from pipeline.manifest import FPS


@dataclass(frozen=True)
class Window:
    index: int
    start_frame: int
    start_sample: int
    audio: np.ndarray  # float32 [window_samples]
    arkit: np.ndarray  # float32 [window_frames, 52]


def resample_frames(times: np.ndarray, values: np.ndarray, fps: float, n_out: int) -> np.ndarray:
    """Linearly interpolate ``values`` sampled at ``times`` onto ``n_out`` frames at ``fps``.

    Frame k is at k / fps seconds. This is time-based: 60 -> 30 fps averages neither nor drops
    every other row blindly, and irregular or dropped input frames land where they belong.
    """
    t_out = np.arange(n_out) / fps
    out = np.empty((n_out, values.shape[1]), dtype=np.float32)
    for j in range(values.shape[1]):
        out[:, j] = np.interp(t_out, times, values[:, j])
    return out


def frame_to_sample(frame: int, rate: int, fps: int) -> int:
    return int(round(frame * rate / fps))


def window_starts(total_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """Start frames of every whole window that fits in ``total_frames``."""
    if stride_frames <= 0:
        raise ValueError("stride must be positive")
    return list(range(0, total_frames - window_frames + 1, stride_frames))


def cut_take(
    audio: np.ndarray,
    rate: int,
    times: np.ndarray,
    values: np.ndarray,
    *,
    fps: int = FPS,
    window_seconds: float = 10.0,
    stride_seconds: float | None = None,
    tolerance_seconds: float = 0.5,
) -> list[Window]:
    """Resample animation to ``fps`` by time, trim audio and animation to the shorter one and
    cut aligned windows. Raises TakeError when durations differ by more than the tolerance or
    the take is shorter than one window.
    """
    if len(times) < 2:
        raise TakeError("animation has fewer than 2 frames")
    step = float(np.median(np.diff(times)))
    anim_seconds = float(times[-1]) + step  # the last frame lasts one frame period
    audio_seconds = len(audio) / rate
    if abs(anim_seconds - audio_seconds) > tolerance_seconds:
        raise TakeError(
            f"audio is {audio_seconds:.2f} s but animation is {anim_seconds:.2f} s "
            f"(differ by more than {tolerance_seconds} s)"
        )
    seconds = min(anim_seconds, audio_seconds)
    window_frames = int(round(window_seconds * fps))
    window_samples = int(round(window_seconds * rate))
    stride_frames = int(round((stride_seconds or window_seconds) * fps))
    # the small epsilon absorbs float error in times (timecodes are large numbers of seconds)
    total_frames = int(np.floor(seconds * fps + 1e-6))
    # the last window's audio must fit as well as its frames
    while total_frames >= window_frames and frame_to_sample(
        total_frames - window_frames, rate, fps
    ) + window_samples > len(audio):
        total_frames -= 1
    if total_frames < window_frames:
        raise TakeError(f"take is {seconds:.2f} s, shorter than one {window_seconds:g} s window")
    frames30 = resample_frames(times, values, fps, total_frames)
    out = []
    for w, f0 in enumerate(window_starts(total_frames, window_frames, stride_frames)):
        s0 = frame_to_sample(f0, rate, fps)
        out.append(
            Window(
                index=w,
                start_frame=f0,
                start_sample=s0,
                audio=audio[s0 : s0 + window_samples],
                arkit=np.clip(frames30[f0 : f0 + window_frames], 0.0, 1.0),
            )
        )
    return out
