"""make_shards' flags checked against their ranges, before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from core.errors import DatasetError
from pipeline.shards import storage
from pipeline.shards.manifest import FPS

# Ranges of the flags: wider than any real use, narrow enough that a typo fails before any work
MAX_SECONDS = 3600.0  # a window, stride, segment, tolerance or gap
MIN_WINDOW_FRAMES = 3
MAX_FPS = 1000.0
MAX_SCALE = 1000.0
MAX_COUNT = 1_000_000  # synthetic takes, samples per shard
MAX_WORKERS = 1024
MAX_SYNC_SECONDS = 5.0  # a lag searched, tolerated or applied


def _frames(seconds: float) -> int | None:
    """``seconds`` in whole frames at the shards' rate, as windows are cut (None: not finite)."""
    return round(seconds * FPS) if math.isfinite(seconds) else None


def usage_problems(args: argparse.Namespace) -> list[str]:
    """Every flag out of its range, before any work."""
    bad = []
    if not args.verify and not args.out:
        bad.append("--out is required with --synthetic or --input")
    if args.input and not args.input.startswith("s3://") and not Path(args.input).is_dir():
        bad.append(f"--input {args.input} is not a folder")
    for flag, value in (("--out", args.out), ("--verify", args.verify)):
        if value and storage.is_s3(value):
            try:
                storage.location(value)
            except DatasetError as exc:
                bad.append(f"{flag}: {exc}")
    window = _frames(args.window_seconds)
    hour, most = f"at most {MAX_SECONDS:g} s (an hour)", f"at most {MAX_SECONDS:g}"
    fps, scale = f"> 0 and at most {MAX_FPS:g}", f"> 0 and at most {MAX_SCALE:g}"
    checks = [
        (
            "--synthetic",
            args.synthetic,
            lambda v: v is None or 1 <= v <= MAX_COUNT,
            f">= 1 and at most {MAX_COUNT}",
        ),
        ("--val-fraction", args.val_fraction, lambda v: 0 <= v < 1, "in [0, 1)"),
        (
            "--window-seconds",
            args.window_seconds,
            lambda v: MIN_WINDOW_FRAMES <= _frames(v) and v <= MAX_SECONDS,
            f"> 0, at least {MIN_WINDOW_FRAMES} frames ({MIN_WINDOW_FRAMES / FPS:g} s at {FPS} "
            f"fps) and {hour}",
        ),
        (
            "--stride-seconds",
            args.stride_seconds,
            lambda v: v is None or (_frames(v) >= 1 and v <= MAX_SECONDS),
            f"> 0, at least a frame ({1 / FPS:.4g} s) and {hour}",
        ),
        (
            "--segment-seconds",
            args.segment_seconds,
            # in frames, as segments are cut: a segment a hair longer is the window
            lambda v: v is None or window is None or (_frames(v) > window and v <= MAX_SECONDS),
            f"at least a frame longer than --window-seconds and {hour}",
        ),
        (
            "--tolerance-seconds",
            args.tolerance_seconds,
            lambda v: 0 <= v <= MAX_SECONDS,
            f">= 0 and {most}",
        ),
        ("--tolerance-ratio", args.tolerance_ratio, lambda v: 0 <= v < 1, "in [0, 1)"),
        (
            "--max-gap-seconds",
            args.max_gap_seconds,
            lambda v: 0 < v <= MAX_SECONDS,
            f"> 0 and {most}",
        ),
        (
            "--samples-per-shard",
            args.samples_per_shard,
            lambda v: 1 <= v <= MAX_COUNT,
            f">= 1 and at most {MAX_COUNT}",
        ),
        ("--seed", args.seed, lambda v: 0 <= v < 2**63, ">= 0 and < 2**63"),
        (
            "--workers",
            args.workers,
            lambda v: 1 <= v <= MAX_WORKERS,
            f">= 1 and at most {MAX_WORKERS}",
        ),
        ("--csv-fps", args.csv_fps, lambda v: v is None or 0 < v <= MAX_FPS, fps),
        ("--csv-scale", args.csv_scale, lambda v: 0 < v <= MAX_SCALE, scale),
        ("--npy-fps", args.npy_fps, lambda v: 0 < v <= MAX_FPS, fps),
        ("--npy-scale", args.npy_scale, lambda v: 0 < v <= MAX_SCALE, scale),
    ]
    for flag, value, ok, must in checks + _sync_checks(args):
        # NaN and inf first: no range holds them, and counting frames of them fails
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            bad.append(f"{flag} must be {must} (got {value})")
    return bad


def _sync_checks(args: argparse.Namespace) -> list:
    """(flag, value, ok, what it must be) of the lag flags."""
    return [
        (
            "--sync-search-seconds",
            args.sync_search_seconds,
            lambda v: 0 < v <= MAX_SYNC_SECONDS,
            f"> 0 and at most {MAX_SYNC_SECONDS:g}",
        ),
        (
            "--max-sync-offset",
            args.max_sync_offset,
            lambda v: 0 < v <= MAX_SYNC_SECONDS,
            f"> 0 and at most {MAX_SYNC_SECONDS:g}",
        ),
        (
            "--audio-offset",
            args.audio_offset,
            lambda v: abs(v) <= MAX_SYNC_SECONDS,
            f"within +-{MAX_SYNC_SECONDS:g}",
        ),
    ]
