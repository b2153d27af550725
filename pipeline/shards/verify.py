"""The one verifier of a dataset: it yields a ``Problem`` (file, sample, member, reason) for each
thing that is wrong, at three depths, and every caller takes what it needs of the same checks:

- ``STARTUP`` (every loader, before DALI reads a byte; stops at the first problem): each shard
  is there at its manifest size; its index parses, lists the manifest's sample count, and every
  wav/npy member is present, of the canonical size and inside its tar; a few tar headers per
  shard are where the index says; every member's WAV/npy header is canonical (the GPU path
  slices headers off unread). About a second per million samples from the page cache, and it
  turns what would crash or confuse DALI (a memory-mapped truncated tar can segfault it) into
  a named error.
- ``DECODE`` (after DALI failed, to name the sample behind it): also decodes every sample as
  the Python readers do, values included.
- ``FULL`` (``make_shards --verify``; lists everything): also the sha256 of every shard, a walk
  of every tar header, the index against the tar's real members, and the ``.json`` member.

A dataset in ``s3://`` gets the same checks through ``pipeline.shards.storage``: ranged GETs of the
headers and members (planned ahead, so they go out many at a time), HEAD for sizes, and the
whole object (one download) only at ``FULL``. A store that fails as a whole (unreachable,
no bucket, access denied) raises its ``StorageError`` instead of a problem per shard.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import DatasetError, MemberError
from pipeline.shards import storage
from pipeline.shards.manifest import MANIFEST_NAME, SPLITS, Manifest, Shard, load_manifest
from pipeline.shards.members import (
    JSON_EXT,
    NPY_EXT,
    WAV_EXT,
    canonical_npy_header,
    check_wav_header,
    decode_sample,
)
from pipeline.shards.storage import FileReader, Location, NotFound, S3Reader, StorageError
from pipeline.shards.tars import Member, group_by_key, header_before, idx_path, read_index, walk_tar


class Depth(enum.IntEnum):
    # the index against the manifest and the tar's size, no member read: where each shard is
    # checked at STARTUP once its verified copy is in the shard cache (pipeline.shards.cache)
    INDEX = -1
    STARTUP = 0
    DECODE = 1
    FULL = 2


@dataclass(frozen=True)
class Problem:
    file: str  # the tar, index or manifest
    reason: str
    sample: str | None = None  # the sample's key
    member: str | None = None  # the member's extension

    def __str__(self) -> str:
        where = f"{self.file}: sample {self.sample}" if self.sample else self.file
        return f"{where}: {self.reason}"


def check_dataset(root: str | Location, depth: Depth = Depth.FULL) -> Iterator[Problem]:
    """Every problem of the dataset at ``root``, manifest first."""
    try:
        m = load_manifest(root)
    except StorageError:
        raise  # the store failed (unreachable, no bucket, denied): the caller says why
    except DatasetError as exc:
        yield Problem(str(storage.location(root) / MANIFEST_NAME), f"missing or unreadable ({exc})")
        return
    for split in SPLITS:
        yield from check_split(m, split, depth)


def check_split(m: Manifest, split: str, depth: Depth = Depth.STARTUP) -> Iterator[Problem]:
    for shard in m.split_shards(split):
        yield from check_shard(m, shard, depth)


def first_problem(m: Manifest, split: str, depth: Depth = Depth.STARTUP) -> Problem | None:
    return next(check_split(m, split, depth), None)


def check_shard(
    m: Manifest, shard: Shard, depth: Depth = Depth.STARTUP, local: Path | None = None
) -> Iterator[Problem]:
    """``local``: a verified local copy of the shard to read instead (problems still name the
    shard where the dataset lies)."""
    tar = m.root / shard.name
    if local is not None:
        reader = FileReader(local)
        try:
            yield from _check_open_shard(m, shard, tar, reader, depth)
        finally:
            reader.close()
        return
    try:
        # FULL reads every byte (sha256, a walk of the headers): an S3 object comes down once
        reader = storage.open_reader(tar, whole=depth >= Depth.FULL)
    except (FileNotFoundError, NotFound):
        yield Problem(str(tar), "listed in the manifest but missing")
        return
    except OSError as exc:
        yield Problem(str(tar), f"unreadable ({exc.strerror})")
        return
    try:
        yield from _check_open_shard(m, shard, tar, reader, depth)
    finally:
        reader.close()


def _check_open_shard(
    m: Manifest, shard: Shard, tar: Location, reader: FileReader | S3Reader, depth: Depth
) -> Iterator[Problem]:
    size = reader.size
    if size != shard.bytes:
        yield Problem(
            str(tar), f"{size} bytes, manifest says {shard.bytes} (truncated or rewritten)"
        )
        if depth < Depth.FULL:
            return
    idx = idx_path(tar)
    try:
        index = read_index(idx)
    except (FileNotFoundError, NotFound):
        yield Problem(str(idx), "missing: the tar has no index beside it; rebuild the dataset")
        index = None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        yield Problem(str(idx), f"unreadable index ({exc})")
        index = None
    if depth >= Depth.FULL:
        yield from _check_whole_file(shard, tar, reader)
        members, error = walk_tar(reader.path)
        if error:
            yield Problem(str(tar), f"not a readable tar ({error}) after {len(members)} members")
        truth = group_by_key(members)
        if index is not None and index != truth:
            yield Problem(str(idx), _index_mismatch(index, truth))
        index = truth  # check the samples that are really there
    if index is None:
        return
    if len(index) != shard.samples:
        yield Problem(
            str(tar if depth >= Depth.FULL else idx),
            f"{len(index)} samples, manifest says {shard.samples}",
        )
        if depth < Depth.FULL:
            return
    yield from _check_samples(m, shard, reader, size, index, depth)


def _check_whole_file(shard: Shard, tar: Location, reader: FileReader) -> Iterator[Problem]:
    digest = hashlib.sha256()
    offset = 0
    while chunk := reader.pread(1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    if digest.hexdigest() != shard.sha256:
        yield Problem(str(tar), "sha256 differs from the manifest (corrupted)")


def _index_mismatch(index: list[list[Member]], truth: list[list[Member]]) -> str:
    k = next(
        (i for i, (a, b) in enumerate(zip(index, truth, strict=False)) if a != b),
        min(len(index), len(truth)),
    )
    first = (index if k < len(index) else truth)[k][0].key
    return (
        f"does not match its tar from sample {first} (number {k}) on: truncated shard or "
        "stale index"
    )


def _spot_checks(n: int, count: int = 8) -> set[int]:
    """Evenly spread sample positions whose tar headers the start-up check reads."""
    return {round(i * (n - 1) / max(count - 1, 1)) for i in range(count)} if n else set()


def _check_samples(
    m: Manifest,
    shard: Shard,
    reader: FileReader | S3Reader,
    size: int,
    index: list[list[Member]],
    depth: Depth,
) -> Iterator[Problem]:
    tar = m.root / shard.name
    lay = m.layout(shard.split)
    want = {WAV_EXT: lay.wav_bytes, NPY_EXT: lay.npy_bytes}
    shape = f"float32 [{lay.frames}, {lay.num_blendshapes}]"
    what = {WAV_EXT: "a canonical WAV", NPY_EXT: shape}
    npy_head = canonical_npy_header(lay.frames, lay.num_blendshapes)
    spots = _spot_checks(len(index)) if Depth.STARTUP <= depth < Depth.FULL else set()
    if isinstance(reader, S3Reader):  # a local file gains nothing from knowing ahead
        heads = (m.wav_header_bytes, len(npy_head))
        reader.plan(_planned_reads(index, spots, depth, heads, want, size))
    for i, sample in enumerate(index):
        key = sample[0].key
        by_ext = {c.ext: c for c in sample}

        def problem(reason: str, member: str | None = None, key=key) -> Problem:
            return Problem(str(tar), reason, key, member)

        required = (WAV_EXT, NPY_EXT, JSON_EXT) if depth >= Depth.FULL else (WAV_EXT, NPY_EXT)
        missing = [ext for ext in required if ext not in by_ext]
        for ext in missing:
            yield problem(f"has no .{ext} member", ext)
        bad = bool(missing)
        for ext in (WAV_EXT, NPY_EXT):
            c = by_ext.get(ext)
            if c is None:
                continue
            fault = _fault(c, want, size)
            if fault == "size":
                yield problem(f".{ext} is {c.size} bytes, {what[ext]} is {want[ext]}", ext)
                bad = True
            elif fault == "place":
                yield problem(
                    f".{ext} at bytes {c.offset}..{c.offset + c.size} lies outside the "
                    f"{size}-byte tar (truncated or stale index)",
                    ext,
                )
                bad = True
            elif i in spots:
                info = header_before(reader.pread, c.offset)
                if info is None or (info.name, info.size) != (c.name, c.size):
                    yield problem(
                        f"the tar header before byte {c.offset} is not {c.name} ({c.size} "
                        f"bytes) as {idx_path(tar).name} says (corrupt tar header or an index "
                        "from another tar)",
                        ext,
                    )
                    bad = True
        if bad or depth < Depth.STARTUP:
            continue
        wav, npy = by_ext[WAV_EXT], by_ext[NPY_EXT]
        try:
            if depth >= Depth.DECODE:
                decode_sample(
                    reader.pread(wav.size, wav.offset), reader.pread(npy.size, npy.offset), lay
                )
            else:  # the headers only: what the GPU path slices off unread
                check_wav_header(
                    reader.pread(m.wav_header_bytes, wav.offset), lay.samples, m.sample_rate
                )
                if reader.pread(len(npy_head), npy.offset) != npy_head:
                    raise MemberError(f"the npy header is not {shape} in C order")
        except MemberError as exc:
            yield problem(str(exc))


def _fault(c: Member, want: dict[str, int], tar_size: int) -> str | None:
    """What is wrong with a wav/npy index entry before anything is read: its ``"size"``, its
    ``"place"`` (not inside the tar after a header), or nothing."""
    if c.size != want[c.ext]:
        return "size"
    if c.offset < 512 or c.offset + c.size > tar_size:
        return "place"
    return None


def _planned_reads(
    index: list[list[Member]],
    spots: set[int],
    depth: Depth,
    heads: tuple[int, int],
    want: dict[str, int],
    tar_size: int,
) -> list[tuple[int, int]]:
    """The (size, offset) reads ``_check_samples`` makes, in its order (S3 sends them ahead),
    for the entries it reads (``_fault`` is None): ``heads`` are the WAV and npy header sizes."""
    reads = []
    for i, sample in enumerate(index):
        by_ext = {c.ext: c for c in sample if c.ext in (WAV_EXT, NPY_EXT)}
        ok = [c for c in by_ext.values() if _fault(c, want, tar_size) is None]
        if i in spots:
            reads += [(512, c.offset - 512) for c in ok]
        wav, npy = by_ext.get(WAV_EXT), by_ext.get(NPY_EXT)
        if wav is None or npy is None or len(ok) < 2 or depth < Depth.STARTUP:
            continue
        wav_head, npy_head = heads
        if depth >= Depth.DECODE:
            reads += [(wav.size, wav.offset), (npy.size, npy.offset)]
        else:
            reads += [(wav_head, wav.offset), (npy_head, npy.offset)]
    return reads
