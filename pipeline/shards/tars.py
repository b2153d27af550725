"""Shards as files: a POSIX tar of samples and the DALI index (wds2idx "v1.2") beside it.

A sample is the members sharing a key (``<key>.wav``, ``<key>.arkit.npy``, ``<key>.json``);
the key ends at the first dot, as DALI's and webdataset's readers cut it. The index lists, per
sample, ``ext offset size name`` for each member, offset being where the member's data starts.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.shards import storage
from pipeline.shards.storage import Location, S3Url

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    """One file in a tar: its name, and where its data lies."""

    name: str
    offset: int  # first byte of the data
    size: int

    @property
    def key(self) -> str:
        return self.name.partition(".")[0]

    @property
    def ext(self) -> str:
        return self.name.partition(".")[2]


def group_by_key(members: Iterable[Member]) -> list[list[Member]]:
    """Consecutive members with the same key, in tar order: one list per sample."""
    samples: list[list[Member]] = []
    for m in members:
        if samples and samples[-1][0].key == m.key:
            samples[-1].append(m)
        else:
            samples.append([m])
    return samples


def index_text(samples: list[list[Member]]) -> str:
    """DALI's index: ``v1.2 <n>`` then one line per sample, ``ext offset size name`` each."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[Member]]:
    """The samples an index lists; ValueError naming what is malformed."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(f"{INDEX_VERSION} "):
        raise ValueError(f"index does not start with '{INDEX_VERSION} <count>'")
    count = int(lines[0].split()[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise ValueError(f"index announces {count} samples but lists {len(body)}")
    samples = []
    for ln in body:
        f = ln.split()
        if len(f) % 4:
            raise ValueError(f"malformed index line: {ln[:80]!r}")
        samples.append(
            [Member(f[i + 3], int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)]
        )
    return samples


def read_index(path: str | Path | S3Url) -> list[list[Member]]:
    return parse_index(storage.read_text(path))


def idx_path(tar_path: str | Path | S3Url) -> Location:
    """The index beside a tar: ``x.tar`` -> ``x.idx`` (a ``Path``, or an ``S3Url`` for s3://)."""
    return storage.location(tar_path).with_suffix(".idx")


def header_before(pread: Callable[[int, int], bytes], offset: int) -> tarfile.TarInfo | None:
    """The tar header of the member whose data starts at ``offset`` (``pread(size, offset)``
    reads the tar); None when the 512 bytes before it are not a valid header (tarfile checks
    the checksum)."""
    block = pread(tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
    try:
        return tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return None


def walk_tar(path: str | Path) -> tuple[list[Member], str | None]:
    """Every whole regular file of a tar, by walking its headers (tarfile checks each header's
    checksum), and why the walk stopped early (a broken header, a member cut short) or None."""
    members: list[Member] = []
    size = Path(path).stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    return members, f"member {info.name} is cut short"
                members.append(Member(info.name, info.offset_data, info.size))
    except (tarfile.TarError, EOFError) as exc:
        return members, str(exc) or type(exc).__name__
    return members, None


def write_shard(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> dict:
    """Write one tar of ``(key, [(ext, bytes), ...])`` samples and its index under temporary
    names, then rename both (index first: a tar is never there without its index). Returns
    the manifest's shard entry (name, samples, bytes, sha256)."""
    tmp_tar, tmp_idx = path.with_suffix(".tar.tmp"), path.with_suffix(".idx.tmp")
    index: list[list[Member]] = []
    digest = hashlib.sha256()
    try:
        with open(tmp_tar, "wb") as raw:
            hashing = _HashingWriter(raw, digest)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for key, members in samples:
                    index.append([_add(tf, f"{key}.{ext}", data) for ext, data in members])
        tmp_idx.write_text(index_text(index))
        os.replace(tmp_idx, idx_path(path))
        os.replace(tmp_tar, path)
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return {
        "name": path.name,
        "samples": len(samples),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    header_at = tf.offset
    tf.addfile(info, io.BytesIO(data))
    return Member(name, header_at + tarfile.BLOCKSIZE, len(data))


class _HashingWriter(io.RawIOBase):
    """A file object that hashes what it writes, so a shard is not read back for its sha256."""

    def __init__(self, raw, digest) -> None:
        self.raw, self.digest = raw, digest

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, b) -> int:
        self.digest.update(b)
        return self.raw.write(b)
