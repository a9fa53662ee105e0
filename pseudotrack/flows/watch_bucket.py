"""The `watch-bucket` flow: label only what is new or changed in a growing bucket, one round per run.

A deployment runs it every hour (prefect.yaml); `pseudotrack watch` runs it once. Each run

1. takes the watch lease (below); a run that finds it held by a live run exits at once and says since when;
2. lists the bucket and compares it with the watcher's state, `watch/state.parquet`: key, size and ETag
   of every video the watcher saw reach a terminal state in the catalog;
3. labels the new and changed videos (a new size or ETag) as one round, `watch-<utc time>-<xxxx>`; an
   unchanged video is never planned, so it is never labelled twice;
4. advances the state, only now and only by the videos the catalog records in a terminal state with the
   listed ETag, then releases the lease.

A crash anywhere leaves the state as it was, so the next run sees the same videos as new; the catalog's
done set and the shard recovery of `run_round` keep it from labelling again what the crashed run
committed, and it resumes the crashed round under the same id. The state only saves work (a listing
compared with it, instead of every caption read again each hour): deleting it costs one full pass.

The lease: a `storage.claims.Lease` under `watch/lease/`, the same mechanism as the per-video claims, so
of any number of racing runs exactly one holds it, on a disk and on S3 alike; a dead or frozen holder's
lease passes on once it expires (at once when the holder was a process of this machine that is gone). A
holder that finds its lease taken over (it was frozen past its expiry) stops before writing the state.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from ..config import RoundConfig
from ..errors import ConfigError
from ..storage.base import ObjectStore
from ..storage.catalog import TERMINAL, Catalog
from ..storage.claims import Lease, Renewal
from ..storage.uri import open_workspace
from ..tasks.discover import Discovery, VideoItem, discover_task
from ..tasks.labelling import resolve_checkpoints
from .label_round import BatchesFailed, run_round
from .summary import artifact_key

log = logging.getLogger(__name__)

STATE_KEY = "watch/state.parquet"
LEASE_PREFIX = "watch/lease/"
DEFAULT_LEASE_SECONDS = 900.0  # a crashed holder on another machine blocks the watcher for at most this long
KEEP_GENERATIONS = 16  # older lease generations are deleted (a racer that far behind: `Lease.take`)

STATE_SCHEMA = pa.schema(
    [
        ("video_key", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("status", pa.string()),  # the terminal state the catalog recorded
        ("round_id", pa.string()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)


# --------------------------------------------------------------------------- the lease


class LeaseBusy(RuntimeError):
    """Another live watch run holds the lease."""

    def __init__(self, doc: dict):
        self.doc = doc
        since = _iso(doc.get("acquired_at"))
        until = _iso(doc.get("expires_at"))
        super().__init__(
            f"another watch run holds the lease since {since} (round {doc.get('round_id') or '?'}, "
            f"host {str(doc.get('host', '?')).split('/')[0]} pid {doc.get('pid', '?')}, lease valid until {until}); "
            "this run does nothing and exits"
        )


def _iso(seconds) -> str:
    try:
        return datetime.fromtimestamp(float(seconds), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return "?"


class WatchLease(Lease):
    """The single watch lease of a workspace: acquire, renewed in the background, release.

    round_for(previous) picks the round id this holder works on, given the lease document in force
    before it (None the first time): a crashed or unfinished round is resumed under its own id.
    """

    def __init__(self, workspace: ObjectStore, seconds: float = DEFAULT_LEASE_SECONDS, prefix: str = LEASE_PREFIX):
        if not seconds > 0:
            raise ConfigError(f"watch lease must be a positive number of seconds, got {seconds}")
        super().__init__(workspace, prefix, seconds, keep=KEEP_GENERATIONS)
        self.previous: dict | None = None
        self._renewal: Renewal | None = None

    def acquire(self, round_for: Callable[[dict | None], str]) -> dict:
        """Hold the lease (returns its document) or raise LeaseBusy naming the live holder."""
        took, doc = self.take(lambda previous: {"round_id": round_for(previous)}, look_first=True)
        if not took:
            raise LeaseBusy(doc or {})
        self.previous = doc
        self._renewal = Renewal(lambda: [self], self.seconds, "watch-lease")
        return self.doc

    def release(self, finished: bool) -> None:
        """Give the lease back; `finished=False` asks the next run to resume this run's round."""
        if self._renewal is not None:
            self._renewal.stop()
        self.give_back(finished=finished)


def new_watch_round_id(now: datetime | None = None) -> str:
    """`watch-YYYYmmdd-HHMMSS-xxxx`: sorts by start time, tells watcher rounds from hand-started ones."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("watch-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def resume_or_new(previous: dict | None) -> str:
    """The round of a holder that crashed, or that released the lease with its round unfinished; else new."""
    if previous and previous.get("round_id") and not (previous.get("released") and previous.get("finished", True)):
        return str(previous["round_id"])
    return new_watch_round_id()


# --------------------------------------------------------------------------- the state


def load_state(workspace: ObjectStore) -> dict[str, dict]:
    """video key -> {size, etag, status, round_id, recorded_at} of the videos the watcher has recorded."""
    try:
        data = workspace.read_bytes(STATE_KEY)
    except FileNotFoundError:
        return {}
    try:
        table = pq.read_table(pa.BufferReader(data))
        rows = table.select(STATE_SCHEMA.names).to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ConfigError(
            f"the watch state {workspace.uri(STATE_KEY)} is unreadable ({exc}); delete it and run again "
            "(the next run compares the whole bucket with the catalog and labels nothing twice)"
        ) from None
    return {r["video_key"]: r for r in rows}


def save_state(workspace: ObjectStore, state: dict[str, dict]) -> None:
    rows = sorted(state.values(), key=lambda r: r["video_key"])
    table = pa.Table.from_pylist(rows, schema=STATE_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    workspace.write_bytes(STATE_KEY, sink.getvalue())  # atomic on both backends


@dataclass
class Changes:
    """The listing compared with the state."""

    new: int = 0
    changed: int = 0
    retried: int = 0  # unchanged but failed last time, with retry_failed
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    todo: list[VideoItem] = field(default_factory=list)  # new, changed and retried, in the listing's order


def compare(videos: list[VideoItem], state: dict[str, dict], retry_failed: bool = False) -> Changes:
    changes = Changes()
    for video in videos:
        seen = state.get(video.key)
        if seen is None:
            changes.new += 1
        elif seen["etag"] != video.etag or seen["size"] != video.size:
            changes.changed += 1
        elif retry_failed and seen["status"] == "failed":
            changes.retried += 1
        else:
            changes.unchanged += 1
            continue
        changes.todo.append(video)
    changes.removed = sorted(set(state) - {v.key for v in videos})
    return changes


def advance(state: dict[str, dict], todo: list[VideoItem], removed: list[str], catalog: Catalog) -> int:
    """Record the videos of `todo` that the catalog has in a terminal state with the listed ETag.

    Anything else (a batch that failed, a video another live round holds) stays out of the state, so the
    next run plans it again; the catalog's done set stops that run from labelling it twice.
    """
    for key in removed:
        state.pop(key, None)
    if not todo:
        return 0
    latest = catalog.latest().select(["video_key", "etag", "status", "round_id"]).to_pydict()
    recorded = {
        k: (e, s, r)
        for k, e, s, r in zip(latest["video_key"], latest["etag"], latest["status"], latest["round_id"], strict=True)
    }
    now = datetime.now(UTC)
    count = 0
    for video in todo:
        etag, status, round_id = recorded.get(video.key, (None, None, None))
        if status in TERMINAL and etag == video.etag:
            state[video.key] = {
                "video_key": video.key,
                "size": video.size,
                "etag": video.etag,
                "status": status,
                "round_id": round_id,
                "recorded_at": now,
            }
            count += 1
    return count


# --------------------------------------------------------------------------- one run


@dataclass
class WatchSummary:
    status: str  # "labelled", "nothing-new", "busy", "lease-lost"
    message: str
    round_id: str | None = None
    listed: int = 0
    new: int = 0
    changed: int = 0
    retried: int = 0
    unchanged: int = 0
    removed: int = 0
    recorded: int = 0  # videos the state advanced by
    round: dict | None = None  # the round's RoundSummary
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _in_flow() -> bool:
    return FlowRunContext.get() is not None


def watch(
    config: RoundConfig,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    on_progress: Callable[[str, dict], None] | None = None,
) -> WatchSummary:
    """One watcher pass (plain function; the flow and `pseudotrack watch` call it)."""
    started = time.perf_counter()
    bucket, workspace = open_workspace(config)
    resolve_checkpoints(config)  # a missing checkpoint stops here, before the lease is taken
    logger = get_run_logger() if _in_flow() else log
    lease = WatchLease(workspace, lease_seconds)
    try:
        doc = lease.acquire(lambda previous: config.round_id or resume_or_new(previous))
    except LeaseBusy as exc:
        logger.warning("%s", exc)
        return WatchSummary("busy", str(exc), round_id=exc.doc.get("round_id"), seconds=time.perf_counter() - started)
    round_id = doc["round_id"]
    finished = False
    try:
        discovery = discover_task(bucket) if _in_flow() else discover_task.fn(bucket)
        state = load_state(workspace)
        changes = compare(discovery.videos, state, config.retry_failed)
        todo = changes.todo
        summary = WatchSummary(
            "labelled" if todo else "nothing-new",
            "",
            round_id=round_id if todo else None,
            listed=len(discovery.videos),
            new=changes.new,
            changed=changes.changed,
            retried=changes.retried,
            unchanged=changes.unchanged,
            removed=len(changes.removed),
        )
        logger.info(
            "watch: %d videos listed: %d new, %d changed, %d unchanged, %d removed since the last run",
            summary.listed,
            summary.new,
            summary.changed,
            summary.unchanged,
            summary.removed,
        )
        failure: BatchesFailed | None = None
        if todo:
            round_config = replace(config, round_id=round_id)
            try:
                summary.round = run_round(round_config, Discovery(todo, discovery.all_keys), on_progress).to_dict()
            except BatchesFailed as exc:  # what committed is recorded below; the next run resumes the rest
                summary.round, failure = exc.summary.to_dict(), exc
        if todo or changes.removed:
            summary.recorded = advance(state, todo, changes.removed, Catalog(workspace))
            if not lease.holds():
                summary.status = "lease-lost"
                summary.message = (
                    "the watch lease was taken over while this run worked (it was stopped past the lease); "
                    "the state is left to the run that holds it now"
                )
                logger.warning("%s", summary.message)
                return summary
            save_state(workspace, state)
        summary.message = _message(summary)
        summary.seconds = time.perf_counter() - started
        if _in_flow():
            create_markdown_artifact(
                watch_markdown(summary),
                key=artifact_key("watch-summary", round_id if todo else "idle"),
                description="what the bucket watcher found and labelled",
            )
        if failure is not None:
            raise failure
        finished = True
        return summary
    finally:
        lease.release(finished)


def _message(summary: WatchSummary) -> str:
    if summary.status == "nothing-new":
        return f"nothing new or changed among {summary.listed} videos"
    r = summary.round or {}
    return (
        f"round {summary.round_id}: {summary.new} new and {summary.changed} changed videos -> "
        f"{r.get('labelled', 0)} labelled, {r.get('filtered', 0)} filtered, {r.get('failed', 0)} failed, "
        f"{r.get('reused', 0)} already done; the state now holds {summary.recorded} more"
    )


def watch_markdown(summary: WatchSummary) -> str:
    lines = [
        f"# Bucket watch: {summary.status}",
        "",
        summary.message,
        "",
        "| videos | count |",
        "|---|---|",
        f"| listed | {summary.listed} |",
        f"| new | {summary.new} |",
        f"| changed | {summary.changed} |",
        f"| unchanged | {summary.unchanged} |",
        f"| removed | {summary.removed} |",
        f"| recorded in the state | {summary.recorded} |",
    ]
    return "\n".join(lines)


@flow(name="watch-bucket", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def watch_bucket(
    config: RoundConfig,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    on_progress: Callable[[str, dict], None] | None = None,
) -> dict:
    """Label what is new or changed in the bucket since the last watch run (one round per run).

    on_progress: the round's in-process progress callback (`run_round`); a deployment run leaves it unset.
    """
    return watch(config, lease_seconds, on_progress).to_dict()


def run_watch_flow(
    config: RoundConfig,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    on_progress: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run `watch-bucket` as a Prefect flow run with `config.workers` batches at a time."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, config.workers))
    return watch_bucket.with_options(task_runner=runner)(config, lease_seconds, on_progress)
