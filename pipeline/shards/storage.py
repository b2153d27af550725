"""Where a dataset lies: a local folder or ``s3://bucket/prefix``, behind one small interface.

Every read, listing and upload of a dataset's files goes through here, and nothing else knows
whether it is local. A local path stays a ``pathlib.Path`` and keeps its exact behaviour
(``os`` calls, ``OSError`` and all). An S3 URL is an ``S3Url``, which joins (``/``), names
(``.name``, ``.with_suffix``) and prints (``str``) like a Path, because ``Path("s3://b/p")``
collapses to ``s3:/b/p``.

S3 is read with boto3 (``pipeline.shards.s3``: the client, its errors), ranged GETs
(``Range: bytes=a-b``) for members and headers.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from core.errors import DatasetError
from pipeline.shards import s3
from pipeline.shards.s3 import (  # noqa: F401 (the S3 names users import from here)
    CHUNK,
    PREFETCH,
    S3_SCHEME,
    THREADS,
    UPLOAD_THREADS,
    NotFound,
    S3Url,
    Sent,
    StorageError,
    call,
    client,
    endpoint,
)

Location = Path | S3Url

# bucket names: 3-63 letters, digits, dots, hyphens (and what legacy buckets allow besides)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{2,62}")


def is_s3(path: str | Path | S3Url) -> bool:
    """Whether ``path`` names S3 (a ``Path`` never does: it would have lost a slash)."""
    return isinstance(path, S3Url) or (isinstance(path, str) and path.startswith(S3_SCHEME))


def location(path: str | Path | S3Url) -> Location:
    """``path`` as a ``Path`` or an ``S3Url``; DatasetError for a malformed S3 URL."""
    if isinstance(path, (Path, S3Url)):
        return path
    if not is_s3(path):
        return Path(path)
    bucket, _, key = path[len(S3_SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or "//" in key.strip("/"):
        raise DatasetError(f"{path} is not an S3 URL of the form s3://bucket/prefix")
    return S3Url(bucket, key.strip("/"))


def _s3(loc: Location) -> S3Url | None:
    return loc if isinstance(loc, S3Url) else None


# ---------------------------------------------------------------- reading


def read_bytes(path: str | Path | S3Url) -> bytes:
    loc = location(path)
    if (url := _s3(loc)) is None:
        return loc.read_bytes()
    return _body(url, call(url, "get_object", Bucket=url.bucket, Key=url.key))


def _body(url: S3Url, response: dict) -> bytes:
    try:
        return response["Body"].read()
    except Exception as exc:  # the stream broke off: urllib3's and botocore's errors alike
        raise StorageError(f"{url}: the download broke off ({type(exc).__name__})") from None


def read_text(path: str | Path | S3Url) -> str:
    loc = location(path)
    return loc.read_text() if _s3(loc) is None else read_bytes(loc).decode()


def read_range(path: str | Path | S3Url, offset: int, size: int) -> bytes:
    """``size`` bytes from ``offset`` (fewer past the end, like ``os.pread``)."""
    loc = location(path)
    if (url := _s3(loc)) is None:
        with open(loc, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, offset)
    if size <= 0:
        return b""
    for attempt in range(1, s3.ATTEMPTS + 1):
        try:
            resp = call(
                url,
                "get_object",
                Bucket=url.bucket,
                Key=url.key,
                Range=f"bytes={offset}-{offset + size - 1}",
            )
        except StorageError as exc:
            if "InvalidRange" in str(exc):  # the range starts past the end
                return b""
            raise
        try:  # botocore retries the request, not a body that breaks off mid-stream
            return _body(url, resp)
        except StorageError:
            if attempt == s3.ATTEMPTS:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Stat:
    size: int
    version: int | str  # local: st_mtime_ns; S3: the ETag (or LastModified)


def stat(path: str | Path | S3Url) -> Stat:
    """Size and version now: OSError (local) or NotFound (S3) if it is not there."""
    loc = location(path)
    if (url := _s3(loc)) is None:
        st = os.stat(loc)
        return Stat(st.st_size, st.st_mtime_ns)
    head = call(url, "head_object", Bucket=url.bucket, Key=url.key)
    version = head.get("ETag") or str(head.get("LastModified", ""))
    return Stat(int(head["ContentLength"]), version)


def list_names(path: str | Path | S3Url, limit: int | None = None) -> list[str]:
    """The names under a prefix (S3: every key below it, relative to it)."""
    loc = location(path)
    if (url := _s3(loc)) is None:
        return sorted(p.name for p in loc.iterdir())[:limit]
    prefix = f"{url.key}/" if url.key else ""
    names: list[str] = []
    token: dict = {}
    while limit is None or len(names) < limit:
        kw = {"MaxKeys": min(1000, limit or 1000), **token}
        page = call(url, "list_objects_v2", Bucket=url.bucket, Prefix=prefix, **kw)
        names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            break
        token = {"ContinuationToken": page["NextContinuationToken"]}
    return names[:limit]


class FileReader:
    """Reads of a local file by offset."""

    def __init__(self, path: Path, temporary: bool = False) -> None:
        self.path, self.temporary = path, temporary
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)
        if self.temporary:
            self.path.unlink(missing_ok=True)


class S3Reader:
    """Reads of one object by ranged GETs. ``plan`` the reads ahead and they go out
    ``PREFETCH`` at a time (a start-up check reads two small headers per sample)."""

    path = None  # no local file to walk

    def __init__(self, url: S3Url) -> None:
        self.url = url
        self.size = stat(url).size
        self._order: dict[tuple[int, int], int] = {}
        self._reads: list[tuple[int, int]] = []
        self._ready: dict[tuple[int, int], bytes] = {}

    def plan(self, reads: list[tuple[int, int]]) -> None:
        self._reads = list(reads)
        self._order = {r: i for i, r in enumerate(self._reads)}
        self._ready = {}

    def pread(self, size: int, offset: int) -> bytes:
        want = (size, offset)
        if want not in self._ready and want in self._order:
            start = self._order[want]
            batch = [r for r in self._reads[start : start + PREFETCH] if r not in self._ready]
            with ThreadPoolExecutor(min(THREADS, len(batch))) as pool:
                got = pool.map(lambda r: read_range(self.url, r[1], r[0]), batch)
                self._ready.update(zip(batch, got, strict=True))
        if want in self._ready:
            return self._ready.pop(want)
        return read_range(self.url, offset, size)

    def close(self) -> None:
        self._ready = {}


def open_reader(path: str | Path | S3Url, whole: bool = False) -> FileReader | S3Reader:
    """A reader by offset: ``FileNotFoundError``/``OSError`` (local) or ``NotFound``/
    ``StorageError`` (S3) if the file cannot be opened. ``whole``: the caller reads all of it,
    so an S3 object is downloaded once into a temporary file instead of read by ranges."""
    loc = location(path)
    if (url := _s3(loc)) is None:
        return FileReader(loc)
    if not whole:
        return S3Reader(url)
    fd, tmp = tempfile.mkstemp(prefix="arkit-", suffix=f"-{url.name}")
    os.close(fd)
    try:
        call(url, "download_file", Bucket=url.bucket, Key=url.key, Filename=tmp)
        return FileReader(Path(tmp), temporary=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- writing (S3 only)


def upload(src: Path, url: S3Url) -> None:
    """Copy the local file ``src`` to ``url`` (multipart above ``CHUNK``, ``UPLOAD_THREADS``
    parts at a time); a link too slow for it is named as such, with what it carried."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=CHUNK, multipart_chunksize=CHUNK, max_concurrency=UPLOAD_THREADS
    )
    sent = Sent(src.stat().st_size)
    kw = dict(Filename=str(src), Bucket=url.bucket, Key=url.key, Config=config, Callback=sent)
    call(url, "upload_file", sent, **kw)


def download(url: S3Url, dst: Path) -> None:
    """Copy the object ``url`` into the local file ``dst`` (streamed, in parts)."""
    call(url, "download_file", Bucket=url.bucket, Key=url.key, Filename=str(dst))


def put_text(url: S3Url, text: str) -> None:
    call(url, "put_object", Bucket=url.bucket, Key=url.key, Body=text.encode())


def delete(url: S3Url) -> None:
    """Remove ``url``; nothing happens if it is not there."""
    call(url, "delete_object", Bucket=url.bucket, Key=url.key)
