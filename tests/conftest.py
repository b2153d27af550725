"""Shared fixtures: the session's few datasets, built once with the real make_shards in temp dirs
(the helpers they use: tests/helpers.py). They are read-only: a test that damages a dataset
works on a copy (``copy_dataset``), a test that needs other make_shards settings builds its own.

- ``tiny_dataset``: 40 plain 10 s windows, 36 train in 3 shards of up to 16, 4 val;
- ``noval_dataset``: 8 plain 10 s windows, all train (no val split), in shards of 4;
- ``segments_dataset``: 36 train segments of 2.8 s (84 frames) for 2 s windows (60 frames), in
  5 shards of up to 8, no val: room for crops at every speed up to 1.4;
- ``long_segments``: 10 takes of 14 s: 8 train segments of 420 frames for 10 s windows, one
  per take, in shards of 4, and 2 val windows of 300 frames;
- ``checkpoint``: a sequence model trained for 6 steps on ``tiny_dataset`` (its best.pt).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import SMALL_RUN, build_synthetic

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """40 synthetic windows: 36 train in 3 shards of up to 16, 4 val. Read-only: do not modify."""
    return build_synthetic(tmp_path_factory.mktemp("tiny") / "ds", 40, "--samples-per-shard", "16")


@pytest.fixture(scope="session")
def noval_dataset(tmp_path_factory) -> Path:
    """8 synthetic windows, all train. Read-only."""
    out = tmp_path_factory.mktemp("noval") / "ds"
    return build_synthetic(out, 8, "--val-fraction", "0", "--samples-per-shard", "4")


@pytest.fixture(scope="session")
def segments_dataset(tmp_path_factory) -> Path:
    """36 train segments of 2.8 s cropped to 2 s windows, shards of 8. Read-only."""
    out = tmp_path_factory.mktemp("segments") / "ds"
    args = ["--segment-seconds", "2.8", "--window-seconds", "2", "--val-fraction", "0"]
    return build_synthetic(out, 36, *args, "--samples-per-shard", "8")


@pytest.fixture(scope="session")
def long_segments(tmp_path_factory) -> Path:
    """10 takes of 14 s: 8 train segments of 420 frames, 2 val windows. Read-only."""
    out = tmp_path_factory.mktemp("long_segments") / "ds"
    args = ["--segment-seconds", "14", "--window-seconds", "10", "--val-fraction", "0.2"]
    return build_synthetic(out, 10, *args, "--samples-per-shard", "4")


@pytest.fixture(scope="session")
def checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A sequence model trained for a few steps on the tiny dataset: its best.pt."""
    from train.cli import main as train

    run = tmp_path_factory.mktemp("infer-run")
    args = ["--loader", "torch"]
    sets = ["train.target=sequence", "train.max_steps=6", "data.num_workers=0"]
    for s in (
        *SMALL_RUN,
        f"data.dir={tiny_dataset}",
        f"run.dir={run}",
        *sets,
        "train.report=false",
    ):
        args += ["--set", s]
    assert train(args) == 0
    return run / "best.pt"


@pytest.fixture
def copy_dataset(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset, for tests that damage it."""
    import shutil

    def make() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(tiny_dataset, dst)
        return dst

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
