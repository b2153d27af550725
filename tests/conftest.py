"""Shared fixtures: tiny real datasets built with the real make_shards, in temp dirs (the helpers
they use: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import build_synthetic

os.environ.setdefault("TQDM_DISABLE", "1")


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
