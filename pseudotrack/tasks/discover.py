"""Discover the videos of a bucket and plan which of them a round must label.

The plan takes videos in a stable order (a hash of the key, so a bucket sorted
by folder does not make a small round all one folder), so `--videos 100` is a
prefix of `--videos 1000` and a larger round reuses the smaller one's labels.
A video already in a terminal state with the same ETag is not planned again; a
changed object (new ETag) is.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..config import VIDEO_SUFFIXES
from ..storage.base import ObjectInfo, check_key, printable_key

LIST_THREADS = 16  # prefix groups listed at once where pages hold 1000 keys (AWS S3)
GROUPS_PER_THREAD = 4  # a few groups a thread, so one slow group does not hold up the listing
S3_PAGE_KEYS = 1000  # the most keys an AWS S3 listing page holds, whatever MaxKeys asks
FIRST_PAGE_KEYS = 2000  # more than S3_PAGE_KEYS, so the first page tells a server that sends bigger pages
MAX_ROOT_OBJECTS = 64
BIG_PAGE_GROUPS = 8  # groups for the two turn-taking streams on a server that sends big pages (moto)
TURN_WAIT = 30.0  # seconds a listing request waits for its turn before it goes anyway
HEAD_START = 0.02  # seconds a member waits for the next to wake, and then to send, before it reads on


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
    last page only that page is left to do.

    on_page: shown each part of the listing as it arrives, so work can start before the listing ends
    (`caption_prefetch`).
    """
    parts: list[tuple[str, list[str], list[tuple[str, VideoItem]]]] = []
    lock = threading.Lock()

    def sort_out(objects: list[ObjectInfo]) -> None:
        if on_page is not None:
            on_page(objects)
        if objects:
            part = _sort_out(objects, suffixes)
            with lock:
                parts.append(part)

    list_objects(store, include_unsafe=True, on_page=sort_out)
    parts.sort(key=lambda part: part[0])  # each page is a run of keys in order, and no two runs overlap
    keys = [key for _, part_keys, _ in parts for key in part_keys]
    videos = sorted((v for _, _, part_videos in parts for v in part_videos), key=lambda ordered: ordered[0])
    return Discovery([video for _, video in videos], keys)


def _sort_out(objects: list[ObjectInfo], suffixes: tuple[str, ...]) -> tuple[str, list[str], list]:
    """(first key, safe keys, (stable order, video) of each video) of one page of the listing."""
    videos, keys = [], []
    for info in objects:
        problem = key_problem(info.key)
        if problem is None:
            keys.append(info.key)
        if posixpath.splitext(info.key)[1].lower() in suffixes:  # PurePosixPath: seconds at 100k keys
            key = info.key if problem is None else printable_key(info.key)
            videos.append((stable_order(key), VideoItem(key, info.size, info.etag, problem)))
    return objects[0].key, keys, videos


def list_objects(store, *, on_page: Callable[[list[ObjectInfo]], None] | None = None, **options) -> list[ObjectInfo]:
    """Every object of the store in key order; a big S3 bucket is listed in prefix groups side by side.

    The pages of one listing come one after another. On AWS S3 a page holds at most 1000 keys, so
    100k keys are 100 round trips in a row; listing groups of top-level folders side by side
    overlaps them (20k keys in 100 folders on moto with 1000-key pages: 23.8 s in a row, 10.9 s by
    folder). A server that sends bigger pages (moto) is listed on from its first page in two streams
    of groups whose requests take turns (`_TakingTurns`): moto spends more CPU on requests that run
    at once than it saves (100k keys: 45-57 s of its CPU as 100 folder requests side by side), but
    one request at a time, the next sent as soon as the last has arrived, it builds a page while we
    parse the one before (100k keys, four runs each: 37-46 s in 12k-key pages by turns against
    47-51 s in 50k-key pages in a row). The first page, of FIRST_PAGE_KEYS, tells the two kinds of
    server apart, and may be the whole bucket.

    on_page: called with each page's objects (with each group's, when groups are listed side by
    side: then from several threads at once).
    """
    from ..storage.s3 import S3Store

    def shown(objects: list[ObjectInfo]) -> list[ObjectInfo]:
        if on_page is not None:
            on_page(objects)
        return objects

    if not isinstance(store, S3Store):
        return shown(list(store.list(**options)))
    # a small first page (a capped server's whole page) is soon parsed, so the rest starts soon after it
    pages = store.list_pages(first_keys=min(store.page_keys, FIRST_PAGE_KEYS))
    first = next(pages)
    if not first.get("IsTruncated"):
        return shown(list(store.page_objects(first, **options)))
    capped = len(first.get("Contents", ())) <= S3_PAGE_KEYS
    groups = _prefix_groups(store, GROUPS_PER_THREAD * LIST_THREADS if capped else BIG_PAGE_GROUPS)
    if groups is None or not first.get("Contents"):
        found = []
        for page in itertools.chain([first], pages):
            found += shown(list(store.page_objects(page, **options)))
        return found
    pages.close()

    def listed(work: list[tuple[str, str]], turns: _TakingTurns | None = None) -> list[ObjectInfo]:
        part = []
        with turns.joined() if turns else contextlib.nullcontext():
            for prefix, after in work:
                for page in store.list_pages(prefix, after):
                    part += shown(list(store.page_objects(page, **options)))
        return part

    if capped:  # AWS S3: the first page is read again by its group (one request)
        with ThreadPoolExecutor(min(LIST_THREADS, len(groups))) as pool:
            found = [info for part in pool.map(lambda g: listed([(g, "")]), groups) for info in part]
    else:
        found = shown(list(store.page_objects(first, **options)))
        rest = _groups_after(groups, first["Contents"][-1]["Key"][len(store.prefix) :])
        half = (len(rest) + 1) // 2
        with _TakingTurns(store.client) as turns, ThreadPoolExecutor(2) as pool:
            streams = pool.map(lambda work: listed(work, turns), [rest[:half], rest[half:]])
            found += [info for part in streams for info in part]
    found.sort(key=lambda info: info.key)  # already in order (disjoint prefixes, sorted): a linear pass
    return found


def _groups_after(groups: list[str], last: str) -> list[tuple[str, str]]:
    """(group, start after) for the keys of `groups` (sorted, disjoint prefixes) that sort after `last`."""
    work = []
    for group in groups:
        if last.startswith(group):
            work.append((group, last))  # the group the first page ended in
        elif group > last:
            work.append((group, ""))
        # else every key of the group sorts before `last`: the first page held them
    return work


class _TakingTurns:
    """Listing requests on one client take turns: a request is sent once the one before it has arrived.

    The turn is taken as a request is sent, once botocore has built and signed it, so the next request
    is ready to go the moment the turn comes. It is given back as soon as the response's headers are
    in: a server like moto builds the whole page before it answers, so it can build the next page while
    this one's body comes over and is parsed. (The request is sent from botocore's `before-send` event
    through the client's own HTTP session, exactly as botocore would send it; a client without one
    gives the turn back once the body is in, before botocore parses it.) A request that fails gives the
    turn back too, and a turn not given back within TURN_WAIT seconds is not waited for: taking turns
    only saves time, it is never needed for a correct listing.

    A member that hands the turn to a waiting one waits until that one has woken (without that, the
    waiting thread got the GIL only once the body had been read, a tenth to half a second later), and
    lets its request out before parsing its own page: the XML parse holds the GIL in one long C call
    (a third of a second for a 12k-key page).
    """

    EVENT = "s3.ListObjectsV2"
    HANDLERS = (("before-send", "_send"), ("before-parse", "_parse"), ("after-call-error", "_give"))

    def __init__(self, client):
        self._events = client.meta.events
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._turn = threading.Lock()
        self._waiting = 0  # members waiting for the turn
        self._count = threading.Lock()
        self._woken = threading.Event()  # set by a member that has just taken the turn
        self._held = threading.local()
        self._id = f"pseudotrack-turns-{id(self)}"

    def __enter__(self) -> _TakingTurns:
        for event, handler in self.HANDLERS:
            self._events.register(f"{event}.{self.EVENT}", getattr(self, handler), unique_id=f"{self._id}-{event}")
        return self

    def __exit__(self, *exc) -> None:
        for event, _ in self.HANDLERS:
            self._events.unregister(f"{event}.{self.EVENT}", unique_id=f"{self._id}-{event}")

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """The calling thread's listing requests take turns (other requests on the shared client do not)."""
        self._held.member = True
        try:
            yield
        finally:
            self._give()
            self._held.member = False

    def _send(self, request=None, **_):
        """The response of a member's request, sent in its turn; None (botocore sends it) for others."""
        if not getattr(self._held, "member", False):
            return None
        self._give()  # a retried request whose first try got no response
        with self._count:
            self._waiting += 1
        try:
            self._held.turn = self._turn.acquire(timeout=TURN_WAIT)
        finally:
            with self._count:
                self._waiting -= 1
        self._woken.set()
        if self._http is None:
            return None  # botocore sends it, and the turn is given back before the body is parsed
        try:
            return self._http.send(request)  # returns with the headers; the body is read later by botocore
        finally:
            self._give()

    def _give(self, **_) -> None:
        if getattr(self._held, "turn", False):
            self._held.turn = False
            self._held.handed = self._waiting > 0
            if self._held.handed:
                self._woken.clear()
            self._turn.release()
            if self._held.handed:
                self._woken.wait(HEAD_START)

    def _parse(self, **_) -> None:
        self._give()
        if getattr(self._held, "handed", False):
            self._held.handed = False
            time.sleep(HEAD_START)


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
    except Exception:  # the plain listing retries, and reports a fault it cannot get past
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


@task(name="discover", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def discover_task(
    store, suffixes: tuple[str, ...] = VIDEO_SUFFIXES, on_page: Callable[[list[ObjectInfo]], None] | None = None
) -> Discovery:
    return discover(store, suffixes, on_page)
