"""Where make_shards writes: one conversion at a time, nothing replaced until the new dataset is
complete, and nothing deleted that is not ours.

``--out`` must be empty, absent, or hold one of our datasets (a ``manifest.json`` we can read);
replacing a dataset needs ``--overwrite`` and touches only that dataset's files (its shards,
indexes, rejects, reports and manifest): other files in the folder stay, and a file of the
user's named like a shard (``shard_like``) that the old manifest does not list is refused
before any work, as the new dataset could need that name. A lock (``flock`` on
``.make_shards.lock``, released by the kernel if the process dies) makes a second conversion
into the same folder refuse instead of mixing. Work happens in ``<out>/in-progress/``: converted
takes (kept after a failure or Ctrl-C, so a rerun reuses them) and the new shards. Only when
everything is written is the old manifest removed, the new files renamed into place, the old
dataset's leftover shards deleted and the new manifest renamed in last.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
from pathlib import Path

from core.errors import ArkitError, DatasetError
from pipeline.shards.manifest import MANIFEST_NAME, SPLITS, Manifest, load_manifest
from pipeline.shards.tars import idx_path

LOCK_NAME = ".make_shards.lock"
WORK_NAME = "in-progress"
WORK_MARK = ".make_shards-work"  # inside WORK_NAME: the folder is ours
REJECTS_NAME = "rejects.jsonl"
# the conversion's reports beside the manifest: each take's lag and what was done about it
# (``pipeline.convert.syncing``), and their histogram
REPORT_NAMES = ("sync.jsonl", "sync.svg")
JOURNAL_NAME = "commit.json"  # in WORK_NAME: what a swap-in does, written before it starts
# every name a shard or index of ours can have: ``<split>-NNNNNN.tar``
# (``pipeline.convert.stages``), and on S3 ``<split>-b-NNNNNN.tar`` for a dataset uploaded
# beside another (``pipeline.convert.s3out``)
_SHARD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})-(?:b-)?[0-9]{{6,}}\.(?:tar|idx)")


def shard_like(name: str) -> bool:
    """A name that a shard or index of a dataset of ours may take."""
    return _SHARD_NAME.fullmatch(name) is not None


def dataset_names(m: Manifest) -> set[str]:
    """The files of the dataset ``m`` besides its manifest: shards, indexes, rejects, reports."""
    return {REJECTS_NAME, *REPORT_NAMES} | {
        n for s in m.shards for n in (s.name, idx_path(s.name).name)
    }


def name_collisions(path: object, names: list[str], ours: set[str], kind: str) -> str | None:
    """Why ``--overwrite`` may not go ahead: the user's ``names`` that a new dataset could
    replace (named like a shard, not listed by the old dataset), or None."""
    theirs = sorted(n for n in names if n not in ours and shard_like(n))
    if not theirs:
        return None
    listed = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
    return (
        f"--out {path} holds {kind} named like our shards that its dataset's manifest does not "
        f"list ({listed}): the new dataset could need those names and would replace them. "
        "Move or rename them (they are not ours), or choose another --out"
    )


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            self._finish_interrupted_commit()
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
        if self.work.exists() and not (self.work / WORK_MARK).is_file():
            raise DatasetError(
                f"--out {self.path} holds a folder {WORK_NAME}/ that is not make_shards' work "
                "folder; make_shards needs that name: move it, or choose another --out"
            )
        others = sorted(p.name for p in self.path.iterdir() if p.name not in (LOCK_NAME, WORK_NAME))
        if not others:
            return
        old = self.old_dataset()
        if old is None:
            listed = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise DatasetError(
                f"--out {self.path} holds files that are not one of our datasets ({listed}); "
                "make_shards writes only into an empty folder or over a dataset of its own: "
                "choose another --out"
            )
        clash = name_collisions(self.path, others, {MANIFEST_NAME} | dataset_names(old), "files")
        if clash:
            raise DatasetError(clash)
        if not self.overwrite:
            raise DatasetError(
                f"--out {self.path} already holds a dataset; pass --overwrite to replace it"
            )

    # ------------------------------------------------------------ committing
    def commit(self, manifest: Manifest, rejects_text: str, reports: dict[str, str]) -> None:
        """Swap the dataset written in the work folder in, manifest last; ``reports``: name
        (one of ``REPORT_NAMES``) -> text, written beside it."""
        (self.work / REJECTS_NAME).write_text(rejects_text)
        new = [REJECTS_NAME]
        for name, text in reports.items():
            (self.work / name).write_text(text)
            new.append(name)
        for s in manifest.shards:
            new += [s.name, idx_path(s.name).name]
        old = self.old_dataset()
        stale = dataset_names(old) if old is not None else set()
        # from here the folder holds no complete dataset until the new manifest is renamed in.
        # The journal, written first, lets the next run finish what a crash, a kill or a full
        # disk cut short; Ctrl-C waits for these few renames
        journal = {"manifest": manifest.to_json(), "new": new, "stale": sorted(stale - set(new))}
        _write_synced(self.work / JOURNAL_NAME, json.dumps(journal))
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._apply(journal)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _apply(self, journal: dict) -> None:
        try:
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)
            for name in journal["new"]:
                if (self.work / name).exists():  # a resumed commit finds some moved already
                    os.replace(self.work / name, self.path / name)
            for name in journal["stale"]:
                (self.path / name).unlink(missing_ok=True)
            _write_synced(self.path / MANIFEST_NAME, journal["manifest"])
        except OSError as exc:
            raise DatasetError(
                f"could not move the new dataset into {self.path} ({exc.strerror or exc}): it "
                "holds no complete dataset now; rerun the same command to finish"
            ) from None
        shutil.rmtree(self.work, ignore_errors=True)

    def _finish_interrupted_commit(self) -> None:
        """An earlier run was cut short while swapping its dataset in: finish it first."""
        path = self.work / JOURNAL_NAME
        if (self.work / WORK_MARK).is_file() and path.is_file():
            self._apply(json.loads(path.read_text()))
