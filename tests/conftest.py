"""Shared fixtures: tiny real datasets built with the real make_shards, in temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import make_shards

os.environ.setdefault("TQDM_DISABLE", "1")

# --set overrides for a trainer run that takes seconds: a tiny model, small batches, no workers
SMALL_RUN = [
    "model.hidden=16",
    "model.n_mels=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "run.progress=false",
    "train.log_every=1",
]


def build_synthetic(out: Path, n: int, *extra: str) -> Path:
    """Run make_shards on ``n`` synthetic takes into ``out`` (raises on failure)."""
    args = ["--synthetic", str(n), "--out", str(out), "--quiet", "--workers", "2", *extra]
    assert make_shards.main(args) == 0
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """40 synthetic windows: 36 train in 3 shards of up to 16, 4 val. Read-only: do not modify."""
    return build_synthetic(tmp_path_factory.mktemp("tiny") / "ds", 40, "--samples-per-shard", "16")


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
