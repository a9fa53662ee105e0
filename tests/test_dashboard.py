"""The dashboard: its numbers, its safety (read-only, escaped, no credentials), its speed, and a real browser.

The workspace is built directly (catalog rows, shards of synthetic scenes with their exact tracks as
labels, a training log, a round summary), so every figure the page shows can be checked against
what was written.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import browser  # tests/browser.py (pytest puts tests/ on sys.path)
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from pseudotrack.dashboard import app as dash
from pseudotrack.dashboard import charts, previews, views
from pseudotrack.errors import ConfigError
from pseudotrack.storage.catalog import EVENTS, SCHEMA, SUFFIX, Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks.clip_codec import decode_clip_bytes, encode_clip
from pseudotrack.tasks.shards import Sample, ShardSink
from pseudotrack.teachers.base import TeacherOutput

EVIL_CAPTION = '<script>document.title="pwned"</script> a dog & "cat" <b>bold</b> <img src=x onerror=alert(1)>'
EVIL_KEY = "videos/<i>odd</i> name.mp4"
EVIL_REASON = "decoder said <img src=x onerror=alert(2)>"
NOW = datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- building a workspace

SECRET = "dashboard-test-secret-9f3a7c"


def scene_sample(seed: int, key: str) -> Sample:
    scene = render_scene(seed, num_frames=16, height=192, width=256, num_points=48)
    tracks = np.ascontiguousarray(scene.tracks.transpose(1, 0, 2)).astype(np.float32)  # [T, N, 2]
    visibility = np.ascontiguousarray(~scene.occluded.T)
    label = TeacherOutput(tracks, visibility, np.ones(visibility.shape, np.float16))
    queries = np.column_stack([np.zeros(len(tracks[0])), tracks[0]]).astype(np.float32)
    return Sample(key, encode_clip(scene.frames, 12.0), queries, {"lk": label}, {"source_key": key, "fps": 12.0})


def first_frame(sample: Sample) -> np.ndarray:
    """Frame 0 of the stored clip, BGR like cv2.imdecode's images."""
    return cv2.cvtColor(decode_clip_bytes(sample.clip)[0], cv2.COLOR_RGB2BGR)


def labelled_row(
    video_key: str, sample_key: str, round_id: str, when: datetime, caption: str = "a dog runs", teacher: str = "lk"
) -> dict:
    return {
        "video_key": video_key,
        "etag": "e-" + video_key,
        "size": 1000,
        "status": "labelled",
        "sample_key": sample_key,
        "teachers": [teacher],
        "round_id": round_id,
        "batch_id": "b1",
        "caption": caption,
        "created_at": when.isoformat(),
    }


def build_workspace(root: Path) -> dict:
    """Two rounds: r1 finished (summary.json), r2 running (config.json, `planned` events); shards, a run."""
    store = open_store(str(root))
    catalog = Catalog(store)
    sink = ShardSink(store, "r1", "b1", max_samples=2)
    previews = [
        ("videos/dog.mp4", "aaaaaaaaaaaa_00", "a dog runs"),
        (EVIL_KEY, "bbbbbbbbbbbb_00", EVIL_CAPTION),
        ("videos/cat.mp4", "cccccccccccc_00", "a cat jumps"),
    ]
    committed = []
    for i, (video, key, caption) in enumerate(previews):
        row = labelled_row(video, key, "r1", NOW - timedelta(minutes=30 - i), caption)
        committed += sink.add(scene_sample(i, key), row)
    committed += sink.close()
    catalog.append([r for c in committed for r in c.rows])
    rows = []
    for i in range(40):  # r1: more labelled videos spread over two hours, from other teachers
        rows.append(
            dict(
                labelled_row(
                    f"videos/r1-{i:03d}.mp4",
                    f"r1x{i:03d}_00",
                    "r1",
                    NOW - timedelta(minutes=150 - 3 * i),
                    teacher=("tapir", "cotracker2")[i % 2],
                ),
                shard_id="shards/r1/gone-000000.tar",
            )
        )  # a shard since deleted: no preview
    for i in range(5):
        rows.append(
            {
                "video_key": f"videos/bad-{i}.mp4",
                "etag": "x",
                "status": "failed",
                "stage": "decode",
                "reason": EVIL_REASON if i == 0 else "cannot decode",
                "round_id": "r1",
                "batch_id": "b1",
                "created_at": NOW - timedelta(minutes=100 - i),
            }
        )
    rows.append(
        {
            "video_key": "videos/nocap.mp4",
            "etag": "x",
            "status": "failed",
            "stage": "caption",
            "reason": "no caption",
            "round_id": "r1",
            "batch_id": "plan",
            "created_at": NOW - timedelta(hours=3),
        }
    )
    for i in range(7):
        rows.append(
            {
                "video_key": f"videos/cgi-{i}.mp4",
                "etag": "x",
                "status": "filtered",
                "filter_rule": "cgi" if i < 4 else "time-lapse",
                "caption": "a CGI render",
                "round_id": "r1",
                "batch_id": "plan",
                "created_at": NOW - timedelta(hours=3),
            }
        )
    for i in range(10):  # r2: 10 planned, 4 of them labelled since
        rows.append(
            {
                "video_key": f"videos/r2-{i}.mp4",
                "etag": "y",
                "status": "planned",
                "round_id": "r2",
                "batch_id": "plan",
                "created_at": NOW - timedelta(minutes=20),
            }
        )
    for i in range(4):
        rows.append(
            dict(
                labelled_row(f"videos/r2-{i}.mp4", f"r2x{i:03d}_00", "r2", NOW - timedelta(minutes=10 - i)),
                shard_id="shards/r2/b1-000000.tar",
            )
        )
    catalog.append(rows)
    summary = {"round_id": "r1", "planned": 48, "recovered": 0, "filtered": 7, "failed": 6, "labelled": 43,
               "stage_seconds": {"batch": 20.0, "teacher": 19.0, "cpu": 31.0, "wait": 0.5}}  # fmt: skip
    store.write_bytes("runs/r1/summary.json", json.dumps(summary).encode())
    store.write_bytes("runs/r1/config.json", json.dumps({"videos": 100}).encode())
    store.write_bytes("runs/r2/config.json", json.dumps({"videos": 20}).encode())
    metrics = [
        {
            "step": s,
            "total_steps": 200,
            "loss": 10.0 / (1 + s / 20) if s != 50 else math.nan,
            "lr": 5e-5 * (1 - s / 200),
            "grad_norm": 1.0,
            "clips_per_second": 3.5,
            "time": 0.0,
        }
        for s in range(10, 130, 10)
    ]
    store.write_bytes(
        "runs/student-a/metrics.jsonl", ("\n".join(json.dumps(m) for m in metrics) + '\n{"step": 13').encode()
    )
    report = {
        "train": {"steps": 120, "first_loss": 9.1, "final_loss": 1.4},
        "evaluation": {
            "trained": {"benchmark": "synthetic", "metrics": {"aj": 0.61, "delta_avg": 0.72, "oa": math.nan}},
            "initial": {"benchmark": "synthetic", "metrics": {"aj": 0.55, "delta_avg": 0.70}},
        },
    }
    store.write_bytes("reports/student-a.json", json.dumps(report).encode())
    return {"store": store, "shards": committed, "previews": previews, "metrics": metrics}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dash") / "ws"
    return root, build_workspace(root)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def served(workspace):
    root, built = workspace
    board = dash.Dashboard(str(root), refresh_s=1.0)
    server, thread, url = dash.start_in_thread(board)
    try:
        yield board, url, root, built
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def request(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    parts = urllib.request.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path or "/", headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- plain functions


def test_collect_matches_what_was_written(workspace):
    root, built = workspace
    store = open_store(str(root))
    data = views.collect(store, Catalog(store), views.FileCache())
    rounds = {r["round_id"]: r for r in data["rounds"]}
    assert rounds["r1"]["labelled"] == 43 and rounds["r1"]["filtered"] == 7 and rounds["r1"]["failed"] == 6
    # summary.json: 48 planned to label; 43 labelled + 5 decode failures done -> finished
    assert (rounds["r1"]["planned"], rounds["r1"]["planned_source"]) == (48, "summary.json")
    assert rounds["r1"]["progress"] == 1.0
    assert rounds["r1"]["expected"] == 48 + 7 + 1  # the caption failure and filtered videos come at planning
    # r2: the catalog's `planned` events are live: 6 waiting + 4 labelled of 10
    assert (rounds["r2"]["planned"], rounds["r2"]["planned_source"], rounds["r2"]["waiting"]) == (10, "catalog", 6)
    assert rounds["r2"]["progress"] == pytest.approx(0.4)
    assert [r["round_id"] for r in data["rounds"]] == ["r2", "r1"]  # most recently active first
    assert rounds["r1"]["videos_per_hour"] > 0
    assert data["teachers"] == {"lk": 7, "cotracker2": 20, "tapir": 20}
    assert data["reasons"] == {"decode: cannot decode": 4, f"decode: {EVIL_REASON}": 1, "caption: no caption": 1}
    assert data["filter_rules"] == {"cgi": 4, "time-lapse": 3}
    assert data["totals"]["by_status"] == {"labelled": 47, "filtered": 7, "failed": 6, "planned": 6}
    shards = data["shards"]
    assert shards["count"] == len(built["shards"]) == 2
    assert shards["bytes"] == sum(c.num_bytes for c in built["shards"])
    assert sum(shards["histogram"]) == 2 and shards["rounds"]["r1"]["samples"] == 3
    # the training log's half-written last line is ignored
    (run,) = data["training"]
    assert run["run"] == "student-a" and run["steps"] == [float(m["step"]) for m in built["metrics"]]
    assert run["last"]["step"] == 120 and run["loss"][4] is None  # the NaN step: a gap in strict JSON
    assert data["students"][0]["metrics"]["trained"] == {"aj": 0.61, "delta_avg": 0.72}  # NaN dropped
    # newest first, and only from committed shards (r2's rows and the 40 others point at missing shards)
    assert [p["sample_key"] for p in data["previews"]] == ["cccccccccccc_00", "bbbbbbbbbbbb_00", "aaaaaaaaaaaa_00"]
    assert data["recent_failures"][0]["video_key"] == "videos/bad-4.mp4"
    # videos/hour: the buckets' rates times their running time add back up to the labelled and failed
    # videos of each round (caption failures excluded), as the rounds table counts them
    tp = data["throughput"]
    hours = [r / 3600 for r in tp["running_seconds"]]
    assert round(sum(v * h for v, h in zip(tp["series"]["labelled"], hours, strict=True))) == 47
    assert round(sum(v * h for v, h in zip(tp["series"]["failed"], hours, strict=True))) == 5
    assert sum(r["finished"] for r in data["rounds"]) == 52
    json.dumps(data, allow_nan=False)  # the API serves it as strict JSON


def test_throughput_per_round_says_what_bounds_it(workspace, tmp_path):
    """r1's summary.json: teacher 19 of 20 batch seconds -> 95% busy, bound by the teacher, 43 / 20 clips/s;
    r2 is running (no summary.json); a round whose teacher idled is bound by the CPU."""
    root, _ = workspace
    store = open_store(str(root))
    data = views.collect(store, Catalog(store), views.FileCache())
    (row,) = data["pipeline"]["rows"]
    assert row["round_id"] == "r1" and row["bound_by"] == "teacher"
    assert row["teacher_busy"] == pytest.approx(0.95) and row["clips_per_s"] == pytest.approx(43 / 20)
    html = dash.render_page(data, str(root), 5.0)
    table = html[html.index('<table id="pipeline">') :]
    table = table[: table.index("</table>")]
    assert "r1" in table and "95%" in table and "2.15" in table and ">teacher<" in table
    cpu = {"summary": {"labelled": 10, "stage_seconds": {"batch": 10.0, "teacher": 4.0}}}
    rows = views.pipeline_rows({"r3": cpu, "r4": {"summary": {"planned": 5}}, "r5": {"config": {}}})["rows"]
    assert [(r["round_id"], r["bound_by"], r["teacher_busy"], r["clips_per_s"]) for r in rows] == [
        ("r3", "cpu", 0.4, 1.0)
    ]


def test_catalog_read_state_and_labelled_sample(tmp_path):
    """The catalog queries the dashboard uses: one read, three views of it, and a sample's video."""
    catalog = Catalog(open_store(str(tmp_path)))
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    catalog.append(
        [
            {**labelled_row("a.mp4", "a1_00", "r1", t0), "shard_id": "s1"},
            {"video_key": "b.mp4", "etag": "e", "status": "failed", "reason": "x", "round_id": "r1", "created_at": t0},
            {**labelled_row("a.mp4", "a2_00", "r2", t0 + timedelta(hours=1)), "shard_id": "s2"},
            {**labelled_row("b.mp4", "b2_00", "r2", t0 + timedelta(hours=2)), "shard_id": "s2"},
        ]
    )
    state = catalog.read_state(["status", "sample_key"])
    assert state.events.num_rows == 4 and "caption" not in state.events.column_names
    assert {r["video_key"]: r["sample_key"] for r in state.latest.to_pylist()} == {"a.mp4": "a2_00", "b.mp4": "b2_00"}
    per_round = {(r["round_id"], r["video_key"]): r["status"] for r in state.latest_in_rounds.to_pylist()}
    assert per_round == {
        ("r1", "a.mp4"): "labelled",
        ("r1", "b.mp4"): "failed",
        ("r2", "a.mp4"): "labelled",
        ("r2", "b.mp4"): "labelled",
    }
    assert state.round_spans == {"r1": (t0, t0), "r2": (t0 + timedelta(hours=1), t0 + timedelta(hours=2))}
    assert catalog.labelled_sample("a2_00")["shard_id"] == "s2"
    assert catalog.labelled_sample("a1_00") is None  # relabelled since: no longer the catalog's answer
    assert catalog.labelled_sample("zz_00") is None


def assert_same_counts_as_catalog_summary(data: dict, catalog: Catalog) -> None:
    """The dashboard counts on integer codes for speed; its answers must be the catalog's own."""
    summary = catalog.summary()
    assert data["totals"]["by_status"] == summary["by_status"]
    assert data["totals"]["videos"] == summary["videos"]
    assert data["teachers"] == summary["by_teacher"]
    assert data["reasons"] == summary["by_reason"]
    assert data["filter_rules"] == summary["by_filter_rule"]
    ours = {
        r["round_id"]: {
            "labelled": r["labelled"],
            "filtered": r["filtered"],
            "failed": r["failed"],
            "planned": r["waiting"],
        }
        for r in data["rounds"]
    }
    theirs = {
        name: {s: counts.get(s, 0) for s in ("labelled", "filtered", "failed", "planned")}
        for name, counts in summary["rounds"].items()
    }
    assert ours == theirs


def test_counts_agree_with_catalog_summary(workspace):
    root, _ = workspace
    store = open_store(str(root))
    catalog = Catalog(store)
    assert_same_counts_as_catalog_summary(views.collect(store, catalog, views.FileCache()), catalog)


def test_empty_workspace_renders(tmp_path):
    board = dash.Dashboard(str(tmp_path))
    page = board.page()
    for text in (
        "No rounds in the catalog yet",
        "no labelling throughput yet",
        "No labelled samples yet",
        "No committed shards yet",
        "No training runs yet",
        "No failures",
    ):
        assert text in page
    assert board.summary()["totals"] == {"videos": 0, "events": 0, "by_status": {}, "shards": 0}


def test_fingerprint_changes_only_with_data(workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(workspace[0], root)
    board = dash.Dashboard(str(root))
    first, again = board.summary(), board.summary()
    assert first["fingerprint"] == again["fingerprint"]
    board.page()
    drawn = board._drawn
    assert board.page() and board._drawn is drawn  # the same data: the charts are not drawn again
    Catalog(open_store(str(root))).append(
        [
            {
                "video_key": "videos/new.mp4",
                "etag": "n",
                "status": "failed",
                "stage": "teacher",
                "reason": "out of memory",
                "round_id": "r2",
            }
        ]
    )
    after = board.summary()  # the same Dashboard re-reads the catalog on every request
    assert after["fingerprint"] != first["fingerprint"]
    assert "teacher: out of memory" in board.page() and board._drawn[0] == after["fingerprint"]
    assert after["reasons"]["teacher: out of memory"] == 1


def test_unreadable_files_are_named_not_fatal(workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(workspace[0], root)
    (root / "shards/r1/broken-000000.tar.json").write_text("{not json")
    (root / "reports/student-b.json").write_text("[1, 2]")  # JSON, but not a report: ignored
    (root / "runs/r1/summary.json").write_bytes(b"\xff\xfe")
    board = dash.Dashboard(str(root))
    for _ in range(2):  # parsed once, still reported on the next refresh
        data = board.summary()
        assert [e.split(":")[0] for e in data["errors"]] == [
            "cannot read shards/r1/broken-000000.tar.json",
            "cannot read runs/r1/summary.json",
        ]
        assert data["shards"]["count"] == 2 and [s["name"] for s in data["students"]] == ["a"]
        r1 = next(r for r in data["rounds"] if r["round_id"] == "r1")
        assert r1["planned_source"] == "config.json (at most)" and r1["planned"] == 100
    assert 'class="error"' in board.page()


def test_throughput_bucket_width():
    assert views.bucket_width(30 * 60) == 60
    assert views.bucket_width(10 * 3600) == 900
    assert views.bucket_width(30 * 86400) == 12 * 3600 and views.bucket_width(60 * 86400) == 86400
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    times = [t0 + timedelta(seconds=s) for s in (0, 10, 20, 70, 3000)]
    table = pa.table(
        {
            "status": ["labelled", "labelled", "failed", "labelled", "labelled"],
            "created_at": pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    out = views.throughput(table, {"r": (times[0], times[-1])})
    assert out["bucket_seconds"] == 60 and out["start"] == int(t0.timestamp())
    assert out["series"]["labelled"][:2] == [120.0, 60.0]  # 2 and 1 videos in a minute the round ran throughout
    assert out["series"]["failed"][0] == 60.0 and len(out["series"]["labelled"]) == 51
    assert out["running_seconds"][:2] == [60.0, 60.0] and out["running_seconds"][-1] == 0.0


def test_videos_per_hour_is_one_figure_in_table_and_chart(tmp_path):
    """Issue 18: a round that ran 83 s showed 4.34k/h in the table and 540/h in the chart (15 min buckets).

    Both now use views.videos_per_hour over the time a round was running: the chart's buckets,
    weighted by their running time, give the table's figure, whatever the bucket width.
    """
    catalog = Catalog(open_store(str(tmp_path)))
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    old = [
        {**labelled_row(f"old/{i}.mp4", f"old{i:03d}_00", "old", t0 + timedelta(minutes=i)), "shard_id": "s"}
        for i in range(0, 600, 20)
    ]  # an earlier round over ten hours: the chart's buckets are 15 minutes wide
    start = t0 + timedelta(hours=11, minutes=3, seconds=20)
    fast = [{**labelled_row("new/plan.mp4", "x", "fast", start), "status": "filtered", "filter_rule": "cgi"}]
    fast += [
        {
            **labelled_row(f"new/{i}.mp4", f"new{i:03d}_00", "fast", start + timedelta(seconds=1 + i * 0.82)),
            "shard_id": "s",
        }
        for i in range(100)
    ]
    catalog.append(old + fast)
    data = views.collect(catalog.store, catalog, views.FileCache())
    fast_row = next(r for r in data["rounds"] if r["round_id"] == "fast")
    running = 1 + 99 * 0.82  # seconds from the round's first event (planning) to its last
    assert fast_row["videos_per_hour"] == views.videos_per_hour(100, running) == pytest.approx(4380.6, abs=0.1)
    tp = data["throughput"]
    assert tp["bucket_seconds"] == 900
    first = (int(start.timestamp()) - tp["start"]) // 900  # the fast round lies in one or two buckets
    buckets = [i for i in range(first, first + 2) if i < len(tp["running_seconds"]) and tp["running_seconds"][i] > 0]
    seconds = sum(tp["running_seconds"][i] for i in buckets)
    assert seconds == pytest.approx(running)
    weighted = sum(tp["series"]["labelled"][i] * tp["running_seconds"][i] for i in buckets) / seconds
    assert weighted == pytest.approx(fast_row["videos_per_hour"], rel=1e-3)
    # and the page says what the figure means, beside the table and the chart
    page = dash.render_page(data, "ws", 0)
    assert page.count(views.VIDEOS_PER_HOUR) >= 2


def test_running_seconds_counts_overlapping_rounds_once():
    spans = [(0.0, 100.0), (50.0, 150.0), (300.0, 400.0)]
    assert views.running_seconds(spans, 0, 1000) == 250.0
    assert views.running_seconds(spans, 120, 350) == 80.0
    assert views.videos_per_hour(10, 0) is None and views.videos_per_hour(10, 1800) == 20.0


def test_metric_columns_sort_by_threshold_and_keep_oa(tmp_path):
    """Issue 18: columns sorted as text (jaccard_1, jaccard_16, jaccard_2) and left OA out."""
    names = ["jaccard_16", "jaccard_2", "pts_within_4", "occlusion_accuracy", "jaccard_1", "pts_within_1"]
    names += ["average_pts_within_thresh", "average_jaccard", "jaccard_8", "jaccard_4"]
    students = [{"metrics": {"trained": {n: 0.5 for n in names}, "initial": {"jaccard_1": 0.4}}}]
    students.append({"metrics": {"trained": {"aj": 0.7, "oa": 0.9}}})  # short names share the long names' columns
    columns = views.metric_columns(students)
    assert [c["names"][0] for c in columns] == [
        "average_jaccard",
        "average_pts_within_thresh",
        "occlusion_accuracy",
        "jaccard_1",
        "jaccard_2",
        "jaccard_4",
        "jaccard_8",
        "jaccard_16",
        "pts_within_1",
        "pts_within_4",
    ]
    assert [c["label"] for c in columns[:5]] == ["AJ", "δ_avg", "OA", "J@1", "J@2"]
    assert columns[0]["names"] == ["average_jaccard", "aj"] and views.metric_value({"aj": 0.7}, columns[0]) == 0.7
    # and the page shows them in that order, OA included
    data = {**views.collect(*(lambda s: (s, Catalog(s)))(open_store(str(tmp_path))), views.FileCache())}
    data.update(students=[{"name": "s", "steps": 1.0, "first_loss": 2.0, "final_loss": 1.0, **students[0]}])
    data["metric_columns"] = columns
    page = dash.render_page(data, "ws", 0)
    headings = re.findall(r'<th class="metric"[^>]*>([^<]*)</th>', page)
    assert headings[:8] == ["AJ", "δ_avg", "OA", "J@1", "J@2", "J@4", "J@8", "J@16"]


def test_display_uri_and_redact(monkeypatch):
    assert dash.display_uri("s3://AKIA:pw@bucket/a/b?X-Amz-Signature=abc#frag") == "s3://bucket/a/b"
    assert dash.display_uri("https://user:pass@host:9000/path?token=t") == "https://host:9000/path"
    assert dash.display_uri("/data/ws") == "/data/ws"
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    raw = "s3://bob:hunter22@bucket/x?sig=zzz"
    text = dash.redact(f"failed: {raw} and again s3://bob:hunter22@bucket/y; env {SECRET}; bucket bob:hunter22@b", raw)
    assert "hunter22" not in text and "zzz" not in text and SECRET not in text
    assert "s3://bucket/x" in text


def test_charts_escape_labels_and_drop_bad_points():
    svg = charts.hbar_chart({"<b>x</b> costs $5 and $6": 3, "plain": 1}, "things")
    assert svg.startswith("<svg") and 'class="chart"' in svg
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt; costs $5 and $6" in svg  # escaped, and no mathtext
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "plain" in texts and " 3 (75%)" in texts
    assert charts.fold_items({f"r{i}": i + 1 for i in range(30)}, 5)[-1] == ("(26 others)", sum(range(1, 27)))
    many = charts.hbar_chart({f"r{i}": i + 1 for i in range(30)}, "reasons", max_items=5)
    assert "(26 others)" in many and "r29" in many and "r25" not in many
    line = charts.line_chart([1, 2, 3, 4, 5], [1.0, float("nan"), 3.0, float("inf"), None], "loss")
    (path,) = re.findall(r'<path d="([^"]+)"[^>]*style="fill: none; stroke: #3b6fd4', line)
    assert path.count("L") == 1 and "nan" not in line.lower()  # two finite points, one segment
    assert charts.line_chart([], [], "loss") is None and charts.line_chart([1], [float("nan")], "loss") is None
    # several charts share one page: their element ids must not collide
    ids = re.findall(r'id="([^"]+)"', line + many)
    assert len(ids) == len(set(ids))
    assert charts.fmt_bytes(3 * 1024 * 1024) == "3.0 MB" and charts.fmt_count(12500) == "12.5k"
    segments = charts.stacked_bar([("labelled", 3), ("failed", 1), ("filtered", 0)], total=8, width=240)
    assert [(s["name"], s["x"], s["width"]) for s in segments] == [("labelled", 0.0, 90.0), ("failed", 90.0, 30.0)]


def test_page_html_escapes_data(workspace):
    root, _ = workspace
    board = dash.Dashboard(str(root))
    page = board.page()
    assert "<script>document.title" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page
    assert "videos/&lt;i&gt;odd&lt;/i&gt; name.mp4" in page
    assert page.count("<script") == 1  # ours, loaded from /dashboard.js


# --------------------------------------------------------------------------- the server


def test_server_is_read_only_and_local(served):
    board, url, root, _ = served
    assert url.startswith("http://127.0.0.1:")
    before = snapshot(root)
    status, headers, body = request(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="rounds"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = request(url, "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"):
        status, headers, _ = request(url + "api/summary", method)
        assert status == 405, method
        assert headers["Allow"] == "GET, HEAD"
    assert request(url + "nothing-here")[0] == 404
    assert request(url + "preview/..%2F..%2Fetc.png")[0] == 404
    assert request(url + "preview/zzzzzzzz_00.png")[0] == 404
    assert request(url + "preview/r1x000_00.png")[0] == 404  # catalogued, but its shard is gone
    assert request(url, headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    assert request(url, headers={"Host": "localhost"})[0] == 200
    status, headers, body = request(url + "api/summary")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["totals"]["videos"] == 66
    assert snapshot(root) == before  # nothing was written


def test_default_bind_is_loopback():
    import inspect

    assert inspect.signature(dash.make_server).parameters["host"].default == "127.0.0.1"
    from pseudotrack.cli.dashboard import dashboard_command  # the command lives in cli/; it calls dash.serve

    for function in (dashboard_command, dash.serve):
        params = inspect.signature(function).parameters
        assert params["host"].default == "127.0.0.1" and params["port"].default == 8765
        assert params["refresh"].default == 10.0


def test_serve_says_which_port_is_busy(tmp_path):
    import socket

    from pseudotrack.cli.dashboard import dashboard_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            dash.serve(str(tmp_path), port=port)
    message = str(info.value)
    assert "\n" not in message and f"port {port}" in message and "--port" in message
    app = typer.Typer()
    app.command()(dashboard_command)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["--workspace", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2 and f"port {port}" in " ".join(result.output.split())


def test_preview_png_draws_tracks_and_is_cached(served):
    board, url, root, built = served
    key = built["previews"][0][1]
    status, headers, png = request(url + f"preview/{key}.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (480, 960, 3)  # six frames, three a row, enlarged from 192x256 and fit to 960 wide
    # issue 18: tracks clearly visible over frames barely dimmed. The same preview drawn with no tracks
    # is the background: tracks are where the two differ, in bright saturated colours, a few pixels wide
    sample = scene_sample(0, key)
    shard_id = Catalog(open_store(str(root))).labelled_sample(key)["shard_id"]
    bare = cv2.imdecode(
        np.frombuffer(previews.render_preview(open_store(str(root)), shard_id, key, "lk", 0), np.uint8), 1
    )
    drawn = np.abs(image[:240, :320].astype(int) - bare[:240, :320]).max(axis=-1) > 60
    tile = cv2.cvtColor(image[:240, :320], cv2.COLOR_BGR2HSV)
    bright = drawn & (tile[..., 1] >= 200) & (tile[..., 2] >= 200)
    points = sample.labels["lk"].tracks[0][sample.labels["lk"].visibility[0]] * (320 / 256)
    inside = [(round(y), round(x)) for x, y in points if 2 <= x < 318 and 2 <= y < 238]
    hits = [bright[y - 1 : y + 2, x - 1 : x + 2].all() for y, x in inside]  # a filled dot, not a pixel
    assert len(inside) > 20 and np.mean(hits) > 0.9, np.mean(hits)
    assert drawn.sum() > 25 * len(inside) and drawn.mean() < 0.5  # dots of several pixels, the frame still shows
    original = cv2.resize(first_frame(sample), (320, 240))
    assert bare[:240, :320].mean() > 0.8 * original.mean()  # not dimmed much (it was 0.7 of the brightness)
    assert request(url + f"preview/{key}.png")[2] == png
    assert len(board._pngs) == 1  # served from the cache, not rendered twice


def test_no_credentials_in_page_or_json(s3_uri, monkeypatch):
    # distinctive credentials the test S3 server accepts (SeaweedFS checks signatures, so they must be real)
    from seaweedfs import LEAK_ACCESS_KEY, LEAK_SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LEAK_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LEAK_SECRET_KEY)
    uri = s3_uri + "?X-Amz-Signature=SIGSECRET123"  # S3 takes it as part of the prefix; we must not show it
    Catalog(open_store(uri)).append(
        [
            {
                "video_key": "v.mp4",
                "etag": "e",
                "status": "failed",
                "stage": "decode",
                "reason": "cannot decode",
                "round_id": "r1",
            }
        ]
    )
    bad = "s3://someone:hunter2pass@" + s3_uri[len("s3://") :]
    with pytest.raises(ConfigError) as refused:  # credentials in a URI are refused, without repeating them
        dash.Dashboard(bad)
    assert "hunter2pass" not in str(refused.value) and "someone" not in str(refused.value)
    missing = s3_uri.replace("s3://pt-", "s3://pt-missing-") + "?X-Amz-Signature=SIGSECRET123"  # every request fails
    for workspace_uri, expect in ((uri, 200), (missing, 503)):
        server, thread, url = dash.start_in_thread(dash.Dashboard(workspace_uri))
        try:
            for path in ("", "api/summary"):
                status, _, body = request(url + path)
                text = body.decode()
                assert status == expect, text
                for secret in (LEAK_SECRET_KEY, LEAK_ACCESS_KEY, "SIGSECRET123", "hunter2pass", "someone:"):
                    assert secret not in text, (path, secret)
            if expect == 200:
                assert dash.display_uri(uri) in text or json.loads(body)["workspace"] == s3_uri
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_command_reports_a_missing_workspace(tmp_path):
    from pseudotrack.cli.dashboard import dashboard_command

    app = typer.Typer()
    app.command()(dashboard_command)
    result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "nope"), "--port", "0"])
    assert result.exit_code == 2
    assert "no such directory" in " ".join(result.output.split())  # rich wraps long lines
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "--refresh" in help_text and "--host" in help_text


# --------------------------------------------------------------------------- scale


def write_big_catalog(root: Path, videos: int = 100_000, files: int = 50, repeat: float = 0.2) -> None:
    """100k videos in `files` event files, written column-wise (rows_to_table's checks cost seconds here)."""
    rng = np.random.default_rng(0)
    retried = np.flatnonzero(rng.random(videos) < repeat)
    ids = np.concatenate([np.arange(videos), retried])
    n = len(ids)
    first = np.arange(n) >= videos  # the extra events are earlier failures of retried videos
    status = np.where(first, "failed", rng.choice(["labelled", "filtered", "failed"], size=n, p=[0.8, 0.12, 0.08]))
    t0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1e6)
    created = t0 + ids * 1_000_000 - first * 3_600_000_000
    teachers = np.array(["cotracker3_online", "cotracker3_offline", "cotracker2", "tapir"])[ids % 4]
    labelled = status == "labelled"
    failed = status == "failed"
    keys = np.char.add(np.char.add("bucket/folder/video_", ids.astype(str)), ".mp4")
    columns = {
        "event_id": np.char.add("ev", np.arange(n).astype(str)),
        "video_key": keys,
        "etag": ids.astype(str),
        "size": ids * 10,
        "caption": np.where(labelled, "a person walks a dog", None),
        "filter_rule": np.where(status == "filtered", np.array(["cgi", "water", "sky"])[ids % 3], None),
        "teachers": [[t] if ok else None for t, ok in zip(teachers.tolist(), labelled.tolist(), strict=True)],
        "shard_id": np.where(labelled, np.char.add("shards/r/b-", (ids // 256).astype(str)), None),
        "sample_key": np.where(labelled, np.char.add(ids.astype(str), "_00"), None),
        "status": status,
        "stage": np.where(failed, "queries", None),
        "reason": np.where(failed, np.array(["too few features", "cannot decode", "timeout"])[ids % 3], None),
        "round_id": np.array(["round-a", "round-b", "round-c"])[ids % 3],
        "batch_id": (ids // 500).astype(str),
        "created_at": created,
    }
    arrays = []
    for field in SCHEMA:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif field.name == "created_at":
            arrays.append(pa.array(value, pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(value.tolist() if isinstance(value, np.ndarray) else value, field.type))
    table = pa.Table.from_arrays(arrays, schema=SCHEMA).take(rng.permutation(n))
    folder = root / EVENTS
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(table.take(part), folder / f"2026010{i:04d}-big{SUFFIX}", compression="zstd")


def test_catalog_views_at_100k_videos_match_the_catalog(tmp_path):
    """Correctness at scale; the timings are measured by bench/bench_catalog.py, not asserted here."""
    write_big_catalog(tmp_path)
    board = dash.Dashboard(str(tmp_path))
    cold = board.summary()
    page = board.page()
    # while a round runs each refresh finds a new event file: the catalog reads it and merges again
    Catalog(str(tmp_path)).append(
        [
            {
                "video_key": "bucket/new.mp4",
                "etag": "n",
                "status": "failed",
                "stage": "decode",
                "reason": "cannot decode",
                "round_id": "round-a",
            }
        ]
    )
    data = board.summary()
    assert data["totals"]["videos"] == 100_001 and cold["fingerprint"] != data["fingerprint"]
    assert sum(r["labelled"] + r["filtered"] + r["failed"] for r in data["rounds"]) == 100_001
    assert data["previews"] == [] and "round-a" in page  # no committed shards in this catalog
    assert_same_counts_as_catalog_summary(data, board.catalog)


# --------------------------------------------------------------------------- a real browser


class DomIndex(HTMLParser):
    """Elements of a DOM dump with their attributes and text, enough to check what a browser built."""

    VOID = {"img", "meta", "link", "br", "hr", "input", "source", "rect", "line", "path", "circle"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": [e["tag"] for e in self._open]}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append({"tag": tag, "attrs": dict(attrs), "text": "", "parents": []})

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, cls: str | None = None, id_: str | None = None) -> list[dict]:
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag)
            and (cls is None or cls in e["attrs"].get("class", "").split())
            and (id_ is None or e["attrs"].get("id") == id_)
        ]


def test_page_in_headless_chromium(served, tmp_path):
    try:
        browser.chromium()
    except browser.BrowserMissing as exc:
        pytest.fail(str(exc))
    board, url, _, _ = served
    dom = DomIndex()
    dom.feed(browser.dump_dom(url, budget_ms=2500))
    assert dom.find("title")[0]["text"].startswith("pseudotrack")  # the caption's script never ran
    (rounds,) = dom.find("table", id_="rounds")
    round_ids = [e["text"] for e in dom.find("td", cls="key") if "table" in e["parents"]][:2]
    assert round_ids == ["r2", "r1"] and "43" in rounds["text"]
    assert len(dom.find("svg", cls="chart")) >= 5 and len(dom.find("svg", cls="bar")) == 2
    assert any("student-a" in e["text"] for e in dom.find("h3"))
    images = [e for e in dom.find("img") if e["attrs"].get("src", "").startswith("preview/")]
    assert len(images) == 3
    # the caption is text: same characters as written, no element made of it
    assert EVIL_CAPTION in [e["text"] for e in dom.find("div", cls="caption")]
    assert not [e for e in dom.elements if "onerror" in e["attrs"]]
    assert [e["attrs"].get("src") for e in dom.find("script")] == ["dashboard.js"]
    assert not [e for e in dom.find("b") if "figcaption" in e["parents"]]
    assert any(e["text"] == EVIL_REASON for e in dom.find("td", cls="reason"))
    # the script polled /api/summary, found no change and said so
    assert dom.find(id_="live")[0]["text"].startswith("no change since")
    png = browser.screenshot(url, tmp_path / "dashboard.png", budget_ms=2500)
    image = cv2.imread(str(png))
    assert image.shape[:2] == (2000, 1280) and image.std() > 20
    assert board._pngs, "the browser loaded no preview image"
    shutil.copy(png, "/tmp/dashboard.png")


def test_api_summary_is_strict_json(served):
    _, url, _, _ = served

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    with urllib.request.urlopen(url + "api/summary", timeout=30) as response:
        data = json.loads(response.read(), parse_constant=refuse)
    assert data["workspace"] and data["refresh_seconds"] == 1.0 and len(data["fingerprint"]) == 16
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url + "api/summary", data=b"x", method="POST"), timeout=30)
    assert info.value.code == 405
