"""make_shards' stages, in order: find inputs -> load and cut takes -> split by recording and
shuffle -> write shards -> write the manifest -> report. Each stage is a small function over
plain lists of named records, so each is tested without the others.

Converted takes go to a ``TakeStore`` (one file per take in the dataset's work directory, so
memory stays flat and a rerun reuses the takes already converted); shards are then written in a
seeded order that does not depend on worker timing, and the finished dataset is swapped into
``--out`` by ``pipeline.outdir.OutDir``, manifest last.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.arkit import NUM_BLENDSHAPES
from pipeline.errors import DatasetError
from pipeline.inputs import Converted, Recording, Rejected, Settings, convert
from pipeline.manifest import SPLITS, Shard
from pipeline.members import JSON_EXT, NPY_EXT, SAMPLE_RATE, WAV_EXT
from pipeline.tars import write_shard

STORE_VERSION = 1  # bump when a stored take's bytes would differ for the same inputs


# ---------------------------------------------------------------- stage 2: load and cut takes


@dataclass(frozen=True)
class StoredWindow:
    """One converted window, by where its member bytes lie in the take store."""

    recording: Recording
    index: int
    start_sample: int
    path: str  # the take's file in the store
    offset: int
    wav_size: int
    npy_size: int

    @property
    def key(self) -> str:
        """The sample key: input order, a readable stem and the window number (no dots)."""
        return f"{self.recording.order:06d}_{safe_key(self.recording.stem)}_{self.index:04d}"

    def read(self) -> tuple[bytes, bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            blob = f.read(self.wav_size + self.npy_size)
        return blob[: self.wav_size], blob[self.wav_size :]


@dataclass(frozen=True)
class StoredTake:
    recording: Recording
    windows: list[StoredWindow]
    seconds: float
    dropped: list[str] = field(default_factory=list)  # windows left out, and why
    duplicates: int = 0  # capture rows dropped for repeating a timecode
    reused: bool = False  # converted by an earlier, interrupted run


def safe_key(text: str) -> str:
    """Keys may not contain dots (the extension starts at the first dot) or slashes."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "x"


def fingerprint(rec: Recording, s: Settings) -> str:
    """What decides a take's windows: its files (path, size, modification time) or its
    synthetic number, and the settings. Equal fingerprints give equal bytes."""
    files = []
    for path in (rec.audio, rec.anim):
        if path is not None:
            st = os.stat(path)
            files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    doc = {"v": STORE_VERSION, "files": files, "synthetic": None if rec.audio else rec.order}
    doc["settings"] = asdict(s)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


class TakeStore:
    """Converted takes on disk: ``<hash>.bin`` (wav + npy of every window) and ``<hash>.json``
    (the windows' sizes), the json written last so its presence means the take is whole."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob("*.tmp"):  # an interrupted write of a take's json
            tmp.unlink(missing_ok=True)

    def get(self, rec: Recording, digest: str) -> StoredTake | Rejected | None:
        meta = self.root / f"{digest}.json"
        if not meta.is_file():
            return None
        doc = json.loads(meta.read_text())
        if "reason" in doc:
            return Rejected(rec, doc["reason"])
        return self._take(rec, digest, doc, reused=True)

    def put(
        self, rec: Recording, digest: str, result: Converted | Rejected
    ) -> StoredTake | Rejected:
        try:
            return self._put(rec, digest, result)
        except OSError as exc:
            raise DatasetError(
                f"could not store a converted take in {self.root} ({exc.strerror or exc}); "
                "nothing in place was changed"
            ) from None

    def _put(
        self, rec: Recording, digest: str, result: Converted | Rejected
    ) -> StoredTake | Rejected:
        meta = self.root / f"{digest}.json"
        if isinstance(result, Rejected):
            _atomic_write(meta, json.dumps({"reason": result.reason}).encode())
            return result
        with open(self.root / f"{digest}.bin", "wb") as f:
            for w in result.windows:
                f.write(w.wav)
                f.write(w.npy)
        doc = {
            "seconds": result.seconds,
            "windows": [[w.index, w.start_sample, len(w.wav), len(w.npy)] for w in result.windows],
            "dropped": result.dropped,
            "duplicates": result.duplicates,
        }
        _atomic_write(meta, json.dumps(doc).encode())
        return self._take(rec, digest, doc, reused=False)

    def _take(self, rec: Recording, digest: str, doc: dict, reused: bool) -> StoredTake:
        path, offset, windows = str(self.root / f"{digest}.bin"), 0, []
        for index, start, wav_size, npy_size in doc["windows"]:
            windows.append(StoredWindow(rec, index, start, path, offset, wav_size, npy_size))
            offset += wav_size + npy_size
        return StoredTake(rec, windows, doc["seconds"], doc["dropped"], doc["duplicates"], reused)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group: the main process handles it once, the workers
    # must not each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def convert_takes(
    recordings: list[Recording],
    settings: Settings,
    store: TakeStore,
    workers: int,
    on_result: Callable[[StoredTake | Rejected], None] = lambda r: None,
) -> Iterator[StoredTake | Rejected]:
    """Convert every recording not already in the store, in parallel; yield each result (in
    completion order) once it is stored."""
    todo: list[tuple[Recording, str]] = []
    for rec in recordings:
        try:
            digest = fingerprint(rec, settings)
        except OSError as exc:  # vanished or unreadable since it was listed
            result = Rejected(rec, f"unreadable: {exc.strerror or exc}")
            on_result(result)
            yield result
            continue
        done = store.get(rec, digest)
        if done is None:
            todo.append((rec, digest))
        else:
            on_result(done)
            yield done
    if not todo:
        return
    digests = {rec.order: digest for rec, digest in todo}
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(max(1, min(workers, len(todo))), initializer=_ignore_sigint) as pool:
        jobs = [(rec, settings) for rec, _ in todo]
        for result in pool.imap_unordered(convert, jobs, chunksize=1):
            stored = store.put(result.recording, digests[result.recording.order], result)
            on_result(stored)
            yield stored


# ---------------------------------------------------------------- stage 3: split and shuffle


def assign_splits(recordings: list[Recording], val_fraction: float, seed: int) -> dict[int, str]:
    """Recording order -> split, by whole recordings so no window of a take leaks across
    splits. At least one recording goes to each split when there are two or more and
    ``val_fraction`` > 0."""
    n = len(recordings)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    val = set(perm[:n_val].tolist())
    return {r.order: ("val" if i in val else "train") for i, r in enumerate(recordings)}


def shuffle_split(windows: list[StoredWindow], seed: int, split: str) -> list[StoredWindow]:
    """The split's windows in a seeded order (DALI's shuffle is a local buffer, so shards are
    pre-shuffled), starting from input order so worker timing never matters."""
    items = sorted(windows, key=lambda w: (w.recording.order, w.index))
    order = np.random.default_rng([seed, 2, SPLITS.index(split)]).permutation(len(items))
    return [items[i] for i in order]


def split_windows(
    takes: list[StoredTake], val_fraction: float, seed: int
) -> dict[str, list[StoredWindow]]:
    """Stage 3: the recordings that gave windows split by recording, each split shuffled."""
    used = [t.recording for t in sorted(takes, key=lambda t: t.recording.order) if t.windows]
    split_of = assign_splits(used, val_fraction, seed)
    by_split: dict[str, list[StoredWindow]] = {s: [] for s in SPLITS}
    for take in takes:
        for w in take.windows:
            by_split[split_of[w.recording.order]].append(w)
    return {s: shuffle_split(ws, seed, s) for s, ws in by_split.items()}


# ---------------------------------------------------------------- stage 4: write shards


@dataclass
class TrainStats:
    """The train split's mean frame and mean first frame: the mean predictor's values."""

    frames: int  # per window
    frame_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BLENDSHAPES))
    frame_count: int = 0
    first_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BLENDSHAPES))
    first_count: int = 0

    def add(self, npy: bytes) -> None:
        body = 4 * self.frames * NUM_BLENDSHAPES
        a = np.frombuffer(npy, "<f4", offset=len(npy) - body).reshape(-1, NUM_BLENDSHAPES)
        self.frame_sum += a.sum(0, dtype=np.float64)
        self.frame_count += len(a)
        self.first_sum += a[0]
        self.first_count += 1

    def to_dict(self) -> dict:
        return {
            "frame_mean": (self.frame_sum / max(self.frame_count, 1)).round(6).tolist(),
            "first_frame_mean": (self.first_sum / max(self.first_count, 1)).round(6).tolist(),
        }


def chunks(items: list, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield items[k : k + size]


def sample_members(w: StoredWindow, split: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A window as the members of its sample: the WAV, the npy and where it came from."""
    wav, npy = w.read()
    meta = {
        "source": w.recording.source,
        "animation": w.recording.anim,
        "window": w.index,
        "start_seconds": w.start_sample / SAMPLE_RATE,
        "split": split,
    }
    return w.key, [(WAV_EXT, wav), (NPY_EXT, npy), (JSON_EXT, json.dumps(meta).encode())]


def write_shards(
    ordered: dict[str, list[StoredWindow]],
    folder: Path,
    samples_per_shard: int,
    stats: TrainStats,
    on_shard: Callable[[Shard], None] = lambda s: None,
) -> list[Shard]:
    """Stage 4: each split's windows, in order, into ``<split>-NNNNNN.tar`` + ``.idx``."""
    shards = []
    for split in SPLITS:
        for k, chunk in enumerate(chunks(ordered[split], samples_per_shard)):
            samples = [sample_members(w, split) for w in chunk]
            if split == "train":
                for _, members in samples:
                    stats.add(members[1][1])
            path = folder / f"{split}-{k:06d}.tar"
            try:
                info = write_shard(path, samples)
            except OSError as exc:
                raise DatasetError(
                    f"could not write {path} ({exc.strerror or exc}); nothing in place was "
                    "changed, and the converted takes are kept for a rerun"
                ) from None
            shards.append(Shard(split=split, **info))
            on_shard(shards[-1])
    return shards


def reject_lines(rejects: Iterable) -> str:
    return "".join(json.dumps({"file": r.file, "reason": r.reason}) + "\n" for r in rejects)
