"""The per-take lags as a histogram, in SVG written by hand: no plotting library, and the same
bytes for the same lags (make_shards writes it beside the dataset as ``sync.svg``)."""

from __future__ import annotations

import math
from html import escape

W, H = 640, 300  # the picture, px
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 48, 48  # margins around the axes, px
BIN_MS = 10.0


def lag_histogram(
    lags: list[float],
    reference: float,
    max_offset: float,
    title: str,
    unknown: int = 0,
) -> str:
    """An SVG histogram of ``lags`` (seconds) in bins of ``BIN_MS``, with the reference lag and
    the band within ``max_offset`` of it; ``unknown`` takes are counted in the caption."""
    ref_ms, lim_ms = reference * 1000, max_offset * 1000
    values = [x * 1000 for x in lags]
    lo = min([*values, ref_ms - lim_ms]) - 2 * BIN_MS
    hi = max([*values, ref_ms + lim_ms]) + 2 * BIN_MS
    lo, hi = math.floor(lo / BIN_MS) * BIN_MS, math.ceil(hi / BIN_MS) * BIN_MS
    bins = [0] * max(1, round((hi - lo) / BIN_MS))
    for v in values:
        bins[min(len(bins) - 1, int((v - lo) // BIN_MS))] += 1
    top = max([*bins, 1])
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(ms: float) -> float:
        return LEFT + (ms - lo) / (hi - lo) * pw

    def y(count: float) -> float:
        return TOP + ph - count / top * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2:.1f}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
        _rect(x(ref_ms - lim_ms), TOP, x(ref_ms + lim_ms), TOP + ph, "#dfeedf"),
    ]
    for i, n in enumerate(bins):
        if n:
            x0, x1 = x(lo + i * BIN_MS) + 0.5, x(lo + (i + 1) * BIN_MS) - 0.5
            out.append(_rect(x0, y(n), x1, TOP + ph, "#4c72b0"))
    for ms, colour, label, (dx, dy, anchor) in (
        (ref_ms, "#333333", f"reference {ref_ms:+.0f} ms", (0, -6, "middle")),
        (ref_ms - lim_ms, "#c44e52", f"{-lim_ms:+.0f} ms", (-3, 24, "end")),
        (ref_ms + lim_ms, "#c44e52", f"{lim_ms:+.0f} ms", (3, 24, "start")),
    ):
        out.append(
            f'<line x1="{x(ms):.1f}" y1="{TOP}" x2="{x(ms):.1f}" y2="{TOP + ph}" '
            f'stroke="{colour}" stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x(ms) + dx:.1f}" y="{TOP + dy}" fill="{colour}" '
            f'text-anchor="{anchor}">{label}</text>'
        )
    out.append(
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{W - RIGHT}" y2="{TOP + ph}" stroke="black"/>'
    )
    step = _tick_step(hi - lo)
    for k in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        t = k * step
        out.append(f'<text x="{x(t):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{top}</text>')
    out.append(f'<text x="{LEFT - 6}" y="{TOP + ph}" text-anchor="end">0</text>')
    caption = (
        f"lag, ms (audio behind animation); {len(values)} takes, {unknown} unknown; "
        f"band: within {lim_ms:.0f} ms of the reference"
    )
    out.append(f'<text x="{W / 2:.1f}" y="{H - 10}" text-anchor="middle">{escape(caption)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _rect(x0: float, y0: float, x1: float, y1: float, fill: str) -> str:
    return (
        f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
        f'fill="{fill}"/>'
    )


def _tick_step(span: float) -> float:
    """A round step giving 4-10 ticks over ``span``."""
    for step in (10, 20, 50, 100, 200, 500, 1000):
        if span / step <= 10:
            return step
    return 2000
