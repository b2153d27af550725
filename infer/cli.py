"""``python -m infer``: a checkpoint and speech in, animation out.

    python -m infer --checkpoint runs/demo/best.pt take.wav more/ --out out/
    python -m infer --checkpoint runs/demo/best.pt --eval data/demo --out report/
    python -m infer --onnx model.onnx take.wav --out out/     # a file of python -m infer.export

``--onnx`` runs an exported file in ONNX Runtime on the CPU instead of the checkpoint in torch:
the same outputs and report, within float rounding (1e-4), which checks a deployed file.

For each audio input (WAV or FLAC, any rate, channels, length; a folder: every one in it) it
writes ``<stem>.csv``, a Live Link Face CSV at ``--fps`` that Unreal's Live Link Face importer
and ``make_shards`` read, and ``<stem>.npy``, ``[T, 52]`` float32 at the model's 30 fps in
Apple's order (the shard format's). Files in a folder keep their sub-folders under ``--out``.
A bad input is reported and the rest still convert; the exit code is then 1.

A file already at a target that this command did not write (a capture beside its audio, say)
stops the run before any work unless ``--overwrite``; its own earlier outputs it replaces
(``infer.outputs``). An input that cannot be written (a full disk) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from core.errors import ArkitError, ConfigError, InputError, RunError
from infer import streaming
from infer.outputs import Outputs, digest
from pipeline.convert.audio import read_audio
from pipeline.convert.inputs import AUDIO_EXTS  # what make_shards takes
from pipeline.convert.livelink import NOMINAL_RATES, write_live_link_csv
from pipeline.convert.windows import resample_frames


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m infer", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files or folders of them")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint of the trainer (best.pt)")
    model.add_argument(
        "--onnx", metavar="FILE", help="a file of python -m infer.export, run by ONNX Runtime"
    )
    p.add_argument("--out", help="folder for the CSVs and npys, or the report")
    p.add_argument("--fps", type=int, default=60, help="the CSV's frame rate (default 60)")
    p.add_argument("--eval", metavar="DATA_DIR", help="score the checkpoint on a dataset")
    p.add_argument("--split", default="val", help="the split --eval scores (default val)")
    p.add_argument("--loader", default="dali", help="the loader --eval reads with (dali, torch)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when there is one), cpu, cuda, cuda:N; --onnx runs on the CPU",
    )
    p.add_argument("--batch-size", type=int, default=16, help="windows per model call")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files at the targets that infer did not write (never an input)",
    )
    streaming.add_arguments(p)
    args = p.parse_args(argv)
    streaming.check_arguments(args, p)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.stream:
        return args
    if not args.inputs and not args.eval:
        p.error("give audio INPUTs, --eval DATA_DIR, or both (or --stream)")
    if args.out is None:
        p.error("--out is required: the folder for the CSVs and npys, or the report")
    if args.fps not in NOMINAL_RATES:
        p.error(f"--fps must be one of {', '.join(map(str, NOMINAL_RATES))}")
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


REPORT_FILES = ("report.json", "report.md", "mae_by_blendshape.png", "curves.png")


def figure(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without an exponent or trailing zeros."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    text = f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def write_outputs(
    values: np.ndarray, model_fps: float, fps: int, seconds: float, stem: Path
) -> tuple[Path, Path, int, dict[Path, str]]:
    """``stem``.npy (as predicted) and ``stem``.csv (``fps`` rows for every frame time inside
    the audio's ``seconds``, resampled as ``make_shards`` resamples captures): the paths, the
    CSV's rows and each file's digest. Both or neither: on a failure (a full disk) the tmp
    files, a CSV without its npy and the folders made for them are removed."""
    made = [d for d in (stem.parent, *stem.parent.parents) if not d.exists()]
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy = stem.with_name(stem.name + ".npy")
    csv = stem.with_name(stem.name + ".csv")
    tmp = npy.with_name(f".{npy.name}.tmp")
    rows = max(1, int(np.ceil(seconds * fps - 1e-9)))
    landed = False
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(values, np.float32))
        times = np.arange(len(values)) / model_fps
        write_live_link_csv(csv, resample_frames(times, values, fps, rows), fps)  # atomic
        landed = True
        digests = {csv: digest(csv), npy: digest(tmp)}
        tmp.replace(npy)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if landed:
            csv.unlink(missing_ok=True)
        for d in made:  # deepest first; stops at one that holds something
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return csv, npy, rows, digests


def run_inputs(predictor, args, found: list[tuple[Path, Path]], outputs: Outputs) -> int:
    """Convert every input of ``found`` (``find_inputs``); the number that failed."""
    failed = 0
    total_audio = total_time = 0.0
    out = Path(args.out)
    for src, rel in found:
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
            csv, npy, rows, digests = write_outputs(
                values, predictor.fps, args.fps, seconds, out / rel
            )
        except OSError as exc:
            print(
                f"skipped {src}: cannot write {out / rel}.csv and .npy "
                f"({exc.strerror or exc}); nothing of it was left in {out}: free space there "
                "or choose another --out",
                file=sys.stderr,
            )
            failed += 1
            continue
        outputs.add(digests)
        took = time.perf_counter() - tick
        total_audio, total_time = total_audio + seconds, total_time + took
        print(
            f"{src}: {figure(seconds)} s -> {csv} ({count(rows, 'row')} at {args.fps} fps), "
            f"{npy} ({count(len(values), 'frame')} at {predictor.fps:g} fps) in {figure(took)} s"
        )
    if total_time > 0:
        speed = figure(total_audio / total_time)
        where = "the CPU (ONNX Runtime)" if args.onnx else predictor.device
        print(f"{speed} s of audio per second on {where}")
    if failed:
        written = len(found) - failed
        print(
            f"{failed} of {count(len(found), 'input')} failed; "
            f"{written or 'none'} written to {out}",
            file=sys.stderr,
        )
    return failed


def write_eval_report(out: Path, rec: dict, example: dict | None, outputs: Outputs) -> list:
    """``train.report.write_report``, recorded; on a failure (a full disk) the report files
    this run wrote are removed (a RunError): what stays is the earlier report or nothing."""
    from train.report import write_report

    before = {n: digest(out / n) if (out / n).is_file() else None for n in REPORT_FILES}
    made = not out.exists()
    try:
        paths = write_report(out, rec, example)
    except OSError as exc:
        for name, old in before.items():
            if (out / name).is_file() and (old is None or digest(out / name) != old):
                (out / name).unlink()
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise RunError(
            f"cannot write the report in {out} ({exc.strerror or exc}); what this run wrote of "
            "it was removed: free space there or choose another --out"
        ) from None
    outputs.add({p: digest(p) for p in paths})
    return paths


def eval_take_lags(predictor, data_dir: str, split: str) -> dict:
    """``train.take_lags`` with the checkpoint's model; a line for each take it flags."""
    from train.take_lags import take_lags

    lags = take_lags(data_dir, split, lambda wav: predictor.predict(wav, progress=False))
    ref, limit = lags["reference_seconds"], lags["max_sync_offset"]
    for r in lags["takes"]:
        if r["flagged"]:
            print(
                f"take {r['source']}: its predicted mouth is {r['lag'] * 1000:+.0f} ms from the "
                f"captured one, {(r['lag'] - ref) * 1000:+.0f} ms from the takes' median: more "
                f"than --max-sync-offset {limit:g}; its audio and animation are out of sync?"
            )
    return lags


def load_predictor(args: argparse.Namespace):
    """The ``--onnx`` file's model in ONNX Runtime, or the ``--checkpoint``'s in PyTorch."""
    from train.predict import Predictor

    if args.onnx:  # a stream's pushes are small: one thread each (infer.streaming)
        return Predictor.from_onnx(args.onnx, args.batch_size, 1 if args.stream else None)
    return Predictor.from_checkpoint(args.checkpoint, args.device, args.batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.evaluate import evaluate
    from train.predict import pick_device

    try:
        if args.onnx and args.device not in ("auto", "cpu"):
            raise ConfigError(
                f"--device {args.device} with --onnx: ONNX Runtime runs the file on the CPU "
                "here; pass --device cpu (or auto), or --checkpoint to run on CUDA"
            )
        pick_device(args.device)  # a device this machine lacks is named before any work
        if args.stream:
            return streaming.run(load_predictor(args), args)
        found = find_inputs(args.inputs) if args.inputs else []
        out = Path(args.out)
        outputs = Outputs(out)
        targets = [out / f"{rel}.{ext}" for _, rel in found for ext in ("csv", "npy")]
        if args.eval:
            targets += [out / name for name in REPORT_FILES]
        model_file = args.onnx or args.checkpoint
        sources = [src for src, _ in found] + [Path(model_file)]
        outputs.check(targets, sources, args.overwrite)
        predictor = load_predictor(args)
        failed = run_inputs(predictor, args, found, outputs) if found else 0
        if args.eval:
            rec, example = evaluate(
                predictor, args.eval, args.split, args.loader, predictor.batch_size
            )
            rec = {"checkpoint": str(model_file), **rec}
            rec["take_lags"] = eval_take_lags(predictor, args.eval, args.split)
            paths = write_eval_report(out, rec, example, outputs)
            print("wrote " + ", ".join(str(p) for p in paths))
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0
