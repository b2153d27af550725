"""``python -m infer``: a checkpoint and speech in, animation out.

    python -m infer --checkpoint runs/demo/best.pt take.wav more/ --out out/
    python -m infer --checkpoint runs/demo/best.pt --eval data/demo --out report/

For each audio input (WAV or FLAC, any rate, channels, length; a folder: every one in it) it
writes ``<stem>.csv``, a Live Link Face CSV at ``--fps`` that Unreal's Live Link Face importer
and ``make_shards`` read, and ``<stem>.npy``, ``[T, 52]`` float32 at the model's 30 fps in
Apple's order (the shard format's). Files in a folder keep their sub-folders under ``--out``.
A bad input is reported and the rest still convert; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.audio import read_audio
from pipeline.errors import ArkitError, ConfigError, InputError
from pipeline.inputs import AUDIO_EXTS  # what make_shards takes
from pipeline.livelink import NOMINAL_RATES, write_live_link_csv
from pipeline.windows import resample_frames


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m infer", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files or folders of them")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of the trainer (best.pt)")
    p.add_argument("--out", required=True, help="folder for the CSVs and npys, or the report")
    p.add_argument("--fps", type=int, default=60, help="the CSV's frame rate (default 60)")
    p.add_argument("--eval", metavar="DATA_DIR", help="score the checkpoint on a dataset")
    p.add_argument("--split", default="val", help="the split --eval scores (default val)")
    p.add_argument("--loader", default="dali", help="the loader --eval reads with (dali, torch)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16, help="windows per model call")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    if not args.inputs and not args.eval:
        p.error("give audio INPUTs, --eval DATA_DIR, or both")
    if args.fps not in NOMINAL_RATES:
        p.error(f"--fps must be one of {', '.join(map(str, NOMINAL_RATES))}")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def find_inputs(paths: list[str]) -> list[tuple[Path, Path]]:
    """(audio file, output path without suffix) for each input; folders are walked."""
    found: list[tuple[Path, Path]] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTS
            )
            if not files:
                raise ConfigError(f"{path} holds no .wav or .flac file")
            found += [(f, f.relative_to(path).with_suffix("")) for f in files]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise ConfigError(f"input {path} does not exist")
    seen: dict[Path, Path] = {}
    for src, rel in found:
        if rel in seen:
            raise ConfigError(f"{seen[rel]} and {src} would both be written as {rel}.csv")
        seen[rel] = src
    return found


def write_outputs(values: np.ndarray, model_fps: float, fps: int, seconds: float, stem: Path):
    """``stem``.npy (as predicted) and ``stem``.csv (``fps`` rows for every frame time inside
    the audio's ``seconds``, resampled as ``make_shards`` resamples captures)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy = stem.with_name(stem.name + ".npy")
    tmp = npy.with_name(f".{npy.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(values, np.float32))
    tmp.replace(npy)
    rows = max(1, int(np.ceil(seconds * fps - 1e-9)))
    times = np.arange(len(values)) / model_fps
    csv = stem.with_name(stem.name + ".csv")
    write_live_link_csv(csv, resample_frames(times, values, fps, rows), fps)
    return csv, npy, rows


def run_inputs(predictor, args) -> int:
    """Convert every input; the number that failed."""
    failed = 0
    total_audio = total_time = 0.0
    for src, rel in find_inputs(args.inputs):
        try:
            audio = read_audio(src, predictor.sample_rate)
        except InputError as exc:
            print(f"skipped {src}: {exc}", file=sys.stderr)
            failed += 1
            continue
        tick = time.perf_counter()
        values = predictor.predict(audio, progress=args.progress)
        seconds = len(audio) / predictor.sample_rate
        try:
            csv, npy, rows = write_outputs(
                values, predictor.fps, args.fps, seconds, Path(args.out) / rel
            )
        except OSError as exc:
            print(f"skipped {src}: cannot write {Path(args.out) / rel}.* ({exc})", file=sys.stderr)
            failed += 1
            continue
        took = time.perf_counter() - tick
        total_audio, total_time = total_audio + seconds, total_time + took
        print(
            f"{src}: {seconds:.1f} s -> {csv} ({rows} rows at {args.fps} fps), {npy} "
            f"({len(values)} frames at {predictor.fps:g} fps) in {took:.2f} s"
        )
    if total_time > 0:
        print(f"{total_audio / total_time:.0f} s of audio per second on {predictor.device}")
    if failed:
        print(f"{failed} input(s) failed; the others were written", file=sys.stderr)
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    from infer.evaluate import report
    from infer.predict import Predictor

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.batch_size)
        failed = run_inputs(predictor, args) if args.inputs else 0
        if args.eval:
            paths = report(predictor, args.checkpoint, args.eval, args.out, args.split, args.loader)
            print("wrote " + ", ".join(str(p) for p in paths))
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0
