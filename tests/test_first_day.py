"""A newcomer's first day: fresh runs never mix their files with another run's, a finished run
says so when resumed, a run worse than the mean predictor says so, the torch loader's workers
fit the machine, and the input format page with its example CSV holds (real runs, real
make_shards)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest

from tests.helpers import SMALL_RUN
from train.cli import main

ROOT = Path(__file__).resolve().parent.parent


def train(dataset, run_dir, *sets, extra=()):
    args = ["--loader", "torch"]
    for s in (*SMALL_RUN, f"data.dir={dataset}", f"run.dir={run_dir}", *sets):
        args += ["--set", s]
    return main([*args, *extra])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(
    tmp_path, tiny_dataset, capsys
):
    run_dir = tmp_path / "run"
    assert train(tiny_dataset, run_dir, "train.max_steps=2", "train.report=false") == 0
    before = snapshot(run_dir)
    capsys.readouterr()
    assert train(tiny_dataset, run_dir, "train.max_steps=3") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run.dir {run_dir} holds another run (")
    assert "metrics.jsonl" in err[0] and "last.pt" in err[0] and "best.pt" in err[0]
    assert f"--resume {run_dir / 'last.pt'}" in err[0]
    assert "--set run.dir=..." in err[0] and "--set run.overwrite=true" in err[0]
    assert snapshot(run_dir) == before  # not a byte changed, no lock file left


@pytest.mark.slow
def test_run_overwrite_replaces_the_previous_run_instead_of_appending(
    tmp_path, tiny_dataset, capsys
):
    run_dir = tmp_path / "run"
    assert train(tiny_dataset, run_dir, "train.max_steps=4", "train.report=false") == 0
    assert max(r["step"] for r in records(run_dir)) == 4
    (run_dir / "notes.txt").write_text("mine")  # not a run's file: kept
    capsys.readouterr()
    assert train(tiny_dataset, run_dir, "train.max_steps=2", "run.overwrite=true") == 0
    out = capsys.readouterr().out
    assert f"run.overwrite: removed the previous run's files from {run_dir} (" in out
    steps = [r["step"] for r in records(run_dir) if r["split"] == "train"]
    assert steps == [1, 2]  # only the new run's records, from step 1
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "report" / "report.md").is_file()


def test_a_resume_into_another_runs_folder_is_refused(tmp_path, tiny_dataset, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        assert train(tiny_dataset, run_dir, "train.max_steps=2", "train.report=false") == 0
    before = snapshot(b)
    capsys.readouterr()
    argv = ["--resume", str(a / "last.pt"), "--set", f"run.dir={b}", "--set", "train.max_steps=4"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(f"error: run.dir {b} holds another run (")
    assert snapshot(b) == before


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_dataset, capsys):
    run_dir = tmp_path / "run"
    assert train(tiny_dataset, run_dir, "train.epochs=1") == 0  # 9 steps, then the report
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["--resume", str(run_dir / "last.pt")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (
        f"{run_dir} is finished: all 1 epochs (train.epochs=1) trained, at step 9; nothing to "
        "do (to train on, add --set train.epochs=2, any number above 1)"
    )
    assert snapshot(run_dir) == before
    # as it says: a larger train.epochs trains on from step 10
    assert main(["--resume", str(run_dir / "last.pt"), "--set", "train.epochs=2"]) == 0
    assert [r["step"] for r in records(run_dir) if r["split"] == "val"] == [9, 18]


def test_resuming_a_run_at_its_max_steps_says_so(tmp_path, tiny_dataset, capsys):
    run_dir = tmp_path / "run"
    assert train(tiny_dataset, run_dir, "train.max_steps=3", "train.report=false") == 0
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["--resume", str(run_dir / "last.pt")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"{run_dir} is finished: train.max_steps=3 reached at step 3; nothing to do (to train "
        "on, add --set train.max_steps=6, or 0 for no step limit)"
    )
    assert snapshot(run_dir) == before


def test_a_run_worse_than_the_mean_predictor_says_so_in_its_last_line(
    tmp_path, tiny_dataset, capsys
):
    # the default config's first_frame target, one step at a tiny lr: an untrained model
    run_dir = tmp_path / "run"
    assert train(tiny_dataset, run_dir, "train.max_steps=1", "train.lr=1e-7") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    val = next(r for r in records(run_dir) if r["split"] == "val")
    ratio = val["mse"] / val["baseline_mse"]
    assert ratio > 1
    assert last == (
        f"this run is worse than the mean predictor: best val mse {val['mse']:.5f} is "
        f"{ratio:.2f}x its {val['baseline_mse']:.5f}; try --config configs/real.yaml (the "
        "sequence model, 40 epochs), or --set train.target=sequence, or more epochs than "
        "train.epochs=10 (docs/training.md#a-first-model-on-your-own-data)"
    )


@pytest.mark.slow
def test_more_torch_workers_than_cpus_are_capped_with_one_line_of_ours(
    tmp_path, tiny_dataset, capsys
):
    cpus = len(os.sched_getaffinity(0))  # what torch's DataLoader compares its workers with
    sets = (f"data.num_workers={cpus + 3}", "train.max_steps=2", "train.report=false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(tiny_dataset, tmp_path / "run", *sets) == 0
    out = capsys.readouterr().out
    line = (
        f"data.num_workers={cpus + 3} is more than the {cpus} CPUs this process may use: "
        f"the torch loader starts {cpus} workers"
    )
    assert out.count(line) == 1
    assert not [w for w in caught if "worker" in str(w.message)]  # torch's own warning


INPUTS = ROOT / "docs" / "inputs.md"


def test_the_example_csv_converts_as_the_inputs_page_says(tmp_path, monkeypatch, capsys):
    from pipeline import make_shards

    page = INPUTS.read_text()
    wav_line = next(x for x in page.splitlines() if x.startswith('python -c "'))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "takes").mkdir()
    (tmp_path / "takes" / "take.csv").write_bytes((ROOT / "examples" / "take.csv").read_bytes())
    exec(wav_line[len('python -c "') : -1], {})  # the page's own one-liner writes takes/take.wav
    assert make_shards.main(["--input", "takes/", "--out", "data/example"]) == 0
    out = capsys.readouterr().out
    assert "data/example: 1 train + 0 val windows" in out and "; 0 rejected;" in out
    assert (tmp_path / "data" / "example" / "rejects.jsonl").read_text() == ""
    assert "data/example: 1 train + 0 val windows ... 0 rejected" in page


def test_the_inputs_page_lists_every_column_and_timecode_form():
    from core.arkit import ARKIT_NAMES, LIVE_LINK_EXTRA, LIVE_LINK_NAMES
    from pipeline.convert.livelink import _TIMECODE, parse_timecode_fields

    page = INPUTS.read_text()
    for name in (*LIVE_LINK_NAMES, *LIVE_LINK_EXTRA, "Timecode", "BlendShapeCount"):
        assert f"`{name}`" in page, name
    assert {n.lower() for n in LIVE_LINK_NAMES} == {n.lower() for n in ARKIT_NAMES}
    # every separator the parser accepts before the frame number has a row in the table,
    # whose example parses as the row says (drop-frame or not)
    separators = re.search(r"\[([^\]]+)\]", _TIMECODE.pattern).group(1)
    rows = re.findall(r"^\| `HH:MM:SS(.)FF(?:\.fff)?` \| `([^`]+)` \| (.+) \|$", page, re.M)
    assert {sep for sep, _, _ in rows} == set(separators)
    for _sep, example, meaning in rows:
        tc = parse_timecode_fields(example)
        assert tc.drop_frame == meaning.startswith("drop-frame"), example
    assert any(parse_timecode_fields(ex).fraction == 0.5 for _, ex, _ in rows)
