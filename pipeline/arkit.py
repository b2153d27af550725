"""ARKit's 52 blendshapes: names and orders, the Live Link Face CSV reader, fps resampling.

The canonical order is Apple's ``ARFaceAnchor.BlendShapeLocation`` order. Every array this
project writes or reads uses it. Other tools ship the same 52 names in other orders (Live Link
Face's CSV swaps JawLeft/JawRight and MouthLeft/MouthRight; some exporters sort them), so
columns are always mapped by name, never by position.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

ARKIT_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft",
    "eyeLookDownLeft",
    "eyeLookInLeft",
    "eyeLookOutLeft",
    "eyeLookUpLeft",
    "eyeSquintLeft",
    "eyeWideLeft",
    "eyeBlinkRight",
    "eyeLookDownRight",
    "eyeLookInRight",
    "eyeLookOutRight",
    "eyeLookUpRight",
    "eyeSquintRight",
    "eyeWideRight",
    "jawForward",
    "jawLeft",
    "jawRight",
    "jawOpen",
    "mouthClose",
    "mouthFunnel",
    "mouthPucker",
    "mouthLeft",
    "mouthRight",
    "mouthSmileLeft",
    "mouthSmileRight",
    "mouthFrownLeft",
    "mouthFrownRight",
    "mouthDimpleLeft",
    "mouthDimpleRight",
    "mouthStretchLeft",
    "mouthStretchRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthPressLeft",
    "mouthPressRight",
    "mouthLowerDownLeft",
    "mouthLowerDownRight",
    "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "browDownLeft",
    "browDownRight",
    "browInnerUp",
    "browOuterUpLeft",
    "browOuterUpRight",
    "cheekPuff",
    "cheekSquintLeft",
    "cheekSquintRight",
    "noseSneerLeft",
    "noseSneerRight",
    "tongueOut",
)
NUM_BLENDSHAPES = len(ARKIT_NAMES)
INDEX = {name.lower(): i for i, name in enumerate(ARKIT_NAMES)}


def _swap(names: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out = list(names)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


# Live Link Face writes capitalised names and swaps two pairs relative to Apple's order.
LIVE_LINK_NAMES: tuple[str, ...] = tuple(
    n[0].upper() + n[1:]
    for n in _swap(_swap(ARKIT_NAMES, "jawLeft", "jawRight"), "mouthLeft", "mouthRight")
)
LIVE_LINK_EXTRA = (
    "HeadYaw",
    "HeadPitch",
    "HeadRoll",
    "LeftEyeYaw",
    "LeftEyePitch",
    "LeftEyeRoll",
    "RightEyeYaw",
    "RightEyePitch",
    "RightEyeRoll",
)
ALPHABETICAL_NAMES: tuple[str, ...] = tuple(sorted(ARKIT_NAMES, key=str.lower))
ORDERS = {"arkit": ARKIT_NAMES, "livelink": LIVE_LINK_NAMES, "alphabetical": ALPHABETICAL_NAMES}


class AnimationError(ValueError):
    """An animation file that cannot be used; the message says why."""


def canonical_columns(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """For each canonical blendshape, the position of its column in ``names``.

    Matching is by name, case-insensitive (``JawOpen`` == ``jawOpen``). Names that are not
    blendshapes (timecode, head pose) are ignored; a missing blendshape is an error naming it.
    """
    where: dict[str, int] = {}
    for pos, name in enumerate(names):
        key = name.strip().lower()
        if key in INDEX:
            if key in where:
                raise AnimationError(f"column {name!r} appears twice")
            where[key] = pos
    missing = [n for n in ARKIT_NAMES if n.lower() not in where]
    if missing:
        raise AnimationError(
            f"missing {len(missing)} of the 52 ARKit columns: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    return np.array([where[n.lower()] for n in ARKIT_NAMES], dtype=np.int64)


def to_canonical(values: np.ndarray, order: str | tuple[str, ...]) -> np.ndarray:
    """Reorder ``[T, 52]`` columns given in ``order`` (a name in ORDERS or a tuple of names)."""
    names = ORDERS[order] if isinstance(order, str) else order
    return np.ascontiguousarray(values[:, canonical_columns(names)])


def parse_timecode(tc: str, fps: float) -> float:
    """Seconds from a Live Link timecode ``HH:MM:SS:FF.fff`` (FF frames at ``fps``)."""
    h, m, s, f = tc.strip().split(":")
    return int(h) * 3600 + int(m) * 60 + int(s) + float(f) / fps


def read_live_link_csv(path: str | Path, fps: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Read a Live Link Face CSV into ``(times [T] seconds from the first row, values [T, 52])``.

    Values come back in the canonical order. Times follow the timecode column, so dropped
    frames keep their true spacing; if the timecodes are unusable (missing, not increasing),
    rows are taken as evenly spaced at ``fps``.
    """
    text = Path(path).read_text(encoding="utf-8-sig")
    header, _, body = text.partition("\n")
    names = [c.strip() for c in header.split(",")]
    cols = canonical_columns(names)
    if not body.strip():
        raise AnimationError("no data rows")
    try:
        table = np.loadtxt(
            io.StringIO(body), delimiter=",", usecols=cols, dtype=np.float64, ndmin=2
        )
    except ValueError as exc:
        raise AnimationError(f"unreadable value: {exc}") from None
    values = table  # usecols order is canonical already
    if not np.isfinite(values).all():
        row = int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0])
        raise AnimationError(f"NaN or inf in data row {row + 1}")
    times = None
    tc_col = next((i for i, n in enumerate(names) if n.lower() == "timecode"), None)
    if tc_col is not None:
        try:
            tcs = [line.split(",")[tc_col] for line in body.splitlines() if line.strip()]
            t = np.array([parse_timecode(tc, fps) for tc in tcs])
            if len(t) == len(values) and (len(t) < 2 or np.all(np.diff(t) > 0)):
                times = t - t[0]
        except (ValueError, IndexError):
            times = None
    if times is None:
        times = np.arange(len(values)) / fps
    return times, values.astype(np.float32)


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
