"""Corrupt data gets a named error, never a crash; interrupted work resumes with nothing lost.

Each corrupt case is made from a private copy of a good tiny dataset. Cases that could crash
the interpreter run in a subprocess, which must end with an ordinary non-zero exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import DatasetError
from pipeline import build_loader
from pipeline.shards.members import npy_member as npy_bytes
from pipeline.shards.tars import write_shard
from pipeline.shards.verify import check_dataset


def verify_dataset(ds: Path) -> list[str]:
    """What ``make_shards --verify`` lists, one line per problem."""
    return [str(p) for p in check_dataset(ds)]


ROOT = Path(__file__).resolve().parent.parent
SHARD = "train-000000.tar"
LOADERS = [("dali", {"decode": "gpu"}), ("dali", {"decode": "cpu"}), ("torch", {"num_workers": 0})]


def load_all(ds: Path, name: str, **kw) -> int:
    """Iterate one epoch unshuffled; return the number of batches."""
    loader = build_loader(name, ds, batch_size=4, shuffle=False, device="cpu", **kw)
    return sum(1 for _ in loader)


def set_manifest(ds: Path, shard: str, **fields) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == shard:
            s.update(fields)
    (ds / "manifest.json").write_text(json.dumps(m))


def rewrite_shard(ds: Path, shard: str, mutate) -> None:
    """Re-write a shard (and its index and manifest entry) with ``mutate`` applied to its
    samples ``[(key, [(ext, bytes), ...]), ...]``, so only the intended damage remains."""
    samples: list = []
    with tarfile.open(ds / shard) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, tf.extractfile(m).read()))
    info = write_shard(ds / shard, mutate(samples))
    set_manifest(ds, shard, **{k: info[k] for k in ("bytes", "sha256", "samples")})


def member(samples, i: int, ext: str) -> bytes:
    return dict(samples[i][1])[ext]


def replace(samples, i: int, ext: str, data: bytes | None):
    key, members = samples[i]
    members = [(e, data if e == ext else d) for e, d in members if not (e == ext and data is None)]
    return samples[:i] + [(key, members)] + samples[i + 1 :]


def sample_key(ds: Path, i: int) -> str:
    line = (ds / SHARD.replace(".tar", ".idx")).read_text().splitlines()[1 + i]
    return line.split()[3].partition(".")[0]


def expect_named_error(ds: Path, *needles: str) -> None:
    """Every loader stops with a DatasetError that names what is wrong and how to find it."""
    for name, kw in LOADERS:
        with pytest.raises(DatasetError) as err:
            load_all(ds, name, **kw)
        msg = str(err.value)
        for needle in needles:
            assert needle in msg, (name, kw, msg)
        assert "make_shards.py --verify" in msg, msg


# ---------------------------------------------------------------- corrupt or wrong data


@pytest.mark.slow
def test_truncated_shard_is_named_by_loaders_verify_and_the_trainer(copy_dataset):
    ds = copy_dataset()
    tar = ds / SHARD
    os.truncate(tar, tar.stat().st_size - 200_000)
    expect_named_error(ds, SHARD, "truncated")
    assert any(SHARD in p and "truncated" in p for p in verify_dataset(ds))
    # what a user types: python -m train --loader dali on the damaged dataset
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--loader",
            "dali",
            "--set",
            f"data.dir={ds}",
            "--set",
            f"run.dir={ds.parent / 'run'}",
            "--set",
            "run.progress=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 1, res.stderr[-2000:]  # an ordinary error, not a signal
    assert SHARD in res.stderr and "make_shards.py --verify" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_shard_with_a_matching_manifest_never_reaches_dali(copy_dataset, mmap):
    """DALI segfaults on a memory-mapped truncated tar; our index check runs first."""
    ds = copy_dataset()
    tar = ds / SHARD
    os.truncate(tar, tar.stat().st_size - 200_000)
    set_manifest(ds, SHARD, bytes=tar.stat().st_size)  # manifest no longer disagrees
    code = (
        "import sys\nfrom pipeline import build_loader\n"
        "from core.errors import DatasetError\n"
        "try:\n"
        f"    sum(1 for _ in build_loader('dali', {str(ds)!r}, batch_size=4, shuffle=False, "
        f"device='cpu', dont_use_mmap={not mmap}))\n"
        "except DatasetError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    assert SHARD in res.stdout and "outside" in res.stdout


def test_corrupt_tar_header(copy_dataset):
    ds = copy_dataset()
    with open(ds / SHARD, "r+b") as f:
        f.seek(0)
        f.write(b"garbage-name-not-a-member\0")  # the first member's header name field
    key = sample_key(ds, 0)
    expect_named_error(ds, SHARD, key, "tar header")
    assert any(SHARD in p for p in verify_dataset(ds))


def test_index_from_another_tar(copy_dataset):
    ds = copy_dataset()
    other = (ds / "train-000001.idx").read_text()
    (ds / "train-000000.idx").write_text(other)  # same sample count, other members
    expect_named_error(ds, SHARD, "index")
    assert any("train-000000.idx" in p and "does not match" in p for p in verify_dataset(ds))


def test_sample_missing_its_npy(copy_dataset):
    ds = copy_dataset()
    rewrite_shard(ds, SHARD, lambda s: replace(s, 2, "arkit.npy", None))
    expect_named_error(ds, SHARD, sample_key(ds, 2), "no .arkit.npy")
    assert any(sample_key(ds, 2) in p and "arkit.npy" in p for p in verify_dataset(ds))


def test_wav_of_the_wrong_length(copy_dataset):
    ds = copy_dataset()
    rewrite_shard(ds, SHARD, lambda s: replace(s, 1, "wav", member(s, 1, "wav")[:-2000]))
    expect_named_error(ds, SHARD, sample_key(ds, 1), ".wav is 318044 bytes")


def test_wav_header_that_is_not_canonical(copy_dataset):
    ds = copy_dataset()

    def at_22k(s):
        wav = bytearray(member(s, 3, "wav"))
        wav[24:28] = (22050).to_bytes(4, "little")  # same size, wrong sample rate
        return replace(s, 3, "wav", bytes(wav))

    rewrite_shard(ds, SHARD, at_22k)
    key = sample_key(ds, 3)
    for name, kw in LOADERS:
        with pytest.raises(DatasetError, match=key) as err:
            load_all(ds, name, **kw)
        msg = str(err.value)
        assert SHARD in msg and ("header" in msg.lower() or "sample rate" in msg), msg
    assert any(key in p and "sample rate 22050" in p for p in verify_dataset(ds))


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_npy_of_the_wrong_shape_or_dtype(copy_dataset, bad):
    ds = copy_dataset()
    arr = np.zeros((300, 51), np.float32) if bad == "shape" else np.zeros((300, 52), np.float64)
    data = npy_bytes(arr) if bad == "shape" else _npy_any(arr)
    rewrite_shard(ds, SHARD, lambda s: replace(s, 0, "arkit.npy", data))
    expect_named_error(ds, SHARD, sample_key(ds, 0), ".arkit.npy is")


def _npy_any(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npy_with_nan_of_the_right_size(copy_dataset):
    ds = copy_dataset()

    def nan(s):
        a = np.zeros((300, 52), np.float32)
        a[7, 17] = np.nan
        return replace(s, 4, "arkit.npy", npy_bytes(a))

    rewrite_shard(ds, SHARD, nan)
    expect_named_error(ds, sample_key(ds, 4), "NaN")
    assert any(sample_key(ds, 4) in p and "NaN" in p for p in verify_dataset(ds))


def test_manifest_missing_from_another_version_or_disagreeing(copy_dataset, tiny_dataset):
    ds = copy_dataset()
    m = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(DatasetError, match="format_version 99"):
        load_all(ds, "dali")
    (ds / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_all(ds, "torch", num_workers=0)
    assert "missing or unreadable" in verify_dataset(ds)[0]
    # a checksum that disagrees: found by --verify (hashing every byte is not a start-up job)
    import shutil

    ds2 = shutil.copytree(tiny_dataset, ds.parent / "again")
    set_manifest(ds2, SHARD, sha256="0" * 64)
    assert any(SHARD in p and "sha256" in p for p in verify_dataset(ds2))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_bytes_in_a_member_end_in_our_error_or_clean_data(
    tiny_dataset, tmp_path_factory, data
):
    """Arbitrary bytes anywhere in a shard (same size): loaders either read it or raise our
    DatasetError; --verify always reports it."""
    import shutil

    ds = tmp_path_factory.mktemp("fuzz") / "ds"
    shutil.copytree(tiny_dataset, ds)
    tar = ds / SHARD
    size = tar.stat().st_size
    start = data.draw(st.integers(0, size - 1), label="start")
    junk = data.draw(st.binary(min_size=1, max_size=2048), label="junk")[: size - start]
    with open(tar, "r+b") as f:
        f.seek(start)
        old = f.read(len(junk))
        f.seek(start)
        f.write(junk)
    for name, kw in LOADERS:
        try:
            load_all(ds, name, **kw)
        except DatasetError as exc:
            assert "make_shards.py --verify" in str(exc)
    if junk != old:
        assert verify_dataset(ds), "verify missed a changed byte"


# ---------------------------------------------------------------- interrupted work


def _train_cmd(ds: Path, run: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "train", "--loader", "dali"]
    for s in (
        "model.hidden=16",
        "model.n_mels=32",
        "data.batch_size=4",
        "run.progress=false",
        "train.log_every=1",
        "train.epochs=3",
        f"data.dir={ds}",
        f"run.dir={run}",
        *sets,
    ):
        args += ["--set", s]
    return args


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_checkpoints_and_resume_gives_the_same_losses(tmp_path, tiny_dataset, sig):
    full = tmp_path / "full"
    assert (
        subprocess.run(
            _train_cmd(tiny_dataset, full), cwd=ROOT, timeout=300, capture_output=True
        ).returncode
        == 0
    )
    ref = _losses(full)
    assert len(ref) == 27
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(tiny_dataset, run, "train.lr=1e-3"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for a few steps, then interrupt mid-epoch
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "--resume" in out
    import torch

    state = torch.load(run / "last.pt", weights_only=True)
    stopped = state["step"]
    assert 4 <= stopped < 27 and state["loader"]["batch"] == stopped % 9
    res = subprocess.run(
        [sys.executable, "-m", "train", "--loader", "dali", "--resume", str(run / "last.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = _losses(run)
    assert sorted(got) == list(range(1, 28))
    assert [got[s] for s in range(stopped + 1, 28)] == [ref[s] for s in range(stopped + 1, 28)]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_sigterm_to_the_whole_process_group_saves_with_either_loader(
    tmp_path, tiny_dataset, loader
):
    """A scheduler (or torchrun) signals every process of the job: the torch loader's workers
    get the SIGTERM too, and must leave the stop to the trainer (last.pt, exit 128 + 15)."""
    run = tmp_path / "run"
    cmd = _train_cmd(tiny_dataset, run, "train.epochs=100", "data.num_workers=2")
    cmd[cmd.index("dali")] = loader
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    import torch

    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] >= 3 and f"saved {run / 'last.pt'} at step {state['step']}" in out
    assert max(_losses(run)) == state["step"]  # saved where it stopped


def test_checkpoint_write_that_crashes_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch

    from train import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def _shard_digests(ds: Path) -> list[tuple[str, str]]:
    m = json.loads((ds / "manifest.json").read_text())
    return [(s["name"], s["sha256"]) for s in m["shards"]]


@pytest.mark.slow
def test_a_failure_while_writing_a_shard_leaves_the_previous_dataset_whole(
    tmp_path, monkeypatch, capsys
):
    """A full disk in the middle of a shard: an error naming it, the previous dataset intact,
    no temporary file left, and a rerun that reuses the converted takes gives the same data."""
    from pipeline import make_shards
    from pipeline.shards import tars

    args = ["--synthetic", "24", "--workers", "2", "--samples-per-shard", "4", "--quiet"]
    ref = tmp_path / "ref"
    assert make_shards.main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    assert make_shards.main([*args, "--seed", "1", "--out", str(out)]) == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    real_add, calls = tars._add, []

    def add_until_the_disk_is_full(tf, name, data):
        calls.append(name)
        if len(calls) == 14:  # the 2nd member of the 5th sample: inside the 2nd shard
            raise OSError(28, "No space left on device", name)
        return real_add(tf, name, data)

    monkeypatch.setattr(tars, "_add", add_until_the_disk_is_full)
    assert make_shards.main([*args, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "train-000001.tar" in err
    assert str(out) in err and "Traceback" not in err
    # the previous dataset is whole and still loads; the work folder holds no half shard
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == previous
    assert verify_dataset(out) == []
    assert not [p for p in (out / "in-progress").iterdir() if p.suffix == ".tmp"]
    monkeypatch.undo()
    assert make_shards.main([*args, "--out", str(out), "--overwrite"]) == 0
    assert _shard_digests(out) == _shard_digests(ref)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


# ---------------------------------------------------------------- shards changed during a run


@pytest.mark.parametrize("name, kw", LOADERS)
def test_a_shard_changed_between_epochs_stops_the_next_epoch_with_a_named_error(
    copy_dataset, name, kw
):
    ds = copy_dataset()
    loader = build_loader(name, ds, batch_size=4, shuffle=True, device="cpu", **kw)
    assert sum(1 for _ in loader) == 9  # epoch 0 reads fine
    with open(ds / SHARD, "r+b") as f:  # rewritten in place: same size, new time
        f.seek(700)
        f.write(b"\0")
    os.utime(ds / SHARD, ns=(0, 0))
    with pytest.raises(DatasetError, match="changed while the run was reading it") as err:
        next(iter(loader))
    assert SHARD in str(err.value) and "it was modified" in str(err.value)


@pytest.mark.slow
def test_a_shard_truncated_mid_epoch_is_named_and_never_a_bus_error(copy_dataset):
    """With the tars read by copy (DALI's dont_use_mmap, the default) a shard cut short while
    DALI reads it is an ordinary, named error in the process that reads it."""
    ds = copy_dataset()
    code = (
        "import os, sys\nfrom pipeline import build_loader\n"
        "from core.errors import DatasetError\n"
        f"loader = build_loader('dali', {str(ds)!r}, batch_size=4, shuffle=False, "
        "device='cpu', dali_prefetch=1, reader_prefetch=1)\n"
        "it = iter(loader)\nnext(it)\n"
        f"os.truncate({str(ds / SHARD)!r}, 2048)\n"
        "try:\n    for _ in it: pass\n"
        "except DatasetError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    assert SHARD in res.stdout and "changed while the run was reading it" in res.stdout


def test_training_stops_with_a_named_error_and_an_intact_checkpoint(copy_dataset, tmp_path):
    import torch

    from train.cli import main
    from train.trainer import Trainer

    ds = copy_dataset()
    run = tmp_path / "run"
    real_end = Trainer._end_epoch

    def end_then_truncate(self, epoch, first):
        real_end(self, epoch, first)
        if epoch == 0:
            os.truncate(ds / SHARD, (ds / SHARD).stat().st_size // 2)

    Trainer._end_epoch = end_then_truncate
    try:
        args = ["--loader", "dali", "--set", f"data.dir={ds}", "--set", f"run.dir={run}"]
        for s in ("model.hidden=16", "model.n_mels=32", "data.batch_size=4", "run.progress=false"):
            args += ["--set", s]
        assert main([*args, "--set", "train.epochs=3"]) == 1
    finally:
        Trainer._end_epoch = real_end
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 9 and state["loader"]["epoch"] == 1  # the end of epoch 0


HELD_AT_EXIT = """
import sys
from pipeline import build_loader

loader = build_loader(
    "torch", sys.argv[1], split="train", batch_size=4, device="cpu", shuffle=False, num_workers=2
)
pending = iter(loader)
next(pending)  # an epoch left half read, its generator still referenced at exit
try:
    raise RuntimeError("kept")
except RuntimeError as exc:
    kept = exc  # an error's traceback holding frames, as a caller may keep one
print("exiting", flush=True)
"""


@pytest.mark.slow  # a process with two DataLoader workers
def test_a_process_holding_a_torch_loader_with_workers_at_exit_exits(tiny_dataset):
    """The workers ignore SIGTERM (the trainer saves on it), so multiprocessing's terminate and
    join at exit cannot end them: the loader shuts its running workers down itself."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_AT_EXIT, str(tiny_dataset)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process did not exit: its DataLoader workers were left running")
    assert proc.returncode == 0, err
    assert out == "exiting\n"
    assert "Traceback" not in err
