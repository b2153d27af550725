"""Turn recordings (or the synthetic corpus) into validated WebDataset shards, once.

    python pipeline/make_shards.py --synthetic 400 --out data/synth
    python pipeline/make_shards.py --input takes/ --out data/mine --val-fraction 0.1
    python pipeline/make_shards.py --verify data/mine
    python pipeline/make_shards.py --synthetic 400 --out s3://bucket/synth   # needs boto3
    python pipeline/make_shards.py --engine ray --ray-address auto \
        --input s3://bucket/captures/ --out s3://bucket/mine   # on a Ray cluster, same bytes

Inputs are paired by file stem: audio (.wav/.flac, any rate, channels, sample format) with a
Live Link Face CSV or a ``[T, 52]`` .npy. Every input that cannot be used becomes a line in
``rejects.jsonl``; the rest are still converted. Windows are pre-shuffled across each split,
and the dataset is written beside the old one and swapped in, ``manifest.json`` last, so an
interrupted run never looks complete and never destroys the previous dataset. An ``s3://``
``--out`` is written in a local staging folder, then uploaded beside the old dataset under
names its manifest does not list, ``manifest.json`` last (``pipeline.convert.s3out``), so an upload
cut short leaves the previous dataset whole; the same command run again finishes it (it converts
again). ``--verify`` reads ``s3://`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.arkit import ORDERS
from core.errors import ArkitError, DatasetError
from pipeline.convert.args import usage_problems
from pipeline.convert.engine import convert_all, make_engine
from pipeline.convert.inputs import (
    Reject,
    Settings,
    find_recordings,
    synthetic_recordings,
)
from pipeline.convert.livelink import LIVE_LINK_FPS
from pipeline.convert.outdir import REJECTS_NAME, REPORT_NAMES, WORK_NAME, OutDir
from pipeline.convert.s3out import S3OutDir, staging_dir
from pipeline.convert.stages import (
    Balance,
    Cutting,
    TrainStats,
    reject_lines,
    split_pieces,
    write_shards,
)
from pipeline.convert.sync import MAX_OFFSET_SECONDS, SEARCH_SECONDS
from pipeline.convert.sync_plot import lag_histogram
from pipeline.convert.syncing import SyncReport, judge
from pipeline.convert.takestore import StoredTake, TakeStore
from pipeline.convert.windows import MAX_GAP_SECONDS, TOLERANCE_RATIO, TOLERANCE_SECONDS
from pipeline.shards import storage
from pipeline.shards.manifest import SPLITS, WINDOW_SECONDS, Manifest
from pipeline.shards.storage import Location, S3Url
from pipeline.shards.verify import check_dataset

# make_shards' arguments that do not change the dataset's bytes: not recorded in the manifest,
# so the local engine and Ray, with any number of workers, write the same manifest
NOT_RECORDED = ("verify", "quiet", "workers", "engine", "ray_address")


@dataclass
class Summary:
    out: Location
    manifest: Manifest
    takes: list[StoredTake]
    rejects: list[Reject]
    minutes: float
    sync: SyncReport
    uploaded: list[str] = dataclasses.field(default_factory=list)  # s3:// --out: the objects
    warnings: list[str] = dataclasses.field(default_factory=list)  # printed after the summary
    cpus: int = 1  # the worker processes, or the Ray cluster's CPUs

    def count(self, kind: str) -> int:
        """Rejects of one kind (``Reject.kind``): "input", "gap", "short" or "sync"."""
        return sum(r.kind == kind for r in self.rejects)

    @property
    def reused(self) -> int:
        return sum(t.reused for t in self.takes)

    @property
    def duplicates(self) -> int:
        return sum(t.duplicates for t in self.takes)


# ---------------------------------------------------------------- the stages, chained


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


def make_dataset(args: argparse.Namespace) -> Summary:
    settings = settings_of(args)
    t0 = time.perf_counter()
    engine = make_engine(args.engine, args.ray_address)
    out_dir = S3OutDir if storage.is_s3(args.out) else OutDir
    with out_dir(args.out, args.overwrite) as out:
        if engine is not None and isinstance(out, S3OutDir):
            out.upload_files = engine.upload  # each task uploads what it wrote
        # 1. find inputs (on this machine: a listing, no data)
        if args.synthetic:
            recordings, rejects = synthetic_recordings(args.synthetic), []
        else:
            recordings, rejects = find_recordings(args.input)

        # 2. load and cut takes (in worker processes or Ray tasks, into the take store)
        store = TakeStore(out.work / "takes")
        takes, failed = convert_all(recordings, settings, store, args.workers, engine, args.quiet)
        rejects += failed

        # 3. judge the lags against the dataset's median; cut, split by recording and shuffle
        takes, out_of_sync, sync = judge(takes, settings)
        rejects += out_of_sync
        cutting = Cutting(args.window_seconds, args.stride_seconds, args.segment_seconds)
        balance: list[Balance] = []
        ordered, dropped = split_pieces(takes, cutting, args.val_fraction, args.seed, balance)
        rejects += dropped
        if not any(ordered.values()):
            raise DatasetError(
                f"no usable windows ({len(rejects)} rejects, see "
                f"{_write_failed_rejects(out, rejects)})"
            )
        if args.strict and rejects:
            raise DatasetError(
                f"--strict and {len(rejects)} inputs or windows were rejected (see "
                f"{_write_failed_rejects(out, rejects)}); no dataset written"
            )

        # 4. write shards (into the work folder)
        layout = Manifest.for_window(out.path, args.window_seconds, args.segment_seconds)
        crops = layout.segment_frames - layout.frames + 1
        stats = TrainStats(frames=layout.segment_frames, crops=crops)
        run = engine.write if engine is not None else None
        shards = write_shards(ordered, out.work, args.samples_per_shard, stats, run=run)

        # 5. the manifest, then swap the new dataset in
        manifest = dataclasses.replace(
            layout,
            shards=tuple(shards),
            input_hours=sum(t.seconds for t in takes) / 3600,
            rejects=len(rejects),
            train_stats=stats.to_dict(),
            sync=sync.to_dict(),
            args={k: v for k, v in vars(args).items() if k not in NOT_RECORDED},
            versions={"python": sys.version.split()[0], "numpy": np.__version__},
        )
        out.commit(manifest, reject_lines(rejects), sync_reports(sync))
    minutes = (time.perf_counter() - t0) / 60
    warnings = [w for w in (balance[0].warning(), sync.warning()) if w]
    warnings += getattr(out, "warnings", [])
    uploaded = getattr(out, "uploaded", [])
    cpus = engine.cpus if engine is not None else args.workers
    return Summary(out.path, manifest, takes, rejects, minutes, sync, uploaded, warnings, cpus)


def sync_reports(sync: SyncReport) -> dict[str, str]:
    """The files beside the manifest: each take's lag (sync.jsonl) and their histogram."""
    lines, plot = REPORT_NAMES
    title = f"Lag of each take: {sync.summary().partition(': ')[2].partition(';')[0]}"
    svg = lag_histogram(sync.lags(), sync.reference, sync.max_offset, title, sync.count("unknown"))
    return {lines: sync.lines(), plot: svg}


def _write_failed_rejects(out: OutDir | S3OutDir, rejects: list[Reject]) -> Path:
    """Where a failed run leaves its rejects: in the work folder, with the converted takes (a
    previous dataset's rejects.jsonl stays whole, and a rerun finds the folder as it was)."""
    path = out.work / REJECTS_NAME
    path.write_text(reject_lines(rejects))
    return path


# ---------------------------------------------------------------- 6. report


def report(s: Summary) -> str:
    m = s.manifest
    counts = {split: m.num_samples(split) for split in SPLITS}
    hours_in = m.input_hours
    gaps, short, sync = s.count("gap"), s.count("short"), s.count("sync")
    why = [f"{gaps} of them windows or segments at capture gaps"] if gaps else []
    why += [f"{short} of them takes shorter than a segment"] if short else []
    why += [f"{sync} of them takes out of sync"] if sync else []
    lines = [
        f"{s.out}: {counts['train']} train + {counts['val']} val windows "
        f"({m.hours:.2f} h of windows from {hours_in:.2f} h of input) in "
        f"{len(m.shards)} shards; {len(s.rejects)} rejected"
        + (f" ({'; '.join([*why, f'see {s.out / REJECTS_NAME}'])})" if s.rejects else "")
        + (f"; {s.duplicates} duplicate timecode rows dropped" if s.duplicates else "")
        + (f"; {s.reused} takes reused from an earlier run" if s.reused else "")
        + f"; {hours_in / max(s.minutes, 1e-9):.1f} h of audio per minute "
        f"({hours_in / max(s.minutes, 1e-9) / s.cpus:.2f} per CPU, {s.cpus} CPUs)",
        f"  {s.sync.summary()} (each take: {s.out / REPORT_NAMES[0]}, {s.out / REPORT_NAMES[1]})",
    ]
    lines += [f"  rejected {r.file}: {r.reason}" for r in s.rejects[:20]]
    if s.uploaded:
        lines.append(
            f"uploaded {len(s.uploaded)} objects to {s.out}/ (endpoint {storage.endpoint()}), "
            "manifest.json last"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic takes")
    src.add_argument(
        "--input",
        metavar="DIR",
        help="folder of recordings (searched recursively), or s3://bucket/prefix",
    )
    src.add_argument("--verify", metavar="DIR", help="re-read a dataset end to end and report")
    p.add_argument("--out", metavar="DIR", help="output dataset folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of recordings for val")
    p.add_argument("--window-seconds", type=float, default=WINDOW_SECONDS)
    p.add_argument("--stride-seconds", type=float, default=None, help="default: the window")
    p.add_argument(
        "--segment-seconds",
        type=float,
        default=None,
        help="store training segments this long, overlapping by one window, for the loader's "
        "random crops (default: the window, no crops)",
    )
    p.add_argument(
        "--tolerance-seconds",
        type=float,
        default=TOLERANCE_SECONDS,
        help="audio and animation lengths may differ by this many seconds, ...",
    )
    p.add_argument(
        "--tolerance-ratio",
        type=float,
        default=TOLERANCE_RATIO,
        help="... and by this share of the take (differences under a frame always pass it)",
    )
    p.add_argument(
        "--max-gap-seconds",
        type=float,
        default=MAX_GAP_SECONDS,
        help="windows overlapping a longer hole in the capture are left out",
    )
    _add_sync_flags(p)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="--engine local")
    _add_engine_flags(p)
    p.add_argument(
        "--csv-fps",
        type=float,
        default=None,
        help="Live Link CSV timecode rate (default: read from each file; 59.94 or 29.97 for "
        "NTSC captures with non-drop timecode)",
    )
    p.add_argument("--csv-scale", type=float, default=1.0, help="multiply CSV values by this")
    p.add_argument("--npy-fps", type=float, default=LIVE_LINK_FPS, help=".npy animation rate")
    p.add_argument(
        "--npy-order",
        choices=sorted(ORDERS),
        default="arkit",
        help="column order of .npy animation",
    )
    p.add_argument("--npy-scale", type=float, default=1.0, help="multiply .npy values by this")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in --out")
    p.add_argument("--strict", action="store_true", help="fail if any input is rejected")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    problems = usage_problems(args)
    if problems:
        p.error("; ".join(problems))
    return args


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine; ray: tasks on a Ray cluster (pip install "
        "'arkit-dali[ray]'); the same bytes either way",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster (host:port, or auto); default RAY_ADDRESS, else a local Ray "
        "started for the run",
    )


def _add_sync_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sync-search-seconds",
        type=float,
        default=SEARCH_SECONDS,
        help="lags between audio and mouth tried either way, per take",
    )
    p.add_argument(
        "--max-sync-offset",
        type=float,
        default=MAX_OFFSET_SECONDS,
        help="a take whose lag is further than this from the dataset's median is out of sync",
    )
    p.add_argument(
        "--fix-sync",
        action="store_true",
        help="re-time takes out of sync to the median (and convert takes whose length "
        "difference their lag explains) instead of rejecting them",
    )
    p.add_argument(
        "--audio-offset",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="every take's audio runs this late against its animation (a recorder's latency; "
        "negative: early): it is moved that much earlier",
    )


def verify(root: str) -> int:
    try:
        problems = [str(p) for p in check_dataset(root)]
    except ArkitError as exc:  # the store failed as a whole (s3: unreachable, no bucket)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    print(f"{root}: " + (f"{len(problems)} problems" if problems else "OK"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify)
    try:
        summary = make_dataset(args)
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if storage.is_s3(args.out):
            print(_interrupted_upload(storage.location(args.out)), file=sys.stderr)
            return 130
        work = Path(args.out) / WORK_NAME
        print(
            f"interrupted: nothing in {args.out} was replaced; the takes converted so far are "
            f"kept in {work} (rerun the same command to continue, or delete it)",
            file=sys.stderr,
        )
        return 130
    if not args.quiet:
        print(report(summary))
    for line in summary.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _interrupted_upload(url: S3Url) -> str:
    return (
        f"interrupted: {url} keeps its previous dataset, whole, unless the upload had finished "
        "(manifest.json is switched last); rerun the same command to finish (before the "
        f"upload, the takes converted so far are kept for that rerun in "
        f"{staging_dir(url) / WORK_NAME})"
    )


if __name__ == "__main__":
    sys.exit(main())
