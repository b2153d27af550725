"""The shard format: one place for its constants, the npy member, the DALI index, the manifest.

A dataset directory holds ``manifest.json`` (written last: its presence means complete),
``<split>-NNNNNN.tar`` WebDataset shards with a DALI ``.idx`` beside each, and
``rejects.jsonl``. One sample = ``<key>.wav`` (canonical PCM16 WAV), ``<key>.arkit.npy``
(float32 [frames, 52]) and ``<key>.json`` (where the window came from).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.arkit import ARKIT_NAMES, NUM_BLENDSHAPES
from pipeline.audio import SAMPLE_RATE, WAV_HEADER_BYTES

FORMAT_VERSION = 1
FPS = 30
WINDOW_SECONDS = 10.0
CLIP_SAMPLES = int(SAMPLE_RATE * WINDOW_SECONDS)  # 160000
FRAMES = int(FPS * WINDOW_SECONDS)  # 300
WAV_EXT, NPY_EXT, JSON_EXT = "wav", "arkit.npy", "json"
SPLITS = ("train", "val")
MAKE_SHARDS_HINT = "python pipeline/make_shards.py --synthetic 400 --out DIR"
VERIFY_HINT = "python pipeline/make_shards.py --verify {dir}"


class DatasetError(RuntimeError):
    """A dataset that is missing, incomplete, corrupt or disagrees with what was asked."""


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def canonical_npy_header(frames: int = FRAMES, width: int = NUM_BLENDSHAPES) -> bytes:
    """The npy header of a float32 [frames, width] C-order array (fixed per dataset)."""
    return npy_bytes(np.zeros((frames, width), np.float32))[: -4 * frames * width]


def npy_header_bytes(frames: int = FRAMES, width: int = NUM_BLENDSHAPES) -> int:
    return len(canonical_npy_header(frames, width))


def parse_arkit_npy(blob: bytes, frames: int = FRAMES, width: int = NUM_BLENDSHAPES) -> np.ndarray:
    """Check that ``blob`` is a float32 [frames, width] C-order npy and return the array.

    Never unpickles. Raises ValueError naming what differs.
    """
    head = canonical_npy_header(frames, width)
    if len(blob) == len(head) + 4 * frames * width and blob.startswith(head):
        return np.frombuffer(blob, dtype="<f4", offset=len(head)).reshape(frames, width)
    try:
        arr = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is "not an npy"
        raise ValueError(f"not a readable npy array ({exc})") from None
    raise ValueError(
        f"npy holds {arr.dtype} {tuple(arr.shape)}, expected float32 ({frames}, {width})"
    )


def decode_sample(wav: bytes, npy: bytes, m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Raw member bytes -> (audio float32 [clip_samples], arkit float32 [frames, 52]), checked.

    The Python readers' decode (the torch baseline, the webdataset peer): int16 / 32768, the
    same arithmetic as DALI's. Raises ValueError (AudioError) naming what is wrong.
    """
    from pipeline.audio import PCM16_SCALE, parse_canonical_wav

    pcm = parse_canonical_wav(wav, m.clip_samples, m.sample_rate)
    arkit = parse_arkit_npy(npy, m.frames, m.num_blendshapes)
    if not (np.isfinite(arkit).all() and arkit.min() >= 0 and arkit.max() <= 1):
        raise ValueError("blendshape values are NaN, inf or outside [0, 1]")
    return pcm.astype(np.float32) * np.float32(1 / PCM16_SCALE), arkit.copy()


# ---------------------------------------------------------------- DALI index (wds2idx v1.2)


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI's index: ``v1.2 <n>`` then per sample ``ext offset size name`` per component."""
    lines = [f"v1.2 {len(samples)}"]
    for comps in samples:
        lines.append(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise ValueError("index does not start with 'v1.2 <count>'")
    count = int(lines[0].split()[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise ValueError(f"index announces {count} samples but lists {len(body)}")
    out = []
    for ln in body:
        f = ln.split()
        if len(f) % 4:
            raise ValueError(f"malformed index line: {ln[:80]!r}")
        out.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return out


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Shard:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What loaders need from ``manifest.json``, read once and checked."""

    root: Path
    sample_rate: int
    clip_samples: int
    fps: int
    frames: int
    names: tuple[str, ...]
    wav_header_bytes: int
    npy_header_bytes: int
    shards: tuple[Shard, ...]
    raw: dict

    @property
    def num_blendshapes(self) -> int:
        return len(self.names)

    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.split_shards(split))

    def tar_paths(self, split: str) -> list[str]:
        return [str(self.root / s.name) for s in self.split_shards(split)]

    def idx_paths(self, split: str) -> list[str]:
        return [p[: -len(".tar")] + ".idx" for p in self.tar_paths(split)]

    def train_mean(self, target: str) -> np.ndarray | None:
        key = "first_frame_mean" if target == "first_frame" else "frame_mean"
        stats = self.raw.get("train_stats") or {}
        return None if key not in stats else np.asarray(stats[key], np.float32)

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


def load_manifest(data_dir: str | Path) -> Manifest:
    root = Path(data_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise DatasetError(f"no dataset at {root}: make one with `{MAKE_SHARDS_HINT}`")
    if not path.is_file():
        raise DatasetError(
            f"{root} has no manifest.json, so it is not a complete dataset (make_shards writes "
            f"it last; an interrupted run leaves none): make one with `{MAKE_SHARDS_HINT}`"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is unreadable ({exc}): rebuild the dataset") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format_version {raw.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}: rebuild with this version's make_shards"
        )
    try:
        m = Manifest(
            root=root,
            sample_rate=int(raw["sample_rate"]),
            clip_samples=int(raw["clip_samples"]),
            fps=int(raw["fps"]),
            frames=int(raw["frames"]),
            names=tuple(raw["names"]),
            wav_header_bytes=int(raw["wav_header_bytes"]),
            npy_header_bytes=int(raw["npy_header_bytes"]),
            shards=tuple(Shard(**s) for s in raw["shards"]),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path} is missing or has a bad field ({exc}): rebuild it") from None
    if m.names != ARKIT_NAMES:
        raise DatasetError(f"{path}: blendshape names are not the canonical ARKit order")
    if m.wav_header_bytes != WAV_HEADER_BYTES:
        raise DatasetError(f"{path}: wav_header_bytes {m.wav_header_bytes}, expected 44")
    for s in m.shards:
        p = root / s.name
        if not p.is_file():
            raise DatasetError(f"{p} is listed in the manifest but missing")
        size = p.stat().st_size
        if size != s.bytes:
            raise DatasetError(
                f"shard {p} is {size} bytes but the manifest says {s.bytes} (truncated or "
                f"rewritten): run `{VERIFY_HINT.format(dir=root)}` to list every bad shard"
            )
        if not Path(str(p)[: -len(".tar")] + ".idx").is_file():
            raise DatasetError(f"{p} has no .idx beside it: rebuild the dataset")
    return m


# ---------------------------------------------------------------- start-up check of the indexes


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in its tar (from the DALI index)."""

    tar: str
    key: str
    wav: tuple[int, int]  # (offset, size)
    npy: tuple[int, int]


def _tar_header_names(fd: int, offset: int) -> tuple[str, int] | None:
    """(name, size) of the ustar header just before ``offset``, or None if unreadable."""
    import os

    block = os.pread(fd, 512, offset - 512)
    if len(block) < 512:
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    return (f"{prefix}/{name}" if prefix else name), size


def read_split_index(m: Manifest, split: str, spot_checks: int = 8) -> list[SampleRef]:
    """Read and check a split's indexes before any loader touches the tars.

    Cheap (the index files, a few 512-byte tar headers per shard and two small reads per
    sample: about a second per million samples from the page cache) and it turns the failures
    that would crash or confuse DALI into a named error: an index that points past the end of
    its tar (DALI can segfault on a memory-mapped truncated tar), members of the wrong size,
    a missing wav or npy, an index that belongs to another tar, a WAV or npy header that is
    not the canonical one (the GPU path slices headers off without reading them).
    """
    import os

    from pipeline.audio import AudioError, check_wav_header

    hint = f"run `{VERIFY_HINT.format(dir=m.root)}` to list every bad shard and sample"
    npy_head = canonical_npy_header(m.frames, m.num_blendshapes)
    wav_size = m.wav_header_bytes + 2 * m.clip_samples
    npy_size = m.npy_header_bytes + 4 * m.frames * len(m.names)
    refs: list[SampleRef] = []
    for shard, tar, idx in zip(
        m.split_shards(split), m.tar_paths(split), m.idx_paths(split), strict=True
    ):
        try:
            index = parse_index(Path(idx).read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{idx}: unreadable index ({exc}); {hint}") from None
        if len(index) != shard.samples:
            raise DatasetError(
                f"{idx}: lists {len(index)} samples, the manifest says "
                f"{shard.samples} for {tar}; {hint}"
            )
        size = shard.bytes
        first = len(refs)
        for comps in index:
            key = comps[0][3].partition(".")[0]
            by_ext = {c[0]: c for c in comps}
            where = f"{tar}: sample {key}"
            for ext, want in ((WAV_EXT, wav_size), (NPY_EXT, npy_size)):
                if ext not in by_ext:
                    raise DatasetError(f"{where} has no .{ext} member; {hint}")
                _, off, n, _ = by_ext[ext]
                if n != want:
                    what = "a canonical WAV" if ext == WAV_EXT else f"float32 [{m.frames}, 52]"
                    raise DatasetError(f"{where}: .{ext} is {n} bytes, {what} is {want}; {hint}")
                if off < 512 or off + n > size:
                    raise DatasetError(
                        f"{where}: .{ext} at bytes {off}..{off + n} lies outside "
                        f"the {size}-byte tar (truncated or stale index); {hint}"
                    )
            refs.append(SampleRef(tar, key, by_ext[WAV_EXT][1:3], by_ext[NPY_EXT][1:3]))
        # spot-check that the index describes this tar: the member headers where it points
        picks = sorted(
            {
                first + round(i * (len(index) - 1) / max(spot_checks - 1, 1))
                for i in range(spot_checks)
            }
            if index
            else set()
        )
        fd = os.open(tar, os.O_RDONLY)
        try:
            for i in picks:
                r = refs[i]
                for ext, (off, n) in ((WAV_EXT, r.wav), (NPY_EXT, r.npy)):
                    got = _tar_header_names(fd, off)
                    if got != (f"{r.key}.{ext}", n):
                        raise DatasetError(
                            f"{tar}: sample {r.key}: the tar header before byte {off} is not "
                            f"{r.key}.{ext} ({n} bytes) as {Path(idx).name} says (corrupt tar "
                            f"header or an index from another tar); {hint}"
                        )
            # every member's own header: what the GPU path slices off unread must be canonical
            for r in refs[first:]:
                try:
                    check_wav_header(
                        os.pread(fd, m.wav_header_bytes, r.wav[0]), m.clip_samples, m.sample_rate
                    )
                except AudioError as exc:
                    raise DatasetError(f"{tar}: sample {r.key}: {exc}; {hint}") from None
                if os.pread(fd, m.npy_header_bytes, r.npy[0]) != npy_head:
                    raise DatasetError(
                        f"{tar}: sample {r.key}: the npy header is not float32 "
                        f"[{m.frames}, 52] in C order; {hint}"
                    )
        finally:
            os.close(fd)
    return refs


def diagnose_split(m: Manifest, split: str) -> str | None:
    """After DALI has failed: the first sample of the split that explains it, reading and
    decoding every sample as the Python readers do; None when every sample looks right."""
    import os

    try:
        refs = read_split_index(m, split)  # indexes, sizes and every member header
    except DatasetError as exc:
        return str(exc).split("; run `")[0]
    fds: dict[str, int] = {}
    try:
        for r in refs:
            fd = fds.get(r.tar) or fds.setdefault(r.tar, os.open(r.tar, os.O_RDONLY))
            try:
                decode_sample(os.pread(fd, r.wav[1], r.wav[0]), os.pread(fd, r.npy[1], r.npy[0]), m)
            except ValueError as exc:
                return f"{r.tar}: sample {r.key}: {exc}"
    finally:
        for fd in fds.values():
            os.close(fd)
    return None
