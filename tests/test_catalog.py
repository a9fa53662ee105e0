"""Catalog: append-only events, latest state, compaction under concurrency, on local disk and on S3."""

from __future__ import annotations

import io
import pickle
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudotrack.storage.base import ObjectStore
from pseudotrack.storage.catalog import EVENTS, SCHEMA, SNAPSHOTS, Catalog

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def labelled(key: str, etag: str = "e1", round_id: str = "r1", teachers=("lk",), at: int | None = None, **kw):
    row = {
        "video_key": key,
        "etag": etag,
        "size": 100,
        "status": "labelled",
        "round_id": round_id,
        "shard_id": f"shards/{round_id}/b-000000.tar",
        "sample_key": f"s_{key}",
        "teachers": list(teachers),
        "teacher_sha256": ["0" * 64] * len(teachers),
        "num_frames": 50,
        "fps": 30.0,
        "width": 512,
        "height": 384,
        "clip_frames": 24,
        "stride": 2,
        "num_queries": 384,
        **kw,
    }
    if at is not None:
        row["created_at"] = T0 + timedelta(seconds=at)
    return row


def failed(key: str, reason: str, stage: str = "decode", etag: str = "e1", round_id: str = "r1", at=None):
    row = {"video_key": key, "etag": etag, "status": "failed", "stage": stage, "reason": reason, "round_id": round_id}
    if at is not None:
        row["created_at"] = T0 + timedelta(seconds=at)
    return row


def filtered(key: str, rule: str, round_id: str = "r1", at=None):
    row = {
        "video_key": key,
        "etag": "e1",
        "status": "filtered",
        "filter_rule": rule,
        "round_id": round_id,
        "caption": "a drawing of a cat",
    }
    if at is not None:
        row["created_at"] = T0 + timedelta(seconds=at)
    return row


def event_ids(catalog: Catalog) -> list[str]:
    return catalog.events()["event_id"].to_pylist()


class HookedStore(ObjectStore):
    """Delegates to a real store and runs a callback once, at a chosen moment, to stage a race exactly."""

    def __init__(self, inner: ObjectStore, when: str, prefix: str, hook):
        self.inner, self.when, self.prefix, self.hook, self.fired = inner, when, prefix, hook, False

    def _maybe(self, op: str, key: str) -> None:
        if not self.fired and op == self.when and key.startswith(self.prefix):
            self.fired = True
            self.hook()

    def list(self, prefix="", suffixes=None):
        return self.inner.list(prefix, suffixes)

    def read_bytes(self, key):
        self._maybe("read", key)
        return self.inner.read_bytes(key)

    def read_range(self, key, start, length):
        return self.inner.read_range(key, start, length)

    def write_bytes(self, key, data):
        self._maybe("write", key)
        return self.inner.write_bytes(key, data)

    def create_exclusive(self, key, data):
        return self.inner.create_exclusive(key, data)

    def put_file(self, local_path, key):
        return self.inner.put_file(local_path, key)

    def get_file(self, key, local_path):
        return self.inner.get_file(key, local_path)

    def info(self, key):
        return self.inner.info(key)

    def delete(self, key):
        self._maybe("delete", key)
        return self.inner.delete(key)

    def uri(self, key=""):
        return self.inner.uri(key)

    def child(self, prefix):
        return self.inner.child(prefix)

    def check_readable(self):
        self.inner.check_readable()

    def check_writable(self):
        self.inner.check_writable()


def test_latest_picks_the_last_event(store: ObjectStore) -> None:
    catalog = Catalog(store)
    assert catalog.latest().num_rows == 0 and catalog.done() == {}
    catalog.append([dict(video_key="a.mp4", etag="e1", status="planned", round_id="r1", created_at=T0)])
    catalog.append([failed("a.mp4", "too few features", at=5), filtered("b.mp4", "drawing", at=1)])
    catalog.append([labelled("a.mp4", at=9)])
    latest = {r["video_key"]: r for r in catalog.latest().to_pylist()}
    assert list(latest) == ["a.mp4", "b.mp4"]
    assert latest["a.mp4"]["status"] == "labelled" and latest["a.mp4"]["teachers"] == ["lk"]
    assert latest["b.mp4"]["status"] == "filtered" and latest["b.mp4"]["filter_rule"] == "drawing"
    # an older event appended later does not win: order is created_at, not arrival
    catalog.append([failed("a.mp4", "stale retry", at=7)])
    assert catalog.latest().to_pylist()[0]["status"] == "labelled"
    # the same instant: the later row of a batch wins
    catalog.append([failed("c.mp4", "first", at=20), failed("c.mp4", "second", at=20)])
    assert {r["video_key"]: r["reason"] for r in catalog.latest().to_pylist()}["c.mp4"] == "second"
    assert catalog.events().num_rows == 7
    # arrival order is not time order here; unordered gives the same events, and still by round
    times = catalog.events()["created_at"].to_pylist()
    assert times == sorted(times)
    unordered = catalog.events(ordered=False)
    assert unordered["created_at"].to_pylist() != times
    assert sorted(unordered["event_id"].to_pylist()) == sorted(catalog.events()["event_id"].to_pylist())
    assert catalog.events("r1", ordered=False).num_rows == 7 and catalog.events("r2", ordered=False).num_rows == 0


def test_done_returns_the_new_etag_after_relabel(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append(
        [
            labelled("a.mp4", etag="e1", at=0),
            failed("b.mp4", "no frames", at=0),
            dict(video_key="c.mp4", etag="e1", status="planned", round_id="r1", created_at=T0),
        ]
    )
    assert catalog.done() == {"a.mp4": "e1", "b.mp4": "e1"}  # planned is not terminal
    assert catalog.done(statuses=("labelled", "filtered")) == {"a.mp4": "e1"}  # retry failures
    catalog.append([labelled("a.mp4", etag="e2", round_id="r2", at=10)])
    assert catalog.done()["a.mp4"] == "e2"
    assert catalog.done(round_id="r1") == {"a.mp4": "e1", "b.mp4": "e1"}
    with pytest.raises(ValueError, match="unknown statuses"):
        catalog.done(statuses=("labeled",))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (dict(labelled("a.mp4"), colour="red"), "unknown columns \\['colour'\\]"),
        (dict(labelled("a.mp4"), status="done"), "status 'done' is not one of"),
        ({k: v for k, v in labelled("a.mp4").items() if k != "round_id"}, "required field 'round_id'"),
        ({k: v for k, v in labelled("a.mp4").items() if k != "etag"}, "required field 'etag'"),
        (dict(labelled("a.mp4"), shard_id=None), "'labelled' row needs 'shard_id'"),
        (dict(failed("a.mp4", "x"), reason=""), "'failed' row needs 'reason'"),
        (dict(filtered("a.mp4", "x"), filter_rule=None), "'filtered' row needs 'filter_rule'"),
        (dict(labelled("a.mp4"), round_id="bad round/../x"), "round id"),
        (dict(labelled("a.mp4"), num_frames="many"), "column 'num_frames'"),
    ],
)
def test_bad_rows_are_refused_before_anything_is_written(tmp_path, row: dict, message: str) -> None:
    catalog = Catalog(str(tmp_path / "ws"))
    with pytest.raises(ValueError, match=message):
        catalog.append([labelled("ok.mp4"), row])
    assert catalog.files() == [] and catalog.events().num_rows == 0


def test_values_are_normalised(tmp_path) -> None:
    catalog = Catalog(str(tmp_path / "ws"))
    stats = {"sift_points": np.int64(812), "spread": np.float32(0.5), "per_keyframe": np.arange(3)}
    catalog.append(
        [
            labelled(
                "a.mp4",
                num_frames=np.int64(50),
                fps=np.float64(29.97),
                query_stats=stats,
                created_at="2026-01-01T00:00:05+00:00",
                duration_s=1.25,
            )
        ]
    )
    row = catalog.latest().to_pylist()[0]
    assert row["num_frames"] == 50 and row["fps"] == pytest.approx(29.97)
    assert row["query_stats"] == '{"per_keyframe": [0, 1, 2], "sift_points": 812, "spread": 0.5}'
    assert row["created_at"] == T0 + timedelta(seconds=5)
    assert catalog.events().schema.equals(SCHEMA, check_metadata=False)


def test_concurrent_appends_from_threads_all_land(store: ObjectStore) -> None:
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        catalog = Catalog(store)  # one per worker, like separate processes
        try:
            for b in range(4):
                catalog.append([labelled(f"w{w}/b{b}/{i}.mp4") for i in range(10)])
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    catalog = Catalog(store)
    assert len(catalog.files()) == 24
    events = catalog.events()
    assert events.num_rows == 240 and len(set(events["event_id"].to_pylist())) == 240
    assert catalog.latest().num_rows == 240


def test_compaction_keeps_every_event_exactly_once(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for b in range(6):
        catalog.append([labelled(f"v{i}.mp4", etag=f"e{b}", at=b) for i in range(5)])
    before_ids, before_latest = sorted(event_ids(catalog)), catalog.latest()
    assert catalog.compact() == 6
    files = catalog.files()
    assert len(files) == 1 and files[0].startswith(SNAPSHOTS)
    fresh = Catalog(store)  # no cache: read from storage
    assert sorted(event_ids(fresh)) == before_ids
    assert fresh.latest().equals(before_latest)
    assert fresh.done() == {f"v{i}.mp4": "e5" for i in range(5)}
    fresh.append([failed("v0.mp4", "gone", at=100)])
    assert fresh.compact() == 2  # the old snapshot and the new event file
    assert len(fresh.files()) == 1 and fresh.events().num_rows == 31
    assert fresh.compact() == 0  # nothing to fold


def test_compact_if_needed_folds_only_past_its_threshold(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for b in range(5):
        catalog.append([labelled(f"v{b}.mp4", at=b)])
    files = catalog.files()
    assert catalog.compact_if_needed(threshold=6) == 0 and catalog.files() == files
    assert catalog.compact_if_needed(threshold=5) == 5
    assert len(catalog.files()) == 1 and Catalog(store).events().num_rows == 5


def test_a_failed_fold_warns_and_keeps_every_event(store: ObjectStore, caplog) -> None:
    from pseudotrack.storage.catalog import fold_quietly

    for b in range(3):
        Catalog(store).append([labelled(f"v{b}.mp4", at=b)])
    expected = sorted(event_ids(Catalog(store)))

    def outage():
        raise ConnectionError("storage went away")

    with caplog.at_level("WARNING"):
        assert fold_quietly(Catalog(HookedStore(store, "write", SNAPSHOTS, outage)), threshold=2) == 0
    assert "not compacted" in caplog.text and "storage went away" in caplog.text
    assert sorted(event_ids(Catalog(store))) == expected and len(Catalog(store).files()) == 3


def test_an_event_appended_during_compaction_survives(store: ObjectStore) -> None:
    Catalog(store).append([labelled("a.mp4", at=0)])
    Catalog(store).append([labelled("b.mp4", at=0)])
    other = Catalog(store)
    late: list[str | None] = []
    # the other worker appends right when the compaction writes its snapshot (after it listed and read)
    hooked = HookedStore(store, "write", SNAPSHOTS, lambda: late.append(other.append([labelled("c.mp4")])))
    assert Catalog(hooked).compact() == 2
    assert late and late[0] in Catalog(store).files()  # the late file was not folded, nor deleted
    events = Catalog(store).events()
    assert sorted(events["video_key"].to_pylist()) == ["a.mp4", "b.mp4", "c.mp4"]
    assert Catalog(store).compact() == 2
    assert sorted(Catalog(store).events()["video_key"].to_pylist()) == ["a.mp4", "b.mp4", "c.mp4"]


def test_reader_survives_a_file_compacted_away_mid_read(store: ObjectStore) -> None:
    for b in range(3):
        Catalog(store).append([labelled(f"v{b}-{i}.mp4") for i in range(4)])
    expected = sorted(event_ids(Catalog(store)))
    # between the reader's listing and its first read, another process compacts everything
    hooked = HookedStore(store, "read", EVENTS, lambda: Catalog(store).compact())
    reader = Catalog(hooked)
    assert sorted(event_ids(reader)) == expected
    assert hooked.fired and len(Catalog(store).files()) == 1


def test_crash_between_snapshot_and_delete_doubles_nothing(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for b in range(3):
        catalog.append([labelled(f"v{i}.mp4", at=b) for i in range(3)])
    expected = sorted(event_ids(catalog))

    class Crash(Exception):
        pass

    def crash():
        raise Crash

    with pytest.raises(Crash):
        Catalog(HookedStore(store, "delete", EVENTS, crash)).compact()
    assert len(Catalog(store).files()) == 4  # snapshot written, no event file removed
    assert sorted(event_ids(Catalog(store))) == expected  # each event once, though stored twice
    assert Catalog(store).compact() == 4
    assert sorted(event_ids(Catalog(store))) == expected


def test_summary_counts(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append(
        [
            labelled("a.mp4", teachers=("cotracker3_online", "tapir"), at=0),
            labelled("b.mp4", teachers=("tapir",), at=0),
            failed("c.mp4", "too few features", stage="queries", at=0),
            failed("d.mp4", "cannot decode", at=0),
            filtered("e.mp4", "animation", at=0),
            filtered("f.mp4", "animation", at=0),
        ]
    )
    catalog.append(
        [
            failed("d.mp4", "cannot decode", round_id="r2", at=10),
            labelled("c.mp4", round_id="r2", shard_id="shards/r2/b-000000.tar", at=10),
            filtered("g.mp4", "time-lapse", round_id="r2", at=10),
        ]
    )
    s = catalog.summary()
    assert s["videos"] == 7 and s["events"] == 9
    assert s["by_status"] == {"labelled": 3, "filtered": 3, "failed": 1}
    assert s["by_teacher"] == {"tapir": 2, "cotracker3_online": 1, "lk": 1}
    assert s["by_reason"] == {"decode: cannot decode": 1}
    assert s["by_filter_rule"] == {"animation": 2, "time-lapse": 1}
    assert s["shards"] == 2
    assert s["rounds"] == {
        "r1": {"labelled": 2, "failed": 2, "filtered": 2},
        "r2": {"failed": 1, "labelled": 1, "filtered": 1},
    }
    r1 = catalog.summary(round_id="r1")
    assert r1["by_status"] == {"failed": 2, "filtered": 2, "labelled": 2}
    assert r1["by_reason"] == {"decode: cannot decode": 1, "queries: too few features": 1}
    assert list(r1["rounds"]) == ["r1"]
    assert catalog.summary(round_id="nothing")["videos"] == 0


def test_files_of_other_versions_and_broken_files(tmp_path) -> None:
    catalog = Catalog(str(tmp_path / "ws"))
    old = pa.table(
        {
            "event_id": ["old-1"],
            "video_key": ["o.mp4"],
            "etag": ["e"],
            "status": ["failed"],
            "reason": ["legacy"],
            "round_id": ["r0"],
            "created_at": pa.array([T0], pa.timestamp("ms", "UTC")),
            "num_frames": pa.array([7], pa.int64()),
            "future_column": [1.5],
        }
    )
    sink = io.BytesIO()
    pq.write_table(old, sink)
    catalog.store.write_bytes(f"{EVENTS}00000000T000000000000Z-old.parquet", sink.getvalue())
    catalog.append([labelled("n.mp4")])
    rows = {r["video_key"]: r for r in catalog.latest().to_pylist()}
    assert rows["o.mp4"]["num_frames"] == 7 and rows["o.mp4"]["teachers"] is None
    assert rows["n.mp4"]["status"] == "labelled"
    catalog.store.write_bytes(f"{EVENTS}zzz-broken.parquet", b"not parquet")
    with pytest.raises(ValueError, match="zzz-broken.parquet.*not a readable Parquet file"):
        Catalog(catalog.store).events()


def test_catalog_pickles_without_its_cache(tmp_path) -> None:
    catalog = Catalog(str(tmp_path / "ws"))
    catalog.append([labelled("a.mp4")])
    clone = pickle.loads(pickle.dumps(catalog))
    assert clone.store == catalog.store and clone._cache == {}
    assert clone.done() == {"a.mp4": "e1"}


def test_a_flow_on_the_prefect_server_appends_to_the_catalog(prefect_server: str, store: ObjectStore) -> None:
    """Proves the session's Prefect server works, and that stores and catalogs travel as task arguments."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client

    @task(cache_policy=NO_CACHE)
    def record(catalog: Catalog, key: str) -> str | None:
        return catalog.append([labelled(key)])

    @flow(name="catalog-smoke")
    def smoke(catalog: Catalog) -> tuple[str | None, str]:
        from prefect.runtime import flow_run

        return record(catalog, "from-flow.mp4"), flow_run.id

    event_file, run_id = smoke(Catalog(store))
    assert event_file in Catalog(store).files()
    assert Catalog(store).done() == {"from-flow.mp4": "e1"}
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_server
        assert client.read_flow_run(run_id).state.is_completed()
