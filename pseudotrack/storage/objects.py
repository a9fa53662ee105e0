"""One small object-store interface over a local directory and S3, so every stage runs unchanged on both.

Why not fsspec/s3fs: s3fs's current release conflicts with current boto3 (DESIGN.md),
and the pipeline needs only a dozen operations whose semantics we want to pin
down ourselves: listings in S3's sorted key order (stable plans), ETags that
change when an object changes (relabel changed videos), and writes that are
atomic on both backends (a crash never exposes half an object).

Keys are always relative to the store's root, '/'-separated, and may not
escape it. Missing objects raise `FileNotFoundError` on both backends, so
callers (the catalog's reader, in particular) can handle one case.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import shutil
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.request import url2pathname

from ..config import has_userinfo
from ..errors import ConfigError
from ..faults import fault_point

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from ..config import RoundConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temporary files carry this marker so that listings can skip them (a crashed writer may leave one).
TMP_MARK = ".pt-tmp-"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing tells about an object without reading it."""

    key: str
    size: int
    etag: str  # changes whenever the content changes; not a content hash on local disks
    mtime: float  # seconds since the epoch


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Refuse keys that would leave the store's root or that no filesystem can hold.

    Spaces, dots, unicode are fine; '..' segments, absolute keys, NUL and names that are not UTF-8 are not.
    """
    if not isinstance(key, str):
        raise TypeError(f"object key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        if allow_empty:
            return key
        raise ValueError("empty object key: name the object to read or write")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} is absolute; keys are relative to the store's root")
    if "\0" in key:
        raise ValueError(f"object key {key!r} contains a NUL character")
    if any(part == ".." for part in key.split("/")):
        raise ValueError(f"object key {key!r} escapes the store's root ('..' is not allowed)")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a local file name in another encoding; S3 cannot hold it either
        raise ValueError(f"object key '{printable_key(key)}' is not valid UTF-8 (a name in another encoding)") from None
    return key


def printable_key(key: str) -> str:
    """A key as valid UTF-8 text: the bytes of a local name in another encoding become \\xNN."""
    try:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates no file name decodes to
        return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _usable(key: str, store: ObjectStore) -> bool:
    """Whether a listed key passes `check_key`; a skipped one is logged (discovery lists it and records why)."""
    try:
        check_key(key)
        return True
    except ValueError as exc:
        log.warning("skipping an object of %s: %s", store.uri(), exc)
        return False


def _matches(key: str, suffixes: tuple[str, ...] | None) -> bool:
    # Case-insensitive: buckets hold 'clip.MP4' as often as 'clip.mp4'.
    return suffixes is None or key.lower().endswith(tuple(s.lower() for s in suffixes))


class ObjectStore(ABC):
    """The operations the pipeline needs, identical on local disks and S3."""

    @abstractmethod
    def list(
        self, prefix: str = "", suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (a plain string prefix, as on S3), recursively, in sorted key order.

        Objects whose keys `check_key` refuses (S3 allows '../x'; a disk allows names that are not UTF-8)
        are skipped with a warning, or listed with `include_unsafe` so that discovery can record them as
        failed rather than lose them; they cannot be read.
        """

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes | bytearray | memoryview | BinaryIO) -> ObjectInfo:
        """Write the whole object atomically; a readable binary file object is streamed."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `key` only if no object has that key; True if this call created it.

        Two writers racing on one key: exactly one gets True. Claims, leases and locks are built on this
        (local: an O_EXCL hard link of a complete temporary file; S3: PutObject with If-None-Match: *).
        `data` must be unique to the writer (carry a random token): on S3 a retried request whose first
        try landed finds the key taken, and the call tells its own object by reading the bytes back.
        """

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike, key: str) -> ObjectInfo: ...

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> None: ...

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing one that is already gone is not an error."""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def child(self, prefix: str) -> ObjectStore: ...

    @abstractmethod
    def check_readable(self) -> None:
        """Raise ConfigError, naming the URI and what to do, when the store cannot be listed."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise ConfigError when objects cannot be written here (creates a missing local directory)."""

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` when the store is local (readers can then skip a copy), else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


# --------------------------------------------------------------------------- local


class LocalStore(ObjectStore):
    """A directory; atomic writes go to a unique temporary name beside the target and are renamed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

    def __getstate__(self) -> dict:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict) -> None:
        self.root = Path(state["root"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("local", self.root))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def uri(self, key: str = "") -> str:
        # Percent-encoded (RFC 8089); open_store and webdataset's gopen both decode it.
        path = self.root / check_key(key, allow_empty=True) if key else self.root
        return path.as_uri()

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / check_key(prefix.strip("/"), allow_empty=True))

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        # size + mtime_ns, the way make and rsync notice changes: hashing 100k videos to list them is
        # not affordable, and inode numbers would change on a plain copy of the bucket.
        return ObjectInfo(key, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}", st.st_mtime)

    def list(
        self, prefix: str = "", suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        check_key(prefix, allow_empty=True)
        base_rel = prefix.rpartition("/")[0]
        base = self.root / base_rel if base_rel else self.root
        found: list[ObjectInfo] = []
        seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: symlink loops end here
        stack = [(base, base_rel + "/" if base_rel else "")] if base.is_dir() else []
        while stack:
            directory, rel = stack.pop()
            try:
                st = directory.stat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(directory))
            except FileNotFoundError:  # removed while we walked
                continue
            for entry in entries:
                key = rel + entry.name
                if TMP_MARK in entry.name:
                    continue
                try:
                    if entry.is_dir():  # symlinked folders too: a bucket may be assembled from links
                        if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append((Path(entry.path), key + "/"))
                    elif (
                        entry.is_file()
                        and key.startswith(prefix)
                        and _matches(key, suffixes)
                        and (include_unsafe or _usable(key, self))
                    ):
                        found.append(self._info(key, entry.stat()))
                except FileNotFoundError:
                    continue
        # Code-point order is UTF-8 byte order, which is S3's listing order.
        found.sort(key=lambda i: i.key)
        yield from found

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise FileNotFoundError(f"{self.uri(key)} is a directory, not an object") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length} for {self.uri(key)}")
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None

    def _tmp_beside(self, path: Path) -> Path:
        return path.with_name(f".{path.name[:100]}{TMP_MARK}{uuid.uuid4().hex}")

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview | BinaryIO) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_beside(path)
        try:
            with open(tmp, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    fh.write(data)
                else:
                    shutil.copyfileobj(data, fh, 1 << 20)
                fh.flush()
                os.fsync(fh.fileno())
            fault_point("store.tmp_written")  # crash tests: the bytes are down, not yet under their name
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._info(key, path.stat())

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_beside(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails if the name exists, and the name only ever points at a complete file.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local_path: str | os.PathLike, key: str) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot upload {src} to {self.uri(key)}: no such file")
        with open(src, "rb") as fh:
            return self.write_bytes(key, fh)

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        _copy_atomically(lambda tmp: shutil.copyfile(path, tmp), Path(local_path))

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return self._info(key, st) if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def check_readable(self) -> None:
        uri = str(self.root)
        if not self.root.exists():
            raise ConfigError(f"{uri}: no such directory; create it or pass the directory holding the data")
        if not self.root.is_dir():
            raise ConfigError(f"{uri} is a file, not a directory; pass the directory that holds the data")
        try:
            next(os.scandir(self.root), None)
        except PermissionError as exc:
            raise ConfigError(f"{uri} cannot be listed ({exc.strerror}); fix its permissions") from None

    def check_writable(self) -> None:
        uri = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            blocker = next((p for p in (self.root, *self.root.parents) if p.is_file()), None)
            raise ConfigError(
                f"cannot create the directory {uri}: {blocker or 'a parent'} is a file, not a directory; "
                "pass a directory you can write to"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot create the directory {uri} ({exc.strerror}); pass a directory you can write to"
            ) from None
        if not self.root.is_dir():
            raise ConfigError(f"{uri} is a file, not a directory; pass a directory you can write to")
        # A real write, not os.access: access() says yes to root even on read-only mounts.
        probe = self.root / f".probe{TMP_MARK}{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"{uri} is not writable ({exc.strerror}); fix its permissions or pass another directory"
            ) from None


def _copy_atomically(copy, dest: Path) -> None:
    """Copy into a temporary name beside `dest` and rename, so a half-downloaded file never shows."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name[:100]}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        copy(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- S3

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
# Retries, in two layers (measured behind a fault-injecting proxy, tests/test_storage_faults.py):
# - botocore's "standard" mode retries 500/502/503/504, throttling and dropped or refused connections,
#   with jittered exponential backoff; for non-throttling faults it starts at 50 ms, so its
#   MAX_ATTEMPTS tries are spent within a few seconds and it shares a retry quota per client, which
#   an outage drains quickly. That absorbs blips, not a server restart.
# - `S3Store` therefore retries a whole operation that still failed, with backoff from 0.5 s to 8 s,
#   until PSEUDOTRACK_S3_OUTAGE_SECONDS have passed; then it raises `StorageUnavailable`, which fails
#   the batch (its videos stay unrecorded, and a rerun of the round labels them).
MAX_ATTEMPTS = 5
OUTAGE_SECONDS = 60.0


def s3_client() -> BaseClient:
    """One boto3 client per process (clients are thread-safe; creating one costs ~50 ms).

    Settings come from boto3's own chain (AWS_ENDPOINT_URL, profiles, credentials, region),
    so MinIO, Ceph or R2 need no code. The cache is keyed on the process and on those
    variables, so a forked worker or a changed environment gets its own client.
    """
    key = (os.getpid(), *(os.environ.get(k) for k in _ENV_KEYS))
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            options: dict[str, Any] = {
                "connect_timeout": _env_seconds("PSEUDOTRACK_S3_CONNECT_TIMEOUT", 10.0),
                "read_timeout": _env_seconds("PSEUDOTRACK_S3_READ_TIMEOUT", 120.0),
                "max_pool_connections": 32,
                "tcp_keepalive": True,
            }
            # Respect a retry policy the user set in the environment or profile. Otherwise standard mode:
            # adaptive mode adds a client-side rate limiter that AWS documents as experimental, and our
            # own outage retries (S3Store._retrying) already back off for as long as a restart takes.
            if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
                options["retries"] = {"mode": "standard", "max_attempts": MAX_ATTEMPTS}
            session = boto3.session.Session()
            # botocore parses every LastModified with dateutil (~180 us each): 18 s of CPU to list 100k keys
            session._session.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=_parse_timestamp
            )
            client = session.client("s3", config=Config(**options))
            _CLIENTS[key] = client
    return client


def _parse_timestamp(value: str) -> datetime:
    """S3's ISO 8601 timestamps the fast way; anything else (HTTP dates in headers) the way botocore does."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

        return DEFAULT_TIMESTAMP_PARSER(value)
    return parsed


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be a positive number of seconds")
    return value


class StorageUnavailable(ConnectionError):
    """The object store kept failing past every retry. Nothing half-written is visible; run again to resume.

    A ConnectionError (so an OSError): Prefect's batch retry condition and callers that
    handle I/O errors treat it as the storage fault it is.
    """


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

    # MaxKeys of a listing request; see list_pages. 12k keys: a page moto builds in about 4 s and we parse
    # in under 1 s, so turn-taking streams (tasks/discover.py) keep it busy
    page_keys = 12_000

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
        """`call()`, tried again while it fails with a transient fault, for up to PSEUDOTRACK_S3_OUTAGE_SECONDS.

        Each try already includes botocore's own quick retries; this outer loop is what rides out
        a server restart or a network outage of tens of seconds (see MAX_ATTEMPTS above).
        """
        started = time.monotonic()
        budget = _env_seconds("PSEUDOTRACK_S3_OUTAGE_SECONDS", OUTAGE_SECONDS)
        delay, tries = 0.5, 0
        while True:
            tries += 1
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                waited = time.monotonic() - started
                if waited >= budget:
                    raise StorageUnavailable(
                        f"{self.uri(key)}: {what} kept failing for {waited:.1f} s ({tries} attempt(s), each with "
                        f"the S3 client's own retries; PSEUDOTRACK_S3_OUTAGE_SECONDS={budget:g}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                pause = min(delay * (0.5 + random.random()), budget - waited)
                log.warning(
                    "%s: %s failed (%s: %s); trying again in %.1f s",
                    self.uri(key),
                    what,
                    type(exc).__name__,
                    exc,
                    pause,
                )
                time.sleep(max(pause, 0.0))
                delay = min(delay * 2, 8.0)

    def list(
        self, prefix: str = "", suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        for page in self.list_pages(prefix):
            yield from self.page_objects(page, suffixes, include_unsafe=include_unsafe)

    def list_pages(self, prefix: str = "", start_after: str = "", first_keys: int | None = None) -> Iterator[dict]:
        """The raw ListObjectsV2 pages under `prefix` (of the keys after `start_after`, if given), each
        fetched (and retried) on its own.

        Each request asks for `page_keys` keys (the first for `first_keys`, if given). AWS S3 sends at
        most 1000 whatever is asked, so this costs nothing there; a server that allows bigger pages (moto
        does) answers a big bucket in a few requests instead of hundreds, and moto scans the whole bucket
        for every request.
        """
        check_key(prefix, allow_empty=True)
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "MaxKeys": first_keys or self.page_keys,
        }
        if start_after:
            request["StartAfter"] = self.prefix + start_after
        while True:  # page by page, so a fault costs one page again, not the whole listing
            page = self._retrying("listing", prefix, lambda: self.client.list_objects_v2(**request))
            yield page
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]
            request["MaxKeys"] = self.page_keys

    def page_objects(
        self, page: dict, suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        """The objects of one `list_pages` page, as `list` yields them."""
        cut = len(self.prefix)
        for obj in page.get("Contents", ()):
            key = obj["Key"][cut:]
            if not key or key.endswith("/") or TMP_MARK in key.rpartition("/")[2]:
                continue  # folder markers and probes
            if not include_unsafe and not _usable(key, self):
                continue
            if _matches(key, suffixes):
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

        self._retrying("download", key, lambda: _copy_atomically(download, Path(local_path)))

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
            # with a delimiter: moto sorts only the top-level names for this, not every key (0.2 s, not
            # 0.7 s, at 100k keys); to AWS S3 it is the same one-key request
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/", MaxKeys=1)
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


# --------------------------------------------------------------------------- entry points


def open_store(uri: str | os.PathLike) -> ObjectStore:
    """A path or file:// URI is a LocalStore, s3://bucket/prefix an S3Store."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise ConfigError(f"storage location {uri!r} is empty; pass a directory or s3://bucket/prefix")
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text)
        return S3Store(bucket, prefix)
    if text.startswith("file://"):
        rest = text[len("file://") :]
        if rest and not rest.startswith("/"):  # file://host/path: only the local host makes sense
            host, _, path = rest.partition("/")
            if host not in ("localhost",):
                raise ConfigError(f"{text}: file URIs must name a local path (file:///path)")
            rest = "/" + path
        return LocalStore(url2pathname(rest))
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise ConfigError(f"{text}: storage scheme {scheme.group(1)!r} is not supported; use a local path or s3://")
    return LocalStore(text)


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


def open_workspace(config: RoundConfig) -> tuple[ObjectStore, ObjectStore]:
    """Open and check both stores; a missing bucket or unwritable workspace stops the round at once."""
    bucket = open_store(config.bucket)
    bucket.check_readable()
    workspace = open_store(config.workspace)
    workspace.check_writable()
    return bucket, workspace
