"""Where a dataset lies: a local folder or ``s3://bucket/prefix``, behind one small interface.

Every read, listing and upload of a dataset's files goes through here, and nothing else knows
whether it is local. A local path stays a ``pathlib.Path`` and keeps its exact behaviour
(``os`` calls, ``OSError`` and all). An S3 URL is an ``S3Url``, which joins (``/``), names
(``.name``, ``.with_suffix``) and prints (``str``) like a Path, because ``Path("s3://b/p")``
collapses to ``s3:/b/p``.

S3 is read with boto3 (the ``s3`` extra), ranged GETs (``Range: bytes=a-b``) for members and
headers. Credentials come from the standard AWS chain (environment, ``~/.aws``, an instance
role); ``AWS_ENDPOINT_URL`` points at any S3-compatible server (boto3 >= 1.28 reads it), e.g.
``moto_server``, MinIO or Ceph. Errors become ``DatasetError``s naming the URL, the endpoint and
the reason (never a key), in bounded time: short timeouts and ``ATTEMPTS`` tries per request,
so an unreachable endpoint fails in seconds instead of hanging. Uploads have a client of their
own that waits longer for an answer (``UPLOAD_READ_TIMEOUT_S``), as a slow link carries what it
buffered first; one that fails there says how many bytes went out and how fast.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import DatasetError

S3_SCHEME = "s3://"
CONNECT_TIMEOUT_S = 3  # per connection attempt
READ_TIMEOUT_S = 4  # per socket read: an endpoint that stops answering
ATTEMPTS = 3  # tries per request (botocore's "standard" retries: up to 2 + 4 s of backoff),
# so an endpoint that accepts connections and never answers fails within 3 x 4 + 6 = 18 s
PREFETCH = 64  # ranged GETs asked for together when a reader knows what it will read ...
THREADS = 16  # ... and how many are in flight at once (each on a connection of the pool)
CHUNK = 8 << 20  # download and upload part size (S3 takes parts of 5 MiB and more)
# An upload's answer comes once the link has carried what it buffered of the part, which on a
# slow link takes longer than an endpoint that stops answering would: uploads wait this long
# (4 parts of 8 MB in flight drain within it down to ~0.5 MB/s, ~4 Mbit/s) ...
UPLOAD_READ_TIMEOUT_S = 60
UPLOAD_THREADS = 4  # ... with fewer parts in flight than reads, to share a slow link


class StorageError(DatasetError):
    """The store itself failed: endpoint unreachable, bucket missing, access denied."""


class NotFound(StorageError):
    """No object at this URL (a local file that is missing raises FileNotFoundError)."""


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``: joined and named like a ``Path``; ``key`` has no slash at its ends
    ("" is the bucket's top)."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    def __truediv__(self, name: str) -> S3Url:
        return S3Url(self.bucket, f"{self.key}/{name}" if self.key else str(name))

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    def with_suffix(self, suffix: str) -> S3Url:
        head, _, name = self.key.rpartition("/")
        stem = name[: name.rfind(".")] if name.rfind(".") > 0 else name
        return S3Url(self.bucket, f"{head}/{stem}{suffix}" if head else f"{stem}{suffix}")


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


# ---------------------------------------------------------------- the client, one per process

_clients: dict[bool, tuple[tuple, object]] = {}  # upload? -> (who, client): see _owner
# a client is made for an endpoint and credentials: a change in these makes a new one
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION", "AWS_ACCESS_KEY_ID")


def _owner() -> tuple:
    """Whose client the cached one is: this process (boto3 clients are not fork-safe, so a
    forked child makes its own) with these settings."""
    return (os.getpid(), *(os.environ.get(name) for name in _SETTINGS))


def client(upload: bool = False):
    """This process's S3 client, made on first use; ``upload``: the one for uploads, which
    waits longer for an answer (``UPLOAD_READ_TIMEOUT_S``)."""
    made = _clients.get(upload)
    if made is None or made[0] != _owner():
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ImportError:
            raise DatasetError(
                "s3:// datasets need boto3: pip install 'arkit-dali[s3]' (or pip install boto3)"
            ) from None
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=UPLOAD_READ_TIMEOUT_S if upload else READ_TIMEOUT_S,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            max_pool_connections=THREADS,
        )
        try:
            made = (_owner(), boto3.session.Session().client("s3", config=config))
        except (BotoCoreError, ValueError) as exc:
            raise _setup_error(exc) from None
        _clients[upload] = made
    return made[1]


def _shown(value: str) -> str:
    """A setting's value fit to print: any user info (``user:secret@``) and credential blanked."""
    return _clean(re.sub(r"(?<=://)[^/]*@", "***@", value))


def _setup_error(exc: Exception) -> StorageError:
    """The ``StorageError`` for an S3 client that cannot be made from the AWS settings."""
    from botocore.exceptions import ProfileNotFound

    if isinstance(exc, ProfileNotFound):
        profile = os.environ.get("AWS_PROFILE") or str(exc.kwargs.get("profile", ""))
        config = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
        creds = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
        return StorageError(
            f"AWS_PROFILE={_shown(profile)}: no such profile in {config} or {creds}: "
            "add it there, name an existing one, or unset AWS_PROFILE to use "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    url = os.environ.get("AWS_ENDPOINT_URL", "")
    if isinstance(exc, ValueError) and url and "endpoint" in str(exc).lower():
        example = f"http://{url}" if "://" not in url else "http://127.0.0.1:9000"
        return StorageError(
            f"AWS_ENDPOINT_URL={_shown(url)} is not an endpoint URL: give it as "
            f"scheme://host[:port], e.g. {_shown(example)}"
        )
    return StorageError(
        f"cannot set up an S3 client from the AWS settings ({_clean(str(exc))[:200]}): check "
        "AWS_PROFILE, AWS_REGION and AWS_ENDPOINT_URL"
    )


def endpoint() -> str:
    """The S3 endpoint requests go to, without any user info it may carry."""
    url = urlsplit(client().meta.endpoint_url)
    return f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")


def _secrets() -> list[str]:
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return [v for v in (os.environ.get(n) for n in names) if v and len(v) >= 4]


def _clean(text: str) -> str:
    """``text`` with any credential value in the environment blanked out."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def _error(url: S3Url, exc: Exception, on_object: bool, sent: _Sent | None = None) -> StorageError:
    """The ``StorageError`` for a boto3 failure on ``url``: what, where, what to do.
    ``on_object``: the request named an object, so a bare 404 means that object is not there
    (a listing's 404 can only mean the bucket or the endpoint); ``sent``: an upload's progress."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectionError as Unreachable

    where = f"{url} (endpoint {endpoint()})"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchKey" or (on_object and code in ("404", "NotFound")):
            return NotFound(f"{url}: no such object")
        if code in ("NoSuchBucket", "404", "NotFound"):
            return StorageError(
                f"{where}: bucket {url.bucket} does not exist ({code}): check the bucket name "
                "and AWS_ENDPOINT_URL"
            )
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{where}: access denied ({code}): check the AWS credentials (AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket's policy"
            )
        message = _clean(str(err.get("Message", "")))[:200]
        return StorageError(f"{where}: S3 answered {code or 'an error'} ({message})")
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{where}: no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ReadTimeoutError) and sent is not None and sent.bytes:
        return StorageError(
            f"{where}: the upload was too slow: {sent}, and no answer came within "
            f"{UPLOAD_READ_TIMEOUT_S} s of a part of up to {CHUNK >> 20} MB sent ({ATTEMPTS} "
            "tries): the link to the endpoint is too slow for it; upload over a faster one"
        )
    if isinstance(exc, ReadTimeoutError):
        return StorageError(
            f"{where}: the endpoint stopped answering (no reply within {READ_TIMEOUT_S} s, "
            f"{ATTEMPTS} tries): check that the S3 server is up and reachable"
        )
    if isinstance(exc, (Unreachable, HTTPClientError)):
        return StorageError(
            f"{where}: cannot reach the endpoint after {ATTEMPTS} tries "
            f"({type(exc).__name__}): check AWS_ENDPOINT_URL and the network"
        )
    return StorageError(f"{where}: S3 request failed ({_clean(str(exc))[:200]})")


def _call(url: S3Url, method: str, sent: _Sent | None = None, **kw):
    """``client().<method>(**kw)``, boto3's failures turned into ``StorageError``; with
    ``sent`` (an upload's progress), on the upload client."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    on_object = method != "list_objects_v2"
    try:
        return getattr(client(upload=sent is not None), method)(**kw)
    except (BotoCoreError, ClientError) as exc:
        raise _error(url, exc, on_object, sent) from None
    except Boto3Error as exc:  # upload_file wraps the ClientError it met
        cause = exc.__cause__ or exc.__context__
        exc = cause if isinstance(cause, Exception) else exc
        raise _error(url, exc, on_object, sent) from None


def _s3(loc: Location) -> S3Url | None:
    return loc if isinstance(loc, S3Url) else None


# ---------------------------------------------------------------- reading


def read_bytes(path: str | Path | S3Url) -> bytes:
    loc = location(path)
    if (url := _s3(loc)) is None:
        return loc.read_bytes()
    return _body(url, _call(url, "get_object", Bucket=url.bucket, Key=url.key))


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
    for attempt in range(1, ATTEMPTS + 1):
        try:
            resp = _call(
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
            if attempt == ATTEMPTS:
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
    head = _call(url, "head_object", Bucket=url.bucket, Key=url.key)
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
        page = _call(url, "list_objects_v2", Bucket=url.bucket, Prefix=prefix, **kw)
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
        _call(url, "download_file", Bucket=url.bucket, Key=url.key, Filename=tmp)
        return FileReader(Path(tmp), temporary=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- writing (S3 only)


class _Sent:
    """An upload's progress (boto3's callback, from its threads): bytes handed to the link,
    retries included, and since when."""

    def __init__(self, size: int) -> None:
        self.size, self.bytes, self.start = size, 0, time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        if amount > 0:  # a retried part counts again (boto3 reports its rewind as negative)
            with self._lock:
                self.bytes += amount

    def __str__(self) -> str:
        took = max(time.monotonic() - self.start, 1e-3)
        return (
            f"{_size(self.bytes)} sent in {took:.0f} s ({_size(self.bytes / took)}/s) for a "
            f"file of {_size(self.size)}"
        )


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def upload(src: Path, url: S3Url) -> None:
    """Copy the local file ``src`` to ``url`` (multipart above ``CHUNK``, ``UPLOAD_THREADS``
    parts at a time); a link too slow for it is named as such, with what it carried."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=CHUNK, multipart_chunksize=CHUNK, max_concurrency=UPLOAD_THREADS
    )
    sent = _Sent(src.stat().st_size)
    kw = dict(Filename=str(src), Bucket=url.bucket, Key=url.key, Config=config, Callback=sent)
    _call(url, "upload_file", sent, **kw)


def put_text(url: S3Url, text: str) -> None:
    _call(url, "put_object", Bucket=url.bucket, Key=url.key, Body=text.encode())


def delete(url: S3Url) -> None:
    """Remove ``url``; nothing happens if it is not there."""
    _call(url, "delete_object", Bucket=url.bucket, Key=url.key)
