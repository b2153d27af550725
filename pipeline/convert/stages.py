"""make_shards' stages 3 and 4: cut the stored takes into pieces, split by recording and shuffle,
then write the shards. Each stage is a small function over plain lists of named records, so
each is tested without the others (stage 2, the take store, is ``pipeline.convert.takestore``).

Validation gets windows (``--window-seconds`` every ``--stride-seconds``); training gets the
same windows, or with ``--segment-seconds`` segments that overlap by one window so that the
loader's random crops can reach every frame. Shards are written in a seeded order that does
not depend on worker timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np

from core.arkit import NUM_BLENDSHAPES
from core.errors import DatasetError
from pipeline.convert.inputs import Recording, Reject
from pipeline.convert.takestore import StoredTake
from pipeline.convert.windows import Piece, outside_gaps, segment_pieces, window_pieces
from pipeline.shards.manifest import FPS, SPLITS, Shard
from pipeline.shards.members import (
    JSON_EXT,
    NPY_EXT,
    SAMPLE_RATE,
    WAV_EXT,
    canonical_wav_bytes,
    npy_member,
)
from pipeline.shards.tars import write_shard

# ---------------------------------------------------------------- stage 3: cut, split, shuffle


@dataclass(frozen=True)
class StoredPiece:
    """A window or segment of a stored take."""

    take: StoredTake
    piece: Piece
    kind: str  # "window" or "segment"

    @property
    def recording(self) -> Recording:
        return self.take.recording

    @property
    def index(self) -> int:
        return self.piece.index

    @property
    def key(self) -> str:
        """The sample key: input order, a readable stem and the piece number (no dots)."""
        return f"{self.recording.order:06d}_{safe_key(self.recording.stem)}_{self.index:04d}"

    def read(self) -> tuple[bytes, bytes]:
        """The canonical WAV and npy members of this piece."""
        take, p = self.take.prepared(), self.piece
        pcm = np.asarray(take.audio[p.start_sample : p.start_sample + p.samples])
        frames = np.asarray(take.frames[p.start_frame : p.start_frame + p.frames])
        return canonical_wav_bytes(pcm), npy_member(frames)


@dataclass(frozen=True)
class Cutting:
    """How takes are cut: windows for validation, segments (or the windows) for training."""

    window_seconds: float
    stride_seconds: float | None = None
    segment_seconds: float | None = None

    @property
    def segmented(self) -> bool:
        """Segments of more frames than a window (as ``Manifest.segmented`` counts them)."""
        if not self.segment_seconds:
            return False
        return round(self.segment_seconds * FPS) > round(self.window_seconds * FPS)


def safe_key(text: str) -> str:
    """Keys may not contain dots (the extension starts at the first dot) or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "x"


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


def shuffle_split(pieces: list, seed: int, split: str) -> list:
    """The split's pieces in a seeded order (DALI's shuffle is a local buffer, so shards are
    pre-shuffled), starting from input order so worker timing never matters."""
    items = sorted(pieces, key=lambda w: (w.recording.order, w.index))
    order = np.random.default_rng([seed, 2, SPLITS.index(split)]).permutation(len(items))
    return [items[i] for i in order]


def cut_pieces(
    take: StoredTake, split: str, cutting: Cutting
) -> tuple[list[StoredPiece], list[Reject]]:
    """A take's pieces for ``split``, and a reject for each piece left out at a gap (or for the
    take, when it is shorter than one segment)."""
    prepared = take.prepared()
    source = take.recording.source
    if split == "train" and cutting.segmented:
        segments = segment_pieces(prepared, cutting.segment_seconds, cutting.window_seconds)
        kept, dropped = outside_gaps(prepared, segments, "segment")
        rejects = [Reject(source, reason, "gap") for reason in dropped]
        if not segments:
            reason = (
                f"take is {prepared.total_frames / prepared.fps:.2f} s, shorter than one "
                f"{cutting.segment_seconds:g} s segment: none of it trains (a shorter "
                "--segment-seconds would use it)"
            )
            rejects.append(Reject(source, reason, "short"))
        return [StoredPiece(take, p, "segment") for p in kept], rejects
    windows = window_pieces(prepared, cutting.window_seconds, cutting.stride_seconds)
    kept, dropped = outside_gaps(prepared, windows, "window")
    rejects = [Reject(source, reason, "gap") for reason in dropped]
    if take.retimed and not windows:  # cut to the overlap of its re-timed streams
        reason = (
            f"take is {prepared.total_frames / prepared.fps:.2f} s once its audio is moved "
            f"{take.shift:+.3f} s and both streams cut to their overlap ({take.action}), "
            f"shorter than one {cutting.window_seconds:g} s window"
        )
        rejects.append(Reject(source, reason, "short"))
    return [StoredPiece(take, p, "window") for p in kept], rejects


@dataclass(frozen=True)
class Balance:
    """How the split by whole recordings came out: takes and windows in val, of all."""

    val_fraction: float  # asked for
    takes: tuple[int, int]  # (in val, all that gave a window)
    windows: tuple[int, int]  # (in val, all: every take cut into windows)

    @property
    def window_fraction(self) -> float:
        return self.windows[0] / max(self.windows[1], 1)

    def warning(self) -> str | None:
        """A line when the windows in val are far from the asked share (off by more than half
        of it, and by more than 5 points), else None."""
        got, want = self.window_fraction, self.val_fraction
        if abs(got - want) <= max(0.05, want / 2):
            return None
        (vt, nt), (vw, nw) = self.takes, self.windows
        return (
            f"--val-fraction {want:g} put {vt} of {nt} takes ({vt / max(nt, 1):.0%}) and {vw} "
            f"of {nw} windows ({got:.0%}) in val: the split is by whole take, so few or unequal "
            "takes miss the share; more or shorter takes (cut long recordings), another --seed "
            "or another --val-fraction come closer"
        )


def split_pieces(
    takes: list[StoredTake],
    cutting: Cutting,
    val_fraction: float,
    seed: int,
    balance: list[Balance] | None = None,
) -> tuple[dict[str, list[StoredPiece]], list[Reject]]:
    """Stage 3: the recordings that give a window split by recording, each cut for its split
    and shuffled; plus a reject for each piece left out. ``balance``, if given, receives how
    the split came out."""
    takes = sorted(takes, key=lambda t: t.recording.order)
    windows = {t.recording.order: cut_pieces(t, "val", cutting) for t in takes}
    used = [t.recording for t in takes if windows[t.recording.order][0]]
    split_of = assign_splits(used, val_fraction, seed)
    by_split: dict[str, list[StoredPiece]] = {s: [] for s in SPLITS}
    rejects: list[Reject] = []
    for take in takes:
        order = take.recording.order
        split = split_of.get(order, "val")
        pieces, dropped = windows[order] if split == "val" else cut_pieces(take, split, cutting)
        by_split[split] += pieces if order in split_of else []
        rejects += dropped
    if balance is not None:
        val = [o for o, s in split_of.items() if s == "val"]
        balance.append(
            Balance(
                val_fraction,
                (len(val), len(split_of)),
                (sum(len(windows[o][0]) for o in val), sum(len(windows[o][0]) for o in split_of)),
            )
        )
    return {s: shuffle_split(ps, seed, s) for s, ps in by_split.items()}, rejects


# ---------------------------------------------------------------- stage 4: write shards


@dataclass
class TrainStats:
    """The mean predictor's values: the train split's mean frame, and its mean first frame of a
    window (over every crop a segment allows: its first ``crops`` frames)."""

    frames: int  # per member
    crops: int = 1  # window starts per member
    frame_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BLENDSHAPES))
    frame_count: int = 0
    first_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BLENDSHAPES))
    first_count: int = 0

    def add(self, npy: bytes) -> None:
        body = 4 * self.frames * NUM_BLENDSHAPES
        a = np.frombuffer(npy, "<f4", offset=len(npy) - body).reshape(-1, NUM_BLENDSHAPES)
        self.frame_sum += a.sum(0, dtype=np.float64)
        self.frame_count += len(a)
        if self.crops == 1:
            self.first_sum += a[0]
        else:
            self.first_sum += a[: self.crops].mean(0, dtype=np.float64)
        self.first_count += 1

    def merge(self, other: TrainStats) -> None:
        self.frame_sum += other.frame_sum
        self.frame_count += other.frame_count
        self.first_sum += other.first_sum
        self.first_count += other.first_count

    def dump(self) -> dict:
        """The sums, exactly (JSON keeps a float64's every bit)."""
        return {
            "frame_sum": self.frame_sum.tolist(),
            "frame_count": self.frame_count,
            "first_sum": self.first_sum.tolist(),
            "first_count": self.first_count,
        }

    def load(self, doc: dict) -> None:
        self.frame_sum, self.first_sum = np.array(doc["frame_sum"]), np.array(doc["first_sum"])
        self.frame_count, self.first_count = doc["frame_count"], doc["first_count"]

    def to_dict(self) -> dict:
        return {
            "frame_mean": (self.frame_sum / max(self.frame_count, 1)).round(6).tolist(),
            "first_frame_mean": (self.first_sum / max(self.first_count, 1)).round(6).tolist(),
        }


def chunks(items: list, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield items[k : k + size]


def sample_members(p: StoredPiece, split: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A piece as the members of its sample: the WAV, the npy and where it came from."""
    wav, npy = p.read()
    meta = {
        "source": p.recording.source,
        "animation": p.recording.anim,
        p.kind: p.index,
        "start_seconds": p.piece.start_sample / SAMPLE_RATE,
        "split": split,
        # the take's lag (audio behind animation, seconds; None: unknown) and what was done
        "sync": {
            "lag": p.take.lag.lag,
            "peak": p.take.lag.peak,
            "action": p.take.action,
            "shift": p.take.shift,
        },
    }
    return p.key, [(WAV_EXT, wav), (NPY_EXT, npy), (JSON_EXT, json.dumps(meta).encode())]


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its pieces in order, where, and the train statistics' shape. Plain
    metadata (take paths, piece positions): a worker process or a Ray task reads the take
    store itself."""

    split: str
    number: int
    pieces: list[StoredPiece]
    folder: str
    frames: int  # TrainStats.frames
    crops: int  # TrainStats.crops

    @property
    def path(self) -> Path:
        return Path(self.folder) / f"{self.split}-{self.number:06d}.tar"

    def plan(self) -> str:
        """What decides the shard's bytes: each sample's key, take file (named by its
        fingerprint), piece and judgement."""
        doc = [
            [p.key, p.recording.source, p.recording.anim, Path(p.take.path).name, p.kind]
            + [list(astuple(p.piece)), p.take.shift, p.take.retimed, p.take.action, self.split]
            for p in self.pieces
        ]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def shard_jobs(
    ordered: dict[str, list[StoredPiece]], folder: Path, samples_per_shard: int, stats: TrainStats
) -> list[ShardJob]:
    """Stage 4's work, in the order of the manifest: each split's pieces cut into shards."""
    return [
        ShardJob(split, k, chunk, str(folder), stats.frames, stats.crops)
        for split in SPLITS
        for k, chunk in enumerate(chunks(ordered[split], samples_per_shard))
    ]


def write_one_shard(job: ShardJob) -> tuple[Shard, TrainStats]:
    """Write one shard and its index (``<split>-NNNNNN.tar`` + ``.idx``), and its train
    statistics; reused when a finished shard of the same plan is already there (its record,
    ``.<name>.done.json``, is written last)."""
    path = job.path
    done = path.with_name(f".{path.name}.done.json")
    plan = job.plan()
    stats = TrainStats(frames=job.frames, crops=job.crops)
    if done.is_file() and path.is_file():
        doc = json.loads(done.read_text())
        if doc.get("plan") == plan:
            stats.load(doc["stats"])
            return Shard(split=job.split, **doc["shard"]), stats
    samples = [sample_members(p, job.split) for p in job.pieces]
    if job.split == "train":
        for _, members in samples:
            stats.add(members[1][1])
    try:
        info = write_shard(path, samples)
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps({"plan": plan, "shard": info, "stats": stats.dump()}))
        os.replace(tmp, done)
    except OSError as exc:
        raise DatasetError(
            f"could not write {path} ({exc.strerror or exc}); nothing in place was "
            "changed, and the converted takes are kept for a rerun"
        ) from None
    return Shard(split=job.split, **info), stats


def write_shards(
    ordered: dict[str, list[StoredPiece]],
    folder: Path,
    samples_per_shard: int,
    stats: TrainStats,
    on_shard: Callable[[Shard], None] = lambda s: None,
    run: Callable[[list[ShardJob]], Iterable[tuple[Shard, TrainStats]]] | None = None,
) -> list[Shard]:
    """Stage 4: each split's pieces, in order, into ``<split>-NNNNNN.tar`` + ``.idx``.
    ``run`` writes the jobs (in any order, anywhere) and yields their results in the jobs'
    order; default: one after the other, here. The statistics are summed shard by shard in
    that order, so they are the same whatever wrote the shards."""
    jobs = shard_jobs(ordered, folder, samples_per_shard, stats)
    shards = []
    for shard, part in (run or (lambda js: map(write_one_shard, js)))(jobs):
        stats.merge(part)
        shards.append(shard)
        on_shard(shard)
    return shards


def reject_lines(rejects: Iterable) -> str:
    return "".join(json.dumps({"file": r.file, "reason": r.reason}) + "\n" for r in rejects)
