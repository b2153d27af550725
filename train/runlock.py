"""One trainer per run folder: rank 0 holds an exclusive ``flock`` on ``run.dir/.train.lock``
for the run's life, so a second run (or ranks left over from a killed job) cannot append to the
same ``metrics.jsonl`` or replace its checkpoints.

The kernel drops the lock when the holder's process ends, however it ends (SIGKILL, a crash),
so the file a killed run leaves behind blocks nobody. While the lock is held the file records
the holder's pid, host and start time, which the refusal names. A run that ends removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path

import torch

from core.errors import RunError
from train.distributed import Dist
from train.rundir import claim_fresh

LOCK_NAME = ".train.lock"


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._closer = None

    def acquire(self) -> None:
        """Take the lock, or RunError naming the run that holds it and the way out."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise RunError(
                    f"run.dir {self.run_dir}: cannot make {self.path.name} ({exc.strerror}); "
                    "pick a folder you can write with --set run.dir=..."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                raise RunError(self._refusal(holder)) from None
            # the holder may have ended and removed the file between our open and flock: a
            # lock on a file no longer at the path excludes nobody, so open the path again
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)  # a lock never released: at exit

    def release(self) -> None:
        """Remove the file and drop the lock (closing the descriptor drops it)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        self._fd = None
        self._closer()

    def _refusal(self, holder: bytes) -> str:
        try:
            rec = json.loads(holder.decode())
            pid, host, since = int(rec["pid"]), str(rec["host"]), str(rec["since"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            who = "another process (it recorded no pid yet)"
        else:
            who = f"another run (pid {pid} on host {host}, since {since})"
            if host == socket.gethostname() and not _alive(pid):
                who += (
                    ", which has ended; processes it started (DataLoader workers) still hold "
                    "the lock and end within seconds"
                )
        return (
            f"run.dir {self.run_dir} is in use by {who}: two runs would write the same "
            f"metrics.jsonl and checkpoints; wait for it to end or stop it, or pass another "
            f"folder with --set run.dir=..."
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_run_dir(
    run_dir: Path, dist: Dist, device: torch.device, fresh: bool = True, overwrite: bool = False
) -> tuple[RunLock | None, str | None]:
    """Rank 0 makes run.dir and locks it (one run writes a folder); for a ``fresh`` run (not
    a resume into the checkpoint's folder) it also claims the folder (``train.rundir``: refused
    when it holds another run, emptied of it with ``overwrite``). It returns its held lock and
    the line to say, if any; under DDP every rank learns whether it could, so that none waits
    for the others in vain when it could not (RunError on every rank). Other ranks: None, None."""
    problem, lock, note = None, None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            lock.acquire()
            if fresh:
                note = claim_fresh(run_dir, overwrite)
        except OSError as exc:
            problem = RunError(f"run.dir {run_dir} cannot be made ({exc.strerror})")
        except RunError as exc:
            problem = exc
        if problem is not None and lock is not None:
            lock.release()
    if dist.enabled:
        failed = torch.tensor([float(problem is not None)], device=device)
        torch.distributed.broadcast(failed, src=0)
        if failed.item() and problem is None:
            problem = RunError(
                f"rank {dist.rank}: rank 0 could not open run.dir {run_dir} "
                "(its error line says why)"
            )
    if problem is not None:
        raise problem
    return lock, note
