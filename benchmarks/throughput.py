"""Throughput: DALI, the DataLoader baseline, webdataset and the physical limits, side by side.

    python benchmarks/throughput.py               # builds data/bench (2048 windows) if absent
    python benchmarks/throughput.py --quick       # seconds: 48 windows, 1 repeat, few batches
    python benchmarks/throughput.py --data DIR --modes loader --rows torch,dali-cpu,read-only
    python benchmarks/throughput.py --data s3://bucket/prefix   # the loaders' rows, over S3

Every row reads the same shards in the same run and is measured the same way: a fresh epoch per
repeat, ``--warmup`` batches untimed (pipeline build, worker start, webdataset's buffer fill),
then ``--batches`` timed batches; the median over ``--repeats`` is reported with min and max.
Repeats are interleaved across rows so that a noisy neighbour hurts every row alike.

Rows (``--rows``; the default is every row this machine can run) are the loaders (torch,
webdataset, spdl, a reference thread pool, DALI in each decode mode) and the limits
(read-only, h2d-pinned, synthetic-*); their table is in ``--help``, generated from the registry
in benchmarks/rows.py.

Modes (``--modes``): ``loader`` iterates batches only; ``train`` also runs the trainer's step
(``train.step.TrainStep``: SimplifiedModel forward/backward, gradient clipping, AdamW; with
``--mel`` the SequenceModel, on raw audio or the loader's log-mel) on each batch and reports the
share of time spent waiting in ``next()`` for data. Results go to
``--out`` (default results/): throughput.json, .md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.dataset import ensure_dataset, warm_page_cache
from benchmarks.figures import figure, plural
from benchmarks.measure import MODES, add_ratios, measure, run_repeats, summarize, trainer_step
from benchmarks.report import check_out, closing_notes, environment, markdown, write_reports
from benchmarks.rows import (
    ROW_ORDER,
    augment_for,
    make_row,
    rows_help,
    select_rows,
    skipped_rows,
)
from core.errors import ConfigError, exit_code
from model.features import Mel
from pipeline.loaders.spec import DaliOptions, resolve_device
from pipeline.shards import storage

# 4 workers on a 2-CPU machine is the point of the baseline, not a mistake to warn about
warnings.filterwarnings("ignore", message="This DataLoader will create")
ROOT = Path(__file__).resolve().parent.parent
_DALI = DaliOptions()  # the loader's defaults, stated there only

# ---------------------------------------------------------------- defaults (one block)
DEFAULTS = dict(
    # 2048 windows (1843 train): more than the (warmup + batches + prefetch) * batch samples
    # a repeat reads, so the timed batches read fresh bytes. Building it takes 4-6 min on 2
    # CPUs (once: later runs reuse it); the timed run after that takes about a minute.
    data="data/bench",
    windows=2048,
    out="results",
    batch_size=16,  # the baseline's batch
    warmup=5,  # untimed batches per repeat: build, worker start, webdataset's buffer fill
    batches=40,  # timed batches per repeat
    repeats=3,
    workers=4,  # torch and webdataset workers, as the baseline's DataLoader
    threads=os.cpu_count() or 1,  # the threads row's pool: one per CPU (measured best on 2)
    spdl_threads=1,  # spdl's threads and stage concurrency: 1 measured best on 2 CPUs (the GIL)
    wds_shuffle=128,  # webdataset's sample buffer; the shards are pre-shuffled on disk
    dali_threads=None,  # None: the threads row's count, so both loaders get the same cores
    dali_prefetch=_DALI.dali_prefetch,
    reader_prefetch=_DALI.reader_prefetch,
)
QUICK = dict(data="data/bench-quick", windows=48, batch_size=4, warmup=1, batches=4, repeats=1)
# the least value of each number flag: below it a row fails (a pool of 0 threads, a prefetch
# queue of 0) or a repeat times nothing (the first batch is a warm-up one)
AT_LEAST = dict(
    windows=1,
    batch_size=1,
    warmup=1,
    batches=1,
    repeats=1,
    workers=0,
    wds_shuffle=0,
    threads=1,
    spdl_threads=1,
    dali_threads=0,
    dali_prefetch=1,
    reader_prefetch=1,
    torch_threads=1,
)


def parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``parse_args`` fills in the defaults that depend on others)."""
    p = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # the title and the commands
        epilog=rows_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        help="a dataset folder made by make_shards, or its s3:// URL (default: the synthetic "
        f"{DEFAULTS['data']}, or {QUICK['data']} with --quick, built on first use)",
    )
    p.add_argument(
        "--windows",
        type=int,
        help="windows of the default dataset when it is built "
        f"(default {DEFAULTS['windows']}; --quick {QUICK['windows']})",
    )
    p.add_argument("--out", default=DEFAULTS["out"], help="where the results go (default results/)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run in seconds: 48-window dataset, batch 4, 1 repeat",
    )
    p.add_argument("--modes", default="loader,train", help="comma list of: " + ", ".join(MODES))
    p.add_argument(
        "--rows", help="comma list (default: every row this machine runs): " + ", ".join(ROW_ORDER)
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="untimed batches per repeat")
    p.add_argument("--batches", type=int, help="timed batches per repeat")
    p.add_argument("--repeats", type=int)
    p.add_argument(
        "--workers", type=int, default=DEFAULTS["workers"], help="torch and webdataset workers"
    )
    p.add_argument("--wds-shuffle", type=int, default=DEFAULTS["wds_shuffle"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="threads row's pool")
    p.add_argument("--spdl-threads", type=int, default=DEFAULTS["spdl_threads"], help="spdl's")
    p.add_argument(
        "--dali-threads",
        type=int,
        default=DEFAULTS["dali_threads"],
        help="DALI's CPU threads (default: --threads, the threads row's pool)",
    )
    p.add_argument("--dali-prefetch", type=int, default=DEFAULTS["dali_prefetch"])
    p.add_argument("--reader-prefetch", type=int, default=DEFAULTS["reader_prefetch"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--augment",
        action="store_true",
        help="add the -aug rows: the loaders with random crops, gain, noise and speed",
    )
    p.add_argument(
        "--mel",
        action="store_true",
        help="add the -mel rows (the loaders yielding log-mel, data.features: mel); the train "
        "step becomes the sequence model, which reads the whole clip's log-mel, for every row",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads of the train step (default: 1 on CPU, torch's on CUDA)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.dali_threads = args.threads if args.dali_threads is None else args.dali_threads
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    if args.data is None:  # the benchmark's own folder, in the repository whatever the cwd
        args.data = str(ROOT / preset["data"])
    for key in ("data", "windows", "batch_size", "warmup", "batches", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for key, least in AT_LEAST.items():
        value = getattr(args, key)
        if value is not None and value < least:
            p.error(f"--{key.replace('_', '-')} {value}: must be at least {least}")
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if not args.modes:
        p.error(f"--modes names no mode: choose from {', '.join(MODES)}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 with ``error: ...`` on stderr for a bad row, device or dataset."""
    args = parse_args(argv)
    return exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.torch_threads or device.type == "cpu":
        # on a CPU-only machine the loader needs the other cores: with several intra-op threads
        # the step's OpenMP barriers spin against the loader's threads and a step takes 4x longer,
        # with 10x spread (measured on 2 cores)
        torch.set_num_threads(args.torch_threads or 1)
    # rows checked before a dataset build that a typo would waste
    remote = storage.is_s3(args.data)
    names = select_rows(args.rows, device, args.augment, args.mel, remote)
    data = storage.location(args.data)
    if not remote and not data.exists() and args.data in (DEFAULTS["data"], QUICK["data"]):
        data = ROOT / data  # the default location is inside the repository (git-ignored /data/)
    check_out(Path(args.out))
    # only the benchmark's own folders are built into; a user's --data must hold a dataset
    own = {(ROOT / DEFAULTS["data"]).resolve(), (ROOT / QUICK["data"]).resolve()}
    build = not remote and data.resolve() in own
    m = ensure_dataset(data, args.windows, 16 if args.quick else None, build=build)
    args.data = str(data)
    args.augment_config = augment_for(m)
    args.mel_config = Mel(sample_rate=m.sample_rate)  # the model's default log-mel

    notes: list[str] = [] if args.rows else skipped_rows()
    B, n_train = args.batch_size, m.num_samples("train")
    if n_train < B:  # no row would yield a batch: some would wait for one forever
        raise ConfigError(
            f"--batch-size {B}: {m.root} has {plural(n_train, 'train sample')}, fewer than one "
            "batch; give a smaller --batch-size or a larger dataset"
        )
    seq = warm_page_cache(m)
    read = "read once from S3" if remote else "page cache warm"
    print(
        f"{m.root}: {plural(n_train, 'train sample')}; {read} ({figure(seq)} MB/s sequential)",
        flush=True,
    )
    rows = [make_row(n, args, m, device) for n in names]
    env = environment(args, m, device, seq)

    # one untimed pass per row first: starts the workers before the train step creates its
    # thread pool (forking after OpenMP has started is fragile) and warms every code path
    for row in rows:
        measure(row, 0, args.warmup, 1, None, device)
    steps = {"train": trainer_step(m, B, device, args.mel)} if "train" in args.modes else {}
    try:
        reps = run_repeats(
            rows, args.modes, args.repeats, args.warmup, args.batches, steps, device, B
        )
    finally:
        for row in rows:
            row.close()

    row_of = {r.name: r for r in rows}
    results = [
        summarize(row_of[name], mode, reps[(name, mode)], B, m.layout("train").sample_bytes)
        for mode in args.modes
        for name in names
        if (name, mode) in reps
    ]
    add_ratios(results)
    env["load_average_end"] = list(os.getloadavg())
    notes += closing_notes(args, names, results, device)
    paths = write_reports(Path(args.out), results, env, notes)
    print("\n" + markdown(results, env, notes))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
