"""The dashboard: its numbers, its safety (read-only, escaped, no credentials), its speed, and a real browser.

The workspace is built directly (catalog rows, shards of synthetic scenes with their exact tracks as
labels, a training log, a round summary), so every figure the page shows can be checked against
what was written.
"""

from __future__ import annotations

import http.client
import json
import math
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
from pseudotrack.dashboard import charts
from pseudotrack.errors import ConfigError
from pseudotrack.storage.catalog import EVENTS, SCHEMA, SUFFIX, Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks.decode import encode_clip
from pseudotrack.tasks.shards import Sample, ShardSink
from pseudotrack.teachers.base import TeacherOutput

EVIL_CAPTION = '<script>document.title="pwned"</script> a dog & "cat" <b>bold</b> <img src=x onerror=alert(1)>'
EVIL_KEY = "videos/<i>odd</i> name.mp4"
EVIL_REASON = "decoder said <img src=x onerror=alert(2)>"
SECRET = "dashboard-test-secret-9f3a7c"
NOW = datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- building a workspace


def scene_sample(seed: int, key: str) -> Sample:
    scene = render_scene(seed, num_frames=16, height=192, width=256, num_points=48)
    tracks = np.ascontiguousarray(scene.tracks.transpose(1, 0, 2)).astype(np.float32)  # [T, N, 2]
    visibility = np.ascontiguousarray(~scene.occluded.T)
    label = TeacherOutput(tracks, visibility, np.ones(visibility.shape, np.float16))
    queries = np.column_stack([np.zeros(len(tracks[0])), tracks[0]]).astype(np.float32)
    return Sample(key, encode_clip(scene.frames, 12.0), queries, {"lk": label}, {"source_key": key, "fps": 12.0})


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
    summary = {"round_id": "r1", "planned": 48, "recovered": 0, "filtered": 7, "failed": 6, "labelled": 43}
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
    data = dash.collect(store, Catalog(store), dash.FileCache())
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
    # videos/hour: the buckets' rates add back up to the labelled and failed events (caption failures excluded)
    tp = data["throughput"]
    hours = tp["bucket_seconds"] / 3600
    assert round(sum(tp["series"]["labelled"]) * hours) == 47
    assert round(sum(tp["series"]["failed"]) * hours) == 5
    json.dumps(data, allow_nan=False)  # the API serves it as strict JSON


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
    assert_same_counts_as_catalog_summary(dash.collect(store, catalog, dash.FileCache()), catalog)


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
    assert dash.bucket_width(30 * 60) == 60
    assert dash.bucket_width(10 * 3600) == 900
    assert dash.bucket_width(30 * 86400) == 12 * 3600 and dash.bucket_width(60 * 86400) == 86400
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    times = [t0 + timedelta(seconds=s) for s in (0, 10, 20, 70, 3000)]
    table = pa.table(
        {
            "round_id": ["r"] * 5,
            "status": ["labelled", "labelled", "failed", "labelled", "labelled"],
            "created_at": pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    out = dash.throughput(table)
    assert out["bucket_seconds"] == 60 and out["start"] == int(t0.timestamp())
    assert out["series"]["labelled"][:2] == [120.0, 60.0]  # 2 and 1 videos in a minute
    assert out["series"]["failed"][0] == 60.0 and len(out["series"]["labelled"]) == 51


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
    svg = charts.hbar_chart({"<b>x</b>": 3, "plain": 1}, "things")
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg and svg.startswith("<svg")
    many = charts.hbar_chart({f"r{i}": i + 1 for i in range(30)}, "reasons", max_items=5)
    assert "(26 others)" in many and many.count("<rect") == 5
    line = charts.line_chart([1, 2, 3, 4, 5], [1.0, float("nan"), 3.0, float("inf"), None], "loss")
    assert line.count("L") >= 1 and "nan" not in line.lower().replace("aria", "")
    assert "no loss points yet" in charts.line_chart([], [], "loss")
    assert charts.nice_ticks(0, 87) == [0, 20, 40, 60, 80, 100]
    assert charts.fmt_bytes(3 * 1024 * 1024) == "3.0 MB" and charts.fmt_count(12500) == "12.5k"


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
    params = inspect.signature(dash.dashboard_command).parameters
    assert params["host"].default == "127.0.0.1" and params["port"].default == 8765


def test_preview_png_draws_tracks_and_is_cached(served):
    board, url, _, built = served
    key = built["previews"][0][1]
    status, headers, png = request(url + f"preview/{key}.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (480, 960, 3)  # six frames, three a row, enlarged from 192x256 and fit to 960 wide
    # the tracks are drawn: where the first frame's visible points are, the tile shows a saturated dot;
    # elsewhere the dimmed frame rarely is that saturated
    sample = scene_sample(0, key)
    tile = cv2.cvtColor(image[:240, :320], cv2.COLOR_BGR2HSV)
    lit = (tile[..., 1] >= 120) & (tile[..., 2] >= 150)
    points = sample.labels["lk"].tracks[0][sample.labels["lk"].visibility[0]] * (320 / 256)
    inside = [(round(y), round(x)) for x, y in points if 1 <= x < 319 and 1 <= y < 239]
    hits = [lit[y - 1 : y + 2, x - 1 : x + 2].any() for y, x in inside]
    assert len(inside) > 20 and np.mean(hits) > 0.8, np.mean(hits)
    assert lit.mean() < 0.1
    assert request(url + f"preview/{key}.png")[2] == png
    assert len(board._pngs) == 1  # served from the cache, not rendered twice


def test_no_credentials_in_page_or_json(s3_uri, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-session")
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
                for secret in (SECRET, "SIGSECRET123", "hunter2pass", "someone:"):
                    assert secret not in text, (path, secret)
            if expect == 200:
                assert dash.display_uri(uri) in text or json.loads(body)["workspace"] == s3_uri
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_command_reports_a_missing_workspace(tmp_path):
    app = typer.Typer()
    app.command()(dash.dashboard_command)
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
