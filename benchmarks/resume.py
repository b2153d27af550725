"""How long a resumed loader takes to yield its first batch, at several points of an epoch.

    python benchmarks/resume.py                        # data/bench, both loaders, 10/50/90 %
    python benchmarks/resume.py --data DIR             # your dataset (made by make_shards)
    python benchmarks/resume.py --at 0.1,0.9 --loaders dali --data s3://bucket/prefix

A loader resumed from a checkpoint's state starts reading at the first unconsumed sample of
the epoch (``pipeline.loaders.plan``'s global position), so the time to the first batch should not
grow with the position. For scale, each row also gives what replaying the consumed batches
would cost: pulling that many batches through a fresh loader. Medians of ``--repeats``; nothing
is asserted (speed is measured, not tested). Without ``--data`` it reads the benchmark's own
synthetic dataset (``data/bench`` in the repository, built on first use); a ``--data`` given
must hold a dataset. Results go to ``--out``/resume.json; other files there stay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.dataset import ensure_dataset
from benchmarks.figures import figure
from benchmarks.report import check_out
from core.errors import RunError, exit_code
from pipeline import build_loader
from pipeline.shards import storage

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "data/bench"  # in the repository (git-ignored /data/), throughput.py's default too

OPTIONS = {"dali": {}, "torch": {"num_workers": 2}}


def first_batch_seconds(name: str, data: str, batch: int, position: int) -> float:
    """Build a loader, load a state at ``position`` of epoch 0, time it to its first batch."""
    t0 = time.perf_counter()
    loader = build_loader(name, data, batch_size=batch, device="auto", seed=0, **OPTIONS[name])
    state = loader.state_dict()
    loader.load_state_dict({**state, "position": position})
    next(iter(loader))
    return time.perf_counter() - t0


def replay_seconds(name: str, data: str, batch: int, batches: int) -> float:
    """Pull ``batches`` batches through a fresh loader: what replaying to that point costs."""
    t0 = time.perf_counter()
    loader = build_loader(name, data, batch_size=batch, device="auto", seed=0, **OPTIONS[name])
    for i, _ in enumerate(loader):
        if i + 1 >= batches:
            break
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="a dataset folder made by make_shards, or its s3:// URL (default: the synthetic "
        f"{DEFAULT_DATA}, built on first use)",
    )
    p.add_argument("--windows", type=int, default=2048, help="windows of the default dataset")
    p.add_argument("--loaders", default="dali,torch", help="comma list of: " + ", ".join(OPTIONS))
    p.add_argument("--at", default="0.1,0.5,0.9", help="points of the epoch, as fractions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    for key in ("windows", "batch_size", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    args.loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    if not args.loaders or not set(args.loaders) <= set(OPTIONS):
        p.error(f"--loaders {','.join(args.loaders)!r}: a comma list of {', '.join(OPTIONS)}")
    raw = args.at
    try:
        args.at = [float(x) for x in raw.split(",")]
    except ValueError:
        p.error(f"--at {raw!r}: a comma list of fractions of the epoch, as 0.1,0.5,0.9")
    if not all(0 <= x < 1 for x in args.at):
        p.error(f"--at {raw!r}: each point is at least 0 and below 1 (the epoch's end)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 with ``error: ...`` on stderr for a bad dataset or --out."""
    args = parse_args(argv)
    return exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out)
    if args.data is None:  # the benchmark's own dataset: the one folder it builds
        args.data = str(ROOT / DEFAULT_DATA)
        ensure_dataset(Path(args.data), args.windows)
    else:
        ensure_dataset(storage.location(args.data), args.windows, build=False)
    rows = []
    for name in args.loaders:
        kw = dict(batch_size=args.batch_size, device="auto", **OPTIONS[name])
        steps = len(build_loader(name, args.data, **kw))
        for frac in args.at:
            done = int(frac * steps)
            resume = [
                first_batch_seconds(name, args.data, args.batch_size, done * args.batch_size)
                for _ in range(args.repeats)
            ]
            replay = [
                replay_seconds(name, args.data, args.batch_size, done + 1)
                for _ in range(args.repeats)
            ]
            row = {
                "loader": name,
                "at": frac,
                "batches_done": done,
                "of": steps,
                "resume_s": statistics.median(resume),
                "replay_s": statistics.median(replay),
            }
            rows.append(row)
            print(
                f"{name:6} at {figure(100 * frac, 2):>4} % ({done}/{steps} batches): first batch "
                f"after {figure(row['resume_s'])} s resumed; replaying to it: "
                f"{figure(row['replay_s'])} s",
                flush=True,
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "resume.json").write_text(json.dumps(rows, indent=1))
    except OSError as exc:
        raise RunError(
            f"cannot write {out / 'resume.json'}: {exc.strerror or exc}; give --out a folder "
            "you can write"
        ) from None
    print(f"wrote {out / 'resume.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
