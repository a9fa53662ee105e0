"""Read a round's captions while its bucket is listed.

On S3 the listing of a big bucket is a long wait on the server, and the caption
stage used to start only after it: fetch and parse the manifest, judge every
caption, then read the sidecars one request each. None of that needs the whole
listing. The manifest is found by name and judged at once; a sidecar is read as
soon as the listing has shown both it and a video the manifest does not caption.
The plan then finds its captions read and judged (100k videos on SeaweedFS:
bench/bench_planning.py).

What is read, and what a read's failure means, is exactly what `CaptionIndex`
would do without the prefetch: a prefetched sidecar's bytes or error stand for
the read the plan would have made.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Iterable, Sized
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import VIDEO_SUFFIXES
from .caption_filter import (
    CaptionIndex,
    CaptionRules,
    Manifest,
    Verdict,
    chosen_sidecars,
    offer_sidecar,
    read_sidecar,
)
from .discover import key_problem


class CaptionPrefetch:
    """The caption stage of one round, started before the listing ends.

    sidecars: read sidecars during the listing. Off for a round capped at N videos, which reads the
    captions of only as many videos as it walks (`plan_round`).
    Use as a context manager: leaving it stops reads not yet started.
    """

    def __init__(
        self,
        store,
        manifest_uri: str | None,
        rules: CaptionRules,
        *,
        sidecars: bool = True,
        threads: int = 16,
        video_suffixes: tuple[str, ...] = VIDEO_SUFFIXES,
    ):
        self.rules = rules
        self._store = store
        self._read_sidecars = sidecars
        self._suffixes = video_suffixes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="captions")
        self._manifest: Future[Manifest] = self._pool.submit(Manifest.find, store, manifest_uri)
        self._judged: Future[dict[str, Verdict]] = self._pool.submit(self._judge_manifest)
        self._lock = threading.Lock()
        self._sidecar: dict[str, tuple[int, str]] = {}  # stem -> (preference, key) of the best sidecar seen
        self._uncaptioned: set[str] = set()  # stems of videos the manifest does not caption
        self._reads: dict[str, Future[bytes]] = {}
        self._scans: list[Future[None]] = []
        self._scanned = 0  # keys the scans have seen

    def __enter__(self) -> CaptionPrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, objects: Iterable) -> None:
        """Listed objects (one page, from any thread): their sidecars are read once the manifest is known."""
        if self._read_sidecars:
            keys = [o.key for o in objects]
            if keys:
                scan = self._pool.submit(self._scan, keys)
                with self._lock:
                    self._scans.append(scan)

    def _judge_manifest(self) -> dict[str, Verdict]:
        manifest = self._manifest.result()
        return {text: self.rules.judge(text) for text in set(manifest.captions.values())}

    def _scan(self, keys: list[str]) -> None:
        manifest = self._manifest.result()
        keys = [key for key in keys if not key_problem(key)]  # discovery records those as failed; none is read
        videos = []
        for key in keys:
            stem, suffix = posixpath.splitext(key)
            if suffix.lower() in self._suffixes and manifest.match(key) is None:
                videos.append(stem)
        with self._lock:
            self._scanned += len(keys)
            self._uncaptioned.update(videos)
            touched = set(videos)
            touched.update(stem for key in keys if (stem := offer_sidecar(self._sidecar, key)) is not None)
            for stem in touched:
                if stem in self._uncaptioned and stem in self._sidecar:
                    key = self._sidecar[stem][1]
                    if key not in self._reads:
                        self._reads[key] = self._pool.submit(read_sidecar, self._store, key)

    def index(self, all_keys: Iterable[str]) -> CaptionIndex:
        """The caption index over the whole listing, with the sidecar reads made so far handed to it.

        A manifest that cannot be read raises here (a ConfigError naming it), as it would without the
        prefetch.
        """
        manifest = self._manifest.result()
        with self._lock:
            scans = list(self._scans)
        for scan in scans:  # every page seen has had its sidecar reads started
            scan.result()
        with self._lock:
            reads = dict(self._reads)
            scanned, best = self._scanned, dict(self._sidecar)
        # when the scans saw the whole listing, their choice is what sidecar_map(all_keys) would give
        whole = isinstance(all_keys, Sized) and scanned == len(all_keys)
        sidecars = chosen_sidecars(best) if whole else None
        return CaptionIndex.build(self._store, all_keys, manifest=manifest, prefetched=reads, sidecars=sidecars)

    def judged(self) -> dict[str, Verdict]:
        """Manifest caption text -> the rules' verdict."""
        return self._judged.result()
