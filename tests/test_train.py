"""The trainer, end to end on a tiny real dataset with the real loaders (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from core.errors import ConfigError
from tests.helpers import SMALL_RUN
from train.cli import main
from train.config import load_config
from train.step import targets

SMALL = [*SMALL_RUN, "data.num_workers=2"]  # a later --set wins


def run(tmp_path, dataset, *sets, loader="dali", extra=()):
    args = ["--loader", loader]
    for s in (*SMALL, f"data.dir={dataset}", f"run.dir={tmp_path / 'run'}", *sets):
        args += ["--set", s]
    return main([*args, *extra])


def metrics(tmp_path):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_debug_run_does_three_batches_per_epoch_and_writes_metrics_and_checkpoint(
    tmp_path, tiny_dataset, loader
):
    assert run(tmp_path, tiny_dataset, "train.epochs=2", loader=loader, extra=["--debug"]) == 0
    m = metrics(tmp_path)
    train_steps = [r["step"] for r in m if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # 3 per epoch, 2 epochs (36 samples would give 9)
    assert [r["epoch"] for r in m if r["split"] == "train"] == [0, 0, 0, 1, 1, 1]
    vals = [r for r in m if r["split"] == "val"]
    assert [v["epoch"] for v in vals] == [0, 1]
    for v in vals:
        assert {"mse", "mae", "baseline_mse", "loss"} <= v.keys()
        assert v["baseline_mse"] > 0 and v["mse"] > 0 and v["world_size"] == 1
        assert len(v["per_blendshape_mae"]) == 52
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 6
    assert state["loader"]["epoch"] == 2 and state["loader"]["batch"] == 0
    assert state["config"]["data"]["batch_size"] == 4
    assert (tmp_path / "run" / "best.pt").is_file()


def test_first_frame_targets_are_frame_zero():
    arkit = torch.rand(4, 300, 52)
    y = targets(arkit, "first_frame")
    assert y.shape == (4, 52) and torch.equal(y, arkit[:, 0, :])
    assert targets(arkit, "sequence") is arkit
    assert torch.equal(targets(arkit[:, 0, :], "first_frame"), arkit[:, 0, :])  # already 2-D


@pytest.mark.slow  # three real epochs
def test_short_cpu_run_lowers_the_training_loss(tmp_path, tiny_dataset):
    assert run(tmp_path, tiny_dataset, "train.epochs=3", "train.lr=3e-3") == 0
    losses = [r["loss"] for r in metrics(tmp_path) if r["split"] == "train"]
    assert len(losses) == 27  # 36 samples / batch 4 = 9 steps, 3 epochs
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.25 * first, (first, last)


def test_sequence_target_trains_the_sequence_model(tmp_path, tiny_dataset):
    assert run(tmp_path, tiny_dataset, "train.target=sequence", "train.max_steps=2") == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert any(k.startswith("context.") for k in state["model"])  # SequenceModel's layers
    v = [r for r in metrics(tmp_path) if r["split"] == "val"][0]
    assert v["samples"] == 4


def test_unknown_set_key_fails_listing_valid_keys(tmp_path, tiny_dataset, capsys):
    assert run(tmp_path, tiny_dataset, "train.lrr=1") == 1
    err = capsys.readouterr().err
    assert "train.lrr" in err and "valid keys" in err and "train.lr" in err and "data.dir" in err
    with pytest.raises(ConfigError, match="must be int"):
        load_config(None, ["data.batch_size=abc"])


@pytest.mark.slow
def test_resume_continues_the_step_count_with_the_same_losses(tmp_path, tiny_dataset):
    # uninterrupted: 12 steps (crosses the 9-step epoch boundary)
    full = tmp_path / "full"
    full.mkdir()
    assert run(full, tiny_dataset, "train.max_steps=12") == 0
    ref = {r["step"]: r["loss"] for r in metrics(full) if r["split"] == "train"}
    # interrupted after 5 steps, then resumed with a larger max_steps from the command line
    assert run(tmp_path, tiny_dataset, "train.max_steps=5") == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 5
    assert (
        main(
            [
                "--loader",
                "dali",
                "--resume",
                str(tmp_path / "run" / "last.pt"),
                "--set",
                "train.max_steps=12",
            ]
        )
        == 0
    )
    got = {r["step"]: r["loss"] for r in metrics(tmp_path) if r["split"] == "train"}
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(6, 13)] == [ref[s] for s in range(6, 13)]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 12


def test_missing_shards_say_how_to_make_them(tmp_path, capsys):
    assert run(tmp_path, tmp_path / "nothing-here") == 1
    err = capsys.readouterr().err
    assert "nothing-here" in err and "make_shards.py" in err


def test_config_that_disagrees_with_the_manifest_is_refused(tmp_path, tiny_dataset, capsys):
    assert run(tmp_path, tiny_dataset, "data.clip_samples=80000") == 1
    err = capsys.readouterr().err
    assert "clip_samples=80000" in err and "clip_samples=160000" in err


def test_a_dataset_without_val_split_trains_without_validation(tmp_path, noval_dataset, capsys):
    assert run(tmp_path, noval_dataset, "train.epochs=2") == 0
    m = metrics(tmp_path)
    assert [r["step"] for r in m if r["split"] == "train"] == [1, 2, 3, 4]
    assert not [r for r in m if r["split"] == "val"]
    assert "no val split" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4


def test_val_batch_divides_each_ranks_share_so_validation_sees_every_sample():
    from train.builders import val_batch_size

    assert val_batch_size(36, 1, 16) == 12  # 3 batches of 12: all 36
    assert val_batch_size(100, 1, 16) == 10
    assert val_batch_size(37, 2, 16) == 9  # shares of 18 and 19: 36 of 37 seen
    assert val_batch_size(3, 4, 16) == 1


@pytest.mark.slow
def test_resume_keeps_the_checkpoints_loader_unless_told(tmp_path, tiny_dataset):
    assert run(tmp_path, tiny_dataset, "train.max_steps=2", loader="torch") == 0
    last = str(tmp_path / "run" / "last.pt")
    state = torch.load(last, weights_only=True)
    assert state["loader"]["backend"] == state["config"]["data"]["loader"] == "torch"
    assert main(["--resume", last, "--set", "train.max_steps=4"]) == 0  # no --loader given
    loaders = {r["loader"] for r in metrics(tmp_path)}
    assert loaders == {"torch"}
    # asking for the other backend is refused: its shuffle order differs
    assert main(["--loader", "dali", "--resume", last, "--set", "train.max_steps=6"]) == 1
    assert main(["--resume", last, "--set", "data.loader=dali", "--set", "train.max_steps=6"]) == 1


def test_a_cuda_device_without_cuda_is_a_clear_error(tmp_path, tiny_dataset, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run(tmp_path, tiny_dataset, "run.device=cuda:0") == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_trainer_takes_its_model_and_loaders_ready_made(tmp_path, tiny_dataset):
    """A test (or a user) hands the trainer a small model of its own, a step with an optimizer of
    its own and a loader built directly; the trainer builds none of them, and fits, validates
    and checkpoints with them."""
    from pipeline import build_loader
    from train.builders import build_step
    from train.config import Config
    from train.trainer import Trainer

    class Mean(torch.nn.Module):  # first frame from the clip's loudness: tiny and learnable
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(1, 52)

        def forward(self, wav):
            return torch.sigmoid(self.head(wav.abs().mean(1, keepdim=True)))

    cfg = Config()
    cfg.run.dir, cfg.run.progress, cfg.train.epochs, cfg.train.log_every = (
        str(tmp_path),
        False,
        2,
        1,
    )
    loader = build_loader("torch", tiny_dataset, batch_size=6, device="cpu", num_workers=0)
    val = build_loader(
        "torch", tiny_dataset, split="val", batch_size=2, device="cpu", shuffle=False, num_workers=0
    )
    model = Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = build_step(cfg, model, torch.device("cpu"), opt=opt)
    trainer = Trainer(cfg, model, loader, val, torch.device("cpu"), step=step)
    rec = trainer.fit()
    assert trainer.step == 12 and trainer.model is model  # 36 samples / 6 = 6 steps, 2 epochs
    assert trainer.opt is opt and trainer.train_step is step
    assert rec["samples"] == 4 and rec["epoch"] == 1
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 12 and {r["lr"] for r in train} == {0.05}
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(state["model"]) == {"head.weight", "head.bias"}
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert state["dataset"]["identity"] == loader.manifest.identity


@pytest.mark.slow
def test_resume_with_augmentation_gives_the_same_losses(tmp_path, tiny_dataset):
    """Crops and augmentation are drawn from seeds of the epoch (and part): a run stopped after
    5 steps and resumed gives the uninterrupted run's losses, step for step."""
    aug = ("augment.gain_db=[-6, 6]", "augment.snr_db=[10, 30]", "augment.speed=[0.9, 0.99]")
    full = tmp_path / "full"
    full.mkdir()
    assert run(full, tiny_dataset, "train.max_steps=12", *aug) == 0
    ref = {r["step"]: r["loss"] for r in metrics(full) if r["split"] == "train"}
    assert run(tmp_path, tiny_dataset, "train.max_steps=5", *aug) == 0
    last = str(tmp_path / "run" / "last.pt")
    assert main(["--loader", "dali", "--resume", last, "--set", "train.max_steps=12"]) == 0
    got = {r["step"]: r["loss"] for r in metrics(tmp_path) if r["split"] == "train"}
    assert [got[s] for s in range(6, 13)] == [ref[s] for s in range(6, 13)]
    state = torch.load(last, weights_only=True)
    assert state["config"]["augment"]["speed"] == [0.9, 0.99]  # the resume kept it
    # and augmentation changes what the model sees: other losses than without it
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run(plain, tiny_dataset, "train.max_steps=5") == 0
    losses = {r["step"]: r["loss"] for r in metrics(plain) if r["split"] == "train"}
    assert losses[5] != ref[5]
