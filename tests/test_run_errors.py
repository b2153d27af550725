"""What a user sees when a run goes wrong: resume into the folder they point at, on the data the
checkpoint was made from; every knob checked before anything is written; and every situation of
theirs (bad YAML, a foreign checkpoint, an impossible run folder, a full disk, an unreadable
shard, a flag out of range) an ``error: <message>`` naming the file and the reason, exit 1 (2
for make_shards' usage errors), never a traceback.

All runs are tiny (hidden 16, 32 mels, batch 4, two steps) on the session's ``tiny_dataset``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import make_shards
from pipeline.shards.tars import idx_path, read_index
from tests.helpers import SMALL_RUN, build_synthetic
from train import runlog as runlog_module
from train.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = SMALL_RUN


def sets(*pairs: str) -> list[str]:
    return [arg for p in pairs for arg in ("--set", p)]


def train_args(run_dir: Path, dataset: Path, *more: str, loader: str = "dali") -> list[str]:
    return ["--loader", loader, *sets(*SMALL, f"data.dir={dataset}", f"run.dir={run_dir}", *more)]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit code and stderr. An exception escaping ``main`` fails the test: on
    the command line the user would have seen a traceback instead of ``error: ...``."""
    try:
        code = main([str(a) for a in argv])
    except Exception as exc:  # any escape is the failure this file looks for
        pytest.fail(f"main() raised {type(exc).__name__}: {exc} (a traceback for the user)")
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def steps(run_dir: Path, split: str = "train") -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["split"] == split]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset) -> Path:
    """``runs/A`` after two steps (last.pt, best.pt, metrics.jsonl). Read-only: tests copy its
    checkpoint and check that A itself is never touched."""
    a = tmp_path_factory.mktemp("runs") / "A"
    assert main(train_args(a, tiny_dataset, "train.max_steps=2")) == 0
    assert load(a / "last.pt")["step"] == 2
    return a


@pytest.fixture
def copied(trained, tmp_path) -> Path:
    """``B/last.pt``: a byte copy of A's checkpoint in a folder of its own."""
    b = tmp_path / "runs" / "B"
    b.mkdir(parents=True)
    shutil.copy2(trained / "last.pt", b / "last.pt")
    return b / "last.pt"


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> Path:
    """Same shape as ``tiny_dataset`` (40 windows, shards of 16), other content."""
    return build_synthetic(
        tmp_path_factory.mktemp("other") / "ds", 40, "--samples-per-shard", "16", "--seed", "5"
    )


# ---------------------------------------------------------------- 1. resume writes where pointed


@pytest.mark.parametrize("where", ["beside the checkpoint", "run.dir"])
def test_resume_writes_where_the_user_points_and_never_into_the_source_run(
    trained, copied, tmp_path, where
):
    a_before = files(trained)
    b = copied.parent
    b_before = files(b)
    extra = sets(f"run.dir={tmp_path / 'runs' / 'C'}") if where == "run.dir" else []
    assert main(["--resume", str(copied), *sets("train.max_steps=4"), *extra]) == 0

    dest = tmp_path / "runs" / "C" if where == "run.dir" else b
    assert steps(dest) == [3, 4]
    assert steps(dest, "val") == [4]
    state = load(dest / "last.pt")
    assert state["step"] == 4
    assert Path(state["config"]["run"]["dir"]).resolve() == dest.resolve()
    assert files(trained) == a_before  # A: byte for byte as it was
    if where == "run.dir":
        assert files(b) == b_before  # B only lent its checkpoint


# ---------------------------------------------------------------- one run per run.dir


@pytest.mark.slow  # a real first run in a subprocess
def test_a_second_run_into_a_busy_run_dir_is_refused_and_a_killed_runs_lock_blocks_nobody(
    tmp_path, tiny_dataset, capsys
):
    import signal
    import socket
    import time

    a = tmp_path / "A"
    more = ("train.epochs=1000", "run.checkpoint_every=1", "train.report=false")
    first = subprocess.Popen(
        [sys.executable, "-m", "train", *train_args(a, tiny_dataset, *more)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None:
            if (a / "last.pt").is_file() and len(steps(a)) >= 2:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding run.dir
        before = files(a)
        for argv in (
            train_args(a, tiny_dataset, "train.max_steps=2"),
            ["--resume", a / "last.pt", *sets("train.max_steps=1000")],
        ):
            code, err = cli(argv, capsys)
            host = socket.gethostname()
            assert_user_error(
                code, err, f"run.dir {a} is in use", f"pid {first.pid} on host {host}"
            )
            assert "--set run.dir=" in err and len(err.strip().splitlines()) == 1, err
            assert files(a) == before  # the second writer wrote nothing
        first.kill()  # SIGKILL: no clean-up; the kernel drops the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
    assert json.loads((a / ".train.lock").read_text())["pid"] == first.pid  # left behind
    stopped = load(a / "last.pt")["step"]
    resume = ["--resume", a / "last.pt", *sets(f"train.max_steps={stopped + 2}")]
    code, err = cli([*resume, *sets("train.report=false")], capsys)
    assert code == 0, err
    assert load(a / "last.pt")["step"] == stopped + 2
    assert not (a / ".train.lock").exists()  # a run that ends takes its lock file away


# ---------------------------------------------------------------- 2. dataset identity


@pytest.mark.slow  # builds a second dataset
def test_resume_on_other_data_is_refused_unless_allowed_and_identity_is_content(
    trained, copied, other_dataset, tiny_dataset, copy_dataset, capsys
):
    recorded = load(copied)["dataset"]
    assert recorded["dir"] == str(tiny_dataset) and recorded["identity"]
    before = copied.read_bytes()

    code, err = cli(
        ["--resume", copied, *sets("train.max_steps=4", f"data.dir={other_dataset}")], capsys
    )
    assert_user_error(code, err, str(tiny_dataset), str(other_dataset), "train.allow_new_data")
    assert copied.read_bytes() == before
    assert not (copied.parent / "metrics.jsonl").exists()

    # the same bytes in another folder: the same dataset
    same = copy_dataset()
    assert main(["--resume", str(copied), *sets("train.max_steps=3", f"data.dir={same}")]) == 0
    state = load(copied)
    assert state["step"] == 3
    assert state["dataset"] == {"dir": str(same), "identity": recorded["identity"]}

    # other data, allowed explicitly
    argv = sets("train.max_steps=4", f"data.dir={other_dataset}", "train.allow_new_data=true")
    assert main(["--resume", str(copied), *argv]) == 0
    state = load(copied)
    assert state["step"] == 4
    assert state["dataset"]["dir"] == str(other_dataset)
    assert state["dataset"]["identity"] != recorded["identity"]


# ---------------------------------------------------------------- 3. every knob checked at start


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.grad_clip=-1", "train.grad_clip must be > 0 or null"),
        ("train.max_steps=-1", "train.max_steps must be >= 0"),
        ("train.epochs=-1", "train.epochs must be >= 1"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("model.hop_length=0", "model.hop_length must be >= 1"),
        ("model.n_mels=0", "model.n_mels must be >= 1"),
        ("data.val_batch_size=-1", "data.val_batch_size must be >= 0"),
        ("run.torch_threads=-2", "run.torch_threads must be >= 0"),
        ("train.lr=0", "train.lr must be > 0"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("model.win_length=1024", "model.win_length (1024) must be <= model.n_fft (512)"),
        ("data.decode=tpu", "data.decode must be auto, gpu or cpu"),
        ("train.target=frames", "train.target must be first_frame or sequence"),
    ],
)
def test_every_knob_out_of_range_is_refused_before_anything_is_written(
    tmp_path, tiny_dataset, capsys, setting, message
):
    run_dir = tmp_path / "run"
    code, err = cli(train_args(run_dir, tiny_dataset, setting), capsys)
    assert_user_error(code, err, message)
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["nonsense", "mps", "cuda:x", "CPU", "cuda:9", "cuda"])
def test_a_device_this_trainer_cannot_use_is_refused_naming_the_choices(
    tmp_path, tiny_dataset, capsys, device
):
    """run.device is one of auto, cpu, cuda, cuda:<index>, and one this machine has; anything
    else is one error line naming the key, the value and the choices (never a CPU run)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda") and device[5:].isdigit() and int(device[5:]) < have:
        pytest.skip(f"this machine has {device}")
    if device == "cuda" and have:
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "run"
    code, err = cli(train_args(run_dir, tiny_dataset, f"run.device={device}"), capsys)
    assert_user_error(code, err, "run.device", device, "auto", "cpu")
    assert len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()


def test_a_knob_out_of_range_on_resume_touches_nothing(copied, capsys):
    before = files(copied.parent)
    code, err = cli(["--resume", copied, *sets("train.max_steps=4", "train.lr=0")], capsys)
    assert_user_error(code, err, "train.lr must be > 0")
    assert files(copied.parent) == before


def _moved(a: dict, b: dict) -> float:
    """The largest change of any trained weight between two checkpoints (not the batch norms'
    running statistics, which every forward pass updates)."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in a["model"] if not k.endswith(stats)]
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in weights)


def test_lr_and_weight_decay_set_on_resume_are_what_the_optimizer_steps_with(
    copied, tmp_path, capsys
):
    """--set train.lr / train.weight_decay on resume: the optimizer steps with them (its moments
    kept), metrics.jsonl and the new checkpoint's config and optimizer all say so."""
    before = load(copied)
    assert before["config"]["train"]["lr"] == 1e-3 and before["optimizer"]["param_groups"]
    tiny = tmp_path / "tiny"
    args = ["--resume", copied, *sets("train.max_steps=4", "train.report=false", f"run.dir={tiny}")]
    code, _ = cli([*args, *sets("train.lr=1e-9", "train.weight_decay=0.25")], capsys)
    assert code == 0
    after = load(tiny / "last.pt")
    assert after["step"] == 4
    assert after["config"]["train"]["lr"] == 1e-9
    assert after["config"]["train"]["weight_decay"] == 0.25
    for group in after["optimizer"]["param_groups"]:
        assert group["lr"] == 1e-9 and group["weight_decay"] == 0.25
    lines = (tiny / "metrics.jsonl").read_text().splitlines()
    assert [r["lr"] for r in map(json.loads, lines) if r["split"] == "train"] == [1e-9, 1e-9]
    # two AdamW steps of lr 1e-9 move no weight by more than ~2e-9; the checkpoint's lr 1e-3
    # (the same resume without --set) moves them by ~1e-3
    assert _moved(after, before) < 1e-7
    kept = tmp_path / "kept"
    code, _ = cli(
        ["--resume", copied, *sets("train.max_steps=4", "train.report=false", f"run.dir={kept}")],
        capsys,
    )
    assert code == 0
    assert _moved(load(kept / "last.pt"), before) > 1e-5
    assert load(kept / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_resume_with_another_target_names_the_key(copied, capsys):
    before = files(copied.parent)
    code, err = cli(["--resume", copied, *sets("train.target=sequence")], capsys)
    assert_user_error(code, err, str(copied), "train.target=first_frame", "train.target=sequence")
    assert files(copied.parent) == before


@pytest.mark.parametrize("grad_clip, clips", [("null", 0), ("0.5", 2)])
def test_grad_clip_null_trains_without_clipping(
    tmp_path, tiny_dataset, monkeypatch, grad_clip, clips
):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def counting(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    run_dir = tmp_path / "run"
    assert (
        main(train_args(run_dir, tiny_dataset, "train.max_steps=2", f"train.grad_clip={grad_clip}"))
        == 0
    )
    assert calls == [0.5] * clips
    assert load(run_dir / "last.pt")["config"]["train"]["grad_clip"] == (
        None if clips == 0 else 0.5
    )
    assert steps(run_dir) == [1, 2]


# ---------------------------------------------------------------- 4. no raw tracebacks


@pytest.mark.parametrize(
    "content, reason",
    [
        ("train:\n  lr: [1,\n", "not valid YAML"),
        ("- train\n- data\n", "must be a mapping"),
        ("train: 5\n", "must be a mapping"),
        (None, "Is a directory"),
    ],
    ids=["syntax error", "a list", "a section that is a number", "a folder"],
)
def test_bad_config_file_is_a_named_error(tmp_path, tiny_dataset, capsys, content, reason):
    cfg = tmp_path / "bad.yaml"
    if content is None:
        cfg.mkdir()
    else:
        cfg.write_text(content)
    run_dir = tmp_path / "run"
    code, err = cli(["--config", cfg, *train_args(run_dir, tiny_dataset)], capsys)
    assert_user_error(code, err, str(cfg), reason)
    assert not run_dir.exists()


def test_missing_config_file_is_a_named_error(tmp_path, capsys):
    cfg = tmp_path / "nope.yaml"
    code, err = cli(["--config", cfg], capsys)
    assert_user_error(code, err, f"--config {cfg}", "No such file or directory")


def test_a_checkpoint_given_as_config_is_a_named_error(trained, tmp_path, tiny_dataset, capsys):
    # --config where --resume was meant: binary bytes, not YAML text
    run_dir = tmp_path / "run"
    last = trained / "last.pt"
    code, err = cli(["--config", last, *train_args(run_dir, tiny_dataset)], capsys)
    assert_user_error(code, err, f"--config {last}")
    assert not run_dir.exists()


def test_set_value_with_a_yaml_syntax_error_is_a_named_error(tmp_path, tiny_dataset, capsys):
    run_dir = tmp_path / "run"
    code, err = cli([*train_args(run_dir, tiny_dataset), "--set", "train.lr=[1,"], capsys)
    assert_user_error(code, err, "train.lr=[1,", "not a YAML value")
    assert not run_dir.exists()


def test_resume_with_another_model_shape_says_so(copied, capsys):
    before = files(copied.parent)
    code, err = cli(["--resume", copied, *sets("train.max_steps=4", "model.hidden=24")], capsys)
    assert_user_error(code, err, str(copied), "a model of another shape")
    assert files(copied.parent) == before


def _random_bytes(path: Path, good: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _empty(path: Path, good: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _a_list(path: Path, good: Path) -> None:
    torch.save([torch.ones(3), 1, "two"], path)


def _a_foreign_dict(path: Path, good: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 3}, path)


@pytest.mark.parametrize(
    "make, reason",
    [
        (_random_bytes, "unreadable or not ours"),
        (_empty, "unreadable or not ours"),
        (_truncated, "unreadable or not ours"),
        (_a_list, "not a checkpoint of this trainer"),
        (_a_foreign_dict, "not a checkpoint of this trainer"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_resume_of_a_file_that_is_not_our_checkpoint_is_a_named_error(
    trained, tmp_path, monkeypatch, capsys, make, reason
):
    # from a folder of the user's own (no data/synthetic here: the config defaults must not
    # decide what the error says)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "theirs" / "model.pt"
    path.parent.mkdir()
    make(path, trained / "last.pt")
    before = files(path.parent)
    code, err = cli(["--resume", path], capsys)
    assert_user_error(code, err, str(path), reason)
    assert files(path.parent) == before  # nothing written beside it


def _text(path: Path) -> None:
    path.write_text("step: 3\nlr: 0.001\n")


def _zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights.txt", "1 2 3")


def _npy(path: Path) -> None:
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 52), np.float32))


def _torch_file_of_objects(path: Path) -> None:
    import numpy as np

    torch.save({"model": np.zeros(3)}, path)  # a numpy array: not loadable weights_only


def _pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=4))


@pytest.mark.parametrize(
    "make, what",
    [
        (_text, "a text file"),
        (_zip, "a zip archive, not a torch file"),
        (_npy, "a NumPy .npy array"),
        (_torch_file_of_objects, "objects other than tensors and plain values"),
        (_pickle, "a Python pickle"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(
    tmp_path, monkeypatch, capsys, make, what
):
    """torch's own error for these advises weights_only=False (running any code the file
    holds): the user is told what the file is and what to pass instead."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "theirs" / "model.pt"
    path.parent.mkdir()
    make(path)
    code, err = cli(["--resume", path], capsys)
    assert_user_error(code, err, str(path), what, "not a checkpoint of this trainer", "last.pt")
    assert "weights_only" not in err and "False" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_pickle_given_as_checkpoint_prints_one_line_on_the_command_line(tmp_path):
    path = tmp_path / "model.pkl"
    _pickle(path)
    res = subprocess.run(
        [sys.executable, "-m", "train", "--resume", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"error: checkpoint {path} is unreadable or not ours (a "), (
        res.stderr
    )
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # no torch warning either


def test_resume_of_a_missing_path_is_a_named_error(tmp_path, capsys):
    path = tmp_path / "runs" / "x" / "last.pt"
    code, err = cli(["--resume", path], capsys)
    assert_user_error(code, err, str(path), "does not exist")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "shape, reason",
    [("sub", "Not a directory"), ("", "File exists")],
    ids=["under a file", "a file"],
)
def test_a_run_dir_that_cannot_be_made_is_a_named_error(
    tmp_path, tiny_dataset, capsys, shape, reason
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file\n")
    run_dir = blocker / shape if shape else blocker
    code, err = cli(train_args(run_dir, tiny_dataset, "train.max_steps=2"), capsys)
    assert_user_error(code, err, str(run_dir), reason)
    assert blocker.read_text() == "a regular file\n"


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    real_save = torch.save
    saves = []

    def save(obj, f, *args, **kwargs):
        saves.append(getattr(f, "name", f))
        if len(saves) == 2:
            f.write(b"the first half of a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    more = ("train.max_steps=2", "run.checkpoint_every=1", "run.tensorboard=false")
    argv = train_args(run_dir, tiny_dataset, *more)  # no event file beside the checkpoints
    code, err = cli(argv, capsys)
    monkeypatch.undo()
    assert_user_error(code, err, str(run_dir / "last.pt"), "No space left")
    assert len(saves) == 2
    assert load(run_dir / "last.pt")["step"] == 1  # the earlier one, whole
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.pt", "metrics.jsonl"]


def test_full_disk_while_appending_metrics_is_a_named_error(
    tmp_path, tiny_dataset, monkeypatch, capsys
):
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if Path(file).name == "metrics.jsonl" and "a" in mode:
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    # only the run log's own open() (its metrics.jsonl) sees the full disk
    monkeypatch.setattr(runlog_module, "open", full_disk_open, raising=False)
    run_dir = tmp_path / "run"
    code, err = cli(train_args(run_dir, tiny_dataset, "train.max_steps=2"), capsys)
    assert_user_error(code, err, str(run_dir / "metrics.jsonl"), "No space left")


@pytest.mark.slow
def test_the_process_exits_1_with_one_error_line_for_bad_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: [1,\n")
    res = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"error: --config {cfg}: not valid YAML"), res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- 5. verify goes on


def test_verify_lists_an_unreadable_shard_and_goes_on(copy_dataset, monkeypatch, capsys):
    ds = copy_dataset()
    locked, damaged = ds / "train-000000.tar", ds / "train-000001.tar"
    # flip bytes inside one sample's audio of another shard: only its sha256 can tell
    wav = next(m for m in read_index(idx_path(damaged))[5] if m.name.endswith(".wav"))
    with open(damaged, "r+b") as f:
        f.seek(wav.offset + 1000)
        data = f.read(64)
        f.seek(wav.offset + 1000)
        f.write(bytes(b ^ 0xFF for b in data))

    real_open = os.open

    def denying_open(path, flags, *args, **kwargs):
        if Path(os.fspath(path)).resolve() == locked.resolve():
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    code = make_shards.main(["--verify", str(ds)])
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"{locked}: unreadable (Permission denied)" in out
    assert f"{damaged}: sha256 differs" in out  # it went on to the next shard
    assert "train-000002" not in out and "val-000000" not in out
    assert out.strip().endswith(f"{ds}: 2 problems")


# ---------------------------------------------------------------- 6. make_shards usage errors


@pytest.mark.parametrize(
    "flag, value, must",
    [
        ("--val-fraction", "1", "in [0, 1)"),
        ("--val-fraction", "-0.1", "in [0, 1)"),
        ("--val-fraction", "nan", "in [0, 1)"),
        ("--stride-seconds", "0", "> 0"),
        ("--csv-fps", "0", "> 0"),
        ("--window-seconds", "0", "> 0"),
        ("--window-seconds", "inf", "> 0"),
        ("--seed", "-1", ">= 0"),
        ("--max-gap-seconds", "0", "> 0"),
        ("--csv-scale", "0", "> 0"),
    ],
)
def test_make_shards_flag_out_of_range_is_a_usage_error_before_any_work(
    tmp_path, capsys, flag, value, must
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        make_shards.main(["--synthetic", "4", "--out", str(out), "--quiet", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must be {must}" in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_checkpoint_config_with_a_key_this_version_lacks_is_refused_naming_it():
    from core.errors import ConfigError
    from train.config import load_config

    # keys of formats that never shipped: no translation, one line naming the key and the layer
    with pytest.raises(
        ConfigError, match="the checkpoint's config: unknown config key 'data.drop_last'"
    ):
        load_config(None, [], base={"data": {"drop_last": True, "batch_size": 4}})
    with pytest.raises(
        ConfigError, match=r"the checkpoint's config: train.grad_clip must be > 0 or null \(got 0\)"
    ):
        load_config(None, [], base={"train": {"grad_clip": 0}})
    with pytest.raises(ConfigError, match="unknown config key 'data.shuffle_buffer'; valid keys: "):
        load_config(None, ["data.shuffle_buffer=512"])
    with pytest.raises(ConfigError, match="the checkpoint's config: unknown config key"):
        load_config(None, [], base={"data": {"nonsense": 1}})
