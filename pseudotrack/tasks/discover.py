"""Discover the videos of a bucket and plan which of them a round must label.

The plan takes videos in a stable order (a hash of the key, so a bucket sorted
by folder does not make a small round all one folder), so `--videos 100` is a
prefix of `--videos 1000` and a larger round reuses the smaller one's labels.
A video already in a terminal state with the same ETag is not planned again; a
changed object (new ETag) is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..config import VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoItem:
    """One video of the bucket, as listed (no bytes read yet)."""

    key: str
    size: int
    etag: str

    @property
    def order(self) -> str:
        return stable_order(self.key)


def stable_order(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@dataclass
class Discovery:
    videos: list[VideoItem]  # in stable order
    all_keys: list[str]  # every key of the bucket, for caption sidecars and manifests


def discover(store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> Discovery:
    """List the bucket once; videos are the keys with a video suffix."""
    videos, keys = [], []
    for info in store.list():
        keys.append(info.key)
        if PurePosixPath(info.key).suffix.lower() in suffixes:
            videos.append(VideoItem(info.key, info.size, info.etag))
    videos.sort(key=lambda v: v.order)
    return Discovery(videos, keys)


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
