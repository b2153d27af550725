"""Live Link Face CSVs: ``Timecode,BlendShapeCount,<52 blendshapes>,<9 head/eye rotations>``.

Timecodes are ``HH:MM:SS:FF.fff`` (FF frames at the capture rate, with a sub-frame fraction).
Columns are mapped by name (Live Link swaps JawLeft/JawRight and MouthLeft/MouthRight relative
to Apple's order; ``pipeline.arkit`` maps them), and the file is parsed with the ``csv``
module, so quoted fields, a byte-order mark and CRLF line ends read as they should.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.arkit import canonical_columns
from pipeline.errors import AnimationError

LIVE_LINK_FPS = 60.0  # Live Link Face's usual capture rate


def parse_timecode(tc: str, fps: float) -> float:
    """Seconds from a Live Link timecode ``HH:MM:SS:FF.fff`` (FF frames at ``fps``)."""
    h, m, s, f = tc.strip().split(":")
    return int(h) * 3600 + int(m) * 60 + int(s) + float(f) / fps


def read_rows(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """The header and the non-empty data rows of a CSV, as strings."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise AnimationError("empty file: no header")
    return [c.strip() for c in rows[0]], rows[1:]


def read_live_link_csv(
    path: str | Path, fps: float = LIVE_LINK_FPS
) -> tuple[np.ndarray, np.ndarray]:
    """Read a Live Link Face CSV into ``(times [T] seconds from the first row, values [T, 52])``.

    Values come back in the canonical order. Times follow the timecode column, so dropped
    frames keep their true spacing; if the timecodes are unusable (missing, not increasing),
    rows are taken as evenly spaced at ``fps``.
    """
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
    times = None
    tc_col = next((i for i, n in enumerate(names) if n.lower() == "timecode"), None)
    if tc_col is not None:
        try:
            t = np.array([parse_timecode(row[tc_col], fps) for row in body])
            if len(t) < 2 or np.all(np.diff(t) > 0):
                times = t - t[0]
        except (ValueError, IndexError):
            times = None
    if times is None:
        times = np.arange(len(values)) / fps
    return times, values.astype(np.float32)
