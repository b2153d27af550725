"""What make_shards converts: recordings found on disk (or synthetic takes), each loaded into
audio and animation and cut into encoded windows. Runs in worker processes, one recording each.

Inputs are paired by file stem in the same folder: audio (.wav/.flac, any rate, channels and
sample format) with a Live Link Face CSV or a ``[T, 52]`` .npy.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import arkit
from core.errors import AnimationError, InputError
from pipeline.convert import audio, synthetic
from pipeline.convert.livelink import LIVE_LINK_FPS, Animation, read_live_link_csv
from pipeline.convert.sync import MAX_OFFSET_SECONDS, SEARCH_SECONDS, Lag, estimate_lag
from pipeline.convert.windows import (
    MAX_GAP_SECONDS,
    TOLERANCE_RATIO,
    TOLERANCE_SECONDS,
    LengthError,
    PreparedTake,
    check_lengths,
    prepare_take,
)
from pipeline.shards import storage
from pipeline.shards.manifest import FPS, WINDOW_SECONDS
from pipeline.shards.members import SAMPLE_RATE

AUDIO_EXTS = (".wav", ".flac")
ANIM_EXTS = (".csv", ".npy")


@dataclass(frozen=True)
class Recording:
    """One take to convert: an audio file with its animation, or synthetic take ``order``."""

    order: int  # position in the sorted input list: makes the output independent of timing
    source: str  # the audio file's path, or "synthetic:<i>"
    audio: str | None = None
    anim: str | None = None

    @property
    def stem(self) -> str:
        return Path(self.source).stem if self.audio else self.source


@dataclass(frozen=True)
class Settings:
    """Everything that decides how a recording becomes windows (make_shards' flags)."""

    seed: int = 0
    window_seconds: float = WINDOW_SECONDS
    stride_seconds: float | None = None
    segment_seconds: float | None = None  # train members; None: the window
    tolerance_seconds: float = TOLERANCE_SECONDS
    tolerance_ratio: float = TOLERANCE_RATIO
    max_gap_seconds: float = MAX_GAP_SECONDS
    csv_fps: float | None = None  # None: each CSV's rate from its timecodes
    csv_scale: float = 1.0
    npy_fps: float = LIVE_LINK_FPS
    npy_order: str = "arkit"
    npy_scale: float = 1.0
    sync_search_seconds: float = SEARCH_SECONDS  # lags tried either way
    max_sync_offset: float = MAX_OFFSET_SECONDS  # from the dataset's median lag
    fix_sync: bool = False  # re-time takes out of sync instead of rejecting them
    audio_offset: float = 0.0  # seconds the audio runs late in every take


@dataclass(frozen=True)
class Mismatch:
    """A take whose lengths differ beyond the tolerances, kept whole under --fix-sync until its
    lag says whether a lead-in or a tail explains it."""

    seconds: float  # audio minus animation
    reason: str  # the reject's reason, if nothing explains it


@dataclass(frozen=True)
class Converted:
    recording: Recording
    take: PreparedTake  # checked, on the shards' clocks, not yet cut
    seconds: float  # the take's audio duration
    duplicates: int = 0  # capture rows dropped for repeating a timecode
    lag: Lag = Lag(None, unknown="not measured")
    mismatch: Mismatch | None = None


@dataclass(frozen=True)
class Rejected:
    recording: Recording
    reason: str
    transient: bool = False  # a file that could not be read now: tried again on a rerun


@dataclass(frozen=True)
class Reject:
    """A line of rejects.jsonl."""

    file: str
    reason: str
    # what was left out, for the summary's counts: "input" (a file or take), "gap" (a window or
    # segment overlapping a gap in the capture), "short" (a take shorter than a segment)
    kind: str = "input"


def synthetic_recordings(n: int) -> list[Recording]:
    return [Recording(i, f"synthetic:{i}") for i in range(n)]


def find_recordings(root: str | Path) -> tuple[list[Recording], list[Reject]]:
    """Pair audio and animation files by stem (same folder). Unpaired files are rejects.
    ``root``: a folder (searched recursively) or ``s3://bucket/prefix`` (every key below it)."""
    if storage.is_s3(root):
        url = storage.location(root)
        files = [str(url / name) for name in storage.list_names(url)]
    else:
        files = [str(p) for p in Path(root).rglob("*") if p.is_file()]
    by_stem: dict[str, dict[str, list[str]]] = {}
    for f in sorted(files, key=_parts):  # as pathlib sorts paths: part by part
        stem, ext = posixpath.splitext(f)
        kind = (
            "audio" if ext.lower() in AUDIO_EXTS else "anim" if ext.lower() in ANIM_EXTS else None
        )
        if kind is not None:
            by_stem.setdefault(stem, {}).setdefault(kind, []).append(f)
    recordings: list[Recording] = []
    rejects: list[Reject] = []
    for _stem, slot in sorted(by_stem.items(), key=lambda item: _parts(item[0])):
        for extra in sorted(slot.get("audio", [])[1:] + slot.get("anim", [])[1:]):
            rejects.append(Reject(extra, "second file with the same stem"))
        if "audio" in slot and "anim" in slot:
            wav, anim = slot["audio"][0], slot["anim"][0]
            recordings.append(Recording(len(recordings), wav, wav, anim))
        elif "audio" in slot:
            reason = "audio has no animation file (.csv or .npy with the same stem)"
            rejects.append(Reject(slot["audio"][0], reason))
        else:
            reason = "animation has no audio file (.wav or .flac with the same stem)"
            rejects.append(Reject(slot["anim"][0], reason))
    return recordings, rejects


def _parts(path: str) -> list[str]:
    return path.split("/")


@contextmanager
def local_files(rec: Recording) -> Iterator[Recording]:
    """``rec`` with its files on this machine: as it is, or for ``s3://`` inputs downloaded
    into a temporary folder (deleted on exit) under their own names."""
    if rec.audio is None or not storage.is_s3(rec.audio):
        yield rec
        return
    with tempfile.TemporaryDirectory(prefix="make_shards-take-") as tmp:
        local = {}
        for role in ("audio", "anim"):
            url = storage.location(getattr(rec, role))
            local[role] = str(Path(tmp) / url.name)
            storage.download(url, Path(local[role]))
        yield dataclasses.replace(rec, **local)


SLACK = 0.01  # values this far outside [0, 1] are float noise and clipped; further, a reject


def check_scale(values: np.ndarray, flag: str, scale: float) -> np.ndarray:
    """Blendshape weights lie in [0, 1]: clip what lies a hair outside, reject what lies
    clearly outside (another scale, or not blendshape weights) naming the range and a fix."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= -SLACK and hi <= 1 + SLACK:
        return np.clip(values, 0.0, 1.0)
    worst = int(np.argmax(np.maximum(values - 1, -values).max(axis=0)))
    name = arkit.ARKIT_NAMES[worst]
    found = (
        f"blendshape values span [{lo:.4g}, {hi:.4g}] ({name} reaches {_extreme(values, worst)})"
    )
    scaled = f" after {flag} {scale:g}" if scale != 1 else ""
    if lo >= -SLACK * 100 and 1 + SLACK < hi <= 100 * (1 + SLACK):
        fix = f"a 0-100 scale? pass {flag} {0.01 * scale:g}"
    elif lo < -SLACK:
        fix = "negative weights are not ARKit blendshape weights (another rig's curves?)"
    else:
        fix = f"pass {flag} to bring them into [0, 1]"
    raise AnimationError(f"{found}{scaled}, outside [0, 1]: {fix}")


def _extreme(values: np.ndarray, col: int) -> str:
    v = values[:, col]
    return f"{v.max():.4g}" if v.max() - 1 >= -v.min() else f"{v.min():.4g}"


def read_npy_animation(path: str, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise AnimationError(f"unreadable npy: {exc}") from None
    if raw.ndim != 2 or raw.shape[1] != arkit.NUM_BLENDSHAPES:
        raise AnimationError(f"npy has shape {raw.shape}, expected [T, {arkit.NUM_BLENDSHAPES}]")
    if not np.isfinite(raw).all():
        raise AnimationError("npy contains NaN or inf")
    values = arkit.to_canonical(raw.astype(np.float32) * np.float32(s.npy_scale), s.npy_order)
    return np.arange(len(values)) / s.npy_fps, check_scale(values, "--npy-scale", s.npy_scale)


def load_take(rec: Recording, s: Settings) -> tuple[np.ndarray, Animation]:
    """(audio float32 at 16 kHz, the animation) of one recording; values checked and in [0, 1]."""
    if rec.audio is None:
        seconds = max(s.window_seconds, s.segment_seconds or 0)
        audio_16k, times, values = synthetic.make_take(s.seed, rec.order, seconds)
        return audio_16k, Animation(times, values, synthetic.CAPTURE_FPS)
    a = audio.read_audio(rec.audio)
    if rec.anim.lower().endswith(".csv"):
        anim = read_live_link_csv(rec.anim, fps=s.csv_fps)
        values = check_scale(anim.values * np.float32(s.csv_scale), "--csv-scale", s.csv_scale)
        return a, dataclasses.replace(anim, values=values)
    times, values = read_npy_animation(rec.anim, s)
    return a, Animation(times, values, s.npy_fps)


def convert(job: tuple[Recording, Settings]) -> Converted | Rejected:
    """Worker: one recording prepared for cutting with its lag measured, or the reason it
    cannot be used.

    Only the user's situation becomes a reject (InputError, or a file that cannot be opened);
    anything else is a bug and propagates.
    """
    rec, s = job
    try:
        with local_files(rec) as here:
            a, anim = load_take(here, s)
        take, mismatch = _prepare(a, anim, s)
    except InputError as exc:
        return Rejected(rec, str(exc))
    except OSError as exc:
        return Rejected(rec, f"unreadable: {exc.strerror or exc}", transient=True)
    except storage.NotFound as exc:  # gone since it was listed; the store's other failures
        return Rejected(rec, f"unreadable: {exc}", transient=True)  # stop the run, naming it
    search = s.sync_search_seconds + (abs(mismatch.seconds) if mismatch else 0.0)
    lag = estimate_lag(take.audio, SAMPLE_RATE, take.frames, FPS, search)
    return Converted(rec, take, len(a) / SAMPLE_RATE, anim.duplicates, lag, mismatch)


def _prepare(a: np.ndarray, anim: Animation, s: Settings) -> tuple[PreparedTake, Mismatch | None]:
    """The take checked and on the shards' clocks; kept whole (``prepare_take``'s ``whole``)
    when --audio-offset explains its lengths, or under --fix-sync with the lengths' mismatch."""
    kw = dict(
        fps=FPS,
        window_seconds=s.window_seconds,
        tolerance_seconds=s.tolerance_seconds,
        tolerance_ratio=s.tolerance_ratio,
        max_gap_seconds=s.max_gap_seconds,
    )
    try:
        return prepare_take(a, SAMPLE_RATE, anim.times, anim.values, **kw), None
    except LengthError as exc:
        audio_seconds, anim_seconds = exc.audio_seconds, exc.anim_seconds
        if s.audio_offset:
            try:  # the recorder's latency is extra audio at the start
                check_lengths(
                    audio_seconds - s.audio_offset,
                    anim_seconds,
                    s.tolerance_seconds,
                    s.tolerance_ratio,
                    1 / anim.fps,
                )
                return prepare_take(a, SAMPLE_RATE, anim.times, anim.values, **kw, whole=True), None
            except LengthError:
                pass
        if not s.fix_sync:
            raise LengthError(
                f"{exc}; --fix-sync converts it if its measured lag explains the difference "
                "(extra audio or animation at the start or the end)",
                audio_seconds,
                anim_seconds,
            ) from None
        take = prepare_take(a, SAMPLE_RATE, anim.times, anim.values, **kw, whole=True)
        return take, Mismatch(audio_seconds - anim_seconds, str(exc))
