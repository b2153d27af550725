"""Writes examples/take.csv: 10.5 s of a made-up Live Link Face capture at 60 fps (630 rows),
laid out as Live Link Face writes it (docs/inputs.md). Speech-like jaw and lip motion at about
four syllables a second, blinks, a drifting brow and head; values rounded to 3 decimals.

    python examples/make_take_csv.py            # rewrites examples/take.csv (deterministic)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.arkit import LIVE_LINK_EXTRA, LIVE_LINK_NAMES  # noqa: E402

FPS, SECONDS, START = 60, 10.5, (14, 23, 5)  # the timecode of the first row: 14:23:05:00


def curves(t: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The blendshapes that move, by Live Link name; every other one stays near 0."""
    syllables = np.clip(np.sin(2 * np.pi * 4.1 * t + rng.uniform(0, 6)), 0, None)
    loud = 0.5 + 0.5 * np.sin(2 * np.pi * 0.31 * t) ** 2  # phrases
    pauses = (np.sin(2 * np.pi * 0.23 * t) > -0.8).astype(float)
    jaw = 0.45 * syllables * loud * pauses
    blink = np.zeros_like(t)
    for at in (1.3, 4.2, 7.6, 9.9):
        blink = np.maximum(blink, np.exp(-(((t - at) / 0.06) ** 2)))
    smile = 0.15 + 0.1 * np.sin(2 * np.pi * 0.12 * t)
    return {
        "JawOpen": jaw,
        "MouthClose": 0.08 * (1 - syllables) * pauses,
        "MouthFunnel": 0.2 * np.clip(np.sin(2 * np.pi * 1.7 * t), 0, None) * pauses,
        "MouthPucker": 0.15 * np.clip(np.sin(2 * np.pi * 1.1 * t + 1), 0, None),
        "MouthLowerDownLeft": 0.6 * jaw,
        "MouthLowerDownRight": 0.6 * jaw,
        "MouthUpperUpLeft": 0.3 * jaw,
        "MouthUpperUpRight": 0.3 * jaw,
        "MouthSmileLeft": smile,
        "MouthSmileRight": smile * 0.9,
        "MouthStretchLeft": 0.1 * syllables,
        "MouthStretchRight": 0.1 * syllables,
        "EyeBlinkLeft": 0.95 * blink,
        "EyeBlinkRight": 0.93 * blink,
        "EyeSquintLeft": 0.1 + 0.3 * smile,
        "EyeSquintRight": 0.1 + 0.3 * smile,
        "BrowInnerUp": 0.2 + 0.1 * np.sin(2 * np.pi * 0.4 * t),
        "BrowDownLeft": 0.05 + 0.03 * np.sin(2 * np.pi * 0.2 * t),
        "BrowDownRight": 0.05 + 0.03 * np.sin(2 * np.pi * 0.2 * t),
        "CheekSquintLeft": 0.5 * smile,
        "CheekSquintRight": 0.5 * smile,
    }


def timecode(row: int) -> str:
    h, m, s = START
    seconds, frame = divmod(row, FPS)
    total = h * 3600 + m * 60 + s + seconds
    return f"{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}:{frame:02d}.000"


def main() -> None:
    rng = np.random.default_rng(27)
    rows = round(SECONDS * FPS)
    t = np.arange(rows) / FPS
    moving = curves(t, rng)
    values = np.zeros((rows, len(LIVE_LINK_NAMES)))
    for j, name in enumerate(LIVE_LINK_NAMES):
        noise = np.abs(rng.normal(0, 0.004, rows))  # capture jitter
        values[:, j] = np.clip(moving.get(name, 0.0) + noise, 0, 1)
    head = 0.05 * np.sin(2 * np.pi * np.outer(t, [0.2, 0.15, 0.1, 0.5, 0.4, 0.1, 0.5, 0.4, 0.1]))
    lines = [",".join(("Timecode", "BlendShapeCount", *LIVE_LINK_NAMES, *LIVE_LINK_EXTRA))]
    for k in range(rows):
        cells = [f"{v:.3f}" for v in (*values[k], *head[k])]
        lines.append(",".join((timecode(k), str(len(cells)), *cells)))
    out = Path(__file__).resolve().parent / "take.csv"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: {rows} rows, {SECONDS:g} s at {FPS} fps")


if __name__ == "__main__":
    main()
