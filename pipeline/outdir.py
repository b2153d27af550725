"""Where make_shards writes: one conversion at a time, nothing replaced until the new dataset is
complete, and nothing deleted that is not ours.

``--out`` must be empty, absent, or hold one of our datasets (a ``manifest.json`` we can read);
replacing a dataset needs ``--overwrite`` and touches only that dataset's files (its shards,
indexes, rejects and manifest): other files in the folder stay. A lock (``flock`` on
``.make_shards.lock``, released by the kernel if the process dies) makes a second conversion
into the same folder refuse instead of mixing. Work happens in ``<out>/in-progress/``: converted
takes (kept after a failure or Ctrl-C, so a rerun reuses them) and the new shards. Only when
everything is written is the old manifest removed, the new files renamed into place, the old
dataset's leftover shards deleted and the new manifest renamed in last.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from pathlib import Path

from pipeline.errors import ArkitError, DatasetError
from pipeline.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.tars import idx_path

LOCK_NAME = ".make_shards.lock"
WORK_NAME = "in-progress"
WORK_MARK = ".make_shards-work"  # inside WORK_NAME: the folder is ours
REJECTS_NAME = "rejects.jsonl"


class OutDir:
    def __init__(self, path: str | Path, overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.work = self.path / WORK_NAME
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening
    def __enter__(self) -> OutDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._check_contents()
            self.work.mkdir(exist_ok=True)
            (self.work / WORK_MARK).touch()
        except OSError as exc:
            self._unlock()
            raise DatasetError(
                f"--out {self.path} cannot be written ({exc.strerror or exc}: {exc.filename})"
            ) from None
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _lock(self) -> None:
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DatasetError(
                    f"another make_shards (pid {holder}) is writing {self.path}; wait for it to "
                    "end or choose another --out"
                ) from None
            # the holder we waited on may have unlinked the file between our open and flock:
            # a lock on a file no longer at the path excludes nobody, so take the new one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def old_dataset(self) -> Manifest | None:
        """Our dataset already in the folder, if there is one."""
        if not (self.path / MANIFEST_NAME).is_file():
            return None
        try:
            return load_manifest(self.path)
        except ArkitError:
            return None

    def _check_contents(self) -> None:
        ours = {LOCK_NAME} | ({WORK_NAME} if (self.work / WORK_MARK).is_file() else set())
        others = sorted(p.name for p in self.path.iterdir() if p.name not in ours)
        if not others:
            return
        if self.old_dataset() is None:
            listed = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise DatasetError(
                f"--out {self.path} holds files that are not one of our datasets ({listed}); "
                "make_shards writes only into an empty folder or over a dataset of its own: "
                "choose another --out"
            )
        if not self.overwrite:
            raise DatasetError(
                f"--out {self.path} already holds a dataset; pass --overwrite to replace it"
            )

    # ------------------------------------------------------------ committing
    def commit(self, manifest: Manifest, rejects_text: str) -> None:
        """Swap the dataset written in the work folder in, manifest last."""
        (self.work / REJECTS_NAME).write_text(rejects_text)
        new = [REJECTS_NAME]
        for s in manifest.shards:
            new += [s.name, idx_path(s.name).name]
        old = self.old_dataset()
        stale: set[str] = set()
        if old is not None:
            stale = {REJECTS_NAME} | {
                n for s in old.shards for n in (s.name, idx_path(s.name).name)
            }
        # from here the folder holds no complete dataset until the new manifest is renamed in:
        # a few renames, which Ctrl-C must not cut in half
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)
            for name in new:
                os.replace(self.work / name, self.path / name)
            for name in sorted(stale - set(new)):
                (self.path / name).unlink(missing_ok=True)
            manifest.write()
        except OSError as exc:
            raise DatasetError(
                f"could not move the new dataset into {self.path} ({exc.strerror or exc}): it "
                f"holds no complete dataset now; rerun to finish"
            ) from None
        finally:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(self.work, ignore_errors=True)
