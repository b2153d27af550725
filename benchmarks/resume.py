"""How long a resumed loader takes to yield its first batch, at several points of an epoch.

    python benchmarks/resume.py                        # data/bench, both loaders, 10/50/90 %
    python benchmarks/resume.py --at 0.1,0.9 --loaders dali --data s3://bucket/prefix

A loader resumed from a checkpoint's state starts reading at the first unconsumed sample of
the epoch (``pipeline.loaders.plan``'s global position), so the time to the first batch should not
grow with the position. For scale, each row also gives what replaying the consumed batches
would cost, the way the loaders resumed before: pulling that many batches through a fresh
loader. Medians of ``--repeats``; nothing is asserted (speed is measured, not tested).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.dataset import ensure_dataset
from pipeline import build_loader

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/bench", help="dataset dir or s3:// URL")
    p.add_argument("--windows", type=int, default=2048, help="windows to build if --data is absent")
    p.add_argument("--loaders", default="dali,torch")
    p.add_argument("--at", default="0.1,0.5,0.9", help="points of the epoch, as fractions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    if "://" not in args.data:
        ensure_dataset(Path(args.data), args.windows)
    rows = []
    for name in args.loaders.split(","):
        kw = dict(batch_size=args.batch_size, device="auto", **OPTIONS[name])
        steps = len(build_loader(name, args.data, **kw))
        for frac in (float(x) for x in args.at.split(",")):
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
                f"{name:6} at {frac:4.0%} ({done}/{steps} batches): first batch after "
                f"{row['resume_s']:.2f} s resumed; replaying to it: {row['replay_s']:.2f} s",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
