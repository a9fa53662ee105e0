"""The S3 backend through boto3: `S3Store`, the process's shared client, and webdataset's s3:// reader.

Settings come from boto3's own chain (AWS_ENDPOINT_URL, profiles, credentials,
region), so MinIO, Ceph, R2 or SeaweedFS need no code. Retries follow the one
policy described in base.py ("retries"): the client's standard mode, then the
outage budget that ends in StorageUnavailable.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ..config import has_userinfo
from ..errors import ConfigError
from .base import (
    MAX_ATTEMPTS,
    TMP_MARK,
    ObjectInfo,
    ObjectStore,
    Outage,
    check_key,
    copy_atomically,
    env_seconds,
    has_suffix,
    retrying,
    usable_key,
)

if TYPE_CHECKING:
    from botocore.client import BaseClient

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024

_CLIENTS: dict[tuple, BaseClient] = {}
_CLIENTS_LOCK = threading.Lock()
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
    "PSEUDOTRACK_S3_CONNECT_TIMEOUT",
    "PSEUDOTRACK_S3_READ_TIMEOUT",
)


def s3_client() -> BaseClient:
    """One boto3 client per process (clients are thread-safe; creating one costs ~50 ms).

    The cache is keyed on the process and on the AWS variables, so a forked worker or a changed
    environment gets its own client.
    """
    key = (os.getpid(), *(os.environ.get(k) for k in _ENV_KEYS))
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            import botocore.session
            from botocore.config import Config

            options: dict[str, Any] = {
                "connect_timeout": env_seconds("PSEUDOTRACK_S3_CONNECT_TIMEOUT", 10.0),
                "read_timeout": env_seconds("PSEUDOTRACK_S3_READ_TIMEOUT", 120.0),
                "max_pool_connections": 32,
                "tcp_keepalive": True,
            }
            # The retry policy of base.py: standard mode, unless the user set one in the environment or
            # profile. (Adaptive mode adds a client-side rate limiter that AWS documents as experimental.)
            if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
                options["retries"] = {"mode": "standard", "max_attempts": MAX_ATTEMPTS}
            core = botocore.session.get_session()
            # botocore parses every LastModified with dateutil (~180 us each): 18 s of CPU to list 100k keys
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
            client = boto3.session.Session(botocore_session=core).client("s3", config=Config(**options))
            _CLIENTS[key] = client
    return client


def parse_timestamp(value: str) -> datetime:
    """S3's ISO 8601 timestamps the fast way; anything else (HTTP dates in headers) the way botocore does."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

        return DEFAULT_TIMESTAMP_PARSER(value)
    return parsed


_THROTTLING = frozenset(
    ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException")
)
_TRANSIENT_CODES = _THROTTLING | {"InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}


def is_transient(exc: BaseException) -> bool:
    """A fault worth retrying: a dropped, refused, timed-out or cut-off connection, a 5xx, throttling.

    s3transfer wraps the client's error in its own (S3UploadFailedError), so the cause chain is searched.
    """
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(
            exc,
            HTTPClientError | BotoConnectionError | ResponseStreamingError | IncompleteReadError | RetriesExceededError,
        ):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or status == 429 or _error_code(exc) in _TRANSIENT_CODES
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
        seen += 1
    return False


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); keys are taken verbatim (S3 URIs are not percent-encoded)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if has_userinfo(uri):  # the message must not repeat what came before the '@'
        raise ConfigError(
            f"s3://{uri.rpartition('@')[2]}: S3 URIs cannot carry credentials (user:password@); remove them "
            "and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or another standard AWS setting"
        )
    if not bucket:
        raise ConfigError(f"{uri!r} names no bucket; write s3://<bucket>/<prefix>")
    return bucket, key


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _is_missing(exc: Exception) -> bool:
    return _error_code(exc) in ("NoSuchKey", "404", "NotFound")


class S3Store(ObjectStore):
    """A bucket and a key prefix; PUTs and completed multipart uploads make objects appear whole."""

    # Keys a listing page asks for; None leaves it to the server (1000 on AWS S3). Tests set a few keys
    # to exercise paging on small buckets.
    page_keys: int | None = None

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        prefix = prefix.strip("/")
        check_key(prefix, allow_empty=True)
        self.prefix = prefix + "/" if prefix else ""

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.bucket, self.prefix = state["bucket"], state["prefix"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Store) and (other.bucket, other.prefix) == (self.bucket, self.prefix)

    def __hash__(self) -> int:
        return hash(("s3", self.bucket, self.prefix))

    @property
    def client(self) -> BaseClient:
        return s3_client()

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{check_key(key, allow_empty=True)}"

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self.prefix + check_key(prefix.strip("/"), allow_empty=True))

    def _retrying(self, what: str, key: str, call: Callable[[], T]) -> T:
        """`call()` within the outage budget (base.py, "retries")."""
        return retrying(what, self.uri(key), call, is_transient)

    def list(
        self, prefix: str = "", suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        # Sorted here: AWS S3 lists in byte order, but a server that keeps a folder tree (SeaweedFS) lists
        # a folder's keys before a sibling name that sorts earlier ('a/b' before 'a-c').
        found = [
            info
            for page in self.list_pages(prefix)
            for info in self.page_objects(page, suffixes, include_unsafe=include_unsafe)
        ]
        found.sort(key=lambda info: info.key)
        yield from found

    def list_pages(self, prefix: str = "") -> Iterator[dict]:
        """The raw ListObjectsV2 pages under `prefix`, through boto3's paginator.

        A page that fails past the client's retries is asked for again within the outage budget,
        from the last key listed (StartAfter), so a fault costs one page, not the whole listing.
        """
        check_key(prefix, allow_empty=True)
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if self.page_keys:
            request["PaginationConfig"] = {"PageSize": self.page_keys}
        outage: Outage | None = None
        while True:
            try:
                for page in self.client.get_paginator("list_objects_v2").paginate(**request):
                    outage = None  # a page came: the next fault gets a fresh budget
                    if page.get("Contents"):
                        request["StartAfter"] = page["Contents"][-1]["Key"]
                    yield page
                return
            except Exception as exc:
                outage = outage or Outage("listing", self.uri(prefix), is_transient)
                outage.failed(exc)

    def page_objects(
        self, page: dict, suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        """The objects of one `list_pages` page, as `list` yields them."""
        cut = len(self.prefix)
        for obj in page.get("Contents", ()):
            key = obj["Key"][cut:]
            if not key or key.endswith("/") or TMP_MARK in key.rpartition("/")[2]:
                continue  # folder markers and probes
            if not include_unsafe and not usable_key(key, self):
                continue
            if has_suffix(key, suffixes):
                yield ObjectInfo(key, obj["Size"], obj["ETag"].strip('"'), obj["LastModified"].timestamp())

    def _get(self, key: str, **kw) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kw)
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise

    def read_bytes(self, key: str) -> bytes:
        # the body is read inside the retried call: a connection cut mid-body is retried too
        return self._retrying("read", key, lambda: self._get(key)["Body"].read())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length} for {self.uri(key)}")
        if length == 0:
            return b""

        def read() -> bytes:
            try:
                return self._get(key, Range=f"bytes={start}-{start + length - 1}")["Body"].read()
            except Exception as exc:
                if _error_code(exc) == "InvalidRange":  # past the end, like a local read
                    return b""
                raise

        return self._retrying("ranged read", key, read)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview | BinaryIO) -> ObjectInfo:
        body = bytes(data) if isinstance(data, bytearray | memoryview) else data
        start = None if isinstance(body, bytes) or not _seekable(body) else body.tell()

        def put() -> dict:
            if start is not None:
                body.seek(start)  # a stream is sent again from where it began
            return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

        # a stream that cannot be rewound is sent once (botocore cannot retry it either)
        response = self._retrying("write", key, put) if isinstance(body, bytes) or start is not None else put()
        size = len(body) if isinstance(body, bytes) else None
        if size is None:
            info = self.info(key)
            assert info is not None, f"{self.uri(key)} vanished right after it was written"
            return info
        return ObjectInfo(key, size, response["ETag"].strip('"'), time.time())

    def create_exclusive(self, key: str, data: bytes) -> bool:
        body = bytes(data)

        def put_if_absent() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
                return True
            except Exception as exc:
                # 412: the key exists. 409: another conditional write to the key is in flight; it will win.
                if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise

        if self._retrying("exclusive create", key, put_if_absent):
            return True
        # A try whose response was lost may have created the object, and its retry then finds it there:
        # the object is ours exactly when it holds our (caller-unique) bytes.
        try:
            return self.read_bytes(key) == body
        except FileNotFoundError:
            return False

    def put_file(self, local_path: str | os.PathLike, key: str) -> ObjectInfo:
        from boto3.s3.transfer import TransferConfig

        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot upload {src} to {self.uri(key)}: no such file")
        if src.stat().st_size < MULTIPART_THRESHOLD:
            with open(src, "rb") as fh:
                self.write_bytes(key, fh)
        else:
            config = TransferConfig(
                multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=4
            )
            self._retrying(
                "upload", key, lambda: self.client.upload_file(str(src), self.bucket, self._key(key), Config=config)
            )
        info = self.info(key)
        if info is None:
            raise FileNotFoundError(f"{self.uri(key)} is missing right after its upload; retry")
        return info

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        def download(tmp: Path) -> None:
            try:
                self.client.download_file(self.bucket, self._key(key), str(tmp))
            except Exception as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
                raise

        self._retrying("download", key, lambda: copy_atomically(download, Path(local_path)))

    def info(self, key: str) -> ObjectInfo | None:
        def head() -> dict | None:
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise

        found = self._retrying("metadata read", key, head)
        if found is None:
            return None
        mtime = found["LastModified"].timestamp()
        return ObjectInfo(key, found["ContentLength"], found["ETag"].strip('"'), mtime)

    def delete(self, key: str) -> None:
        self._retrying("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def _config_error(self, exc: Exception, action: str) -> ConfigError:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError

        uri = self.uri()
        endpoint = self.client.meta.endpoint_url
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return ConfigError(
                f"{uri}: bucket {self.bucket!r} does not exist at {endpoint}; create it "
                f"(aws s3 mb s3://{self.bucket}) or fix the bucket name or AWS_ENDPOINT_URL"
            )
        if code in (
            "AccessDenied",
            "403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AllAccessDisabled",
            "InvalidToken",
            "ExpiredToken",
        ):
            return ConfigError(
                f"{uri}: cannot {action} ({code}); check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) "
                "and the bucket policy"
            )
        if isinstance(exc, NoCredentialsError):
            return ConfigError(
                f"{uri}: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, EndpointConnectionError):
            return ConfigError(f"{uri}: cannot reach {endpoint}; check AWS_ENDPOINT_URL and the network")
        return ConfigError(f"{uri}: cannot {action}: {exc}")

    def check_readable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise self._config_error(exc, "list objects") from None

    def check_writable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        probe = f".probe{TMP_MARK}{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + probe, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + probe)
        except (ClientError, BotoCoreError) as exc:
            raise self._config_error(exc, "write objects") from None


# --------------------------------------------------------------------------- webdataset


class _S3Reader(io.RawIOBase):
    """A streaming GET body as a raw file, so tarfile reads through a buffer of our size."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    """webdataset opener for s3:// URLs through boto3 (9x faster than `pipe:aws s3 cp`, DESIGN.md)."""
    if mode != "rb":
        raise ValueError(f"{url}: webdataset reads s3:// URLs only; write shards locally and upload them with put_file")
    bucket, key = split_s3_uri(url)
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        if _is_missing(exc) or _error_code(exc) == "NoSuchBucket":
            raise FileNotFoundError(f"{url} does not exist") from None
        raise
    return io.BufferedReader(_S3Reader(body), buffer_size=max(bufsize, 1 << 20))


def register_s3_gopen() -> None:
    """Let `webdataset.WebDataset("s3://bucket/shards/x.tar")` read through boto3; idempotent."""
    from webdataset.gopen import gopen_schemes  # `webdataset.gopen` is also a function name

    gopen_schemes["s3"] = gopen_s3
