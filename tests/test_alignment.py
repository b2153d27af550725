"""Alignment end to end: every window's animation sits on its sound, or the take is reported.

Each situation is a take built in a temp dir: audio of low noise with 20 ms 1 kHz beeps at
known random instants, and a capture whose jawOpen is a narrow Gaussian bump (height 0.8,
sigma 40 ms) centred on the same instants, written as a Live Link CSV at the capture's real
row times with the timecodes the situation calls for (or as a .npy). make_shards converts the
folder; every window is read back and measured on its own: the beep onsets in its audio
(energy envelope) against the jawOpen peaks in its 30 fps frames (parabolic interpolation,
frame k at k / 30 s). Each take must be aligned within 20 ms with as many peaks as beeps in
every window, or be in rejects.jsonl with a reason naming it.

Run with ``-rA`` to see each situation's worst offset (the ``ALIGNMENT`` lines).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.arkit import INDEX
from pipeline import make_shards
from pipeline.convert.livelink import parse_timecode_fields
from tests.helpers import by_source, csv_text, df_labels, nd_labels, parsed

RATE = 16000  # the shards' audio rate
FPS = 30  # the shards' animation rate
WINDOW = 10.0
TOLERANCE = 0.020  # the promise: within 20 ms
JAW = INDEX["jawopen"]
HEIGHT, SIGMA = 0.8, 0.040  # the jawOpen bump at each event
BEEP_SECONDS, BEEP_HZ, BEEP_AMP = 0.020, 1000.0, 0.5
NOISE = 0.002
NTSC = 1000 / 1001
START = (10, 11, 12, 0)  # the first row's timecode (h, m, s, ff) unless a test says


# ---------------------------------------------------------------- takes


def event_times(seconds: float, seed: int) -> np.ndarray:
    """Random instants 0.5-1.5 s apart, none within 0.3 s of a window edge (a multiple of 10 s:
    windows are cut every 10 s from the start) or of the take's end, so each beep and bump lies
    whole inside one window."""
    rng = np.random.default_rng([seed, 77])
    t, out = 0.4, []
    while t < seconds - 0.5:
        if 0.3 <= t % WINDOW <= WINDOW - 0.3:
            out.append(t)
        t += rng.uniform(0.5, 1.5)
    return np.array(out)


def anim_values(t: np.ndarray, events: np.ndarray) -> np.ndarray:
    """[len(t), 52] in canonical order: column j the constant 0.02 + j / 2000, jawOpen a bump
    of HEIGHT (sigma SIGMA) centred on each event."""
    v = np.tile(0.02 + np.arange(52) / 2000, (len(t), 1))
    jaw = np.zeros(len(t))
    for e in events:
        near = np.abs(t - e) < 8 * SIGMA
        jaw[near] += HEIGHT * np.exp(-0.5 * ((t[near] - e) / SIGMA) ** 2)
    v[:, JAW] = jaw
    return v


def beep_audio(
    seconds: float, events: np.ndarray, seed: int, rate: int = RATE, channels: int = 1
) -> np.ndarray:
    """[n, channels] noise with a beep starting at each event (sample round(e * rate))."""
    rng = np.random.default_rng([seed, 78])
    x = rng.normal(0.0, NOISE, (int(round(seconds * rate)), channels))
    k = np.arange(int(round(BEEP_SECONDS * rate)))
    tone = BEEP_AMP * np.sin(2 * np.pi * BEEP_HZ * k / rate)
    for e in events:
        i = int(round(e * rate))
        x[i : i + len(k)] += tone[: len(x) - i, None]
    return x


# Captures: (real rows per second, labels of rows 0..n-1). Timecode frame numbers count at the
# label's nominal rate; a row's label is its frame since the first row's label, at that rate.
CAPTURES: dict[str, tuple[float, Callable[[int, tuple], list[str]]]] = {
    "60": (60.0, lambda n, st: nd_labels(st, range(n), 60)),
    "30": (30.0, lambda n, st: nd_labels(st, range(n), 30)),
    # a 60 fps capture with 30 fps timecode: rows at frames 12.0, 12.5, 13.0, ...
    "60 as 30": (60.0, lambda n, st: nd_labels(st, np.arange(n) / 2, 30)),
    # 59.94 fps, labelled with 60 fps non-drop timecode: one label per row, 60 labels a second
    "59.94 as 60": (60 * NTSC, lambda n, st: nd_labels(st, range(n), 60)),
    # drop-frame: the labels SMPTE's rule leaves, one per row
    "29.97 df": (30 * NTSC, lambda n, st: df_labels(st, n, 30)),
    "59.94 df": (60 * NTSC, lambda n, st: df_labels(st, n, 60)),
}


@dataclass
class Take:
    name: str  # the audio file's name: what rejects.jsonl and the shards' meta name
    events: np.ndarray  # seconds from the start of the take's audio
    seconds: float
    labels: list[str]  # of the rows written (CSV)
    times: np.ndarray  # real time of each row written, from the first
    values: np.ndarray  # [rows, 52] canonical order, as written (before any scale)


def write_take(
    folder: Path,
    stem: str,
    seconds: float,
    seed: int,
    *,
    capture: str = "60",
    start: tuple = START,
    audio_rate: int = RATE,
    channels: int = 1,
    lead_in: float = 0.0,
    events: np.ndarray | None = None,
    rows: Callable[[np.ndarray], np.ndarray] | None = None,
    edit: Callable[[list[str], np.ndarray], tuple[list[str], np.ndarray]] | None = None,
    values: Callable[[np.ndarray], np.ndarray] | None = None,
    anim: str = "csv",
) -> Take:
    """A take of ``seconds`` seconds: audio (``lead_in`` seconds of extra noise before it: its
    beeps come that much late) and a capture covering it. ``rows`` picks the rows that are
    written (indexes into the regular capture: drops, holes), ``edit`` rewrites labels and
    values after (duplicates, swaps, garbage), ``values`` transforms the values (scales)."""
    folder.mkdir(parents=True, exist_ok=True)
    if events is None:
        events = event_times(seconds, seed)
    audio = beep_audio(seconds + lead_in, events + lead_in, seed, audio_rate, channels)
    sf.write(str(folder / f"{stem}.wav"), audio, audio_rate, subtype="PCM_16")
    rate, label = CAPTURES[capture]
    n = int(math.ceil(seconds * rate))  # the capture covers the audio
    times = np.arange(n) / rate
    v = anim_values(times, events)
    if anim == "npy":
        assert capture == "60" and rows is None and edit is None
        v = v if values is None else values(v)
        np.save(folder / f"{stem}.npy", v.astype(np.float32))
        return Take(f"{stem}.wav", events, seconds, [], times, v)
    labels = label(n, start)
    if rows is not None:
        keep = rows(np.arange(n))
        labels, times, v = [labels[i] for i in keep], times[keep], v[keep]
    if edit is not None:
        labels, v = edit(labels, v)
    v = v if values is None else values(v)
    (folder / f"{stem}.csv").write_text(csv_text(labels, v))
    return Take(f"{stem}.wav", events, seconds, labels, times, v)


# ---------------------------------------------------------------- converting and reading back


def convert(src: Path, out: Path, *flags: str, quiet: bool = True) -> int:
    args = ["--input", str(src), "--out", str(out), "--val-fraction", "0", "--workers", "2"]
    return make_shards.main([*args, *map(str, flags), *(["--quiet"] if quiet else [])])


def with_good_take(src: Path) -> Take:
    """A clean 10.5 s take beside a take that may be rejected, so that the run writes a
    dataset and its rejects.jsonl whatever becomes of the other."""
    return write_take(src, "good", 10.5, 99)


def reject_lines(out: Path) -> list[tuple[str, str]]:
    """(file name, reason) of each line of rejects.jsonl."""
    lines = (out / "rejects.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert all(set(d) == {"file", "reason"} for d in docs)
    return [(Path(d["file"]).name, d["reason"]) for d in docs]


def rejected(out: Path, take: Take) -> str:
    """The one reject line naming ``take``, its reason."""
    reasons = [r for name, r in reject_lines(out) if name == take.name]
    assert len(reasons) == 1, (take.name, reject_lines(out))
    return reasons[0]


def beep_onsets(pcm: np.ndarray) -> np.ndarray:
    """Seconds from the window's start of each beep: where the energy envelope (mean power
    over 1 ms, centred) first crosses half the tone's power; beeps are >= 0.5 s apart."""
    x = pcm.astype(np.float64) / 32768
    env = np.convolve(x * x, np.ones(16) / 16, mode="same")
    above = np.flatnonzero(env > 0.5 * BEEP_AMP**2 / 2)
    if len(above) == 0:
        return np.empty(0)
    return above[np.r_[True, np.diff(above) > 0.1 * RATE]] / RATE


def jaw_peaks(jaw: np.ndarray) -> np.ndarray:
    """Seconds from the window's start of each jawOpen peak: a local maximum above half the
    bump's height, refined by a parabola through it and its neighbours (frame k at k / 30)."""
    v = jaw.astype(np.float64)
    mid = v[1:-1]
    k = np.flatnonzero((mid > HEIGHT / 2) & (mid >= v[:-2]) & (mid > v[2:])) + 1
    y0, y1, y2 = v[k - 1], v[k], v[k + 1]
    den = y0 - 2 * y1 + y2
    delta = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
    return (k + delta) / FPS


def offsets(beeps: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Each beep's offset to its nearest peak (peak minus beep, seconds)."""
    if len(beeps) == 0:
        return np.empty(0)
    d = peaks[None, :] - beeps[:, None]
    return d[np.arange(len(beeps)), np.abs(d).argmin(1)]


@dataclass
class Measured:
    windows: dict[str, list[int]]  # take -> its window numbers
    worst: dict[str, float]  # take -> worst |offset| over its windows, seconds
    samples: dict[str, list[dict]]


def measure(out: Path, takes: list[Take], *, skip: Callable | None = None) -> Measured:
    """Measure every window of ``takes``: its beeps must be the take's events in the window
    (the audio is cut where it should be) and every beep must have a peak and vice versa.
    ``skip(take, t0, beeps)`` may exclude beeps from the count (a bridged hole)."""
    samples = by_source(parsed(out))
    windows, worst = {}, {}
    for take in takes:
        wins = samples.get(take.name, [])
        windows[take.name] = [s["meta"]["window"] for s in wins]
        worst[take.name] = 0.0
        for s in wins:
            w, t0 = s["meta"]["window"], s["meta"]["start_seconds"]
            assert t0 == w * WINDOW  # the stride is the window
            want = take.events[(take.events >= t0) & (take.events < t0 + WINDOW)] - t0
            beeps, peaks = beep_onsets(s["pcm"]), jaw_peaks(s["arkit"][:, JAW])
            assert len(beeps) == len(want), (take.name, w, beeps, want)
            assert np.abs(beeps - want).max(initial=0) < 1e-3, (take.name, w, beeps, want)
            if skip is not None:
                beeps = beeps[~skip(take, t0, beeps)]
            ctx = f"{take.name} window {w}: beeps {np.round(beeps, 3)} peaks {np.round(peaks, 3)}"
            assert len(peaks) == len(beeps), f"events lost or invented: {ctx}"
            if len(beeps):
                worst[take.name] = max(
                    worst[take.name],
                    float(np.abs(offsets(beeps, peaks)).max()),
                    float(np.abs(offsets(peaks, beeps)).max()),
                )
    return Measured(windows, worst, samples)


def assert_aligned(m: Measured, take: Take, situation: str, windows: list[int] | None = None):
    n = int((take.seconds + 1e-9) // WINDOW)
    assert m.windows[take.name] == (list(range(n)) if windows is None else windows)
    worst = m.worst[take.name]
    print(f"ALIGNMENT {situation}: converted, worst offset {1000 * worst:.1f} ms")
    assert worst <= TOLERANCE, f"{situation}: {take.name} off by {1000 * worst:.0f} ms"


def note_rejected(situation: str, reason: str) -> None:
    print(f"ALIGNMENT {situation}: rejected: {reason}")


# ---------------------------------------------------------------- the measuring itself


def test_the_measure_sees_a_shift_of_a_frame():
    """The harness is sharp: the bumps moved 33 ms late measure 33 ms late."""
    events = event_times(10.0, 1)
    pcm = np.round(beep_audio(10.0, events, 1)[:, 0] * 32767).astype(np.int16)
    t = np.arange(300) / FPS
    for shift in (0.0, 1 / 30, -0.012):
        jaw = anim_values(t, events + shift)[:, JAW]
        beeps, peaks = beep_onsets(pcm), jaw_peaks(jaw)
        np.testing.assert_allclose(beeps, events, atol=5e-4)
        assert len(peaks) == len(events)
        np.testing.assert_allclose(offsets(beeps, peaks), shift, atol=2e-3)


# ---------------------------------------------------------------- 1. clean 60 fps


def test_clean_60_fps_16k_mono_and_48k_stereo(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    takes = [
        write_take(src, "clean16k", 24.0, 1),
        write_take(src, "clean48k", 24.0, 2, audio_rate=48000, channels=2),
    ]
    assert convert(src, out, "--strict") == 0
    m = measure(out, takes)
    assert_aligned(m, takes[0], "1 clean 60 fps, 16 kHz mono")
    assert_aligned(m, takes[1], "1 clean 60 fps, 48 kHz stereo")


# ---------------------------------------------------------------- 2. dropped rows


def drop_runs(seed: int, keep_rows: np.ndarray, p: float = 0.04):
    """Rows kept after dropping runs of 1-4 rows at random (about 10%), first and last kept,
    and ``keep_rows`` kept: the row nearest each bump's top. A bump that loses its top rows
    (a run of 4 centred on it leaves a flat line from -42 to +42 ms) has no peak left to time,
    with any resampling: the data lost the event's instant, not the pipeline."""

    def rows(idx: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([seed, 79])
        keep = np.ones(len(idx), bool)
        i = 1
        while i < len(idx) - 5:
            if rng.random() < p:
                run = int(rng.integers(1, 5))
                keep[i : i + run] = False
                i += run
            i += 1
        keep[keep_rows] = True
        return idx[keep]

    return rows


def test_dropped_rows_with_intact_timecodes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    events = event_times(24.0, 3)
    rows = drop_runs(3, np.round(events * 60).astype(int))
    take = write_take(src, "dropped", 24.0, 3, events=events, rows=rows)
    lost = 1 - len(take.times) / math.ceil(24.0 * 60)
    assert 0.08 < lost < 0.12
    assert np.diff(take.times).max() == pytest.approx(5 / 60)  # runs of 4 are there
    assert convert(src, out, "--strict") == 0
    assert_aligned(measure(out, [take]), take, f"2 dropped rows ({100 * lost:.0f}%)")


# ---------------------------------------------------------------- 3. duplicated rows


def test_duplicated_rows_are_dropped_and_reported(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(80)
    where = np.sort(rng.choice(np.arange(1, 1400), 15, replace=False))  # 1% of 1440 rows

    def duplicate(labels, v):
        order = np.sort(np.r_[np.arange(len(labels)), where])  # row i written twice
        return [labels[i] for i in order], v[order]

    take = write_take(src, "dups", 24.0, 4, edit=duplicate)
    assert len(take.labels) == 1440 + 15 and len(set(take.labels)) == 1440
    assert convert(src, out, "--strict", quiet=False) == 0
    assert "15 duplicate timecode rows dropped" in capsys.readouterr().out
    assert_aligned(measure(out, [take]), take, "3 duplicated rows (15 of 1440)")


# ---------------------------------------------------------------- 4. 30 fps timecode


def test_30_fps_capture_read_by_its_timecodes_and_contradicted_by_csv_fps(tmp_path):
    src = tmp_path / "in"
    takes = [
        write_take(src, "cap30", 24.0, 5, capture="30"),
        write_take(src, "cap60", 24.0, 6, capture="60"),
        write_take(src, "cap60tc30", 24.0, 7, capture="60 as 30"),
    ]
    assert max(int(t[9:11]) for t in takes[0].labels) == 29
    assert takes[2].labels[1].endswith(".500")
    # no --csv-fps: each file's rate from its own timecodes, one run
    out = tmp_path / "out"
    assert convert(src, out, "--strict") == 0
    m = measure(out, takes)
    assert_aligned(m, takes[0], "4 30 fps capture, no --csv-fps")
    assert_aligned(m, takes[1], "4 60 fps take beside it")
    assert_aligned(m, takes[2], "4 60 fps capture with 30 fps timecode (.500)")
    # --csv-fps 60 contradicts the 30 fps timecodes: that take is rejected, saying so
    out = tmp_path / "out60"
    assert convert(src, out, "--csv-fps", "60") == 0
    reason = rejected(out, takes[0])
    assert "timecodes count frames 0-29 (30 fps) but --csv-fps is 60" in reason, reason
    note_rejected("4 30 fps capture, --csv-fps 60", reason)
    m = measure(out, takes[1:2])
    assert_aligned(m, takes[1], "4 60 fps take, --csv-fps 60")


# ---------------------------------------------------------------- 5. NTSC rates


def test_59_94_capture_with_60_fps_timecode_needs_csv_fps_59_94(tmp_path):
    src = tmp_path / "in"
    take = write_take(src, "ntsc", 240.2, 8, capture="59.94 as 60")
    with_good_take(src)
    out = tmp_path / "out"
    assert convert(src, out) == 0
    reason = rejected(out, take)
    assert "1000/1001" in reason and "--csv-fps 59.94" in reason, reason
    note_rejected("5 59.94 labelled 60, 4 min, default", reason)
    out = tmp_path / "out5994"
    assert convert(src, out, "--csv-fps", "59.94") == 0
    assert_aligned(measure(out, [take]), take, "5 59.94 labelled 60, 4 min, --csv-fps 59.94")


def test_59_94_capture_with_60_fps_timecode_one_minute(tmp_path):
    """A shorter 59.94 take read at 60 drifts 1 ms a second: 60 ms at the end of a minute.
    Its lengths differ by 0.06 s: it must be rejected (the NTSC ratio is there to see) or read
    right."""
    src, out = tmp_path / "in", tmp_path / "out"
    take = write_take(src, "ntsc60s", 60.2, 9, capture="59.94 as 60")
    with_good_take(src)
    assert convert(src, out) == 0
    names = [name for name, _ in reject_lines(out)]
    if take.name in names:
        note_rejected("5 59.94 labelled 60, 1 min, default", rejected(out, take))
        return
    assert_aligned(measure(out, [take]), take, "5 59.94 labelled 60, 1 min, default")


def test_drop_frame_captures_convert_with_no_flag(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    # from 00:58:30: minute 59 drops labels, minute 0 of hour 1 (a tenth minute) does not
    takes = [
        write_take(src, "df2997", 120.2, 10, capture="29.97 df", start=(0, 58, 30, 0)),
        write_take(src, "df5994", 120.2, 11, capture="59.94 df", start=(0, 58, 30, 0)),
    ]
    for take, nominal, skipped in ((takes[0], 30, "00:59:00;02"), (takes[1], 60, "00:59:00;04")):
        labels = take.labels
        assert f"{skipped}.000" in labels and f"{skipped[:-1]}1.000" not in labels
        assert "01:00:00;00.000" in labels
        # the writer agrees with the reader's drop-frame counting, row for row
        count = [parse_timecode_fields(t).frame_count(nominal) for t in labels]
        np.testing.assert_array_equal(np.diff(count), 1)
    assert convert(src, out, "--strict") == 0
    m = measure(out, takes)
    assert_aligned(m, takes[0], "5 29.97 drop-frame, 2 min, no flag")
    assert_aligned(m, takes[1], "5 59.94 drop-frame, 2 min, no flag")


# ---------------------------------------------------------------- 6. a hole in the rows


def test_hole_in_the_rows_leaves_its_windows_out(tmp_path):
    src = tmp_path / "in"
    a, b = 13.0, 17.0  # no rows in [13, 17): tracking lost for 4 s
    events = event_times(34.0, 12)
    events = events[(np.abs(events - a) > 0.3) & (np.abs(events - b) > 0.3)]
    inside = events[(events > a) & (events < b)]
    assert len(inside) >= 2  # the hole holds events, whose bumps are lost with the rows
    take = write_take(
        src,
        "hole",
        34.0,
        12,
        events=events,
        rows=lambda idx: idx[(idx / 60 < a) | (idx / 60 >= b)],
    )
    before, after = take.times[take.times < a][-1], take.times[take.times >= b][0]

    out = tmp_path / "out"
    assert convert(src, out) == 0
    (reason,) = [r for name, r in reject_lines(out) if name == take.name]
    assert reason.startswith("window 1 (10.00-20.00 s) left out"), reason
    assert f"no rows from {before:.2f} to {after:.2f} s" in reason and "gap" in reason, reason
    note_rejected("6 4 s hole (window 1)", reason)
    m = measure(out, [take])
    # windows 0 and 2 (0-10 s, 20-30 s) convert aligned; none spans the hole, so no window's
    # jawOpen is a straight line drawn across it
    assert_aligned(m, take, "6 4 s hole, the other windows", windows=[0, 2])
    for s in m.samples[take.name]:
        t0 = s["meta"]["start_seconds"]
        assert t0 + WINDOW <= before or t0 >= after

    # --max-gap-seconds 5 asks for holes up to 5 s to be bridged: then the hole IS interpolated,
    # a straight line from the last row before it to the first after (that is what the flag
    # means), and the events inside it have no bump; the rest stays aligned
    out = tmp_path / "bridged"
    assert convert(src, out, "--max-gap-seconds", "5", "--strict") == 0

    def in_hole(take, t0, beeps):
        return (beeps + t0 > before) & (beeps + t0 < after)

    m = measure(out, [take], skip=in_hole)
    assert_aligned(m, take, "6 4 s hole, --max-gap-seconds 5 (bridged)")
    s = m.samples[take.name][1]
    k = np.arange(300)
    line = (k / FPS + 10 > before + 2 / FPS) & (k / FPS + 10 < after - 2 / FPS)
    jaw = s["arkit"][line, JAW].astype(np.float64)
    assert np.abs(np.diff(jaw, 2)).max() < 1e-5  # straight
    assert jaw.max() < 0.05  # the events in the hole are not there


# ---------------------------------------------------------------- 7. scales


def set_cols(cols: dict[str, float], rows=slice(None)) -> Callable[[np.ndarray], np.ndarray]:
    def f(v: np.ndarray) -> np.ndarray:
        v = v.copy()
        for name, value in cols.items():
            v[rows, INDEX[name.lower()]] = value
        return v

    return f


def test_scales_csv_and_npy(tmp_path):
    src = tmp_path / "in"
    seconds = 10.5
    takes = {}
    for kind in ("csv", "npy"):
        kw = {"anim": kind}
        takes[kind, "ref"] = write_take(src, f"{kind}_ref", seconds, 13, **kw)
        takes[kind, "pct"] = write_take(
            src, f"{kind}_pct", seconds, 13, values=lambda v: v * 100, **kw
        )
        hair = set_cols({"eyeBlinkLeft": 1.00002, "browDownLeft": -0.0001})
        takes[kind, "hair"] = write_take(src, f"{kind}_hair", seconds, 13, values=hair, **kw)
        neg = set_cols({"mouthClose": -0.3}, slice(100, 200))
        takes[kind, "neg"] = write_take(src, f"{kind}_neg", seconds, 13, values=neg, **kw)
    out = tmp_path / "out"
    assert convert(src, out) == 0
    m = measure(out, list(takes.values()))
    for kind, flag in (("csv", "--csv-scale"), ("npy", "--npy-scale")):
        assert_aligned(m, takes[kind, "ref"], f"7 {kind} 0-1 scale")
        # 0-100: rejected with the range found and the fix
        pct = takes[kind, "pct"]
        reason = rejected(out, pct)
        lo, hi = pct.values.min(), pct.values.max()
        assert f"blendshape values span [{lo:.4g}, {hi:.4g}]" in reason, reason
        assert "jawOpen reaches" in reason and f"pass {flag} 0.01" in reason, reason
        note_rejected(f"7 {kind} 0-100 scale", reason)
        # a hair outside [0, 1]: float noise, clipped
        hair = takes[kind, "hair"]
        assert_aligned(m, hair, f"7 {kind} values a hair outside [0, 1]")
        (s,) = m.samples[hair.name]
        assert (s["arkit"][:, INDEX["eyeblinkleft"]] == 1).all()
        assert (s["arkit"][:, INDEX["browdownleft"]] == 0).all()
        assert 0 <= s["arkit"].min() and s["arkit"].max() <= 1
        # negative weights: not ARKit weights at all, named
        reason = rejected(out, takes[kind, "neg"])
        assert "mouthClose reaches -0.3" in reason and "negative" in reason, reason
        note_rejected(f"7 {kind} negative weights", reason)
    assert len(reject_lines(out)) == 4

    # the 0-100 takes with the scale flags: converted, equal to the 0-1 takes
    src2, out2 = tmp_path / "in100", tmp_path / "out100"
    src2.mkdir()
    for kind in ("csv", "npy"):
        for ext in ("wav", kind):
            shutil.copy(src / f"{kind}_pct.{ext}", src2)
    assert convert(src2, out2, "--csv-scale", "0.01", "--npy-scale", "0.01", "--strict") == 0
    m2 = measure(out2, [takes["csv", "pct"], takes["npy", "pct"]])
    for kind, flag in (("csv", "--csv-scale"), ("npy", "--npy-scale")):
        pct = takes[kind, "pct"]
        assert_aligned(m2, pct, f"7 {kind} 0-100 scale, {flag} 0.01")
        (got,) = m2.samples[pct.name]
        (ref,) = m.samples[takes[kind, "ref"].name]
        np.testing.assert_allclose(got["arkit"], ref["arkit"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got["pcm"], ref["pcm"])


# ---------------------------------------------------------------- 8. midnight


def test_take_across_midnight(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    take = write_take(src, "midnight", 24.0, 14, start=(23, 59, 50, 0))
    assert take.labels[0] == "23:59:50:00.000" and "00:00:00:00.000" in take.labels
    assert convert(src, out, "--strict") == 0
    assert_aligned(measure(out, [take]), take, "8 midnight, 60 fps")


def test_drop_frame_take_across_midnight(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    take = write_take(src, "dfmidnight", 24.0, 15, capture="29.97 df", start=(23, 59, 50, 0))
    assert "00:00:00;00.000" in take.labels
    with_good_take(src)
    assert convert(src, out) == 0
    names = [name for name, _ in reject_lines(out)]
    assert take.name not in names, rejected(out, take)
    assert_aligned(measure(out, [take]), take, "8 midnight, 29.97 drop-frame")


# ---------------------------------------------------------------- 9. bad rows


def test_rows_out_of_order_and_unparsable_timecodes_reject_naming_the_row(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    good = write_take(src, "good", 10.5, 16)

    def swap(labels, v):
        labels = list(labels)
        labels[300], labels[301] = labels[301], labels[300]  # data rows 301 and 302
        return labels, v

    def garble(labels, v):
        labels = list(labels)
        labels[199] = "12:xx:00:00.000"  # data row 200
        return labels, v

    swapped = write_take(src, "swapped", 10.5, 17, edit=swap)
    garbled = write_take(src, "garbled", 10.5, 18, edit=garble)
    assert convert(src, out) == 0
    reason = rejected(out, swapped)
    assert reason.startswith("data row 302: timecode ") and "out of order" in reason, reason
    assert swapped.labels[300] in reason and swapped.labels[301] in reason
    note_rejected("9 two rows swapped", reason)
    reason = rejected(out, garbled)
    assert "data row 200" in reason and "'12:xx:00:00.000'" in reason, reason
    note_rejected("9 unparsable timecode", reason)
    assert_aligned(measure(out, [good]), good, "9 a good take beside them")


# ---------------------------------------------------------------- 10. lengths


def test_lead_in_of_half_a_second_is_rejected(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    take = write_take(src, "leadin", 60.0, 19, lead_in=0.5)
    good = with_good_take(src)
    assert convert(src, out) == 0
    reason = rejected(out, take)
    assert "audio is 60.500 s but animation is 60.000 s" in reason, reason
    note_rejected("10 0.5 s lead-in, 60 s", reason)
    assert_aligned(measure(out, [good]), good, "10 a good take beside it")


def test_lead_in_under_the_tolerance_is_not_converted_misaligned(tmp_path):
    """80 ms of extra audio before the capture starts: every event is 80 ms late in the audio.
    Only the lengths can tell (they differ by 0.08 s), and the take must not convert 80 ms off,
    against the 20 ms promise."""
    src, out = tmp_path / "in", tmp_path / "out"
    take = write_take(src, "leadin80", 12.0, 20, lead_in=0.08)
    take.events = take.events + 0.08  # where the beeps are in the audio
    with_good_take(src)
    assert convert(src, out) == 0
    if take.name in [name for name, _ in reject_lines(out)]:
        note_rejected("10 80 ms lead-in, 12 s", rejected(out, take))
        return
    m = measure(out, [take])
    assert_aligned(m, take, "10 80 ms lead-in, 12 s")
