"""Streaming latency: the delay a live frame can have, and how many live streams a core runs.

    python benchmarks/latency.py --checkpoint runs/demo/best.pt --rounds 100 \\
        --out benchmarks/streaming-latency

For each lookahead (``model.lookahead_seconds`` 0.05, 0.1, 0.2 s and unbounded) and each
backend (PyTorch; ONNX Runtime when the ``export`` extra is installed, on the file
``infer.export`` writes), on one CPU core (the process pinned to it, one thread):

1. the algorithmic delay: the model's lookahead plus one chunk (one frame, 1 / fps s): the
   wait before a frame can be computed at all;
2. the compute per chunk: ``Stream.push`` of each 1 / fps s of ``--seconds`` of speech, its
   median and p99 (the first ``WARMUP`` pushes left out), and the real-time factor (compute
   over audio time);
3. the streams one core sustains: K streams pushed in turn, one chunk each per round; the
   most K whose rounds take, on average, no longer than a chunk lasts.

The weights are the checkpoint's, its model built with each lookahead (the same shapes, so
the same compute; the frames are not the ones a model trained so would give). Writes
``<out>/latency.json`` (every figure, the command and the machine) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.constants import FPS, SAMPLE_RATE
from core.errors import exit_code
from infer.stream import Stream
from pipeline.convert.synthetic import make_take
from train.checkpoint import load_checkpoint
from train.predict import Predictor

LOOKAHEADS = (0.05, 0.1, 0.2, None)
WARMUP = 10


def checkpoint_with(checkpoint: str, lookahead: float | None, folder: Path) -> Path:
    """A copy of ``checkpoint`` whose model is built with ``lookahead`` (the same shapes)."""
    state = load_checkpoint(checkpoint)  # a file that is not one: a ResumeError naming it
    state["model_args"] = {**state["model_args"], "lookahead_seconds": lookahead}
    path = folder / f"lookahead-{lookahead}.pt"
    torch.save(state, path)
    return path


def chunks(audio: np.ndarray, fps: float, rate: int) -> list[np.ndarray]:
    """``audio`` in pieces of one frame each (533 or 534 samples at 16 kHz and 30 fps)."""
    n = int(len(audio) * fps / rate)
    edges = [round(i * rate / fps) for i in range(n + 1)]
    return [audio[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def one_stream(p: Predictor, pieces: list[np.ndarray]) -> dict:
    stream, took = Stream(p), []
    for piece in pieces:
        tick = time.perf_counter()
        stream.push(piece)
        took.append(time.perf_counter() - tick)
    ms = np.asarray(took[WARMUP:]) * 1000
    chunk_ms = 1000 / p.fps
    return {
        "lookahead_ms": stream.lookahead_seconds * 1000,
        "chunk_ms": chunk_ms,
        "compute_median_ms": float(np.median(ms)),
        "compute_p99_ms": float(np.percentile(ms, 99)),
        "real_time_factor": float(ms.mean() / chunk_ms),
    }


def round_ms(p: Predictor, pieces: list[np.ndarray], k: int) -> float:
    """Mean time (ms) of a round: ``k`` streams each pushing one chunk."""
    streams = [Stream(p) for _ in range(k)]
    rounds = []
    for piece in pieces:
        tick = time.perf_counter()
        for s in streams:
            s.push(piece)
        rounds.append(time.perf_counter() - tick)
    return float(np.mean(rounds[WARMUP:]) * 1000)


def streams_per_core(p: Predictor, pieces: list[np.ndarray], median_ms: float) -> dict:
    """The most streams whose mean round fits in a chunk, searched around the estimate."""
    chunk_ms = 1000 / p.fps
    lo, hi = 0, max(2, int(2 * chunk_ms / max(median_ms, 1e-3)) + 1)
    tried = {}
    while hi - lo > 1:
        k = (lo + hi) // 2
        tried[k] = round_ms(p, pieces, k)
        lo, hi = (k, hi) if tried[k] <= chunk_ms else (lo, k)
    return {"streams_per_core": lo, "round_ms_by_streams": tried}


def backends(checkpoint: str, lookahead: float | None, folder: Path):
    """(name, Predictor) for PyTorch and, when the export extra is installed, ONNX Runtime on
    the file ``python -m infer.export`` writes."""
    path = checkpoint_with(checkpoint, lookahead, folder)
    yield "pytorch", Predictor.from_checkpoint(path, "cpu")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"ONNX Runtime skipped: {exc}", file=sys.stderr)
        return
    from infer.export import export

    onnx = export(path, path.with_suffix(".onnx"))["path"]
    yield "onnxruntime", Predictor.from_onnx(onnx, threads=1)


def measure(args) -> list[dict]:
    audio = make_take(77, 1, seconds=args.seconds)[0].astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lookahead in LOOKAHEADS:
            for name, p in backends(args.checkpoint, lookahead, Path(tmp)):
                pieces = chunks(audio, p.fps, p.sample_rate)
                row = {"backend": name, "lookahead_asked": lookahead, **one_stream(p, pieces)}
                row["delay_ms"] = row["lookahead_ms"] + row["chunk_ms"]
                short = pieces[: min(len(pieces), WARMUP + args.rounds)]
                row.update(streams_per_core(p, short, row["compute_median_ms"]))
                rows.append(row)
                print(line(row), flush=True)
    return rows


def line(r: dict) -> str:
    asked = "unbounded" if r["lookahead_asked"] is None else f"{r['lookahead_asked']:g} s"
    return (
        f"| {asked} | {r['backend']} | {r['lookahead_ms']:.1f} + {r['chunk_ms']:.1f} = "
        f"{r['delay_ms']:.1f} | {r['compute_median_ms']:.2f} | {r['compute_p99_ms']:.2f} | "
        f"{r['real_time_factor']:.3f} | {r['streams_per_core']} |"
    )


HEADER = (
    "| lookahead asked | backend | delay: lookahead + chunk (ms) | compute per chunk, median "
    "(ms) | p99 (ms) | real-time factor | 30 fps streams per core |\n" + "|---" * 7 + "|"
)


def run(args: argparse.Namespace) -> int:
    core = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    print(HEADER)
    rows = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python benchmarks/latency.py " + " ".join(args.argv),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "pinned_to_core": core,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "sample_rate": SAMPLE_RATE,
        "fps": FPS,
        "rows": rows,
        "warmup_pushes_left_out": WARMUP,
    }
    (out / "latency.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'latency.json'}")
    return 0


def main(argv=None) -> int:
    """Run the benchmark; 1 with ``error: ...`` on stderr for a bad checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trainer's checkpoint (best.pt)")
    p.add_argument("--seconds", type=float, default=20.0, help="speech per stream (default 20)")
    p.add_argument("--rounds", type=int, default=150, help="chunks per streams-per-core trial")
    p.add_argument("--cpu", type=int, default=None, help="the core to pin to (default: the first)")
    p.add_argument("--out", default="results/streaming-latency", help="folder for latency.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
