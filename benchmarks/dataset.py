"""The data every benchmark row reads: the synthetic dataset built once, the page cache warmed
(a dataset in s3:// is read as it is: make it with ``make_shards --out s3://...``)."""

from __future__ import annotations

import time

from benchmarks.figures import figure
from core.errors import DatasetError
from pipeline.shards import storage
from pipeline.shards.manifest import Manifest, load_manifest
from pipeline.shards.storage import Location


def not_a_dataset(path: Location) -> str:
    """Why ``path``, a local path given by the user, holds no dataset, and what to do."""
    if not path.exists():
        what = "does not exist"
    elif not path.is_dir():
        what = "is a file, not a dataset folder"
    elif not any(path.iterdir()):
        what = "is an empty folder"
    else:
        what = "has no manifest.json (not a dataset, or an interrupted build)"
    return (
        f"--data {path} {what}: give a dataset made by `python pipeline/make_shards.py --out "
        f"DIR` (or an s3:// URL of one), or leave --data out for the benchmark's own synthetic "
        "dataset, built on first use"
    )


def ensure_dataset(
    path: Location, windows: int, samples_per_shard: int | None = None, *, build: bool = True
) -> Manifest:
    """Use the dataset at ``path``; with ``build`` (the benchmark's own default folder only),
    build the synthetic one there if nothing is there yet (a local folder only). A user's
    ``--data`` is never built into: without ``build`` a path holding no dataset is refused."""
    if storage.is_s3(path) or (path / "manifest.json").is_file():
        return load_manifest(path)
    if not build:
        raise DatasetError(not_a_dataset(path))
    if path.exists() and not path.is_dir():
        raise DatasetError(f"{path} is a file, not a folder: move it away to build the dataset")
    if path.exists() and any(path.iterdir()):
        raise DatasetError(
            f"{path} exists but has no manifest.json (an interrupted build?): finish it with "
            f"`python pipeline/make_shards.py --synthetic {windows} --out {path}`, or pass "
            "--data with a complete dataset"
        )
    from pipeline import make_shards

    print(
        f"building a synthetic dataset of {windows} windows in {path} (once; reused later)",
        flush=True,
    )
    args = ["--synthetic", str(windows), "--out", str(path), "--quiet"]
    if samples_per_shard:
        args += ["--samples-per-shard", str(samples_per_shard)]
    t0 = time.perf_counter()
    if make_shards.main(args) != 0:
        raise DatasetError(f"building {path} failed")
    print(f"built in {figure(time.perf_counter() - t0)} s", flush=True)
    return load_manifest(path)


def warm_page_cache(m: Manifest, chunk: int = 16 << 20) -> float:
    """Read every train shard once in big chunks (ranged GETs from S3); returns the
    sequential MB/s."""
    total, t0 = 0, time.perf_counter()
    for p in m.tar_paths("train"):
        reader, offset = storage.open_reader(p), 0
        try:
            while b := reader.pread(chunk, offset):
                offset += len(b)
        finally:
            reader.close()
        total += offset
    return total / (time.perf_counter() - t0) / 1e6
