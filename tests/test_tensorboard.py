"""TensorBoard event files beside metrics.jsonl: real runs of the trainer (CPU, tiny dataset),
read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import SMALL_RUN
from train.cli import main
from train.runlog import SKIP_LINE

SMALL = [*SMALL_RUN, "train.log_every=2"]  # a later --set wins
TRAIN_TAGS = {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait_share"}
VAL_TAGS = {"val/mse", "val/mae", "val/mse_ratio_to_mean_predictor"}


def run(run_dir, dataset, *sets):
    args = ["--loader", "torch"]
    for s in (*SMALL, f"data.dir={dataset}", f"run.dir={run_dir}", *sets):
        args += ["--set", s]
    return main(args)


def records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def events(run_dir):
    """TensorBoard's own reader over the run's event files (skips where it is not installed)."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = reader.EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: every point
    acc.Reload()
    return acc


def series(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_event_files_hold_the_same_numbers_as_metrics_jsonl(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    assert run(run_dir, tiny_dataset, "train.epochs=2", "train.max_steps=12") == 0
    acc = events(run_dir)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert TRAIN_TAGS | VAL_TAGS <= set(acc.Tags()["scalars"])

    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8, 10, 12]  # every 2nd and the first
    for key in ("loss", "lr", "samples_per_s", "data_wait_share"):
        got = series(acc, f"train/{key}")
        assert sorted(got) == [r["step"] for r in train], key
        for r in train:
            assert got[r["step"]] == pytest.approx(r[key], rel=1e-6), (key, r["step"])
    for r in train:
        assert 0.0 <= r["data_wait_share"] <= 1.0

    val = records(run_dir, "val")
    assert [r["step"] for r in val] == [9, 12]
    mse, mae = series(acc, "val/mse"), series(acc, "val/mae")
    ratio = series(acc, "val/mse_ratio_to_mean_predictor")
    for r in val:
        assert mse[r["step"]] == pytest.approx(r["mse"], rel=1e-6)
        assert mae[r["step"]] == pytest.approx(r["mae"], rel=1e-6)
        assert ratio[r["step"]] == pytest.approx(r["mse"] / r["baseline_mse"], rel=1e-6)


def test_without_tensorboard_the_run_says_so_once_and_writes_metrics(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    run_dir = tmp_path / "run"
    assert run(run_dir, tiny_dataset, "train.epochs=2", "train.max_steps=12") == 0
    out = capsys.readouterr().out
    assert out.count(SKIP_LINE) == 1, out
    assert "pip install 'arkit-dali[tensorboard]'" in SKIP_LINE
    assert len(records(run_dir, "train")) == 7 and len(records(run_dir, "val")) == 2
    assert not list(run_dir.glob("events.out.tfevents.*"))


def test_run_tensorboard_false_writes_no_event_file(tmp_path, tiny_dataset, capsys):
    run_dir = tmp_path / "run"
    assert run(run_dir, tiny_dataset, "train.max_steps=3", "run.tensorboard=false") == 0
    assert records(run_dir, "train") and records(run_dir, "val")
    assert not list(run_dir.glob("events.out.tfevents.*"))
    assert SKIP_LINE not in capsys.readouterr().out  # switched off is not "not installed"


@pytest.mark.slow
def test_a_resumed_run_adds_its_steps_to_the_same_folder(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    assert run(run_dir, tiny_dataset, "train.max_steps=4") == 0
    events(run_dir)  # skips where tensorboard is not installed
    last = str(run_dir / "last.pt")
    assert main(["--loader", "torch", "--resume", last, "--set", "train.max_steps=8"]) == 0
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one per process run
    steps = sorted(series(events(run_dir), "train/loss"))
    assert steps == [r["step"] for r in records(run_dir, "train")] == [1, 2, 4, 6, 8]
