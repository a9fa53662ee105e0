"""Per-video claims in the workspace, so that rounds running at once never label one video twice.

Before a batch labels a video it claims it. A claim is a small JSON object

    claims/<h>/<generation:08d>.json      h: a hash of the video key and its ETag

created with `create_exclusive`, so of any number of racing claimers exactly one
gets each generation, on a local disk and on S3 alike. The highest generation is
the claim in force. It is *free* when its holder released it (the batch ended),
when its lease ran out (the holder stopped renewing it: dead, or frozen for a
whole lease), or when its holder is provably dead: a process of this machine
whose pid is gone, or this very process once the batch that took it is over.
A free claim is taken by creating the next generation, which again exactly one
taker wins, so a crashed round's claims pass to one successor. A video whose
claim is held by a live batch of another round is left to it, and the round
says so in its summary ("claimed by round X").

Why per video, not per batch: two rounds plan different batches (a round
started later skips what is already labelled), so only the video is common to
both. Why a lease and not just "the same round may take its own claims back":
across machines a live twin cannot be told from a dead one, and a rerun of a
round whose label-batch runs still work on another machine would then label
their videos a second time. On one machine a killed round is recognised at
once (its pid is gone), so rerunning it waits for nothing.

Generations are never deleted, so the numbers only grow: a claimer that sees
generation g can only ever race for g + 1. Claims hold no labels: losing the
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .base import ObjectStore

log = logging.getLogger(__name__)

CLAIMS = "claims"
DEFAULT_LEASE_SECONDS = 600.0
MAX_RACES = 8  # lost races for one video before it is reported as contended
THREADS = 8  # claims of a batch are taken and released in parallel (one request each on S3)
_GEN = re.compile(r"(\d{8})\.json")
_LIVE_TOKENS: set[str] = set()  # claim sets open in this process


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
    """Why a claim no longer protects its video, or None while its holder may still be working."""
    now = time.time() if now is None else now
    if doc.get("released"):
        return "released"
    try:
        expires = float(doc.get("expires_at") or 0)
    except (TypeError, ValueError):
        expires = 0.0  # not written by us: a claim nobody can vouch for protects nothing
    if expires < now:
        return "lease expired"
    if doc.get("host") == HOST:
        pid = doc.get("pid")
        if pid == os.getpid():
            if doc.get("token") not in _LIVE_TOKENS:
                return "its batch in this process is over"
        elif not pid_alive(pid):
            return f"its process {pid} on this machine is gone"
    return None


@dataclass
class Held:
    video_key: str
    etag: str
    prefix: str
    generation: int
    doc: dict
    lost: bool = False


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
        self.held: dict[str, Held] = {}
        self.skipped: dict[str, str] = {}
        self.took_over = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ClaimSet:
        _LIVE_TOKENS.add(self.token)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.release()
        finally:
            _LIVE_TOKENS.discard(self.token)

    # ----------------------------------------------------------------- taking

    def acquire(self, videos: list) -> list:
        """The videos (anything with `.key` and `.etag`) this batch now holds, in their order."""
        if not videos:
            return []
        with ThreadPoolExecutor(min(THREADS, len(videos))) as pool:
            outcomes = list(pool.map(self._acquire_one, videos))
        mine = [v for v, ok in zip(videos, outcomes, strict=True) if ok]
        if self.held and self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name=f"claims-{self.batch_id}", daemon=True)
            self._thread.start()
        return mine

    def _doc(self, video, generation: int) -> dict:
        now = time.time()
        return {
            "video_key": video.key,
            "etag": video.etag,
            "generation": generation,
            "round_id": self.round_id,
            "batch_id": self.batch_id,
            "token": self.token,
            "host": HOST,
            "pid": os.getpid(),
            "acquired_at": now,
            "expires_at": now + self.lease_seconds,
            "released": False,
        }

    def _acquire_one(self, video) -> bool:
        prefix = claim_prefix(video.key, video.etag)
        generation = 0  # first try the fresh case: one request when nobody ever claimed this video
        current: dict = {}
        for _ in range(MAX_RACES):
            doc = self._doc(video, generation)
            if self.workspace.create_exclusive(generation_key(prefix, generation), _encode(doc)):
                with self._lock:
                    self.held[video.key] = Held(video.key, video.etag, prefix, generation, doc)
                    self.took_over += generation > 0
                return True
            top = self._top(prefix)
            if top is None:  # listed nothing right after a create failed: look again
                continue
            current = self._read(prefix, top)
            reason = why_free(current)
            if reason is None:
                with self._lock:
                    self.skipped[video.key] = f"claimed by round {current.get('round_id', '?')}"
                return False
            log.info("claim of %s (round %s): %s; taking it over", video.key, current.get("round_id"), reason)
            generation = top + 1
        with self._lock:
            self.skipped[video.key] = f"claimed by round {current.get('round_id', '?')} (contended)"
        return False

    def _top(self, prefix: str) -> int | None:
        generations = [
            int(m.group(1)) for i in self.workspace.list(prefix) if (m := _GEN.fullmatch(i.key[len(prefix) :]))
        ]
        return max(generations) if generations else None

    def _read(self, prefix: str, generation: int) -> dict:
        """The claim document; an unreadable one counts as expired once it is a lease old."""
        key = generation_key(prefix, generation)
        try:
            doc = json.loads(self.workspace.read_bytes(key))
            if isinstance(doc, dict):
                return doc
        except FileNotFoundError:
            return {"released": True}  # claims are never deleted; someone removed it by hand
        except ValueError:
            pass
        info = self.workspace.info(key)
        expires = (info.mtime if info else 0.0) + self.lease_seconds
        return {"round_id": "(unreadable claim)", "expires_at": expires}

    # ----------------------------------------------------------------- keeping and giving back

    def _renew_loop(self) -> None:
        interval = max(self.lease_seconds / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as exc:  # a storage fault: the next renewal tries again, well within the lease
                log.warning("renewing the claims of batch %s failed: %s", self.batch_id, exc)

    def renew(self) -> None:
        """Push every held claim's expiry a lease ahead; a claim someone took over (we were frozen) is lost."""
        with self._lock:
            held = [h for h in self.held.values() if not h.lost]
        for h in held:
            if self.workspace.exists(generation_key(h.prefix, h.generation + 1)):
                h.lost = True
                log.warning("claim of %s was taken over after its lease ran out", h.video_key)
                continue
            h.doc = dict(h.doc, expires_at=time.time() + self.lease_seconds)
            self.workspace.write_bytes(generation_key(h.prefix, h.generation), _encode(h.doc))

    def holds(self, video_key: str) -> bool:
        """Whether this batch still holds the video's claim (False once someone took it over)."""
        h = self.held.get(video_key)
        return h is not None and not h.lost

    def release(self) -> None:
        """Mark every held claim released (best effort: an unreleased claim only delays others until its lease ends)."""
        self.drop(set(self.held))

    def drop(self, video_keys: set[str]) -> None:
        """Release the claims of these videos (the batch is done with them, or will not label them after all)."""
        with self._lock:
            dropped = [self.held.pop(k) for k in list(self.held) if k in video_keys]
        if not dropped:
            return

        def give_back(h: Held) -> None:
            doc = dict(h.doc, released=True, released_at=time.time())
            try:
                self.workspace.write_bytes(generation_key(h.prefix, h.generation), _encode(doc))
            except Exception as exc:
                log.warning("could not release the claim of %s (it expires by itself): %s", h.video_key, exc)

        with ThreadPoolExecutor(min(THREADS, len(dropped))) as pool:
            list(pool.map(give_back, dropped))


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode("utf-8")
