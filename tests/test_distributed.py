"""Scale-out rules on CPU: 2 ranks with the gloo backend, both loaders, the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import build_loader
from tests.helpers import become_rank, ddp_args, free_port, spawn_ranks

ROOT = Path(__file__).resolve().parent.parent
NO_REPORT = "train.report=false"  # the torchrun test writes one under DDP; these need none


def fingerprints(batch) -> list[bytes]:
    return [bytes(w[:64].numpy().tobytes()) for w in batch["wav"]]


@pytest.mark.parametrize("loader", ["dali", "torch"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_samples_equal_steps_and_rotating_leftovers(tiny_dataset, loader, world):
    batch = 5  # 36 samples: 30 used per epoch, 6 left out (at most world * batch - 1)
    kw = {"num_workers": 0} if loader == "torch" else {}
    loaders = [
        build_loader(
            loader,
            tiny_dataset,
            batch_size=batch,
            seed=3,
            rank=r,
            world_size=world,
            device="cpu",
            **kw,
        )
        for r in range(world)
    ]
    everything = set()
    left_out = []
    for epoch in range(3):
        seen: list[list[bytes]] = []
        for lo in loaders:
            fp = [f for b in lo for f in fingerprints(b)]
            seen.append(fp)
        assert len({len(s) for s in seen}) == 1  # every rank ran the same number of steps
        assert len(seen[0]) == len(loaders[0]) * batch
        flat = [f for s in seen for f in s]
        assert len(flat) == len(set(flat)), f"epoch {epoch}: a sample was seen twice"
        everything |= set(flat)
        left_out.append(set(flat))
        assert len(flat) == 30
    # over the epochs nothing is starved and the left-out samples change
    assert len(everything) == 36
    assert len({frozenset(s) for s in left_out}) > 1


def _counting_rank_main(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    """A rank that counts the collectives (``all_reduce``) of each epoch's training steps."""
    become_rank(rank, world, port)
    import torch.distributed as dist

    from train.cli import main
    from train.trainer import Trainer

    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting(*a, **kw):  # noqa: ANN002, ANN003 - counts, then the real collective
        calls[0] += 1
        return real_all_reduce(*a, **kw)

    dist.all_reduce = counting
    epochs: list[dict] = []
    real_epoch = Trainer._train_epoch

    def train_epoch(self, epoch):  # noqa: ANN001
        step, before = self.step, calls[0]
        real_epoch(self, epoch)
        epochs.append({"steps": self.step - step, "all_reduce": calls[0] - before})

    Trainer._train_epoch = train_epoch
    rc = main(args)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"rc": rc, "epochs": epochs}))


@pytest.mark.slow
def test_a_ddp_training_step_makes_one_collective_of_its_own(tmp_path, tiny_dataset):
    """The bad-batch flag and the stop agreement share one all_reduce per step (DDP's gradient
    buckets aside), and no step waits on the host for the device to read the stop flag."""
    out = tmp_path / "out"
    out.mkdir()
    args = ddp_args(tmp_path / "run", tiny_dataset, "dali", "train.max_steps=6", NO_REPORT)
    mp.start_processes(
        _counting_rank_main,
        args=(2, free_port(), [*args, "--set", "data.num_workers=0"], str(out)),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    for r in range(2):
        rec = json.loads((out / f"rank{r}.json").read_text())
        assert rec["rc"] == 0
        assert [e["steps"] for e in rec["epochs"]] == [4, 2]  # 36 samples, 2 ranks, batch 4
        assert [e["all_reduce"] for e in rec["epochs"]] == [4, 2]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_ddp_ranks_stay_in_step_identical_and_resume_with_the_same_batches(
    tmp_path, tiny_dataset, loader
):
    # 36 train samples, 2 ranks, batch 4: 4 steps per epoch per rank. 7 steps cross an epoch.
    full = spawn_ranks(
        ddp_args(tmp_path / "full", tiny_dataset, loader, "train.max_steps=7", NO_REPORT),
        tmp_path / "full-out",
    )
    assert [r["rc"] for r in full] == [0, 0]
    assert [r["released"] for r in full] == [True, True]
    assert [r["step"] for r in full] == [7, 7]
    for k, v in full[0]["params"].items():
        assert torch.equal(v, full[1]["params"][k]), f"{k} differs across ranks"
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {x["world_size"] for x in lines} == {2}
    ref = {x["step"]: x["loss"] for x in lines if x["split"] == "train"}
    assert sorted(ref) == list(range(1, 8))

    part = spawn_ranks(
        ddp_args(tmp_path / "part", tiny_dataset, loader, "train.max_steps=2", NO_REPORT),
        tmp_path / "part-out",
    )
    assert [r["step"] for r in part] == [2, 2]
    resumed = spawn_ranks(
        [
            "--loader",
            loader,
            "--resume",
            str(tmp_path / "part" / "last.pt"),
            "--set",
            "train.max_steps=7",
        ],
        tmp_path / "resumed-out",
    )
    assert [r["resumed_at"] for r in resumed] == [[2], [2]]  # each rank's loader mid-epoch
    assert [r["step"] for r in resumed] == [7, 7]
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    got = {x["step"]: x["loss"] for x in lines if x["split"] == "train"}
    assert [got[s] for s in range(3, 8)] == [ref[s] for s in range(3, 8)]
    for k, v in resumed[0]["params"].items():
        assert torch.equal(v, full[0]["params"][k]), f"{k}: resumed run differs"


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_dataset):
    """What a user types: torchrun --nproc_per_node=2 -m train --loader dali ..."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        "-m",
        "train",
        *ddp_args(tmp_path / "run", tiny_dataset, "dali", "train.epochs=1"),
    ]
    res = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(x["world_size"] == 2 for x in lines)
    assert [x["step"] for x in lines if x["split"] == "train"] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4
    # best.pt's report: both ranks scored their half of the val split, rank 0 wrote it once
    rec = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rec["samples"] == 4 and rec["frames"] == 4 * 300 and rec["step"] == 4
    assert res.stdout.count("report on best.pt") == 1
