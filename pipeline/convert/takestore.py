"""Stage 2 of make_shards: load and prepare takes in worker processes, into a take store.

A take is stored once it is checked and on the shards' clocks, before it is cut: its 16 kHz
audio as PCM16 and its 30 fps frames as float32 (``<hash>.bin``), and what cutting needs to
know (``<hash>.json``: lengths, the capture's gaps), the json written last so its presence means
the take is whole. The hash is the take's fingerprint (its files and every setting), so a rerun
after Ctrl-C or a failure reuses the takes already converted, and the workers write the store
themselves, so only a few numbers cross the process boundary.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.arkit import NUM_BLENDSHAPES
from core.errors import DatasetError
from pipeline.convert.inputs import Converted, Mismatch, Recording, Rejected, Settings, convert
from pipeline.convert.sync import Lag
from pipeline.convert.windows import PreparedTake, retime
from pipeline.shards import storage
from pipeline.shards.manifest import FPS
from pipeline.shards.members import SAMPLE_RATE, to_pcm16
from pipeline.shards.storage import NotFound

STORE_VERSION = 3  # bump when a stored take's bytes would differ for the same inputs


@dataclass(frozen=True)
class StoredTake:
    recording: Recording
    path: str  # <hash>.bin: PCM16 audio, then float32 frames
    samples: int
    total_frames: int
    gaps: list[tuple[float, float]]
    max_gap_seconds: float
    seconds: float  # the take's audio duration
    duplicates: int = 0  # capture rows dropped for repeating a timecode
    reused: bool = False  # converted by an earlier, interrupted run
    lag: Lag = Lag(None, unknown="not measured")  # audio behind animation, as stored
    mismatch: Mismatch | None = None  # lengths that differ, stored whole (--fix-sync)
    # what the judgement of the lags decided (``pipeline.convert.syncing``): the audio is moved
    # ``shift`` seconds earlier and both streams cut to their overlap, when ``retimed``
    shift: float = 0.0
    retimed: bool = False
    action: str = ""

    def prepared(self) -> PreparedTake:
        """The take, mapped from the store (nothing is read until it is sliced), re-timed as
        judged."""
        return retime(self.stored(), self.shift) if self.retimed else self.stored()

    def stored(self) -> PreparedTake:
        """The take as stored, mapped from the store."""
        audio = np.memmap(self.path, dtype="<i2", mode="r", shape=(self.samples,))
        frames = np.memmap(
            self.path,
            dtype="<f4",
            mode="r",
            offset=2 * self.samples,
            shape=(self.total_frames, NUM_BLENDSHAPES),
        )
        gaps = [tuple(g) for g in self.gaps]
        return PreparedTake(audio, frames, SAMPLE_RATE, FPS, gaps, self.max_gap_seconds)


def fingerprint(rec: Recording, s: Settings) -> str:
    """What decides a stored take: its files (path, size, modification time) or its synthetic
    number, and the settings. Equal fingerprints give equal bytes."""
    files = []
    for path in (rec.audio, rec.anim):
        if path is not None and storage.is_s3(path):  # its URL, size and ETag
            st = storage.stat(path)
            files.append([path, st.size, st.version])
        elif path is not None:
            st = os.stat(path)
            files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    doc = {"v": STORE_VERSION, "files": files, "synthetic": None if rec.audio else rec.order}
    doc["settings"] = asdict(s)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


class TakeStore:
    def __init__(self, root: Path, clean: bool = True) -> None:
        """``clean``: remove what an interrupted run half wrote (the main process does, once;
        a worker must not, while the others write)."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if clean:
            self.clean()

    def clean(self) -> None:
        """Remove half-written files; only while no worker writes."""
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def get(self, rec: Recording, digest: str) -> StoredTake | Rejected | None:
        meta = self.root / f"{digest}.json"
        if not meta.is_file():
            return None
        doc = json.loads(meta.read_text())
        if "reason" in doc:
            return Rejected(rec, doc["reason"])
        return self._take(rec, digest, doc, reused=True)

    def put(self, rec: Recording, digest: str, result: Converted | Rejected):
        try:
            return self._put(rec, digest, result)
        except OSError as exc:
            raise DatasetError(
                f"could not store a converted take in {self.root} ({exc.strerror or exc}); "
                "nothing in place was changed"
            ) from None

    def _put(self, rec: Recording, digest: str, result: Converted | Rejected):
        meta = self.root / f"{digest}.json"
        if isinstance(result, Rejected):
            if not result.transient:  # a permission or I/O error may be fixed before a rerun
                _atomic_write(meta, json.dumps({"reason": result.reason}).encode())
            return result
        take = result.take
        tmp = self.root / f"{digest}.bin.tmp"
        with open(tmp, "wb") as f:
            f.write(to_pcm16(take.audio).tobytes())
            f.write(np.ascontiguousarray(take.frames, "<f4").tobytes())
        os.replace(tmp, self.root / f"{digest}.bin")
        doc = {
            "seconds": result.seconds,
            "samples": len(take.audio),
            "total_frames": take.total_frames,
            "gaps": take.gaps,
            "max_gap_seconds": take.max_gap_seconds,
            "duplicates": result.duplicates,
            "lag": result.lag.to_dict(),
            "mismatch": None if result.mismatch is None else asdict(result.mismatch),
        }
        _atomic_write(meta, json.dumps(doc).encode())
        return self._take(rec, digest, doc, reused=False)

    def _take(self, rec: Recording, digest: str, doc: dict, reused: bool) -> StoredTake:
        return StoredTake(
            rec,
            str(self.root / f"{digest}.bin"),
            doc["samples"],
            doc["total_frames"],
            [tuple(g) for g in doc["gaps"]],
            doc["max_gap_seconds"],
            doc["seconds"],
            doc["duplicates"],
            reused,
            Lag.from_dict(doc["lag"]),
            None if doc["mismatch"] is None else Mismatch(**doc["mismatch"]),
        )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _worker_signals() -> None:
    # Ctrl-C goes to the whole process group: the main process handles it once, the workers
    # must not each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the pool stops its workers with SIGTERM: they must die of it, whatever handler they were
    # forked with (Ray's driver drains its node on SIGTERM; a worker running that, or exiting
    # through Python with the pool's queue lock held, leaves the pool waiting for it forever)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


Job = tuple[Recording, Settings, str, str]  # (recording, settings, store folder, fingerprint)


def convert_and_store(job: Job) -> StoredTake | Rejected:
    """Worker: convert one recording and write it to the store."""
    rec, settings, root, digest = job
    return TakeStore(Path(root), clean=False).put(rec, digest, convert((rec, settings)))


def _pool(todo: list[Job], workers: int) -> Iterator[StoredTake | Rejected]:
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(max(1, min(workers, len(todo))), initializer=_worker_signals) as pool:
        yield from pool.imap_unordered(convert_and_store, todo, chunksize=1)


def convert_takes(
    recordings: list[Recording],
    settings: Settings,
    store: TakeStore,
    workers: int,
    on_result: Callable[[StoredTake | Rejected], None] = lambda r: None,
    run: Callable[[list[Job]], Iterator[StoredTake | Rejected]] | None = None,
) -> Iterator[StoredTake | Rejected]:
    """Convert every recording not already in the store, in parallel; yield each result (in
    completion order) once it is stored. ``run`` converts the jobs (``convert_and_store`` each,
    anywhere that sees the store's folder) and yields results as they come; default: a
    process pool of ``workers`` here."""
    todo: list[Job] = []
    for rec in recordings:
        try:
            digest = fingerprint(rec, settings)
        except (OSError, NotFound) as exc:  # vanished or unreadable since it was listed
            result = Rejected(rec, f"unreadable: {getattr(exc, 'strerror', None) or exc}")
            on_result(result)
            yield result
            continue
        done = store.get(rec, digest)
        if done is None:
            todo.append((rec, settings, str(store.root), digest))
        else:
            on_result(done)
            yield done
    if not todo:
        return
    results = run(todo) if run is not None else _pool(todo, workers)
    try:
        for stored in results:
            on_result(stored)
            yield stored
    finally:
        # stops the workers (the pool) or cancels the tasks left (Ray); on Ctrl-C or a failure
        # one may have been stopped mid-write
        results.close()
        store.clean()
