"""What several test modules share: the small-run overrides and the synthetic dataset builder.
Test modules import these from here, never from one another."""

from __future__ import annotations

from pathlib import Path

from pipeline import make_shards

# --set overrides for a trainer run that takes seconds: a tiny model, small batches, no workers
# (a later --set wins, so a test adds its own after these)
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
