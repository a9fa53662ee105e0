"""Discover the videos of a bucket and plan which of them a round must label.

The plan takes videos in a stable order (a hash of the key, so a bucket sorted
by folder does not make a small round all one folder), so `--videos 100` is a
prefix of `--videos 1000` and a larger round reuses the smaller one's labels.
A video already in a terminal state with the same ETag is not planned again; a
changed object (new ETag) is.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..config import VIDEO_SUFFIXES
from ..storage.objects import ObjectInfo, check_key, printable_key

LIST_THREADS = 16
MAX_ROOT_OBJECTS = 64


@dataclass(frozen=True)
class VideoItem:
    """One video of the bucket, as listed (no bytes read yet).

    problem: why the key cannot be read safely ('..' segments or a leading '/' on S3, a local name that
    is not UTF-8); such a video is recorded as failed at discovery, not lost. Its `key` is then
    `printable_key` of the listed one.
    """

    key: str
    size: int
    etag: str
    problem: str | None = None

    @property
    def order(self) -> str:
        return stable_order(self.key)


def stable_order(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@dataclass
class Discovery:
    videos: list[VideoItem]  # in stable order
    all_keys: list[str]  # every key of the bucket, for caption sidecars and manifests


def key_problem(key: str) -> str | None:
    """Why a listed key cannot be labelled (`check_key` refuses it), as a failure reason, or None."""
    try:
        check_key(key)
    except ValueError as exc:
        return f"unsafe key: {exc}; rename the object to label it"
    return None


def discover(store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> Discovery:
    """List the bucket once; videos are the keys with a video suffix, unsafe keys included (with their problem)."""
    videos, keys = [], []
    for info in list_objects(store, include_unsafe=True):
        problem = key_problem(info.key)
        if problem is None:
            keys.append(info.key)
        if posixpath.splitext(info.key)[1].lower() in suffixes:  # PurePosixPath: seconds at 100k keys
            key = info.key if problem is None else printable_key(info.key)
            videos.append(VideoItem(key, info.size, info.etag, problem))
    videos.sort(key=lambda v: v.order)
    return Discovery(videos, keys)


def list_objects(store, **options) -> list[ObjectInfo]:
    """Every object of the store in key order; an S3 bucket with folders is listed one folder per thread.

    A LIST page holds 1000 keys and the pages of one listing come one after another, so 100k keys are
    100 round trips in a row; listing the top-level folders side by side overlaps them (moto, 20k keys
    in 100 folders: 23.8 s in a row, 10.9 s by folder, bench/bench_planning.py). The folders come from
    one listing with a delimiter; objects beside them (a captions manifest) are listed by their own
    names. A store without folders, or with many objects at its root, is listed in one go.
    """
    split = _s3_top_level(store)
    if split is None:
        return list(store.list(**options))
    folders, root = split
    with ThreadPoolExecutor(min(LIST_THREADS, len(folders) + len(root))) as pool:
        found = [info for part in pool.map(lambda p: list(store.list(p, **options)), folders) for info in part]
        for name, part in zip(root, pool.map(lambda p: list(store.list(p, **options)), root), strict=True):
            found.extend(info for info in part if info.key == name)  # 'a.json' also lists 'a.json.bak'
    found.sort(key=lambda info: info.key)
    return found


def _s3_top_level(store) -> tuple[list[str], list[str]] | None:
    """(folder prefixes, object names) at the root of an S3 store, or None when one listing is better."""
    from ..storage.objects import S3Store

    if not isinstance(store, S3Store):
        return None
    folders: list[str] = []
    root: list[str] = []
    cut = len(store.prefix)
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=store.prefix, Delimiter="/"
        )
        for page in pages:
            folders += [p["Prefix"][cut:] for p in page.get("CommonPrefixes", ())]
            root += [o["Key"][cut:] for o in page.get("Contents", ())]
            if len(root) > MAX_ROOT_OBJECTS:
                return None
    except Exception:  # the plain listing retries, and reports a fault it cannot get past
        return None
    root = [name for name in root if name]  # '' is the prefix's own folder marker
    if len(folders) < 2 or any(key_problem(name) for name in root + [f.rstrip("/") for f in folders]):
        return None  # an unsafe name cannot be a listing prefix; the plain listing reports it
    return folders, root


def pending(videos: list[VideoItem], done: Mapping[str, str]) -> tuple[list[VideoItem], list[VideoItem]]:
    """Split into (to do, already done with the same ETag)."""
    todo, skipped = [], []
    for video in videos:
        (skipped if done.get(video.key) == video.etag else todo).append(video)
    return todo, skipped


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@task(name="discover", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def discover_task(store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> Discovery:
    return discover(store, suffixes)
