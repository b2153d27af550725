"""Live Link Face CSVs: ``Timecode,BlendShapeCount,<52 blendshapes>,<9 head/eye rotations>``.

Timecodes are ``HH:MM:SS:FF.fff``: FF counts frames within the second at the capture's nominal
rate, ``.fff`` is a fraction of a frame. They are trusted and checked:

- the timecode's rate is read from the file itself (the highest frame number within a whole
  second), so a folder that mixes 30 and 60 fps takes converts right in one run;
  ``fps`` (``--csv-fps``) overrides it, and a file whose timecodes contradict it is rejected;
- 59.94 and 29.97 fps captures: ``fps=59.94`` reads non-drop timecode as frames at 60000/1001
  per second; drop-frame timecode (``;`` before the frames) is always read as drop-frame;
- a row repeating the previous row's timecode is dropped (counted); a row whose timecode goes
  back, or cannot be parsed, rejects the file naming the row; a wrap past midnight is handled.

The file is parsed with the ``csv`` module (quoted fields, a byte-order mark and CRLF read as
they should) and columns are mapped by name (``core.arkit``), so Live Link's swapped
JawLeft/JawRight and MouthLeft/MouthRight land right.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.arkit import INDEX, LIVE_LINK_EXTRA, LIVE_LINK_NAMES, canonical_columns
from core.errors import AnimationError

LIVE_LINK_FPS = 60.0  # Live Link Face's usual rate; the rate of a file without timecodes
NOMINAL_RATES = (24, 25, 30, 48, 50, 60)  # what the frame field of a timecode can count to
NTSC = 1000 / 1001  # 59.94 = 60 * NTSC, 29.97 = 30 * NTSC
# for each Live Link column in its order, that blendshape's position in the canonical order
_LIVE_LINK_FROM_CANONICAL = np.array([INDEX[n.lower()] for n in LIVE_LINK_NAMES])
_TIMECODE = re.compile(r"^\s*(\d{1,2}):(\d{2}):(\d{2})([:;.,])(\d{1,3})(?:\.(\d+))?\s*$")


@dataclass(frozen=True)
class Timecode:
    hours: int
    minutes: int
    seconds: int
    frames: int
    fraction: float  # of a frame
    drop_frame: bool

    def frame_count(self, nominal: int) -> float:
        """Frames since midnight at ``nominal`` frames per timecode second; drop-frame timecode
        skips frame numbers 0 and 1 (0-3 at 60) of every minute but each tenth."""
        count = (self.hours * 3600 + self.minutes * 60 + self.seconds) * nominal + self.frames
        if self.drop_frame:
            minutes = 60 * self.hours + self.minutes
            count -= (nominal // 15) * (minutes - minutes // 10)
        return count + self.fraction


def parse_timecode_fields(text: str) -> Timecode:
    match = _TIMECODE.match(text)
    if match is None:
        raise ValueError(f"timecode {text.strip()!r} is not HH:MM:SS:FF(.fff)")
    h, m, s, sep, f, frac = match.groups()
    if int(m) > 59 or int(s) > 59 or int(h) > 23:
        raise ValueError(f"timecode {text.strip()!r} is out of range")
    return Timecode(
        int(h), int(m), int(s), int(f), float(f"0.{frac}") if frac else 0.0, sep in ";,"
    )


def parse_timecode(tc: str, fps: float) -> float:
    """Seconds since midnight of a timecode at the capture rate ``fps`` (e.g. 60 or 59.94)."""
    nominal = round(fps)
    return parse_timecode_fields(tc).frame_count(nominal) / fps


@dataclass(frozen=True)
class Animation:
    """A capture read from a file: frame times and values, and what the reading found."""

    times: np.ndarray  # seconds from the first row
    values: np.ndarray  # float32 [T, 52], canonical order, as in the file (not clipped)
    fps: float  # the capture rate the times were computed with
    duplicates: int = 0  # rows dropped for repeating the previous timecode
    note: str = ""  # how the rate was found


def read_rows(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """The header and the non-empty data rows of a CSV, as strings."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise AnimationError("empty file: no header")
    return [c.strip() for c in rows[0]], rows[1:]


def nominal_rate(codes: list[Timecode]) -> tuple[int | None, bool]:
    """The rate the timecodes' frame field counts at: the smallest standard rate above the
    highest frame number (None if none fits); and whether that is certain, which it is when
    the file holds a whole timecode second (a shorter file may never show its top frame
    numbers). The rows themselves may come faster than the timecode counts: a 60 fps capture
    with 30 fps timecode has rows at frames 12.0, 12.5, ... (``.fff`` is a fraction of a
    frame), and its times are right all the same."""
    top = max(c.frames for c in codes) + 1
    seconds = {(c.hours, c.minutes, c.seconds) for c in codes}
    return next((r for r in NOMINAL_RATES if r >= top), None), len(seconds) >= 3


def _capture_rate(codes: list[Timecode], fps: float | None) -> tuple[float, str]:
    """The rate the frame numbers are counted at, from the file and ``fps`` (None: auto)."""
    found, certain = nominal_rate(codes)
    drop = any(c.drop_frame for c in codes)
    top = max(c.frames for c in codes)
    if found is None:
        raise AnimationError(f"timecode frame numbers reach {top}: no standard frame rate")
    if fps is None:
        if drop:
            nominal = 30 if found <= 30 else 60
            return nominal * NTSC, f"drop-frame timecode: {nominal * NTSC:.2f} fps"
        if not certain:  # under two seconds: Live Link's usual rate unless the file says more
            found = max(found, int(LIVE_LINK_FPS))
            return float(found), f"a short take: {found} fps assumed"
        return float(found), f"timecodes count {found} frames per second"
    nominal = round(fps)
    if nominal not in NOMINAL_RATES or not math.isclose(fps, nominal, rel_tol=0.002):
        raise AnimationError(f"--csv-fps {fps:g} is not a frame rate Live Link writes")
    if found > nominal or (certain and found != nominal):
        raise AnimationError(
            f"timecodes count frames 0-{top} ({found} fps) but --csv-fps is {fps:g}: drop "
            "--csv-fps to read each file's rate from its timecodes"
        )
    if drop and fps == nominal:
        return nominal * NTSC, f"drop-frame timecode: {nominal * NTSC:.2f} fps"
    if abs(fps - nominal * NTSC) < 0.01:  # 59.94 and 29.97 name 60000/1001 and 30000/1001
        return nominal * NTSC, f"--csv-fps {fps:g}: {nominal}000/1001 fps"
    return fps, f"--csv-fps {fps:g}"


def timecode_times(
    texts: list[str], fps: float | None
) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Seconds from the first row for each kept row, the kept rows' indexes, the capture rate
    and how it was found. Rows repeating the previous timecode are not kept."""
    codes = []
    for r, text in enumerate(texts):
        try:
            codes.append(parse_timecode_fields(text))
        except ValueError as exc:
            raise AnimationError(f"data row {r + 1}: {exc}") from None
    rate, note = _capture_rate(codes, fps)
    nominal = round(rate)
    counts = np.array([c.frame_count(nominal) for c in codes])
    steps = np.diff(counts)
    # a step back by most of a day is midnight passing, not a row out of order (a drop-frame
    # day holds fewer frame numbers than a non-drop one)
    day = Timecode(24, 0, 0, 0, 0.0, any(c.drop_frame for c in codes)).frame_count(nominal)
    wraps = steps < -day / 2
    counts[1:] += np.cumsum(wraps) * day
    steps = np.diff(counts)
    back = np.nonzero(steps < 0)[0]
    if len(back):
        r = int(back[0]) + 1
        raise AnimationError(
            f"data row {r + 1}: timecode {texts[r].strip()} comes before the previous row's "
            f"{texts[r - 1].strip()} (rows out of order)"
        )
    keep = np.concatenate([[True], steps > 0])
    counts = counts[keep]
    return (counts - counts[0]) / rate, np.nonzero(keep)[0], rate, note


def read_live_link_csv(path: str | Path, fps: float | None = None) -> Animation:
    """Read a Live Link Face CSV: times from its timecodes (checked as the module says),
    values in the canonical order. ``fps`` None reads the rate from the timecodes."""
    names, body = read_rows(path)
    cols = canonical_columns(names)
    if not body:
        raise AnimationError("no data rows")
    width = max(cols) + 1
    for r, row in enumerate(body):
        if len(row) < width:
            raise AnimationError(f"data row {r + 1} has {len(row)} fields, the header {len(names)}")
    try:
        values = np.array([[row[c] for c in cols] for row in body], dtype=np.float64)
    except ValueError as exc:
        raise AnimationError(f"unreadable value: {exc}") from None
    if not np.isfinite(values).all():
        row = int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0])
        raise AnimationError(f"NaN or inf in data row {row + 1}")
    tc_col = next((i for i, n in enumerate(names) if n.lower() == "timecode"), None)
    if tc_col is None:
        rate = fps or LIVE_LINK_FPS
        times = np.arange(len(values)) / rate
        return Animation(times, values.astype(np.float32), rate, 0, f"no timecodes: {rate:g} fps")
    times, kept, rate, note = timecode_times([row[tc_col] for row in body], fps)
    return Animation(times, values[kept].astype(np.float32), rate, len(values) - len(kept), note)


def format_timecode(frame: int, fps: int) -> str:
    """Live Link's ``HH:MM:SS:FF.fff`` for a frame counted from midnight at a whole ``fps``
    (non-drop: FF counts 0 .. fps - 1; .fff, a fraction of a frame, is 0 for a frame start)."""
    seconds, ff = divmod(int(frame), fps)
    minutes, ss = divmod(seconds, 60)
    hours, mm = divmod(minutes, 60)
    return f"{hours % 24:02d}:{mm:02d}:{ss:02d}:{ff:02d}.000"


def write_live_link_csv(
    path: str | Path, values: np.ndarray, fps: int = int(LIVE_LINK_FPS), decimals: int = 6
) -> None:
    """Write ``values`` (``[T, 52]``, canonical order, in [0, 1]) as Live Link Face does: its
    header (``Timecode``, ``BlendShapeCount``, the 52 names in its own order, the 9 head and eye
    rotations, written as zeros) and one row per frame at ``fps`` from 00:00:00:00. Written to
    a hidden tmp file beside ``path`` and renamed into place; the tmp is removed on failure."""
    if fps not in NOMINAL_RATES:
        raise ValueError(f"fps {fps} is not a rate Live Link timecode counts at {NOMINAL_RATES}")
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != len(LIVE_LINK_NAMES):
        raise ValueError(f"values must be [T, {len(LIVE_LINK_NAMES)}], not {values.shape}")
    ordered = np.clip(values[:, _LIVE_LINK_FROM_CANONICAL], 0.0, 1.0)
    count = len(LIVE_LINK_NAMES) + len(LIVE_LINK_EXTRA)
    zeros = ",".join(["0"] * len(LIVE_LINK_EXTRA))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # whole or not at all: a full disk or an interrupt leaves neither tmp nor half a file
        with open(tmp, "w", newline="") as f:
            f.write(",".join(("Timecode", "BlendShapeCount", *LIVE_LINK_NAMES, *LIVE_LINK_EXTRA)))
            f.write("\n")
            for k, row in enumerate(ordered):
                cells = ",".join(f"{v:.{decimals}f}" for v in row)
                f.write(f"{format_timecode(k, fps)},{count},{cells},{zeros}\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
