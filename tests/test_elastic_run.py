"""What a preempted job does: ``torchrun --nproc_per_node=2 -m train`` gets SIGTERM mid-epoch
(every process, as a scheduler sends it), then resumes from ``last.pt`` on one process and, from
the same checkpoint, on three. Over the stopped run and each resume, every sample of that epoch
is trained on exactly once, but for fewer than ``world_size * batch`` left at the epoch's end;
the next epoch follows the plan for the new world size. ``run.sample_log`` is the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.loaders.plan import epoch_batches
from pipeline.shards.index import sample_refs
from pipeline.shards.manifest import load_manifest
from tests.helpers import SMALL_DDP, build_synthetic, ddp_args, free_port, spawn_ranks

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
BATCH = 2
ENV = {**os.environ, "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def short_windows(tmp_path_factory) -> Path:
    """240 one-second windows (216 train in 9 shards): 54 steps an epoch on 2 ranks."""
    out = tmp_path_factory.mktemp("short") / "ds"
    return build_synthetic(out, 240, "--window-seconds", "1", "--samples-per-shard", "24")


def _sets(data: Path, run: Path, *extra: str) -> list[str]:
    args = []
    for s in (
        *SMALL_DDP,
        "data.num_workers=0",
        f"data.batch_size={BATCH}",
        "train.report=false",
        "run.sample_log=true",
        f"data.dir={data}",
        f"run.dir={run}",
        *extra,
    ):
        args += ["--set", s]
    return args


def _torchrun(nproc: int) -> list[str]:
    return [TORCHRUN, f"--nproc_per_node={nproc}", "--master_port", str(free_port())]


def _freeze_mid_epoch(proc: subprocess.Popen, log: Path, steps: int) -> None:
    """Stop the job (SIGSTOP to its process group) at a moment its rank 0 has run a few steps
    and is well inside an epoch of ``steps``, so a signal sent now lands mid-epoch whatever the
    machine's speed (a step takes ~10 ms here: a poll alone can miss whole epochs)."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            os.killpg(proc.pid, signal.SIGSTOP)
            done = len(log.read_text().splitlines())  # steady now
            if 3 <= done % steps <= steps - 8:
                return
            os.killpg(proc.pid, signal.SIGCONT)  # near an epoch's end: try again later
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before it could be stopped (rc {proc.poll()})")


def _consumed(run: Path) -> dict[int, list[str]]:
    """Every key each epoch trained on, over all ranks' sample logs of ``run``."""
    out: dict[int, list[str]] = {}
    for path in sorted(run.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["epoch"], []).extend(rec["keys"])
    return out


@pytest.mark.slow
def test_torchrun_stopped_by_sigterm_resumes_on_one_and_on_three_processes(tmp_path, short_windows):
    keys = [r.key for r in sample_refs(load_manifest(short_windows), "train")]
    sizes = [s.samples for s in load_manifest(short_windows).split_shards("train")]
    n = len(keys)
    run = tmp_path / "run"
    cmd = [*_torchrun(2), "-m", "train", "--loader", "dali"]
    cmd += _sets(short_windows, run, "train.epochs=6")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    _freeze_mid_epoch(proc, run / "samples-rank0.jsonl", n // (2 * BATCH))
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as a scheduler preempts it
    os.killpg(proc.pid, signal.SIGCONT)  # ... delivered as it goes on
    out, _ = proc.communicate(timeout=180)
    assert "SIGTERM: saved" in out and "--resume" in out, out[-2000:]
    state = torch.load(run / "last.pt", weights_only=True)
    epoch, position = state["loader"]["epoch"], state["loader"]["position"]
    assert state["loader"]["world_size"] == 2 and 0 < position < n, state["loader"]
    before = _consumed(run).get(epoch, [])
    assert len(before) == position == 2 * BATCH * (state["step"] - epoch * (n // (2 * BATCH)))

    for nproc in (1, 3):
        again = tmp_path / f"resumed-{nproc}"
        launch = [sys.executable] if nproc == 1 else _torchrun(nproc)
        res = subprocess.run(
            [*launch, "-m", "train", "--loader", "dali", "--resume", str(run / "last.pt")]
            + ["--set", f"run.dir={again}", "--set", f"train.epochs={epoch + 2}"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        seen = _consumed(again)
        rest = seen[epoch]
        both = before + rest
        assert len(both) == len(set(both)), f"{nproc} processes: a sample was trained on twice"
        assert set(both) <= set(keys)
        assert len(rest) == (n - position) // (nproc * BATCH) * nproc * BATCH
        assert n - len(both) <= nproc * BATCH - 1, f"{n - len(both)} left out"
        # the next epoch: the whole plan at the new world size, rank by rank
        for r in range(nproc):
            lines = (again / f"samples-rank{r}.jsonl").read_text().splitlines()
            got = [
                k
                for rec in map(json.loads, lines)
                if rec["epoch"] == epoch + 1
                for k in rec["keys"]
            ]
            planned = epoch_batches(0, epoch + 1, sizes, BATCH, r, nproc).ravel()
            assert got == [keys[i] for i in planned]


@pytest.mark.slow
def test_a_resume_with_less_than_a_global_batch_left_still_ends_that_epoch(tmp_path, tiny_dataset):
    """One process stops after 8 of its 9 steps (32 of 36 samples); on 2 ranks of 4 the 4 left
    make no global batch, so the loader moves on, but epoch 0 still gets its validation."""
    part = tmp_path / "part"
    from train.cli import main

    assert (
        main(ddp_args(part, tiny_dataset, "dali", "train.max_steps=8", "train.report=false")) == 0
    )
    state = torch.load(part / "last.pt", weights_only=True)
    assert (state["loader"]["epoch"], state["loader"]["position"]) == (0, 32)
    resumed = spawn_ranks(
        ["--loader", "dali", "--resume", str(part / "last.pt"), "--set", "train.max_steps=10"],
        tmp_path / "out",
    )
    assert [r["step"] for r in resumed] == [10, 10]
    lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    vals = [(x["epoch"], x["step"]) for x in lines if x["split"] == "val" and x["world_size"] == 2]
    assert vals[0] == (0, 8)  # epoch 0 validated at the step it stopped, by the resumed run
    trained = [(x["epoch"], x["step"]) for x in lines if x["split"] == "train" and x["step"] > 8]
    assert trained == [(1, 9), (1, 10)]


@pytest.mark.slow
def test_torchrun_sigterm_gives_one_line_per_rank_and_the_checkpoint_of_that_step(
    tmp_path, tiny_dataset
):
    """What a user sees when the job is preempted: every rank says in one line where it
    stopped (the same step), rank 0 saved last.pt there, and no traceback of ours. torchrun
    itself then prints its SignalException and exits 1 (documented in the README)."""
    import re

    run = tmp_path / "run"
    cmd = [*_torchrun(2), "-m", "train", "--loader", "dali", *_sets(tiny_dataset, run)]
    proc = subprocess.Popen(
        [*cmd, "--set", "train.epochs=500"],
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run / "samples-rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    saved = re.findall(
        rf"^SIGTERM: saved {re.escape(str(run / 'last.pt'))} at step (\d+); "
        r"continue with --resume",
        out,
        re.M,
    )
    stopped = re.findall(r"^rank 1: stopped by SIGTERM at step (\d+)", out, re.M)
    assert len(saved) == 1 and stopped == saved, out[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == int(saved[0])
    # torchrun's own SignalException is the only traceback; none passes through our code
    assert err.count("Traceback") <= 1, err[-3000:]
    assert str(ROOT / "train") not in err and str(ROOT / "pipeline") not in err, err[-3000:]
