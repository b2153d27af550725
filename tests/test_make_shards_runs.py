"""make_shards runs against each other, failures and Ctrl-C: one conversion per folder at a time,
a failed run never costs the previous dataset, an interrupted run resumes from its converted
takes, folders that are not ours are never written into, and a finished run leaves only the
dataset behind (the contract of ``pipeline/convert/outdir.py``).

Real processes where the behaviour is about processes (the lock, signals); in-process runs with
an injected failure where it is about what a failure leaves behind.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline import make_shards
from tests.helpers import manifest, pcm16_take
from tests.helpers import run_make_shards as run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "pipeline" / "make_shards.py"
LOCK = ".make_shards.lock"
WORK = "in-progress"
# the Ctrl-C runs: big enough to interrupt in the middle of the conversion
ARGS40 = ("--synthetic", "40", "--workers", "2", "--samples-per-shard", "8")


# ---------------------------------------------------------------- helpers


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def top_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def shard_digests(root: Path) -> list[tuple[str, str]]:
    return [(s["name"], s["sha256"]) for s in manifest(root)["shards"]]


def assert_only_the_dataset(root: Path, *foreign: str) -> None:
    """The folder holds exactly its dataset's files (and the user's ``foreign`` ones)."""
    names = {"manifest.json", "rejects.jsonl", "sync.jsonl", "sync.svg"}
    for s in manifest(root)["shards"]:
        names |= {s["name"], s["name"].removesuffix(".tar") + ".idx"}
    assert sorted(p.name for p in root.iterdir()) == sorted(names | set(foreign))


def assert_no_tmp(root: Path) -> None:
    assert [str(p) for p in root.rglob("*.tmp")] == []


def lock_text(out: Path) -> str:
    try:
        return (out / LOCK).read_text()
    except FileNotFoundError:
        return ""


def stored_takes(out: Path) -> int:
    """Takes the work folder holds whole (the json is written last)."""
    return len(list((out / WORK / "takes").glob("*.json")))


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *map(str, args), "--out", str(out)]


@contextmanager
def started(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """A make_shards process with its output piped; killed (its own group) if left running."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"make_shards ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def load_one_batch(out: Path) -> None:
    from pipeline import build_loader

    loader = build_loader("torch", out, batch_size=4, num_workers=0, device="cpu")
    batch = next(iter(loader))
    m = manifest(out)
    assert tuple(batch["wav"].shape) == (4, m["clip_samples"])
    assert tuple(batch["arkit"].shape) == (4, m["frames"], 52)


# ---------------------------------------------------------------- 1. the lock


def test_a_held_lock_makes_a_second_run_refuse_naming_its_pid(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--synthetic", "4", "--out", out) == 0
    before = tree(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        capsys.readouterr()
        assert run("--synthetic", "4", "--seed", "1", "--out", out, "--overwrite") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: another make_shards (pid {os.getpid()}) is writing {out}")
        # the holder's lock file is left alone, the dataset untouched, no work folder made
        assert tree(out) == {**before, LOCK: str(os.getpid()).encode()}
    finally:
        os.close(fd)  # as a killed process: the kernel drops the flock, the file stays
    # a lock file nobody holds (a run that was killed) does not stop the next run
    assert run("--synthetic", "4", "--seed", "1", "--out", out, "--overwrite") == 0
    assert_only_the_dataset(out)
    assert manifest(out)["args"]["seed"] == 1


@pytest.mark.slow
def test_two_processes_into_one_folder_one_refuses_and_the_other_writes_it_whole(tmp_path):
    args = ("--synthetic", "24", "--workers", "1", "--quiet")
    out, ref = tmp_path / "out", tmp_path / "ref"
    with started(command(out, *args)) as first:
        # the second starts once the first holds the lock (it then converts for seconds)
        wait_until(lambda: lock_text(out) == str(first.pid), first, "the first run to lock")
        second = subprocess.run(
            command(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        # meanwhile, the reference: the same arguments, alone in its folder
        assert make_shards.main([*args, "--out", str(ref)]) == 0
        first_out, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert (first_out, first_err) == ("", "")
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(f"error: another make_shards (pid {first.pid}) is writing")
    assert len(second.stderr.splitlines()) == 1 and second.stdout == ""
    assert make_shards.main(["--verify", str(out)]) == 0
    assert shard_digests(out) == shard_digests(ref)
    assert_only_the_dataset(out)


def test_the_lock_still_excludes_when_its_file_is_unlinked_under_an_opener(
    tmp_path, capsys, monkeypatch
):
    """Run A ends (unlinking the lock file, then closing it) just after run B opened that file
    and before B's flock: B's flock succeeds on the unlinked file, so B must not believe it
    holds the folder's lock unless a third run C is then refused."""
    from pipeline.convert.outdir import OutDir

    out = tmp_path / "out"
    a = OutDir(out, overwrite=False).__enter__()
    ended: list[bool] = []
    real_flock = fcntl.flock

    def flock_as_a_ends(fd, op):
        if not ended:
            ended.append(True)
            a.__exit__(None, None, None)
        return real_flock(fd, op)

    b = OutDir(out, overwrite=False)
    monkeypatch.setattr(fcntl, "flock", flock_as_a_ends)
    b.__enter__()
    monkeypatch.undo()
    try:
        assert ended
        capsys.readouterr()
        rc = run("--synthetic", "2", "--out", out)
        err = capsys.readouterr().err
        assert rc == 1 and f"another make_shards (pid {os.getpid()})" in err, (rc, err)
    finally:
        b.__exit__(None, None, None)


# ---------------------------------------------------------------- 2. failures keep the old data


def assert_previous_dataset_whole(out: Path, previous: dict[str, bytes]) -> None:
    assert top_files(out) == previous  # no lock file left either
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [WORK]
    assert_no_tmp(out)
    assert make_shards.main(["--verify", str(out)]) == 0
    load_one_batch(out)


def test_a_failing_run_leaves_the_previous_dataset_whole(tmp_path, monkeypatch, capsys):
    from pipeline.convert import stages as convert

    out = tmp_path / "out"
    assert run("--synthetic", "8", "--samples-per-shard", "4", "--out", out) == 0
    previous = top_files(out)
    assert len(previous) == 4 + 2 * len(manifest(out)["shards"])  # manifest, 3 reports

    # (a) --strict with a rejected input: an error naming the rejects, written aside
    src = tmp_path / "in"
    pcm16_take(src, "good", 12.0, seed=1)
    pcm16_take(src, "short", 6.0, seed=2)
    capsys.readouterr()
    assert run("--input", src, "--out", out, "--overwrite", "--strict") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --strict and 1 inputs or windows were rejected")
    assert str(out / WORK / "rejects.jsonl") in err
    assert "short.wav" in (out / WORK / "rejects.jsonl").read_text()
    assert_previous_dataset_whole(out, previous)

    # (b) a bug in the middle of the conversion (cutting the stored takes, in the main
    # process) propagates, and nothing is replaced
    real_cut, calls = convert.cut_pieces, []

    def cut_that_fails(take, split, cutting):
        calls.append(take.recording.source)
        if len(calls) == 3:
            raise RuntimeError("injected bug while cutting a take")
        return real_cut(take, split, cutting)

    monkeypatch.setattr(convert, "cut_pieces", cut_that_fails)
    with pytest.raises(RuntimeError, match="injected bug"):
        run("--synthetic", "8", "--seed", "1", "--out", out, "--overwrite")
    assert len(calls) == 3
    monkeypatch.undo()
    # kept for a rerun: both inputs of (a) (a reject is stored too), the 8 takes of (b)
    assert stored_takes(out) == 2 + 8
    assert_previous_dataset_whole(out, previous)


def test_a_failed_first_run_into_an_empty_folder_can_be_rerun(tmp_path, capsys):
    """--strict fails into an empty --out; once the bad input is fixed the same command must
    run (reusing the converted take), not refuse the folder its own failure left behind."""
    src, out = tmp_path / "in", tmp_path / "out"
    pcm16_take(src, "good", 12.0, seed=1)
    pcm16_take(src, "short", 6.0, seed=2)
    assert run("--input", src, "--out", out, "--strict") == 1
    capsys.readouterr()
    for p in src.glob("short.*"):
        p.unlink()
    argv = ["--input", str(src), "--out", str(out), "--strict", "--workers", "2"]
    rc = make_shards.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "; 1 takes reused from an earlier run" in captured.out
    assert_only_the_dataset(out)
    assert manifest(out)["rejects"] == 0


# ---------------------------------------------------------------- 3. Ctrl-C and resume


@pytest.fixture(scope="module")
def reference40(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref40") / "ds"
    assert make_shards.main([*ARGS40, "--quiet", "--out", str(out)]) == 0
    return out


def interrupt(out: Path, args: tuple[str, ...], how: str) -> int:
    """Start make_shards, Ctrl-C it in the middle of the conversion (``how``: the main pid
    only, or the whole process group as a terminal does); check what it leaves; return the
    number of converted takes kept."""
    with started(command(out, *args, "--quiet")) as proc:
        wait_until(lambda: stored_takes(out) >= 6, proc, "6 converted takes")
        seen = stored_takes(out)
        if how == "pid":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("interrupted:") and str(out / WORK) in lines[0], stderr
    for text in (stdout, stderr):
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not (out / "manifest.json").exists()
    assert (out / WORK / "takes").is_dir() and not (out / LOCK).exists()
    assert_no_tmp(out)
    kept = stored_takes(out)
    assert 6 <= seen <= kept <= 40
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("how", ["pid", "group"])
def test_ctrl_c_keeps_the_takes_and_the_same_command_resumes(tmp_path, reference40, how):
    out = tmp_path / "out"
    kept = interrupt(out, ARGS40, how)
    res = subprocess.run(command(out, *ARGS40), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    reused = re.search(r"; (\d+) takes reused from an earlier run", res.stdout)
    assert reused is not None, res.stdout
    assert int(reused.group(1)) == kept
    assert not (out / WORK).exists()
    assert shard_digests(out) == shard_digests(reference40)
    assert_only_the_dataset(out)
    assert make_shards.main(["--verify", str(out)]) == 0


@pytest.mark.slow
def test_a_rerun_with_other_settings_reuses_no_take(tmp_path):
    out = tmp_path / "out"
    interrupt(out, ARGS40, "pid")
    other = (*ARGS40, "--window-seconds", "5")
    res = subprocess.run(command(out, *other), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{out}: 36 train + 4 val windows")
    assert "reused" not in res.stdout
    ref = tmp_path / "ref"
    assert make_shards.main([*other, "--quiet", "--out", str(ref)]) == 0
    assert manifest(out)["clip_samples"] == 5 * 16000
    assert shard_digests(out) == shard_digests(ref)
    assert_only_the_dataset(out)


# ---------------------------------------------------------------- 4. foreign folders


FOREIGN = {
    "a user's file": {"keep.txt": b"mine"},
    "a tar without a manifest": {"train-000000.tar": b"\0" * 1024, "train-000000.idx": b"v1.2"},
    "an unreadable manifest": {"manifest.json": b"{not json", "train-000000.tar": b"x"},
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
@pytest.mark.parametrize("contents", list(FOREIGN.values()), ids=list(FOREIGN))
def test_a_folder_that_is_not_ours_is_never_written_into(tmp_path, capsys, contents, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in contents.items():
        (out / name).write_bytes(data)
    capsys.readouterr()
    assert run("--synthetic", "2", "--out", out, *(["--overwrite"] if overwrite else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} holds files that are not one of our datasets")
    assert tree(out) == contents  # no lock file, no in-progress folder
    assert sorted(p.name for p in out.iterdir()) == sorted(contents)


def test_a_users_folder_named_in_progress_is_not_taken_for_ours(tmp_path, capsys):
    """``in-progress/`` is ours only when make_shards made it: a user's folder of that name
    (their files in it) is not an empty --out, and is never deleted by a successful run."""
    out = tmp_path / "out"
    (out / WORK).mkdir(parents=True)
    (out / WORK / "notes.txt").write_bytes(b"the user's notes")
    rc = run("--synthetic", "2", "--out", out)
    err = capsys.readouterr().err
    assert tree(out) == {f"{WORK}/notes.txt": b"the user's notes"}, (rc, err)
    assert rc == 1 and "not make_shards' work folder" in err, (rc, err)


# ---------------------------------------------------------------- 5. what a finished run leaves


def test_a_finished_run_leaves_only_the_dataset(tmp_path, monkeypatch):
    from pipeline.convert.takestore import TakeStore

    out = tmp_path / "out"
    args = ("--synthetic", "6", "--samples-per-shard", "2", "--val-fraction", "0", "--out", out)
    real_put = TakeStore.put

    def put_then_fail(self, rec, digest, result):
        real_put(self, rec, digest, result)
        raise RuntimeError("injected bug after storing a take")

    monkeypatch.setattr(TakeStore, "put", put_then_fail)
    with pytest.raises(RuntimeError, match="injected bug"):
        run(*args)
    monkeypatch.undo()
    # a failed earlier run's work folder, kept (the workers store takes: one each got there)
    assert stored_takes(out) >= 1
    assert run(*args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "rejects.jsonl",
        "sync.jsonl",
        "sync.svg",
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
        "train-000002.idx",
        "train-000002.tar",
    ]


# ---------------------------------------------------------------- 6. found in review


def test_a_users_in_progress_folder_beside_our_dataset_is_never_taken(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--synthetic", "4", "--val-fraction", "0", "--out", out) == 0
    (out / WORK).mkdir()
    (out / WORK / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert run("--synthetic", "4", "--val-fraction", "0", "--out", out, "--overwrite") == 1
    assert "not make_shards' work folder" in capsys.readouterr().err
    assert (out / WORK / "notes.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_swap_cut_short_is_finished_by_the_next_run(tmp_path, monkeypatch, capsys):
    """The swap-in writes a journal first: a failure half way through it (here a full disk on
    the second rename) leaves no complete dataset, and the next run finishes it."""
    from core.errors import DatasetError
    from pipeline import build_loader

    args = ("--synthetic", "8", "--samples-per-shard", "2", "--val-fraction", "0")
    ref = tmp_path / "ref"
    assert run(*args, "--out", ref) == 0
    out = tmp_path / "out"
    assert run(*args, "--seed", "3", "--out", out) == 0
    real_replace, calls = os.replace, []

    def replace_until_full(src, dst):
        if "in-progress" in str(src) and not str(src).endswith(".tmp"):
            calls.append(src)
            if len(calls) == 2:
                raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_until_full)
    assert run(*args, "--out", out, "--overwrite") == 1
    monkeypatch.undo()
    assert "rerun the same command to finish" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no manifest.json"):
        build_loader("torch", out, num_workers=0, device="cpu")
    assert run(*args, "--out", out, "--overwrite") == 0
    assert make_shards.main(["--verify", str(out)]) == 0
    assert manifest(out)["shards"] == manifest(ref)["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_a_file_that_could_not_be_read_is_tried_again_on_the_rerun(tmp_path, monkeypatch):
    """A permission or I/O error is not stored with the converted takes: fixed, it converts."""
    from pipeline.convert import audio as audio_module

    src = tmp_path / "in"
    pcm16_take(src, "a", 12.0, seed=1)
    pcm16_take(src, "b", 12.0, seed=2)
    real_read = audio_module.read_audio

    def denied(path, *a, **kw):
        if Path(path).stem == "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *a, **kw)

    monkeypatch.setattr(audio_module, "read_audio", denied)
    out = tmp_path / "out"
    assert run("--input", src, "--out", out, "--strict", "--val-fraction", "0") == 1
    monkeypatch.undo()
    assert run("--input", src, "--out", out, "--strict", "--val-fraction", "0") == 0
    assert manifest(out)["splits"]["train"] == 2


# ---------------------------------------------------------------- 7. names of the user's


def test_overwrite_refuses_a_users_file_named_like_a_new_shard(tmp_path, capsys):
    """Beside our one-shard dataset, the user's ``train-000001.tar`` and ``val-000000.idx`` are
    not ours: an --overwrite that could write those names refuses before any work, naming them
    and the way out; moved away, the same command runs and leaves the user's other file."""
    out = tmp_path / "out"
    args = ("--synthetic", "8", "--samples-per-shard", "4", "--val-fraction", "0", "--out", out)
    assert run("--synthetic", "4", *args[2:]) == 0
    assert [s["name"] for s in manifest(out)["shards"]] == ["train-000000.tar"]
    for name in ("train-000001.tar", "val-000000.idx", "notes.txt"):
        (out / name).write_bytes(b"the user's " + name.encode())
    before = tree(out)
    capsys.readouterr()
    assert run(*args, "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --out {out} holds files named like our shards that its dataset's manifest "
        "does not list (train-000001.tar, val-000000.idx): the new dataset could need those "
        "names and would replace them. Move or rename them"
    ), err
    assert tree(out) == before  # no lock left, no in-progress folder: nothing was done
    for name in ("train-000001.tar", "val-000000.idx"):
        (out / name).rename(tmp_path / name)
    assert run(*args, "--overwrite") == 0
    assert_only_the_dataset(out, "notes.txt")
    assert [s["name"] for s in manifest(out)["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert (out / "notes.txt").read_bytes() == b"the user's notes.txt"
