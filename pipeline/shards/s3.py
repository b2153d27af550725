"""S3 through boto3 (the ``s3`` extra): its URLs, one client per process, its failures as errors.

Credentials come from the standard AWS chain (environment, ``~/.aws``, an instance role);
``AWS_ENDPOINT_URL`` points at any S3-compatible server (boto3 >= 1.28 reads it), e.g.
``moto_server``, MinIO or Ceph. Errors become ``DatasetError``s naming the URL, the endpoint and
the reason (never a key), in bounded time: short timeouts and ``ATTEMPTS`` tries per request,
so an unreachable endpoint fails in seconds instead of hanging. Uploads have a client of their
own that waits longer for an answer (``UPLOAD_READ_TIMEOUT_S``), as a slow link carries what it
buffered first; one that fails there says how many bytes went out and how fast.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.errors import DatasetError

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
S3_SCHEME = "s3://"


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


class StorageError(DatasetError):
    """The store itself failed: endpoint unreachable, bucket missing, access denied."""


class NotFound(StorageError):
    """No object at this URL (a local file that is missing raises FileNotFoundError)."""


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


def _error(url: S3Url, exc: Exception, on_object: bool, sent: Sent | None = None) -> StorageError:
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


def call(url: S3Url, method: str, sent: Sent | None = None, **kw):
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


class Sent:
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
