"""Whole shards of an ``s3://`` dataset streamed into a bounded local cache, so that the loaders
read local files on their fast paths.

A ``ShardCache`` serves one leg of an epoch (``pipeline.loaders.base.Leg``): given the shards the
leg reads, in the order it first needs them, ``prefetch`` threads download whole objects (one
GET each) in that order, ahead of use, and never start a download that would take the bytes
held (downloaded, downloading, not yet released) over ``limit``. Each download streams into a
part file of its own (``<pid>.<shard>.part-<random>``) while its sha256 is computed; it is
checked against the manifest's size and sha256 and only then renamed into place
(``<pid>.<shard>``, ``os.replace``). A download that breaks off or does not match is fetched
again; a second failure is a ``DatasetError`` naming the shard, its URL and both reasons, which
waiting for that shard raises (``wait``) and, for the DataLoader's worker processes, a
``<pid>.<shard>.failed`` file holds (``wait_for_file``). ``release`` deletes a consumed shard,
unless the cache ``keep``s its shards: where the whole split fits in the limit, the loader keeps
every verified copy for its next legs (``close`` hands them over, the next leg's cache starts
with them ``kept``), so a dataset that fits is downloaded once per process, not once per epoch.

Several processes (ranks, runs) share one folder per dataset (``folder_for``: the URL and the
manifest's identity): every file a process writes carries its pid, so no two processes write
the same file, and each holds its own copies within its own limit. Files of processes that are
gone (a run killed mid-download) are removed when a cache opens in the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from core.errors import DatasetError
from pipeline.shards.manifest import Shard, verify_command
from pipeline.shards.storage import S3Url, StorageError, call

READ_CHUNK = 1 << 20  # bytes read from a download's body at a time
POLL_S = 0.002  # how often a worker process looks for a shard it waits for
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/arkit-dali``, or ``~/.cache/arkit-dali``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "arkit-dali"


def folder_for(cache_dir: str | Path | None, root: S3Url, identity: str) -> Path:
    """The dataset's folder in the cache: its bucket and prefix, and the manifest's identity
    (so two datasets, or two versions of one, never share a file name)."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    name = _SAFE.sub("_", f"{root.bucket}-{root.key}")[:80]
    return Path(cache_dir or default_cache_dir()) / f"{name}-{digest}-{identity}"


def cached_path(folder: Path, owner: int, shard: str) -> Path:
    """Where process ``owner``'s verified copy of ``shard`` lies while it is cached."""
    return folder / f"{owner}.{shard}"


class Kept:
    """The verified copies a loader keeps between its legs (``ShardCache.keep``): in one
    folder, this process's; ``drop`` deletes them (the loader's finalizer does)."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.pid = os.getpid()
        self.shards: dict[str, int] = {}  # name: bytes

    def take(self, folder: Path) -> dict[str, int]:
        """The copies kept in ``folder`` (those kept elsewhere are deleted), handed over."""
        if folder != self.folder:
            self.drop()
        self.folder = folder
        shards, self.shards = self.shards, {}
        return shards

    def hold(self, shards: dict[str, int]) -> None:
        self.shards = dict(shards)

    def drop(self) -> None:
        if self.folder is not None and os.getpid() == self.pid:  # not a forked worker's
            for name in self.shards:
                cached_path(self.folder, self.pid, name).unlink(missing_ok=True)
        self.shards = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_dead(folder: Path) -> list[str]:
    """Remove the files of processes that are gone (verified copies, parts, failure notes):
    the names removed."""
    removed = []
    for path in folder.glob("*"):
        pid = path.name.partition(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def wait_for_file(path: Path) -> Path:
    """``path`` once it is there (a worker process's wait for a shard its loader caches); the
    ``DatasetError`` the loader's cache recorded if fetching it failed, or one saying the cache
    is closed or its process gone (so that a worker never waits for what will not come)."""
    owner = path.name.partition(".")[0]
    failed = path.with_name(path.name + ".failed")
    closed = path.with_name(f"{owner}.closed")
    while not path.exists():
        if failed.exists():
            raise DatasetError(failed.read_text())
        if closed.exists() or not _alive(int(owner)):
            raise DatasetError(f"{path.name}: the shard cache of process {owner} was closed")
        time.sleep(POLL_S)
    return path


class ShardCache:
    """Downloads ``shards`` (in this order) of the dataset at ``root`` into ``folder``, at most
    ``limit`` bytes held at once, ``prefetch`` downloads at a time (see the module)."""

    def __init__(
        self,
        root: S3Url,
        shards: Sequence[Shard],
        folder: Path,
        limit: int,
        prefetch: int,
        keep: bool = False,
        kept: dict[str, int] | None = None,
        check: Callable[[Shard, Path], str | None] | None = None,
    ) -> None:
        """``keep``: consumed shards stay (the loader's next legs read them); ``kept``: the
        verified copies (name: bytes) an earlier leg of this process kept; ``check``: what is
        wrong with a downloaded copy whose bytes are the manifest's (its index, say), or None:
        a problem is the shard's error, not fetched again."""
        big = max(shards, key=lambda s: s.bytes, default=None)
        if big is not None and big.bytes > limit:
            raise DatasetError(
                f"data.cache_limit={limit} bytes is smaller than the shard {root / big.name} "
                f"({big.bytes} bytes): raise it to at least {big.bytes}"
            )
        self.root, self.shards, self.folder = root, list(shards), folder
        self.limit, self.pid = limit, os.getpid()
        folder.mkdir(parents=True, exist_ok=True)
        clean_dead(folder)
        self.held = 0  # bytes downloaded or downloading, not yet released
        self.peak = 0  # the most bytes held at once
        self.requests = 0  # GETs sent
        self._next = 0  # index in ``shards`` of the next download to start
        self._ready: dict[str, Path] = {}
        self._errors: dict[str, DatasetError] = {}
        self._size = {s.name: s.bytes for s in self.shards}
        self._released: set[str] = set()
        self._closed, self.keep, self._check = False, keep, check
        for name, size in (kept or {}).items():  # counted whether this leg reads them or not
            path = self.path(name)
            if path.is_file() and path.stat().st_size == size:
                self._ready[name] = path
                self._size.setdefault(name, size)
                self.held += size
        self.peak = self.held
        self.shards = [s for s in self.shards if s.name not in self._ready]
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"shard-cache-{k}")
            for k in range(max(1, min(prefetch, len(self.shards))))
        ]
        for t in self._threads:
            t.start()

    @property
    def to_fetch(self) -> int:
        """Shards this leg downloads (those not kept from earlier legs)."""
        return len(self.shards)

    def path(self, name: str) -> Path:
        return cached_path(self.folder, self.pid, name)

    # ------------------------------------------------------------ the consumer's side
    def wait(self, name: str) -> Path:
        """The verified local copy of shard ``name``, once it is there."""
        with self._cond:
            self._cond.wait_for(lambda: name in self._ready or name in self._errors or self._closed)
            if name in self._errors:
                raise self._errors[name]
            if name not in self._ready:
                raise DatasetError(f"{self.root / name}: the shard cache was closed")
            return self._ready[name]

    def release(self, name: str) -> None:
        """Shard ``name`` is consumed: delete it, and let the downloads go further."""
        with self._cond:
            if name in self._released or name not in self._size:
                return
            self._released.add(name)
            if not self.keep and self._ready.pop(name, None) is not None:
                self.path(name).unlink(missing_ok=True)
                self.held -= self._size[name]
            self._cond.notify_all()

    def stop_waiters(self) -> None:
        """Tell the processes waiting for this cache's shards (``wait_for_file``) that no more
        will come: the DataLoader's workers, before they are asked to stop."""
        (self.folder / f"{self.pid}.closed").touch()

    def close(self) -> dict[str, int]:
        """Stop downloading and delete every file this cache wrote, except the verified copies
        it ``keep``s: those it returns (name: bytes), for the next leg's ``kept``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        kept = {n: self._size[n] for n in self._ready} if self.keep else {}
        for name in self._size:
            if name not in kept:
                self.path(name).unlink(missing_ok=True)
            self.path(name).with_name(f"{self.pid}.{name}.failed").unlink(missing_ok=True)
        (self.folder / f"{self.pid}.closed").unlink(missing_ok=True)
        self._ready.clear()
        return kept

    # ------------------------------------------------------------ the downloads
    def _claim(self) -> Shard | None:
        """The next shard to download, once it fits in the limit (None: nothing left)."""
        with self._cond:
            while True:
                if self._closed or self._next >= len(self.shards):
                    return None
                shard = self.shards[self._next]
                if self.held + shard.bytes <= self.limit:
                    self._next += 1
                    self.held += shard.bytes
                    self.peak = max(self.peak, self.held)
                    return shard
                self._cond.wait()

    def _work(self) -> None:
        while (shard := self._claim()) is not None:
            try:
                path = self._fetch(shard)
            except DatasetError as exc:
                self._failed(shard, exc)
                continue
            except Exception as exc:  # never leave a waiter waiting
                self._failed(shard, DatasetError(f"{self.root / shard.name}: {exc!r}"))
                continue
            with self._cond:
                if shard.name in self._released or self._closed:
                    path.unlink(missing_ok=True)
                    self.held -= shard.bytes
                else:
                    self._ready[shard.name] = path
                self._cond.notify_all()

    def _failed(self, shard: Shard, exc: DatasetError) -> None:
        note = self.folder / f"{self.pid}.{shard.name}.failed"
        note.write_text(str(exc))
        with self._cond:
            self._errors[shard.name] = exc
            self.held -= shard.bytes
            self._cond.notify_all()

    def _fetch(self, shard: Shard) -> Path:
        """``shard`` downloaded and verified, at its place: tried twice."""
        url = self.root / shard.name
        first = self._download(shard, url)
        if first is None:
            return self.path(shard.name)
        if self._closed:
            raise DatasetError(f"{url}: the shard cache was closed")
        second = self._download(shard, url)
        if second is None:
            return self.path(shard.name)
        raise DatasetError(
            f"{url}: shard {shard.name} failed its check twice when fetched into the cache "
            f"{self.folder} ({first}; then {second}); check the dataset with "
            f"`{verify_command(self.root)}`"
        )

    def _download(self, shard: Shard, url: S3Url) -> str | None:
        """One try: None once the verified copy is in place, else what was wrong."""
        part = self.folder / f"{self.pid}.{shard.name}.part-{secrets.token_hex(4)}"
        try:
            with self._cond:
                self.requests += 1
            try:
                body = call(url, "get_object", Bucket=url.bucket, Key=url.key)["Body"]
            except StorageError as exc:
                return str(exc)
            digest, size = hashlib.sha256(), 0
            try:
                with open(part, "wb") as f:
                    while chunk := body.read(READ_CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
            except Exception as exc:  # the stream broke off: urllib3's and botocore's errors
                if type(exc).__name__ == "FlexibleChecksumError":  # S3 sent a checksum
                    return "its checksum differs from the one S3 sent (FlexibleChecksumError)"
                return f"the download broke off after {size} bytes ({type(exc).__name__})"
            if size != shard.bytes:
                return f"{size} bytes arrived, the manifest says {shard.bytes}"
            if digest.hexdigest() != shard.sha256:
                return "its sha256 differs from the manifest's"
            problem = self._check(shard, part) if self._check else None
            if problem is not None:  # the bytes are the manifest's: fetching again won't help
                raise DatasetError(problem)
            os.replace(part, self.path(shard.name))
            return None
        finally:
            part.unlink(missing_ok=True)
