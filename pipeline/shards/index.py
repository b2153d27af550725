"""The sample index the loaders read from: each sample's members' places in its tar (from the
DALI index, after the start-up check) and the shards' stamps a run checks again every epoch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from core.errors import DatasetError
from pipeline.shards import storage
from pipeline.shards.manifest import Manifest, verify_hint
from pipeline.shards.members import NPY_EXT, WAV_EXT
from pipeline.shards.storage import NotFound
from pipeline.shards.tars import idx_path, read_index
from pipeline.shards.verify import Depth, Problem, first_problem


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in its tar (from the DALI index)."""

    tar: str
    key: str
    wav: tuple[int, int]  # (offset, size)
    npy: tuple[int, int]


def sample_refs(m: Manifest, split: str, depth: Depth = Depth.STARTUP) -> list[SampleRef]:
    """A split's samples in order, after the start-up check (``depth``: ``Depth.INDEX`` where
    the shard cache checks each shard's members once it is downloaded): DatasetError on the
    first problem."""
    problem = first_problem(m, split, depth)
    if problem is not None:
        raise DatasetError(f"{problem}; {verify_hint(m.root)}")
    refs = []
    for tar in m.tar_paths(split):
        for sample in read_index(idx_path(tar)):
            by_ext = {c.ext: c for c in sample}
            wav, npy = by_ext[WAV_EXT], by_ext[NPY_EXT]
            refs.append(SampleRef(tar, wav.key, (wav.offset, wav.size), (npy.offset, npy.size)))
    return refs


def _stats(tars: list[str]) -> list[storage.Stat | Exception]:
    """Each tar's ``storage.stat`` now, or what it raised (OSError, NotFound); S3's HEADs go
    out ``storage.THREADS`` at a time (one after the other, 30 ms each on real S3, they would
    add a second per 30 shards to every epoch)."""

    def one(tar: str) -> storage.Stat | Exception:
        try:
            return storage.stat(tar)
        except (OSError, NotFound) as exc:
            return exc

    if len(tars) < 2 or not storage.is_s3(tars[0]):
        return [one(t) for t in tars]
    with ThreadPoolExecutor(min(storage.THREADS, len(tars))) as pool:
        return list(pool.map(one, tars))


def shard_stamps(m: Manifest, split: str) -> dict[str, tuple[int, int | str]]:
    """Each shard's (size, version) now: what a run checks again at every epoch. The version
    is the modification time of a file, the ETag of an S3 object."""
    tars = m.tar_paths(split)
    # a shard that is missing is left out: the start-up check names it
    return {
        tar: (st.size, st.version)
        for tar, st in zip(tars, _stats(tars), strict=True)
        if not isinstance(st, Exception)
    }


def changed_shards(stamps: dict[str, tuple[int, int | str]]) -> Problem | None:
    """The first shard whose size or version differs from ``stamps``."""
    for (tar, (size, version)), st in zip(stamps.items(), _stats(list(stamps)), strict=True):
        if isinstance(st, OSError):
            return Problem(tar, f"vanished while the run was reading it ({st.strerror})")
        if isinstance(st, NotFound):
            return Problem(tar, "vanished while the run was reading it (no such object)")
        if (st.size, st.version) != (size, version):
            what = (
                f"its size went from {size} to {st.size} bytes"
                if st.size != size
                else ("it was modified")
            )
            return Problem(
                tar,
                f"changed while the run was reading it ({what}): rewritten or truncated during "
                "training? Let the writer finish, check it, and resume from the last checkpoint",
            )
    return None
