"""The append-only Parquet catalog: every video's history, and so its state, in plain files.

Why events and not a table we update: any number of workers (threads, processes,
machines on S3) append at once with no lock and no database; a crash loses at
most the batch being written, never what was there. The state of a video is its
latest event (by `created_at`, then `event_id`).

Files under `<workspace>/catalog/`:

    events/<utc>-<uuid>.parquet     one per append, written atomically, never rewritten
    snapshots/<utc>-<uuid>.parquet  written by compact(): the events of the files it folded

Compaction writes its snapshot *before* deleting the files it folded, and every
event carries a unique `event_id`, so a reader that sees both the old files and the
snapshot drops the duplicates, and a reader that finds a listed file gone lists
again (the snapshot holding those events is there by then). Readers thus never lose
or double an event, whatever crashes or concurrent compactions happen.

All queries are pyarrow compute (sort, group_by, take): 100k videos read in
well under a second (bench/bench_catalog.py).
"""

from __future__ import annotations

import io
import json
import logging
import math
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..faults import fault_point
from .base import ObjectStore
from .layout import CATALOG, validate_round_id
from .uri import open_store

EVENTS = f"{CATALOG}/events/"
SNAPSHOTS = f"{CATALOG}/snapshots/"
SUFFIX = ".parquet"

STATUSES = ("planned", "labelled", "filtered", "failed")
TERMINAL = ("labelled", "filtered", "failed")

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("video_key", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("caption", pa.string()),
        ("filter_rule", pa.string()),  # the caption rule that dropped the video
        ("num_frames", pa.int32()),  # decode facts of the source video
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("clip_frames", pa.int32()),  # the clip the teachers saw
        ("stride", pa.int32()),
        ("num_queries", pa.int32()),
        ("query_stats", pa.string()),  # JSON object
        ("teachers", pa.list_(pa.string())),
        ("teacher_sha256", pa.list_(pa.string())),
        ("shard_id", pa.string()),  # object key of the shard holding the sample
        ("sample_key", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),  # the stage that failed
        ("reason", pa.string()),  # why it failed, for a person to act on
        ("round_id", pa.string()),
        ("batch_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("duration_s", pa.float64()),
        # label quality (tasks/quality.py catalog_columns); null in rows written before it existed
        ("quality_mean", pa.float64()),  # the sample's mean track score over its teachers
        ("quality_min_teacher", pa.float64()),  # the lowest teacher's mean score
        ("quality_low_fraction", pa.float64()),  # share of tracks below the low threshold
        ("quality_fb", pa.bool_()),  # whether the forward-backward check ran on the clip
        ("quality_teachers", pa.list_(pa.float64())),  # each teacher's mean track score, in `teachers` order
    ],
    metadata={"pseudotrack.catalog": "1"},
)
COLUMNS = frozenset(SCHEMA.names)
REQUIRED = ("video_key", "etag", "status", "round_id")
# What a person needs to see for each terminal state (DESIGN.md: nothing is silently skipped).
REQUIRED_BY_STATUS = {
    "labelled": ("shard_id", "sample_key", "teachers"),
    "filtered": ("filter_rule",),
    "failed": ("reason",),
    "planned": (),
}
SUMMARY_COLUMNS = (
    "event_id",
    "video_key",
    "round_id",
    "created_at",
    "status",
    "teachers",
    "stage",
    "reason",
    "filter_rule",
    "shard_id",
)
READ_THREADS = 8
MAX_RELISTS = 20
# Files beside which a writer folds the catalog. A cold read costs ~5 ms per file on top of the rows
# (bench/bench_catalog.py: 200 files 1.1 s, one snapshot 0.2 s at 100k videos), and a 100k-video round
# writes one file per batch (3,000+), so rounds fold as they go and `status` stays under a second.
COMPACT_AT_FILES = 32


@dataclass(frozen=True)
class CatalogState:
    """One read of the catalog seen three ways, for pages that show several views of the same moment.

    `latest`: each video's latest event; `latest_in_rounds`: its latest event within each round it
    has events in (a video relabelled in a later round counts in both, as `summary()['rounds']`);
    `round_spans`: round id -> (first, last) event time, any status.
    """

    events: pa.Table
    latest: pa.Table
    latest_in_rounds: pa.Table
    round_spans: dict[str, tuple[datetime, datetime]]


class Catalog:
    """Append events; ask for the latest state of videos and counts over them."""

    def __init__(self, store: ObjectStore | str):
        self.store = open_store(store) if isinstance(store, str) else store
        self._cache: dict[str, pa.Table] = {}  # file key -> table; files never change once written
        self._merged: tuple[tuple[str, ...], pa.Table] | None = None  # the deduplicated union of those files

    def __getstate__(self) -> dict:
        return {"store": self.store}

    def __setstate__(self, state: dict) -> None:
        self.store = state["store"]
        self._cache = {}
        self._merged = None

    def __repr__(self) -> str:
        return f"Catalog({self.store.uri(CATALOG)!r})"

    # ----------------------------------------------------------------- writing

    def append(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write the rows as one new event file; returns its key (None when there were no rows).

        Rows missing a required field, with an unknown column or status, are refused
        (ValueError naming the row) before anything is written.
        """
        rows = list(rows)
        if not rows:
            return None
        now = datetime.now(UTC)
        stem = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:16]}"
        table = rows_to_table(rows, stem, now)
        key = f"{EVENTS}{stem}{SUFFIX}"
        data = _to_parquet(table)
        fault_point("catalog.before_write")
        self.store.write_bytes(key, data)
        fault_point("catalog.written")
        self._cache[key] = table
        return key

    def compact(self) -> int:
        """Fold every event file and snapshot into one new snapshot; returns how many files it removed.

        Safe beside concurrent appends (files written after the listing are left alone)
        and concurrent compactions (a file another one already folded is skipped: its
        events are in that one's snapshot, written before the file was removed).
        """
        return self._compact(self._list())

    def compact_if_needed(self, threshold: int | None = None) -> int:
        """Fold the catalog once it holds `threshold` (default COMPACT_AT_FILES) files or more.

        Costs one listing when it does not.
        """
        keys = self._list()
        return self._compact(keys) if len(keys) >= (threshold or COMPACT_AT_FILES) else 0

    def _compact(self, keys: list[str]) -> int:
        if len(keys) < 2:
            return 0
        tables = self._read_many(keys)
        present = [k for k in keys if tables.get(k) is not None]
        if not present:
            return 0
        merged = _sort_events(_dedupe(pa.concat_tables([tables[k] for k in present])))
        now = datetime.now(UTC)
        key = f"{SNAPSHOTS}{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:16]}{SUFFIX}"
        self.store.write_bytes(key, _to_parquet(merged))
        self._cache[key] = merged
        for old in present:  # only after the snapshot exists
            self.store.delete(old)
            self._cache.pop(old, None)
        return len(present)

    # ----------------------------------------------------------------- reading

    def shard_ids(self) -> set[str]:
        """Every shard any event names: shards the catalog knows (crash recovery reads only the others)."""
        shards = self._load()["shard_id"].drop_null()
        return set(pc.unique(shards).to_pylist()) if len(shards) else set()

    def events(self, round_id: str | None = None, *, ordered: bool = True) -> pa.Table:
        """Every event once, oldest first (by created_at, then event_id).

        ordered=False skips the sort for callers that aggregate anyway (a quarter second at 100k events).
        """
        events = self._events(round_id)
        return _sort_events(events) if ordered else events

    def latest(self, round_id: str | None = None) -> pa.Table:
        """One row per video, its latest event (within `round_id` if given), sorted by video_key."""
        return latest_by(self._events(round_id), ("video_key",))

    def done(self, round_id: str | None = None, statuses: Iterable[str] | None = None) -> dict[str, str]:
        """video_key -> ETag of the videos whose latest event is terminal (or in `statuses`).

        A planner skips these when the ETag it lists is the same and relabels when it changed.
        """
        wanted = tuple(statuses) if statuses is not None else TERMINAL
        _check_statuses(wanted)
        latest = self.latest(round_id)
        latest = latest.filter(pc.is_in(latest["status"], pa.array(wanted, pa.string())))
        return dict(zip(latest["video_key"].to_pylist(), latest["etag"].to_pylist(), strict=True))

    def summary(self, round_id: str | None = None) -> dict:
        """Counts over the latest state of each video: by status, teacher, failure reason, filter rule, round.

        `rounds` counts, per round, the latest state within that round of each video the round
        recorded an event for (a video relabelled in a later round counts in both).
        """
        events = self._events(round_id).select(list(SUMMARY_COLUMNS))  # fewer columns to permute
        latest = latest_by(events, ("video_key",))
        status = latest["status"]
        labelled = latest.filter(pc.equal(status, "labelled"))
        failed = latest.filter(pc.equal(status, "failed"))
        filtered = latest.filter(pc.equal(status, "filtered"))
        joined = pc.binary_join_element_wise(failed["stage"], failed["reason"], ": ")
        reasons = pc.coalesce(joined, failed["reason"])
        shards = labelled["shard_id"].drop_null()

        per_round = latest_by(events, ("round_id", "video_key"))
        rounds: dict[str, dict[str, int]] = {}
        if per_round.num_rows:
            grouped = per_round.group_by(["round_id", "status"]).aggregate([("video_key", "count")])
            for name, state, count in zip(
                grouped["round_id"].to_pylist(),
                grouped["status"].to_pylist(),
                grouped["video_key_count"].to_pylist(),
                strict=True,
            ):
                rounds.setdefault(name or "(none)", {})[state] = count
        return {
            "round_id": round_id,
            "events": events.num_rows,
            "videos": latest.num_rows,
            "shards": pc.count_distinct(shards).as_py() if len(shards) else 0,
            "by_status": _counts(status),
            "by_teacher": _counts(pc.list_flatten(labelled["teachers"])),
            "by_reason": _counts(reasons),
            "by_stage": _counts(failed["stage"]),
            "by_filter_rule": _counts(filtered["filter_rule"]),
            "rounds": dict(sorted(rounds.items())),
        }

    def read_state(self, columns: Iterable[str] | None = None) -> CatalogState:
        """Events, latest per video, latest per (round, video) and round spans from one listing.

        One listing, not one per view: on S3 each listing is a request, and a monitoring page
        asks for all of these on every refresh. `columns` narrows the tables (the latest_by
        keys are always kept); events are left unsorted, since the views aggregate them.
        """
        events = self._load()
        if columns is not None:
            keep = set(columns) | {"video_key", "round_id", "created_at", "event_id", "status"}
            events = events.select([n for n in SCHEMA.names if n in keep])
        spans: dict[str, tuple[datetime, datetime]] = {}
        if events.num_rows:
            grouped = events.group_by("round_id", use_threads=False).aggregate(
                [("created_at", "min"), ("created_at", "max")]
            )
            for name, first, last in zip(
                grouped["round_id"].to_pylist(),
                grouped["created_at_min"].to_pylist(),
                grouped["created_at_max"].to_pylist(),
                strict=True,
            ):
                spans[name or "(none)"] = (first, last)
        return CatalogState(
            events=events,
            latest=latest_by(events, ("video_key",)),
            latest_in_rounds=latest_by(events, ("round_id", "video_key")),
            round_spans=spans,
        )

    def labelled_sample(self, sample_key: str) -> dict | None:
        """The latest event of the video whose labelled sample is `sample_key`, or None.

        None also when that video has been relabelled or has failed since: its old sample is no
        longer the catalog's answer for it.
        """
        latest = latest_by(self._load(), ("video_key",))
        hit = latest.filter(pc.and_(pc.equal(latest["sample_key"], sample_key), pc.equal(latest["status"], "labelled")))
        return hit.slice(0, 1).to_pylist()[0] if hit.num_rows else None

    def failures(self, round_id: str | None = None) -> list[dict]:
        """The videos whose latest state (within `round_id` if given) is failed: key, stage, reason, round,
        time; sorted by video key. What `pseudotrack status --failed` lists."""
        columns = ["video_key", "stage", "reason", "round_id", "created_at"]
        latest = self.latest(round_id)
        failed = latest.filter(pc.equal(latest["status"], "failed")).select(columns)
        return [
            {**row, "created_at": row["created_at"].isoformat() if row["created_at"] is not None else None}
            for row in failed.to_pylist()
        ]

    def _events(self, round_id: str | None) -> pa.Table:
        table = self._load()
        if round_id is not None:
            table = table.filter(pc.equal(table["round_id"], round_id))
        return table

    def files(self) -> list[str]:
        """The catalog's event and snapshot files, for tools and tests."""
        return self._list()

    def _list(self) -> list[str]:
        # One listing of catalog/: events/ sorts before snapshots/, so a snapshot written before
        # an event file vanished from a later page is still seen.
        return [
            info.key
            for info in self.store.list(f"{CATALOG}/", suffixes=(SUFFIX,))
            if info.key.startswith((EVENTS, SNAPSHOTS))
        ]

    def _read_one(self, key: str) -> pa.Table | None:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            data = self.store.read_bytes(key)
        except FileNotFoundError:
            return None  # compacted away by someone else; the caller lists again
        try:
            # one thread per file: the pool already reads files in parallel (measured: 25% faster)
            table = conform(pq.read_table(pa.BufferReader(data), use_threads=False))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(
                f"catalog file {self.store.uri(key)} is not a readable Parquet file ({exc}); "
                "move it out of the catalog folder and run again"
            ) from None
        self._cache[key] = table
        return table

    def _read_many(self, keys: list[str]) -> dict[str, pa.Table | None]:
        todo = [k for k in keys if k not in self._cache]
        if len(todo) > 1:
            with ThreadPoolExecutor(min(READ_THREADS, len(todo))) as pool:
                list(pool.map(self._read_one, todo))
        return {k: self._read_one(k) for k in keys}

    def _load(self) -> pa.Table:
        """All events, deduplicated; lists again when a listed file vanished mid-read."""
        tables: dict[str, pa.Table] = {}
        for _ in range(MAX_RELISTS):
            keys = self._list()
            read = self._read_many([k for k in keys if k not in tables])
            tables.update({k: t for k, t in read.items() if t is not None})
            if all(t is not None for t in read.values()):
                break
        else:
            raise RuntimeError(
                f"the catalog at {self.store.uri(CATALOG)} kept changing while it was read "
                f"({MAX_RELISTS} listings); are compactions running in a loop?"
            )
        for stale in set(self._cache) - set(keys):
            self._cache.pop(stale, None)
        if not tables:
            return SCHEMA.empty_table()
        names = tuple(sorted(tables))
        merged = self._merged
        if merged is None or merged[0] != names:
            # one chunk: sorts and takes over 200 small chunks were twice as slow (bench_catalog.py)
            merged = (names, _dedupe(pa.concat_tables([tables[k] for k in names]).combine_chunks()))
            self._merged = merged
        return merged[1]


def fold_quietly(catalog: Catalog, threshold: int | None = None) -> int:
    """`compact_if_needed` for a round between batches: a failed fold is a warning, never a failed round.

    Every event is in its own file whether or not the fold happened; only cold reads stay slower
    until the next one succeeds.
    """
    try:
        return catalog.compact_if_needed(threshold)
    except Exception as exc:  # storage outage, permissions: the round's own work is already committed
        logging.getLogger(__name__).warning("catalog at %s not compacted: %s", catalog.store.uri(CATALOG), exc)
        return 0


# --------------------------------------------------------------------------- helpers


def rows_to_table(rows: list[Mapping[str, Any]], stem: str, now: datetime) -> pa.Table:
    """Validate rows and build the event table.

    Event ids are `<stem>-<row index>`, so of two rows of one batch for the same video the later wins.
    Built column by column: a round's plan records tens of thousands of verdicts in one go.
    """
    round_ids: set[str] = set()
    for i, row in enumerate(rows):
        unknown = row.keys() - COLUMNS
        if unknown:
            raise ValueError(
                f"{_where(i, row)}: unknown columns {sorted(unknown)}; the catalog schema is fixed in "
                f"pseudotrack/storage/catalog.py (columns: {', '.join(SCHEMA.names)})"
            )
        for name in REQUIRED:
            if row.get(name) is None or (name != "etag" and row.get(name) == ""):
                raise ValueError(f"{_where(i, row)}: required field {name!r} is missing")
        status = row["status"]
        if status not in STATUSES:
            raise ValueError(f"{_where(i, row)}: status {status!r} is not one of {', '.join(STATUSES)}")
        for name in REQUIRED_BY_STATUS[status]:
            if row.get(name) in (None, "", [], ()):
                raise ValueError(f"{_where(i, row)}: a {status!r} row needs {name!r}")
        if row["round_id"] not in round_ids:
            validate_round_id(row["round_id"])
            round_ids.add(row["round_id"])
    arrays = []
    for field in SCHEMA:
        name = field.name
        values = [row.get(name) for row in rows]
        if name == "event_id":
            values = [f"{stem}-{i:06d}" if v is None else v for i, v in enumerate(values)]
        elif name == "created_at":
            values = [now if v is None else _timestamp(v, _where(i, rows[i])) for i, v in enumerate(values)]
        elif name == "query_stats":
            values = [
                v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True, default=_json_default)
                for v in values
            ]
        elif name in ("fps", "duration_s", "quality_mean", "quality_min_teacher", "quality_low_fraction"):
            values = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        try:
            arrays.append(pa.array(values, type=field.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"catalog column {name!r} ({field.type}): a row has a bad value: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _where(i: int, row: Mapping[str, Any]) -> str:
    return f"catalog row {i} (video_key={row.get('video_key')!r})"


def conform(table: pa.Table) -> pa.Table:
    """Bring a file written by an older or newer version to today's schema (missing columns are null)."""
    if table.schema.equals(SCHEMA, check_metadata=False):
        return table
    arrays = []
    for field in SCHEMA:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def latest_by(table: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """The latest event per distinct `keys`, sorted by `keys` (vectorised: sort, mark group starts, take).

    Only the sort columns are permuted; the full rows are gathered once, for the winners.
    """
    n = table.num_rows
    if n < 2:
        return table
    sort_keys = [(k, "ascending") for k in keys] + [(k, "descending") for k in ("created_at", "event_id")]
    order = pc.sort_indices(table.select([k for k, _ in sort_keys]), sort_keys=sort_keys)
    change = None
    for k in keys:
        column = pc.take(table[k], order).combine_chunks()
        head, tail = column.slice(0, n - 1), column.slice(1)
        # a new group where neighbours differ; null == null is the same group, null != value is not
        differs = pc.fill_null(pc.not_equal(tail, head), True)
        differs = pc.and_(differs, pc.invert(pc.and_(pc.is_null(tail), pc.is_null(head))))
        change = differs if change is None else pc.or_(change, differs)
    first = pa.concat_arrays([pa.array([True]), change])
    return table.take(pc.filter(order, first))


def _sort_events(table: pa.Table) -> pa.Table:
    if table.num_rows < 2:
        return table
    order = pc.sort_indices(table, sort_keys=[("created_at", "ascending"), ("event_id", "ascending")])
    return table.take(order)


def _dedupe(table: pa.Table) -> pa.Table:
    """One row per event_id: the same event can sit in an event file and in a snapshot for a while."""
    if table.num_rows < 2 or pc.count_distinct(table["event_id"]).as_py() == table.num_rows:
        return table
    indexed = table.select(["event_id"]).append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    keep = indexed.group_by("event_id", use_threads=False).aggregate([("__row", "min")])["__row_min"]
    return table.take(pc.sort_indices(keep))


def _counts(values: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """value -> count, most frequent first; nulls count as '(none)'."""
    if len(values) == 0:
        return {}
    vc = pc.value_counts(values)
    pairs = zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
    named = ((v if v is not None else "(none)", c) for v, c in pairs)
    return dict(sorted(named, key=lambda kv: (-kv[1], kv[0])))


def _check_statuses(statuses: tuple[str, ...]) -> None:
    bad = [s for s in statuses if s not in STATUSES]
    if bad:
        raise ValueError(f"unknown statuses {bad}; choose from {', '.join(STATUSES)}")


def _timestamp(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            return _timestamp(datetime.fromisoformat(value), where)
        except ValueError:
            pass
    raise ValueError(f"{where}: created_at {value!r} is not a datetime, epoch seconds or ISO 8601 string")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays without importing numpy
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"query_stats value {value!r} is not JSON serialisable")


def _to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
