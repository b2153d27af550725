"""``python -m infer --stream``: live animation from live audio, a line per frame.

    arecord -q -f S16_LE -r 16000 -c 1 | python -m infer --checkpoint best.pt --stream
    python -m infer --checkpoint best.pt --stream --realtime speech.wav --format json

Audio comes from stdin as 16-bit little-endian PCM (``--rate``, default the model's; other
rates are resampled as they arrive; ``--channels`` are averaged), or, with ``--realtime``, from
an audio file played at its own pace. Each frame is written to stdout as soon as the audio it
depends on has arrived (``infer.stream``): a CSV line ``frame,seconds,<52 values>`` in Apple's
order after a header, or a JSON object per line. With ``--realtime`` a JSON line also gives the
frame's delay (ms): the wall time it was written less the time its moment of audio was played,
and stderr ends with the delays' median, p99 and maximum. The model runs on one thread (PyTorch
and ONNX Runtime alike): a push is small work, and threads cost more than they give.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from core.arkit import ARKIT_NAMES
from core.errors import ConfigError, InputError
from infer.stream import Stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming")
    g.add_argument("--stream", action="store_true", help="16-bit PCM on stdin to a frame a line")
    g.add_argument("--realtime", metavar="AUDIO", help="with --stream: play this file live")
    g.add_argument("--format", choices=("csv", "json"), default="csv", help="lines (default csv)")
    g.add_argument(
        "--chunk-ms", type=float, default=None, help="audio per push (default one frame: 33.3)"
    )
    g.add_argument("--rate", type=int, default=None, help="stdin's sample rate (default model's)")
    g.add_argument("--channels", type=int, default=1, help="stdin's channels (default 1)")


def check_arguments(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if not args.stream:
        if args.realtime:
            p.error("--realtime plays a file into --stream: give --stream too")
        return
    if args.inputs or args.eval:
        p.error("--stream takes its audio from stdin or --realtime, not INPUTs or --eval")
    if args.chunk_ms is not None and not 0 < args.chunk_ms <= 10_000:
        p.error("--chunk-ms must be > 0 and at most 10000 (10 s)")
    if args.channels < 1 or (args.rate is not None and args.rate < 1):
        p.error("--rate and --channels must be >= 1")


class Lines:
    """Frames to text lines on ``out``: CSV after a header, or JSON objects."""

    def __init__(self, fmt: str, fps: float, out, names=ARKIT_NAMES) -> None:
        self.fmt, self.fps, self.out, self.names = fmt, fps, out, names
        if fmt == "csv":
            out.write(",".join(["frame", "seconds", *names]) + "\n")

    def write(self, first: int, frames: np.ndarray, delays_ms=None) -> None:
        rows = []
        for i, values in enumerate(frames):
            k = first + i
            if self.fmt == "csv":
                rows.append(
                    ",".join([str(k), f"{k / self.fps:.4f}", *(f"{v:.5f}" for v in values)])
                )
                continue
            doc = {"frame": k, "seconds": round(k / self.fps, 4)}
            if delays_ms is not None:
                doc["delay_ms"] = round(float(delays_ms[i]), 2)
            doc["blendshapes"] = {
                n: round(float(v), 5) for n, v in zip(self.names, values, strict=True)
            }
            rows.append(json.dumps(doc))
        if rows:
            self.out.write("\n".join(rows) + "\n")
            self.out.flush()


def play(stream: Stream, audio: np.ndarray, chunk: int, lines: Lines) -> list[float]:
    """Push ``audio`` in ``chunk``-sample pieces at the pace it would be heard; write each
    frame as it comes and return its delay (ms) after its moment of audio was played."""
    rate, fps = stream.sample_rate, stream.fps
    delays: list[float] = []
    start = time.perf_counter()
    for at in range(0, len(audio), chunk):
        piece = audio[at : at + chunk]
        wait = start + (at + len(piece)) / rate - time.perf_counter()
        if wait > 0:  # the piece's last sample has not been "heard" yet
            time.sleep(wait)
        first = stream.emitted
        frames = stream.push(piece)
        now = time.perf_counter()
        d = [(now - start - (first + i) / fps) * 1000 for i in range(len(frames))]
        lines.write(first, frames, d)
        delays += d
    first = stream.emitted
    lines.write(first, stream.flush())  # the tail: the audio ended, not a live delay
    return delays


def read_stdin(stream: Stream, rate: int, channels: int, chunk: int, lines: Lines) -> None:
    """Push stdin's 16-bit PCM as it arrives; flush at its end."""
    resampler = None
    if rate != stream.sample_rate:
        import soxr

        resampler = soxr.ResampleStream(rate, stream.sample_rate, 1, dtype="float32")
    fd, frame_bytes = sys.stdin.fileno(), 2 * channels
    left = b""
    while True:
        data = os.read(fd, chunk * frame_bytes)
        last = not data
        data, left = left + data, b""
        cut = len(data) - len(data) % frame_bytes
        data, left = data[:cut], data[cut:]
        pcm = np.frombuffer(data, "<i2").reshape(-1, channels).mean(1, dtype=np.float32) / 32768
        if resampler is not None:
            pcm = resampler.resample_chunk(pcm, last=last)
        first = stream.emitted
        lines.write(first, stream.push(pcm))
        if last:
            break
    first = stream.emitted
    lines.write(first, stream.flush())


def run(predictor, args: argparse.Namespace) -> int:
    """``--stream``: the lines on stdout, the notes on stderr."""
    from pipeline.convert.audio import read_audio

    # a push runs the model on well under a second of audio: threads would wait on each other
    # longer than they compute (benchmarks/streaming-latency/README.md)
    torch.set_num_threads(1)
    stream = Stream(predictor)
    rate, fps = predictor.sample_rate, predictor.fps
    chunk = max(1, round((args.chunk_ms or 1000 / fps) / 1000 * rate))
    nb = predictor.model.num_blendshapes
    names = ARKIT_NAMES if nb == len(ARKIT_NAMES) else tuple(f"blendshape{i}" for i in range(nb))
    lines = Lines(args.format, fps, sys.stdout, names)
    look = stream.lookahead_seconds * 1000
    budget = f"lookahead {look:.1f} ms + chunk {chunk / rate * 1000:.1f} ms + compute"
    if args.realtime:
        try:
            audio = read_audio(args.realtime, rate)
        except InputError as exc:
            raise ConfigError(f"--realtime {args.realtime}: {exc}") from None
        print(f"playing {args.realtime} live: each frame's delay is {budget}", file=sys.stderr)
        delays = play(stream, audio, chunk, lines)
        if delays:
            d = np.asarray(delays)
            print(
                f"{len(d)} frames live: delay median {np.median(d):.1f} ms, p99 "
                f"{np.percentile(d, 99):.1f} ms, max {d.max():.1f} ms ({budget})",
                file=sys.stderr,
            )
        return 0
    print(f"reading 16-bit PCM from stdin: each frame's delay is {budget}", file=sys.stderr)
    read_stdin(stream, args.rate or rate, args.channels, chunk, lines)
    return 0
