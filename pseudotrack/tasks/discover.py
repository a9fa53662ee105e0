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
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..config import VIDEO_SUFFIXES
from ..storage.base import ObjectInfo, check_key, printable_key
from ..storage.s3 import S3Store

LIST_THREADS = 8  # prefix groups listed at once
GROUPS_PER_THREAD = 4  # a few groups a thread, so one slow group does not hold up the listing
MAX_ROOT_OBJECTS = 64  # more objects than this at the top level: a flat bucket, listed in one go


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


def discover(
    store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES, on_page: Callable[[list[ObjectInfo]], None] | None = None
) -> Discovery:
    """List the bucket once; videos are the keys with a video suffix, unsafe keys included (with their problem).

    Each page is sorted out as it arrives, while the server builds the next one, so that after the
    last page little is left to do.

    on_page: shown each part of the listing as it arrives, so work can start before the listing ends
    (`caption_prefetch`).
    """
    parts: list[tuple[list[str], list[tuple[str, VideoItem]]]] = []
    lock = threading.Lock()

    def sort_out(objects: list[ObjectInfo]) -> None:
        if on_page is not None:
            on_page(objects)
        if objects:
            part = _sort_out(objects, suffixes)
            with lock:
                parts.append(part)

    list_objects(store, include_unsafe=True, on_page=sort_out)
    # pages come from groups side by side, in any order; on AWS S3 each is a sorted run, on SeaweedFS
    # not quite ('a/b' before 'a-c'): one sort either way
    keys = sorted(key for part_keys, _ in parts for key in part_keys)
    videos = sorted((v for _, part_videos in parts for v in part_videos), key=lambda ordered: ordered[0])
    return Discovery([video for _, video in videos], keys)


def _sort_out(objects: list[ObjectInfo], suffixes: tuple[str, ...]) -> tuple[list[str], list]:
    """(safe keys, (stable order, video) of each video) of one page of the listing."""
    videos, keys = [], []
    for info in objects:
        problem = key_problem(info.key)
        if problem is None:
            keys.append(info.key)
        if posixpath.splitext(info.key)[1].lower() in suffixes:  # PurePosixPath: seconds at 100k keys
            key = info.key if problem is None else printable_key(info.key)
            videos.append((stable_order(key), VideoItem(key, info.size, info.etag, problem)))
    return keys, videos


def list_objects(store, *, on_page: Callable[[list[ObjectInfo]], None] | None = None, **options) -> list[ObjectInfo]:
    """Every object of the store in key order; an S3 bucket with folders is listed in prefix groups side by side.

    The pages of one listing come one after another, and a page holds at most 1000 keys on AWS S3,
    so 100k keys are 100 round trips in a row. Listing groups of top-level names side by side (a
    few threads, each with boto3's plain paginator) overlaps those round trips.

    on_page: called with each page's objects (from several threads at once, when groups are listed
    side by side).
    """

    def shown(objects: list[ObjectInfo]) -> list[ObjectInfo]:
        if on_page is not None:
            on_page(objects)
        return objects

    if not isinstance(store, S3Store):
        return shown(list(store.list(**options)))

    def listed(prefix: str) -> list[ObjectInfo]:
        return [info for page in store.list_pages(prefix) for info in shown(list(store.page_objects(page, **options)))]

    groups = _prefix_groups(store, GROUPS_PER_THREAD * LIST_THREADS) or [""]
    if len(groups) == 1:
        found = listed(groups[0])
    else:
        with ThreadPoolExecutor(min(LIST_THREADS, len(groups)), thread_name_prefix="list") as pool:
            found = [info for part in pool.map(listed, groups) for info in part]
    found.sort(key=lambda info: info.key)  # in order already on AWS S3 (disjoint sorted groups): a linear pass
    return found


def _prefix_groups(store, want: int) -> list[str] | None:
    """About `want` disjoint key prefixes that together cover the S3 store, or None when one listing is better.

    The top-level names (folders and objects) come from one listing with a delimiter. A group is
    split on the character after its names' common prefix until there are enough: 'clips00/' ...
    'clips99/' become 'clips0' ... 'clips9', then 'clips00' ... as needed. A name that is the whole
    common prefix of its group ('a' beside 'a/') cannot be split off, and stays with it.
    """
    names: list[str] = []
    root = 0
    cut = len(store.prefix)
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=store.prefix, Delimiter="/"
        )
        for page in pages:
            names += [p["Prefix"][cut:] for p in page.get("CommonPrefixes", ())]
            objects = [o["Key"][cut:] for o in page.get("Contents", ())]
            names += [name for name in objects if name]  # '' is the prefix's own folder marker
            root += len(objects)
            if root > MAX_ROOT_OBJECTS:
                return None  # a flat bucket: the delimiter listing would already be the whole listing
    except Exception:  # the plain listing rides out a fault, or reports one it cannot get past
        return None
    if len(names) < 2 or any(key_problem(name.rstrip("/")) for name in names):
        return None  # an unsafe name cannot be a listing prefix; the plain listing reports it
    groups: dict[str, list[str]] = {"": sorted(names)}
    whole: set[str] = set()
    while len(groups) < want:
        splittable = [p for p, members in groups.items() if len(members) > 1 and p not in whole]
        if not splittable:
            break
        prefix = max(splittable, key=lambda p: len(groups[p]))
        members = groups[prefix]
        common = posixpath.commonprefix(members)
        if common in members:
            whole.add(prefix)
            continue
        del groups[prefix]
        for name in members:
            groups.setdefault(name[: len(common) + 1], []).append(name)
    if any(key_problem(p.rstrip("/")) for p in groups if p.rstrip("/")):
        return None
    return sorted(groups)


def pending(videos: list[VideoItem], done: Mapping[str, str]) -> tuple[list[VideoItem], list[VideoItem]]:
    """Split into (to do, already done with the same ETag)."""
    todo, skipped = [], []
    for video in videos:
        (skipped if done.get(video.key) == video.etag else todo).append(video)
    return todo, skipped


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@task(name="discover", cache_policy=NO_CACHE)  # storage faults are retried by the store (storage/base.py)
def discover_task(
    store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES, on_page: Callable[[list[ObjectInfo]], None] | None = None
) -> Discovery:
    return discover(store, suffixes, on_page)
