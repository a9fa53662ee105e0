"""One small object-store interface over a local directory and S3, so every stage runs unchanged on both.

Why not fsspec/s3fs: s3fs's current release conflicts with current boto3 (DESIGN.md),
and the pipeline needs only a dozen operations whose semantics we want to pin
down ourselves: listings in S3's sorted key order (stable plans), ETags that
change when an object changes (relabel changed videos), and writes that are
atomic on both backends (a crash never exposes half an object).

Keys are always relative to the store's root, '/'-separated, and may not
escape it. Missing objects raise `FileNotFoundError` on both backends, so
callers (the catalog's reader, in particular) can handle one case.

The backends are `local.LocalStore` and `s3.S3Store`; `uri.open_store` picks one from a URI.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temporary files carry this marker so that listings can skip them (a crashed writer may leave one).
TMP_MARK = ".pt-tmp-"


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


def usable_key(key: str, store: ObjectStore) -> bool:
    """Whether a listed key passes `check_key`; a skipped one is logged (discovery lists it and records why)."""
    try:
        check_key(key)
        return True
    except ValueError as exc:
        log.warning("skipping an object of %s: %s", store.uri(), exc)
        return False


def has_suffix(key: str, suffixes: tuple[str, ...] | None) -> bool:
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

        Two writers racing on one key: exactly one gets True. Claims and leases (`claims.py`) are built
        on this (local: an O_EXCL hard link of a complete temporary file; S3: PutObject with
        If-None-Match: *). `data` must be unique to the writer (carry a random token): on S3 a retried
        request whose first try landed finds the key taken, and the call tells its own object by
        reading the bytes back.
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


def copy_atomically(copy: Callable[[Path], None], dest: Path) -> None:
    """Copy into a temporary name beside `dest` and rename, so a half-downloaded file never shows."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name[:100]}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        copy(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- retries
#
# The retry policy of the whole package, in one place. Storage faults are retried here, in the store,
# and nowhere else in storage or discovery; a fault past this policy surfaces as StorageUnavailable.
#
# 1. The S3 client retries each request: botocore's "standard" mode (`s3.s3_client`; a policy the
#    user set with AWS_RETRY_MODE or AWS_MAX_ATTEMPTS is respected instead). It retries 5xx,
#    throttling and dropped, refused or timed-out connections, MAX_ATTEMPTS tries with jittered
#    exponential backoff. Its tries are spent within a few seconds and share a retry quota per
#    client, which an outage drains quickly: it absorbs blips, not a server restart.
# 2. An outage: `retrying` tries a whole operation again while it fails with a transient fault
#    (`s3.is_transient`), with jittered backoff from 0.5 s to 8 s, until PSEUDOTRACK_S3_OUTAGE_SECONDS
#    have passed; then it raises StorageUnavailable, naming the object, the attempts and the last
#    error. A listing is one operation a page: a fault costs that page again, not the whole listing.
#
# Measured behind the fault-injecting proxy of tests/faults.py (tests/test_storage_faults.py): 500,
# 503 SlowDown, held responses, dropped connections before and after the server acted, cut bodies
# and a server restart of 2 s are all absorbed; a fault that outlasts the budget fails its batch.
# Local disks are not retried: their faults are not transient.

MAX_ATTEMPTS = 5  # tries of one request by the S3 client
OUTAGE_SECONDS = 60.0  # how long an operation is tried again before StorageUnavailable


class StorageUnavailable(ConnectionError):
    """The object store kept failing past every retry. Nothing half-written is visible; run again to resume.

    A ConnectionError (so an OSError): Prefect's batch retry condition and callers that
    handle I/O errors treat it as the storage fault it is.
    """


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, or `default` when unset."""
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


class Outage:
    """The outage budget of one operation: `failed(exc)` waits before the next try, or raises.

    A non-transient error is raised as it is; a transient one is waited out with backoff until the
    budget is spent, and then raised as StorageUnavailable.
    """

    def __init__(self, what: str, where: str, transient: Callable[[BaseException], bool]):
        self.what, self.where, self.transient = what, where, transient
        self.started = time.monotonic()
        self.budget = env_seconds("PSEUDOTRACK_S3_OUTAGE_SECONDS", OUTAGE_SECONDS)
        self.delay, self.tries = 0.5, 0

    def failed(self, exc: Exception) -> None:
        self.tries += 1
        if not self.transient(exc):
            raise exc
        waited = time.monotonic() - self.started
        if waited >= self.budget:
            raise StorageUnavailable(
                f"{self.where}: {self.what} kept failing for {waited:.1f} s ({self.tries} attempt(s), each with "
                f"the S3 client's own retries; PSEUDOTRACK_S3_OUTAGE_SECONDS={self.budget:g}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        pause = max(min(self.delay * (0.5 + random.random()), self.budget - waited), 0.0)
        log.warning(
            "%s: %s failed (%s: %s); trying again in %.1f s", self.where, self.what, type(exc).__name__, exc, pause
        )
        time.sleep(pause)
        self.delay = min(self.delay * 2, 8.0)


def retrying(what: str, where: str, call: Callable[[], T], transient: Callable[[BaseException], bool]) -> T:
    """`call()`, tried again while it fails with a transient fault, within the outage budget."""
    outage = Outage(what, where, transient)
    while True:
        try:
            return call()
        except Exception as exc:
            outage.failed(exc)
