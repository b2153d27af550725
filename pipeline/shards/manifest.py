"""``manifest.json``: the one reader and writer of a dataset's description.

A dataset directory holds ``manifest.json`` (written last: its presence means complete),
``<split>-NNNNNN.tar`` shards with a DALI ``.idx`` beside each, and ``rejects.jsonl``. The
manifest records the format's sizes and rates, the shards (samples, bytes, sha256), the
train-split blendshape means and how the dataset was made. Every module that needs a size or
a rate asks a ``Manifest``; the canonical values below are what ``make_shards`` writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from core.arkit import ARKIT_NAMES
from core.constants import FPS, WINDOW_SECONDS
from core.errors import DatasetError
from pipeline.shards import storage
from pipeline.shards.members import SAMPLE_RATE, WAV_HEADER_BYTES, canonical_npy_header, wav_bytes
from pipeline.shards.members import npy_bytes as npy_member_bytes
from pipeline.shards.storage import Location, S3Url
from pipeline.shards.tars import idx_path

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
MAKE_SHARDS_HINT = "python pipeline/make_shards.py --synthetic 400 --out DIR"
VERIFY_HINT = "python pipeline/make_shards.py --verify {dir}"


def verify_command(root: str | Location) -> str:
    """The command that re-reads the dataset at ``root`` end to end and lists its problems."""
    return VERIFY_HINT.format(dir=root)


def verify_hint(root: str | Location) -> str:
    """What an error about the data at ``root`` ends with: the command to run, and why."""
    return f"run `{verify_command(root)}` to list every bad shard and sample"


@dataclass(frozen=True)
class Shard:
    split: str
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Layout:
    """The members of one split's samples: ``samples`` audio samples and ``frames`` frames each
    (a window, or in the train split of a dataset made with --segment-seconds a segment)."""

    sample_rate: int
    samples: int
    frames: int
    num_blendshapes: int

    @property
    def clip_samples(self) -> int:  # the name decode_sample reads
        return self.samples

    @property
    def npy_header_bytes(self) -> int:
        return len(canonical_npy_header(self.frames, self.num_blendshapes))

    @property
    def wav_bytes(self) -> int:
        return wav_bytes(self.samples)

    @property
    def npy_bytes(self) -> int:
        return npy_member_bytes(self.frames, self.num_blendshapes)

    @property
    def sample_bytes(self) -> int:
        return self.wav_bytes + self.npy_bytes


@dataclass(frozen=True)
class Manifest:
    """A dataset's description; ``root`` is where it lies (not stored in the file): a ``Path``,
    or an ``S3Url`` for a dataset in ``s3://bucket/prefix``.

    ``clip_samples`` and ``frames`` are the window every loader yields; the train split's
    members hold ``segment_samples`` / ``segment_frames`` (equal to the window unless the
    dataset was made with --segment-seconds), which the loaders crop windows from.
    """

    root: Location
    sample_rate: int
    clip_samples: int
    fps: int
    frames: int
    shards: tuple[Shard, ...] = ()
    segment_samples: int = 0  # 0: the window
    segment_frames: int = 0
    names: tuple[str, ...] = ARKIT_NAMES
    wav_header_bytes: int = WAV_HEADER_BYTES
    npy_header_bytes: int = 0  # 0: the canonical header's size for frames x 52
    input_hours: float = 0.0
    rejects: int = 0
    train_stats: dict = field(default_factory=dict)
    sync: dict = field(default_factory=dict)  # the takes' lags: make_shards' SyncReport.to_dict
    args: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.segment_samples:
            object.__setattr__(self, "segment_samples", self.clip_samples)
        if not self.segment_frames:
            object.__setattr__(self, "segment_frames", self.frames)
        if not self.npy_header_bytes:
            head = len(canonical_npy_header(self.frames, self.num_blendshapes))
            object.__setattr__(self, "npy_header_bytes", head)

    @classmethod
    def for_window(
        cls,
        root: str | Location,
        window_seconds: float = WINDOW_SECONDS,
        segment_seconds: float | None = None,
        **fields,
    ):
        """The manifest of a dataset of ``window_seconds`` windows (train members of
        ``segment_seconds``, default the window) at the canonical rates."""
        segment = segment_seconds or window_seconds
        return cls(
            root=storage.location(root),
            sample_rate=SAMPLE_RATE,
            clip_samples=int(round(window_seconds * SAMPLE_RATE)),
            fps=FPS,
            frames=int(round(window_seconds * FPS)),
            segment_samples=int(round(segment * SAMPLE_RATE)),
            segment_frames=int(round(segment * FPS)),
            **fields,
        )

    def layout(self, split: str) -> Layout:
        """The member sizes of ``split``: segments in train, windows elsewhere."""
        if split == "train":
            samples, frames = self.segment_samples, self.segment_frames
        else:
            samples, frames = self.clip_samples, self.frames
        return Layout(self.sample_rate, samples, frames, self.num_blendshapes)

    @property
    def segmented(self) -> bool:
        """Whether the train split holds segments longer than the window (crops are drawn)."""
        return self.segment_frames > self.frames

    # ------------------------------------------------------------ sizes and rates
    @property
    def num_blendshapes(self) -> int:
        return len(self.names)

    @property
    def window_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    @property
    def identity(self) -> str:
        """A digest of the dataset's content (its layout and every shard's sha256): equal for
        the same data wherever it lies, different as soon as one shard differs."""
        doc = [self.sample_rate, self.clip_samples, self.fps, self.frames, list(self.names)]
        if self.segmented:
            doc.append([self.segment_samples, self.segment_frames])
        doc.append([[s.split, s.name, s.samples, s.sha256] for s in self.shards])
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    @property
    def hours(self) -> float:
        """Audio stored in the shards (overlapping segments count each time they are stored)."""
        seconds = {s: self.layout(s).samples / self.sample_rate for s in SPLITS}
        return sum(sh.samples * seconds.get(sh.split, 0.0) for sh in self.shards) / 3600

    # ------------------------------------------------------------ shards
    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.split_shards(split))

    def tar_paths(self, split: str) -> list[str]:
        return [str(self.root / s.name) for s in self.split_shards(split)]

    def idx_paths(self, split: str) -> list[str]:
        return [str(idx_path(p)) for p in self.tar_paths(split)]

    def train_mean(self, target: str) -> np.ndarray | None:
        """The mean predictor: the train split's mean first frame or mean frame."""
        key = "first_frame_mean" if target == "first_frame" else "frame_mean"
        return (
            None if key not in self.train_stats else np.asarray(self.train_stats[key], np.float32)
        )

    def check(self, **expected) -> None:
        """Refuse settings that disagree with the dataset, naming both values."""
        for key, want in expected.items():
            if want is None:
                continue
            have = getattr(self, key)
            if have != want:
                raise DatasetError(
                    f"{self.root}: config asks for {key}={want} but the dataset's manifest says "
                    f"{key}={have}; change the config or rebuild the shards"
                )

    # ------------------------------------------------------------ the file
    def to_json(self) -> str:
        counts = {s: self.num_samples(s) for s in SPLITS}
        doc = {
            "format_version": self.format_version,
            "sample_rate": self.sample_rate,
            "clip_samples": self.clip_samples,
            "fps": self.fps,
            "frames": self.frames,
            "names": list(self.names),
            "wav_header_bytes": self.wav_header_bytes,
            "npy_header_bytes": self.npy_header_bytes,
            "segment_samples": self.segment_samples,
            "segment_frames": self.segment_frames,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "splits": counts,
            "hours": self.hours,
            "input_hours": self.input_hours,
            "rejects": self.rejects,
            "train_stats": self.train_stats,
            "sync": self.sync,
            "args": self.args,
            "versions": self.versions,
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, root: str | Location) -> Manifest:
        """Parse and check a manifest; DatasetError naming the field that is wrong."""
        root = storage.location(root)
        path = root / MANIFEST_NAME
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is unreadable ({exc}): rebuild the dataset") from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            version = raw.get("format_version") if isinstance(raw, dict) else None
            raise DatasetError(
                f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}: "
                "rebuild with this version's make_shards"
            )
        try:
            m = cls(
                root=root,
                sample_rate=int(raw["sample_rate"]),
                clip_samples=int(raw["clip_samples"]),
                fps=int(raw["fps"]),
                frames=int(raw["frames"]),
                names=tuple(raw["names"]),
                wav_header_bytes=int(raw["wav_header_bytes"]),
                npy_header_bytes=int(raw["npy_header_bytes"]),
                shards=tuple(Shard(**s) for s in raw["shards"]),
                segment_samples=int(raw.get("segment_samples", 0)),
                segment_frames=int(raw.get("segment_frames", 0)),
                input_hours=float(raw.get("input_hours", 0.0)),
                rejects=int(raw.get("rejects", 0)),
                train_stats=dict(raw.get("train_stats") or {}),
                sync=dict(raw.get("sync") or {}),
                args=dict(raw.get("args") or {}),
                versions=dict(raw.get("versions") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"{path} is missing or has a bad field ({exc}): rebuild it"
            ) from None
        if m.names != ARKIT_NAMES:
            raise DatasetError(f"{path}: blendshape names are not the canonical ARKit order")
        if m.wav_header_bytes != WAV_HEADER_BYTES:
            raise DatasetError(
                f"{path}: wav_header_bytes {m.wav_header_bytes}, expected {WAV_HEADER_BYTES}"
            )
        if m.npy_header_bytes != m.layout("val").npy_header_bytes:
            raise DatasetError(
                f"{path}: npy_header_bytes {m.npy_header_bytes} is not the float32 "
                f"[{m.frames}, {m.num_blendshapes}] header's size"
            )
        return m


def load_manifest(data_dir: str | Location) -> Manifest:
    """The manifest of the dataset at ``data_dir`` (a folder or ``s3://bucket/prefix``);
    DatasetError saying what to do if absent."""
    root = storage.location(data_dir)
    if isinstance(root, S3Url):
        return Manifest.from_json(_read_s3_manifest(root), root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"no dataset at {root}: make one with `{MAKE_SHARDS_HINT}`")
    if not path.is_file():
        raise DatasetError(
            f"{root} has no manifest.json, so it is not a complete dataset (make_shards writes "
            f"it last; an interrupted run leaves none): make one with `{MAKE_SHARDS_HINT}`"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"{path} is unreadable ({exc.strerror})") from None
    return Manifest.from_json(text, root)


def _read_s3_manifest(root: S3Url) -> str:
    try:
        return storage.read_text(root / MANIFEST_NAME)
    except storage.NotFound:
        pass
    if not storage.list_names(root, limit=1):
        raise DatasetError(f"no dataset at {root}: make one with `{MAKE_SHARDS_HINT}`")
    raise DatasetError(
        f"{root} has no manifest.json, so it is not a complete dataset (make_shards uploads it "
        f"last; an interrupted upload leaves none): make one with `{MAKE_SHARDS_HINT}`"
    )
