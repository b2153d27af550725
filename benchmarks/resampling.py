"""What the 60 -> 30 fps low-pass of ``pipeline.convert.windows.resample_frames`` does to capture
data, against keeping every other row (plain interpolation at the frame times).

    python benchmarks/resampling.py

Three measurements on 60 fps curves, each resampled to 30 fps both ways:
- capture jitter: white noise frame to frame (tracking noise); the RMS that reaches the targets;
- a 20 Hz wobble (above the 15 Hz a 30 fps target can hold): the amplitude folded back to 10 Hz;
- mouth events: Gaussian bumps of a given width at random sub-frame times, as jawOpen opens
  for a syllable or mouthClose for a bilabial; the peak height kept, and the peak time error.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks.figures import figure
from pipeline.convert.windows import resample_frames

CAPTURE, TARGET = 60, 30


def both(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(len(values)) / CAPTURE
    n = len(values) // 2
    filtered = resample_frames(t, values[:, None], TARGET, n)[:, 0]
    point = np.interp(np.arange(n) / TARGET, t, values)
    return filtered, point


def peak(frames: np.ndarray) -> tuple[float, float]:
    """Height and time (in frames, parabolic) of the largest value."""
    k = int(np.argmax(frames[1:-1])) + 1
    a, b, c = frames[k - 1 : k + 2]
    d = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
    return b - 0.25 * (a - c) * d, k + d


def main() -> int:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 60 * CAPTURE)
    f, p = both(noise)
    print(f"jitter RMS kept: filtered {f[1:].std():.2f}, every other row {p.std():.2f}")
    t = np.arange(60 * CAPTURE) / CAPTURE
    f, p = both(np.sin(2 * np.pi * 20 * t + 0.3))
    print(
        f"20 Hz folded to 10 Hz: filtered {np.abs(f[1:]).max():.2f}, every other row "
        f"{np.abs(p).max():.2f} (of 1)"
    )
    print(
        "bump width (sigma ms) | height kept filtered / every other row | peak time error "
        "filtered / every other row (ms, worst)"
    )
    for sigma_ms in (15, 25, 40, 60, 100):
        kept_f, kept_p, err_f, err_p = [], [], [], []
        for _ in range(200):
            t0 = rng.uniform(1.0, 2.0)
            curve = np.exp(-0.5 * ((t[:200] - t0) / (sigma_ms / 1000)) ** 2)
            f, p = both(curve)
            (hf, tf), (hp, tp) = peak(f), peak(p)
            kept_f.append(hf)
            kept_p.append(hp)
            err_f.append(abs(tf / TARGET - t0))
            err_p.append(abs(tp / TARGET - t0))
        print(
            f"{sigma_ms:>5} | {np.mean(kept_f):.4f} / {np.mean(kept_p):.4f} | "
            f"{figure(1000 * max(err_f), 2)} / {figure(1000 * max(err_p), 2)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
