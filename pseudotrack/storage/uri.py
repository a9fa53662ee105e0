"""Storage locations as the user writes them: a path, a file:// URI or s3://bucket/prefix, opened as a store."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING
from urllib.request import url2pathname

from ..errors import ConfigError
from .base import ObjectStore
from .local import LocalStore
from .s3 import S3Store, split_s3_uri

if TYPE_CHECKING:
    from ..config import RoundConfig

__all__ = ["open_store", "open_workspace", "split_s3_uri"]


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


def open_workspace(config: RoundConfig) -> tuple[ObjectStore, ObjectStore]:
    """Open and check both stores; a missing bucket or unwritable workspace stops the round at once."""
    bucket = open_store(config.bucket)
    bucket.check_readable()
    workspace = open_store(config.workspace)
    workspace.check_writable()
    return bucket, workspace
