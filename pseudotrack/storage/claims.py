"""Leases in a store, and the per-video claims built on them, so that runs at once never do one thing twice.

A `Lease` is the package's one mechanism for "exactly one live holder": the bucket
watcher's lease (flows/watch_bucket.py) and every per-video claim are leases. A
lease is a folder of small JSON objects

    <prefix><generation:08d>.json

each created with `create_exclusive`, so of any number of racing takers exactly
one gets each generation, on a local disk and on S3 alike. The highest generation
is the lease in force. It is *free* when its holder released it, when its expiry
passed (the holder pushes it a lease ahead every quarter lease while it works, so
only a dead or frozen holder lets it run out), or when its holder is provably
dead: a process of this machine whose pid is gone, or this very process once the
holder is done. A free lease is taken by creating the next generation, which again
exactly one taker wins, so a crashed holder's lease passes to one successor. A
holder that finds a higher generation than its own (it was frozen past its expiry
and someone took over) has lost the lease.

Claims: before a batch labels a video it claims it, a lease under

    claims/<h>/      h: a hash of the video key and its ETag

A video whose claim is held by a live batch of another round is left to it, and
the round says so in its summary ("claimed by round X").

Why per video, not per batch: two rounds plan different batches (a round
started later skips what is already labelled), so only the video is common to
both. Why a lease and not just "the same round may take its own claims back":
across machines a live twin cannot be told from a dead one, and a rerun of a
round whose label-batch runs still work on another machine would then label
their videos a second time. On one machine a killed round is recognised at
once (its pid is gone), so rerunning it waits for nothing.

Claim generations are never deleted, so the numbers only grow: a claimer that
sees generation g can only ever race for g + 1. Claims hold no labels: losing the
whole folder costs no data, only the protection while rounds overlap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import ObjectStore

log = logging.getLogger(__name__)

CLAIMS = "claims"
DEFAULT_LEASE_SECONDS = 600.0
MAX_RACES = 8  # lost races for one lease before it is reported as contended
THREADS = 8  # claims of a batch are taken and released in parallel (one request each on S3)
_GEN = re.compile(r"(\d{8})\.json")
_LIVE: Counter[str] = Counter()  # token -> leases this process holds under it
_LIVE_LOCK = threading.Lock()


def claim_prefix(video_key: str, etag: str) -> str:
    """The folder of one video version's claim generations; a changed video (new ETag) is claimed afresh."""
    digest = hashlib.sha256(f"{video_key}\0{etag}".encode()).hexdigest()[:32]
    return f"{CLAIMS}/{digest}/"


def generation_key(prefix: str, generation: int) -> str:
    return f"{prefix}{generation:08d}.json"


def host_id() -> str:
    """This machine and pid namespace: a pid means the same process only under the same id.

    The boot id separates reboots; the pid namespace separates containers that share a hostname.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


HOST = host_id()


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that pid runs (a zombie, killed but not yet reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    return True


def why_free(doc: dict, now: float | None = None) -> str | None:
    """Why a lease no longer protects what it guards, or None while its holder may still be working."""
    now = time.time() if now is None else now
    if doc.get("released"):
        return "released"
    try:
        expires = float(doc.get("expires_at") or 0)
    except (TypeError, ValueError):
        expires = 0.0  # not written by us: a lease nobody can vouch for protects nothing
    if expires < now:
        return "lease expired"
    if doc.get("host") == HOST:
        pid = doc.get("pid")
        if pid == os.getpid():
            if _LIVE[doc.get("token")] <= 0:
                return "its holder in this process is done"
        elif not pid_alive(pid):
            return f"its process {pid} on this machine is gone"
    return None


def _live(token: str, change: int) -> None:
    with _LIVE_LOCK:
        _LIVE[token] += change
        if _LIVE[token] <= 0:
            del _LIVE[token]


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode("utf-8")


class Lease:
    """One lease under `prefix` of a store: `take`, `renew` while working, `give_back`.

    keep: delete all but the newest `keep` generations when taking the lease (a lease taken every
    hour, like the watcher's); None keeps every generation (claims).
    token: shared by the leases of one holder (a batch's claims); a fresh one by default.
    """

    def __init__(
        self, store: ObjectStore, prefix: str, seconds: float, *, keep: int | None = None, token: str | None = None
    ):
        if not seconds > 0:
            raise ValueError(f"a lease must last a positive number of seconds, got {seconds}")
        self.store = store
        self.prefix = prefix
        self.seconds = seconds
        self.keep = keep
        self.token = token or uuid.uuid4().hex
        self.generation: int | None = None  # of the lease this holder took
        self.doc: dict = {}
        self.lost = False
        self._counted = False

    def key(self, generation: int) -> str:
        return generation_key(self.prefix, generation)

    def generations(self) -> list[int]:
        return sorted(
            int(m.group(1)) for i in self.store.list(self.prefix) if (m := _GEN.fullmatch(i.key[len(self.prefix) :]))
        )

    def read(self, generation: int) -> dict:
        """A generation's document; an unreadable one counts as expired once it is a lease old."""
        key = self.key(generation)
        try:
            doc = json.loads(self.store.read_bytes(key))
            if isinstance(doc, dict):
                return doc
        except FileNotFoundError:
            return {"released": True}  # pruned, or removed by hand: nobody works under it
        except ValueError:
            pass
        info = self.store.info(key)
        return {"round_id": "(unreadable lease)", "expires_at": (info.mtime if info else 0.0) + self.seconds}

    def take(
        self, fields: Callable[[dict | None], dict], *, look_first: bool = False, races: int = MAX_RACES
    ) -> tuple[bool, dict | None]:
        """Try to become the holder: (True, the document in force before, or None) or (False, the holder's).

        fields(previous) gives this holder's own fields (round id, ...) from the document in force before.
        After `races` lost races (False, a free document or None) is returned: the lease is contended.
        look_first: list the generations before the first try (a lease taken many times); otherwise
        generation 0 is tried first, one request when nobody ever took the lease (a fresh claim).
        """
        current: dict | None = None
        generation = 0
        if look_first:
            generations = self.generations()
            if generations:
                current = self.read(generations[-1])
                if why_free(current) is None:
                    return False, current
                generation = generations[-1] + 1
        for _ in range(races):
            now = time.time()
            doc = {
                **fields(current),
                "generation": generation,
                "token": self.token,
                "host": HOST,
                "pid": os.getpid(),
                "acquired_at": now,
                "expires_at": now + self.seconds,
                "released": False,
            }
            _live(self.token, +1)  # before the lease exists: a racer of this process must see it live
            created = self.store.create_exclusive(self.key(generation), _encode(doc))
            after = self.generations() if created and self.keep is not None else []
            if created and not (after and after[-1] > generation):
                self.generation, self.doc, self._counted = generation, doc, True
                if self.keep is not None:
                    self._prune(after)
                return True, current
            _live(self.token, -1)
            if created:  # we re-created a pruned number below the one in force
                self.store.delete(self.key(generation))
            generations = after or self.generations()
            if not generations:  # listed nothing right after a create failed: look again
                continue
            current = self.read(generations[-1])
            reason = why_free(current)
            if reason is None:
                return False, current
            log.info("lease %s%08d: %s; taking it over", self.prefix, generations[-1], reason)
            generation = generations[-1] + 1
        return False, current

    def _prune(self, generations: list[int]) -> None:
        for old in generations[: -self.keep or None]:
            try:
                self.store.delete(self.key(old))
            except Exception as exc:  # only tidiness
                log.debug("could not delete the old lease %s: %s", self.key(old), exc)

    def holds(self) -> bool:
        """Whether this holder's generation is still the one in force (checked on the store, not remembered)."""
        if self.generation is None or self.lost:
            return False
        generations = self.generations()
        if generations and generations[-1] > self.generation:
            self.lost = True
            log.warning("lease %s was taken over by generation %d after ours ran out", self.prefix, generations[-1])
        return not self.lost

    def renew(self) -> None:
        """Push the expiry a lease ahead; a lease someone took over (we were frozen past it) is lost instead."""
        if self.holds():
            self.doc = dict(self.doc, expires_at=time.time() + self.seconds)
            self.store.write_bytes(self.key(self.generation), _encode(self.doc))

    def give_back(self, **fields) -> None:
        """Mark the lease released (with `fields`); it is free at once. A lost lease is left to its new holder."""
        try:
            if self.generation is not None and not self.lost:
                doc = dict(self.doc, released=True, released_at=time.time(), **fields)
                self.store.write_bytes(self.key(self.generation), _encode(doc))
                self.doc = doc
        finally:
            if self._counted:
                self._counted = False
                _live(self.token, -1)


class Renewal:
    """A thread that renews leases every quarter lease until stopped; a failed renewal is tried again."""

    def __init__(self, leases: Callable[[], list[Lease]], seconds: float, name: str):
        self._leases = leases
        self._interval = max(seconds / 4, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            for lease in self._leases():
                try:
                    lease.renew()
                except Exception as exc:  # a storage fault: the next renewal tries again, well within the lease
                    log.warning("renewing the lease %s failed: %s", lease.prefix, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class ClaimSet:
    """The claims of one label batch: renewed while it is open, released when it closes.

    `acquire` returns the videos this batch may label; the others are in `skipped`
    (video key -> "claimed by round X"). `took_over` counts claims taken from an
    earlier holder (generation > 0): only then can a video have been recorded
    since the round planned it, so only then does the batch look at the catalog again.
    """

    def __init__(
        self, workspace: ObjectStore, round_id: str, batch_id: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ):
        if lease_seconds <= 0:
            raise ValueError(f"claim lease must be positive, got {lease_seconds}")
        self.workspace = workspace
        self.round_id = round_id
        self.batch_id = batch_id
        self.lease_seconds = lease_seconds
        self.token = uuid.uuid4().hex
        self.held: dict[str, Lease] = {}
        self.skipped: dict[str, str] = {}
        self.took_over = 0
        self._lock = threading.Lock()
        self._renewal: Renewal | None = None

    def __enter__(self) -> ClaimSet:
        return self

    def __exit__(self, *exc) -> None:
        if self._renewal is not None:
            self._renewal.stop()
        self.release()

    def acquire(self, videos: list) -> list:
        """The videos (anything with `.key` and `.etag`) this batch now holds, in their order."""
        if not videos:
            return []
        with ThreadPoolExecutor(min(THREADS, len(videos))) as pool:
            outcomes = list(pool.map(self._acquire_one, videos))
        mine = [v for v, ok in zip(videos, outcomes, strict=True) if ok]
        if self.held and self._renewal is None:
            self._renewal = Renewal(self._unlost, self.lease_seconds, f"claims-{self.batch_id}")
        return mine

    def _acquire_one(self, video) -> bool:
        claim = Lease(self.workspace, claim_prefix(video.key, video.etag), self.lease_seconds, token=self.token)
        fields = {"video_key": video.key, "etag": video.etag, "round_id": self.round_id, "batch_id": self.batch_id}
        took, doc = claim.take(lambda previous: fields)
        with self._lock:
            if took:
                self.held[video.key] = claim
                self.took_over += claim.generation > 0
            else:
                contended = "" if doc is not None and why_free(doc) is None else " (contended)"
                self.skipped[video.key] = f"claimed by round {(doc or {}).get('round_id', '?')}{contended}"
        return took

    def _unlost(self) -> list[Lease]:
        with self._lock:
            return [claim for claim in self.held.values() if not claim.lost]

    def renew(self) -> None:
        """Push every held claim's expiry a lease ahead; a claim someone took over (we were frozen) is lost."""
        for claim in self._unlost():
            claim.renew()

    def holds(self, video_key: str) -> bool:
        """Whether this batch still holds the video's claim (False once someone took it over)."""
        claim = self.held.get(video_key)
        return claim is not None and not claim.lost

    def release(self) -> None:
        """Mark every held claim released (best effort: an unreleased claim only delays others until its lease ends)."""
        self.drop(set(self.held))

    def drop(self, video_keys: set[str]) -> None:
        """Release the claims of these videos (the batch is done with them, or will not label them after all)."""
        with self._lock:
            dropped = [(k, self.held.pop(k)) for k in list(self.held) if k in video_keys]
        if not dropped:
            return

        def give_back(item: tuple[str, Lease]) -> None:
            try:
                item[1].give_back()
            except Exception as exc:
                log.warning("could not release the claim of %s (it expires by itself): %s", item[0], exc)

        with ThreadPoolExecutor(min(THREADS, len(dropped))) as pool:
            list(pool.map(give_back, dropped))
