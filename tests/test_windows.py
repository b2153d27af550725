"""pipeline.convert.windows: cutting a take into windows; frame k starts at sample
round(k*16000/30)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from core.errors import TakeError
from pipeline.convert.windows import (
    frame_to_sample,
    outside_gaps,
    prepare_take,
    window_pieces,
    window_starts,
)

RATE, FPS = 16000, 30


def cut(*args, stride_seconds=None, **kw):
    """A take's windows as make_shards cuts them (prepare_take, window_pieces, outside_gaps),
    each with its audio and frames (none are left out: these takes have no gaps)."""
    take = prepare_take(*args, **kw)
    pieces = window_pieces(take, kw.get("window_seconds", 10.0), stride_seconds)
    kept, dropped = outside_gaps(take, pieces, "window")
    assert dropped == []
    return [
        SimpleNamespace(
            index=p.index,
            start_frame=p.start_frame,
            start_sample=p.start_sample,
            audio=take.audio[p.start_sample : p.start_sample + p.samples],
            arkit=take.frames[p.start_frame : p.start_frame + p.frames],
        )
        for p in kept
    ]


def exact_start(k: int) -> int:
    """round(k * 16000 / 30) in integers: k * 1600 / 3 is never a tie."""
    return (2 * k * 1600 + 3) // 6


def take(audio_seconds: float, anim_seconds: float, anim_fps: float = 60.0):
    """Audio whose sample i holds i (exact in float32 up to 2**24) and an animation whose
    column j is the ramp (t + j) / 100 at ``anim_fps``."""
    audio = np.arange(int(round(audio_seconds * RATE)), dtype=np.float32)
    times = np.arange(int(round(anim_seconds * anim_fps))) / anim_fps
    values = ((times[:, None] + np.arange(52)) / 100).astype(np.float32)
    return audio, times, values


def test_frame_to_sample_is_round_k_times_16000_over_30():
    assert [frame_to_sample(k, RATE, FPS) for k in range(7)] == [
        0,
        533,
        1067,
        1600,
        2133,
        2667,
        3200,
    ]
    for k in range(0, 100_000, 7):
        assert frame_to_sample(k, RATE, FPS) == exact_start(k)
    assert frame_to_sample(300, RATE, FPS) == 160000


def test_window_starts():
    assert window_starts(900, 300, 300) == [0, 300, 600]
    assert window_starts(899, 300, 300) == [0, 300]
    assert window_starts(299, 300, 300) == []
    assert window_starts(400, 300, 50) == [0, 50, 100]
    with pytest.raises(ValueError):
        window_starts(900, 300, 0)


def check_windows(windows, audio, *, stride_frames: int):
    for w, win in enumerate(windows):
        f0 = w * stride_frames
        assert win.index == w and win.start_frame == f0
        assert win.start_sample == exact_start(f0)
        assert win.audio.shape == (160000,) and win.arkit.shape == (300, 52)
        np.testing.assert_array_equal(
            win.audio, audio[win.start_sample : win.start_sample + 160000]
        )
        assert win.audio[0] == win.start_sample  # sample i holds i
        # frame i of the window is the animation at time (f0 + i) / 30
        t = (f0 + np.arange(300)) / 30
        np.testing.assert_allclose(win.arkit, (t[:, None] + np.arange(52)) / 100, atol=1e-6, rtol=0)


def test_cut_aligned_windows():
    audio, times, values = take(35.0, 35.0)
    windows = cut(audio, RATE, times, values)
    assert len(windows) == 3
    check_windows(windows, audio, stride_frames=300)


@pytest.mark.parametrize(
    "stride, frames, starts",
    [
        (2.5, 75, [0, 40000, 80000, 120000, 160000]),
        (2.0 / 3, 20, [0, 10667, 21333, 32000, 42667, 53333, 64000]),
    ],
)
def test_cut_with_stride(stride, frames, starts):
    seconds = 20.0 if stride == 2.5 else 14.0
    audio, times, values = take(seconds, seconds)
    windows = cut(audio, RATE, times, values, stride_seconds=stride)
    assert [w.start_sample for w in windows] == starts
    check_windows(windows, audio, stride_frames=frames)


def test_cut_trims_to_the_shorter_stream():
    loose = dict(tolerance_seconds=0.5, tolerance_ratio=0.05)
    audio, times, values = take(20.4, 20.0)  # audio 0.4 s longer: within a tolerance of 0.5 s
    assert len(cut(audio, RATE, times, values, **loose)) == 2
    audio, times, values = take(19.7, 20.0)  # animation longer
    windows = cut(audio, RATE, times, values, **loose)
    assert len(windows) == 1
    check_windows(windows, audio, stride_frames=300)
    # with a stride the last window is the last one whose audio and frames both fit
    windows = cut(audio, RATE, times, values, stride_seconds=1.0, **loose)
    assert windows[-1].start_frame == 270  # 9 s + 10 s = 19 s <= 19.7 s < 10 s + 10 s
    assert windows[-1].start_sample + 160000 <= len(audio)


def test_cut_last_window_audio_must_fit():
    # frames say 10 s but the audio is one sample short of 10 s: no window
    audio, times, values = take(10.0, 10.0)
    with pytest.raises(TakeError, match="shorter than one 10 s window"):
        cut(audio[:-1], RATE, times, values)


def test_cut_exactly_one_window_despite_float_noise_in_times():
    # times from HH:MM:SS:FF timecodes carry ~1e-13 s of float error; a take of exactly 10 s
    # (600 rows at 60 fps, 160000 samples) must still give its window
    audio, times, values = take(10.0, 10.0)
    for noisy in (times * (1 - 1e-13), times * (1 + 1e-13), times - 1e-13 * np.arange(600) / 600):
        windows = cut(audio, RATE, noisy, values)
        assert len(windows) == 1 and windows[0].start_sample == 0


def test_cut_tolerance_is_absolute_and_relative_and_errors():
    audio, times, values = take(20.0, 20.6)
    with pytest.raises(TakeError, match=r"audio is 20.000 s but animation is 20.600 s"):
        cut(audio, RATE, times, values)
    assert len(cut(audio, RATE, times, values, tolerance_seconds=0.7, tolerance_ratio=0.05)) == 2
    # the audio may end within the last frame's 1/60 s, or at most 0.02 s away from it ...
    for audio_seconds in (20.02, 19.99, 19.984 - 0.019):
        audio, times, values = take(audio_seconds, 20.0)
        assert len(cut(audio, RATE, times, values)) == 1 + (audio_seconds >= 20), audio_seconds
    audio, times, values = take(20.03, 20.0)
    with pytest.raises(TakeError, match="differ by 0.030 s, more than --tolerance-seconds 0.02"):
        cut(audio, RATE, times, values)
    audio, times, values = take(19.95, 20.0)  # 0.033 s before the last frame starts
    with pytest.raises(TakeError, match="differ by 0.033 s"):
        cut(audio, RATE, times, values)
    # ... and, however large the absolute tolerance, beyond 20 ms at most 0.05 % of the take:
    # a 10-minute take may not drift by 0.5 s
    audio, times, values = take(600.3, 600.0, anim_fps=30)
    assert len(cut(audio, RATE, times, values, tolerance_seconds=1.0)) == 60
    audio, times, values = take(600.5, 600.0, anim_fps=30)
    with pytest.raises(TakeError, match="more than --tolerance-ratio 0.0005 of the take"):
        cut(audio, RATE, times, values, tolerance_seconds=1.0)
    # lengths in NTSC's ratio 1000/1001 say how to read the capture
    audio, times, values = take(240.24, 240.0)
    with pytest.raises(TakeError, match="1000/1001 of the audio.*--csv-fps 59.94"):
        cut(audio, RATE, times, values)
    audio, times, values = take(9.9, 9.9)
    with pytest.raises(TakeError, match="take is 9.90 s, shorter than one 10 s window"):
        cut(audio, RATE, times, values)
    with pytest.raises(TakeError, match="fewer than 2 frames"):
        cut(audio, RATE, times[:1], values[:1])


def test_cut_clips_values_and_other_window_lengths():
    audio, times, values = take(6.0, 6.0)
    values = values * 40 - 1  # from -1 to above 1
    windows = cut(audio, RATE, times, values, window_seconds=2.0)
    assert len(windows) == 3
    for w in windows:
        assert w.audio.shape == (32000,) and w.arkit.shape == (60, 52)
        t = (w.start_frame + np.arange(60)) / 30
        want = np.clip((t[:, None] + np.arange(52)) / 100 * 40 - 1, 0, 1)
        np.testing.assert_allclose(w.arkit, want, atol=1e-5, rtol=0)
    assert windows[0].arkit.min() == 0.0 and windows[0].arkit.max() == 1.0
    assert [w.start_sample for w in windows] == [0, 32000, 64000]


def test_resampling_in_chunks_changes_nothing(monkeypatch):
    from pipeline.convert import windows

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 30, 1790))
    v = rng.random((1790, 52)).astype(np.float32)
    whole = windows.resample_frames(t, v, 30, 899)
    monkeypatch.setattr(windows, "CHUNK_FRAMES", 7)
    np.testing.assert_array_equal(windows.resample_frames(t, v, 30, 899), whole)
