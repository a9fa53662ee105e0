"""`pseudotrack dashboard`: a read-only web page over a workspace's catalog, shards and training runs.

Why a page of our own beside Prefect's UI: Prefect shows flow runs, but the
questions a person asks while 100,000 videos are labelled are about the data:
how far each round is, how fast, which teachers labelled what, why videos fail,
what the caption filter drops, how big shards are, whether the student's loss
goes down, and whether the pseudo-tracks look right. All of that is in the
workspace already; this module only reads it.

Why the standard library's `http.server`: no web framework to install or keep
patched, and the page is a few server-rendered views. It binds 127.0.0.1 by
default, answers GET and HEAD only (every other method gets 405), and no
endpoint writes anything. Everything that comes from data (captions, keys,
reasons, round ids) is HTML-escaped, and a Content-Security-Policy allows only
our own script, so a caption with markup is shown as text. URIs are shown
without user:password@ or query strings, and no environment value is shown.

Each request re-reads the catalog: `Catalog` caches the Parquet files it has
read (they never change), so a refresh costs one listing plus the new files,
and the queries are pyarrow compute over the cached table (under a second at
100,000 videos; see tests/test_dashboard.py).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from ..storage.base import ObjectInfo, ObjectStore
from ..storage.catalog import Catalog
from ..storage.layout import REPORTS, RUNS, SHARDS, is_manifest, is_sample_key
from ..storage.uri import open_store
from . import charts

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # student/train.py's METRICS_NAME; not imported to keep torch out of this module
PREVIEWS = 6
RECENT_FAILURES = 12
MAX_CURVE_POINTS = 400
PREVIEW_CACHE = 64
PREVIEW_WIDTH = 960
PREVIEW_MIN_HEIGHT = 288
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE", re.IGNORECASE)
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
BUCKET_WIDTHS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 72
PLANNING_STAGES = pa.array(["discover", "caption"])  # failures recorded when a round is planned, not labelled


# --------------------------------------------------------------------------- hiding credentials


def display_uri(uri: str) -> str:
    """The URI without user:password@ and without ?query or #fragment (presigned tokens live there)."""
    text = os.fspath(uri)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", text, re.DOTALL)
    if not match:
        return re.split(r"[?#]", text, maxsplit=1)[0]
    scheme, authority, rest = match.groups()
    return f"{scheme}://{authority.rpartition('@')[2]}{re.split(r'[?#]', rest, maxsplit=1)[0]}"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they hold a secret (long enough to be one)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, raw_uri: str | None = None) -> str:
    """Scrub a message (an exception's text, say) of credentials before a browser sees it."""
    if raw_uri:
        text = text.replace(raw_uri, display_uri(raw_uri))
        userinfo = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", raw_uri)
        if userinfo:  # libraries quote pieces of the URI (boto: the "bucket" name) in their messages
            for piece in sorted({userinfo.group(1), *userinfo.group(1).split(":")}, key=len, reverse=True):
                if piece:
                    text = text.replace(piece + "@", "").replace(piece, "***")
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]*@", r"\1", text)
    text = re.sub(r"(://[^\s'\"]*?)\?[^\s'\"]*", r"\1", text)
    for value in secret_values():
        text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- reading the workspace


class FileCache:
    """Parsed small files keyed by object key and ETag: a refresh re-parses only what changed."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, Any, str | None]] = {}  # key -> (etag, parsed, why it failed)
        self.errors: list[str] = []  # this refresh's unreadable files, for the page to name

    def get(self, store: ObjectStore, info: ObjectInfo, parse: Callable[[bytes], Any]) -> Any:
        """The parsed file, or None when it vanished or cannot be parsed (one bad file must not hide the page)."""
        entry = self._entries.get(info.key)
        if entry is None or entry[0] != info.etag:
            try:
                entry = (info.etag, parse(store.read_bytes(info.key)), None)
            except FileNotFoundError:
                return None  # replaced or removed since the listing; the next refresh sees the new state
            except Exception as exc:
                entry = (info.etag, None, f"cannot read {info.key}: {type(exc).__name__}: {exc}")
            self._entries[info.key] = entry
        if entry[2] is not None:
            self.errors.append(entry[2])
        return entry[1]

    def keep_only(self, keys: set[str]) -> None:
        for stale in set(self._entries) - keys:
            del self._entries[stale]


def _manifest_facts(data: bytes) -> dict:
    # manifests carry every sample's catalog row; keep only what the page shows
    manifest = json.loads(data)
    return {k: manifest.get(k) for k in ("shard", "round_id", "count", "bytes", "teachers", "created_at")}


def _metrics_rows(data: bytes) -> list[dict]:
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    return rows


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value is not None else None


def _micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """created_at as int64 microseconds since the epoch (nulls never occur: the catalog fills them)."""
    return pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)


def bucket_width(span_s: float) -> int:
    """The smallest round bucket (1 min .. 1 week) that keeps the chart under MAX_BUCKETS columns."""
    return next((w for w in BUCKET_WIDTHS if span_s / w < MAX_BUCKETS), BUCKET_WIDTHS[-1])


def throughput(work: pa.Table) -> dict:
    """Videos per hour over time, by status, from the events' created_at."""
    if work.num_rows == 0:
        return {"start": None, "bucket_seconds": 0, "series": {}}
    micros = _micros(work["created_at"])
    lo, hi = int(micros.min()), int(micros.max())
    width = bucket_width((hi - lo) / 1e6)
    start = lo // (width * 1_000_000) * width
    index = (micros // 1_000_000 - start) // width
    length = int(index.max()) + 1
    status = work["status"].to_numpy(zero_copy_only=False)
    series = {}
    for name in ("labelled", "failed"):
        counts = np.bincount(index[status == name], minlength=length)
        series[name] = [round(float(c) * 3600 / width, 1) for c in counts]
    return {"start": start, "bucket_seconds": width, "series": series}


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Integer codes and their values: grouping on ints is several times faster than sorting strings."""
    encoded = pc.dictionary_encode(pc.fill_null(column, "(none)")).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def latest_indices(events: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the latest event per video, and per (round, video), with the catalog's order (created_at, event_id).

    One sort serves both: within a video sorted newest first, the first row of each round is that
    round's latest. Same answer as catalog.latest_by, but on integer codes (a third of its time).
    """
    if events.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    video, _ = _codes(events["video_key"])
    rounds, names = _codes(events["round_id"])
    order = pc.sort_indices(
        pa.table({"v": video, "t": events["created_at"], "e": events["event_id"]}),
        sort_keys=[("v", "ascending"), ("t", "descending"), ("e", "descending")],
    ).to_numpy()
    sorted_video = video[order]
    latest = order[np.r_[True, sorted_video[1:] != sorted_video[:-1]]]
    _, first = np.unique(sorted_video * len(names) + rounds[order], return_index=True)
    return latest, order[first]


def count_values(values: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """value -> count, most frequent first, nulls as '(none)' (as Catalog.summary counts)."""
    if len(values) == 0:
        return {}
    vc = pc.value_counts(values)
    pairs = zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
    return dict(sorted(((v if v is not None else "(none)", c) for v, c in pairs), key=lambda kv: (-kv[1], kv[0])))


def round_rows(events: pa.Table, per_round: np.ndarray, is_work: np.ndarray, plans: dict[str, dict]) -> list[dict]:
    """One row per round: latest state of each video within the round, planned size, speed, last activity."""
    if events.num_rows == 0:
        return []
    rounds, names = _codes(events["round_id"])
    states, state_names = _codes(events["status"])
    caption = pc.fill_null(pc.is_in(events["stage"], PLANNING_STAGES), False).to_numpy(zero_copy_only=False)
    # a failure at discovery or the caption stage is a planning verdict, not a video the labelling stage finished
    failed_code = state_names.index("failed") if "failed" in state_names else -1
    kind = np.where(caption & (states == failed_code), len(state_names), states)
    width = len(state_names) + 1
    table = np.bincount(rounds[per_round] * width + kind[per_round], minlength=len(names) * width)
    table = table.reshape(len(names), width)
    micros = _micros(events["created_at"])
    last = np.full(len(names), np.iinfo(np.int64).min)
    np.maximum.at(last, rounds, micros)
    # speed: from the round's first event (planning records its verdicts at the start) to its last labelling
    lo = np.full(len(names), np.iinfo(np.int64).max)
    hi = np.full(len(names), np.iinfo(np.int64).min)
    np.minimum.at(lo, rounds, micros)
    np.maximum.at(hi, rounds[is_work], micros[is_work])
    rows = []
    for r in np.argsort(-last, kind="stable"):
        c = {state_names[i]: int(table[r, i]) for i in range(len(state_names)) if table[r, i]}
        failed_caption = int(table[r, -1])
        if not c and not failed_caption:
            continue
        name = names[r]
        labelled, failed_labelling = c.get("labelled", 0), c.get("failed", 0)
        processed = labelled + failed_labelling  # videos the labelling stage has finished
        planned, source = plan_size(name, c, plans.get(name, {}), processed)
        hours = (hi[r] - lo[r]) / 3.6e9 if hi[r] > lo[r] else 0.0
        rows.append(
            {
                "round_id": name,
                "labelled": labelled,
                "filtered": c.get("filtered", 0),
                "failed": failed_labelling + failed_caption,
                "waiting": c.get("planned", 0),
                "planned": planned,
                "planned_source": source,
                # the bar's whole: what the round will have recorded once done (caption verdicts come at planning)
                "expected": planned + c.get("filtered", 0) + failed_caption if planned is not None else None,
                "progress": min(1.0, processed / planned) if planned else None,
                "videos_per_hour": round(float(processed / hours), 1) if hours > 0 else None,
                "last_event": _iso(datetime.fromtimestamp(int(last[r]) / 1e6, UTC)),
            }
        )
    return rows


def plan_size(round_id: str, counts: dict[str, int], plan: dict, processed: int) -> tuple[int | None, str]:
    """How many videos the round set out to label, and where that figure comes from.

    `planned` events in the catalog are live; runs/<round>/summary.json is exact once the
    round wrote it; config.json's `videos` is only an upper bound (it counts reused videos).
    """
    if counts.get("planned"):
        return counts["planned"] + processed, "catalog"
    summary = plan.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("planned"), int):
        return summary["planned"] + summary.get("recovered", 0), "summary.json"
    config = plan.get("config")
    if isinstance(config, dict) and isinstance(config.get("videos"), int):
        return config["videos"], "config.json (at most)"
    return None, ""


def shard_stats(manifests: list[dict]) -> dict:
    sizes = np.array([m.get("bytes") or 0 for m in manifests], dtype=np.float64)
    per_round: dict[str, dict] = {}
    for m in manifests:
        entry = per_round.setdefault(str(m.get("round_id") or "(none)"), {"shards": 0, "bytes": 0, "samples": 0})
        entry["shards"] += 1
        entry["bytes"] += int(m.get("bytes") or 0)
        entry["samples"] += int(m.get("count") or 0)
    out: dict[str, Any] = {
        "count": len(manifests),
        "bytes": int(sizes.sum()),
        "rounds": per_round,
        "edges": [],
        "histogram": [],
    }
    if len(sizes):
        lo, hi = float(sizes.min()), float(sizes.max())
        bins = max(1, min(20, len(sizes)))
        if hi <= lo:
            hi = lo + 1
        counts, edges = np.histogram(sizes, bins=bins, range=(lo, hi))
        out.update(
            edges=[float(e) for e in edges],
            histogram=[int(c) for c in counts],
            median=float(np.median(sizes)),
            min=lo,
            max=float(sizes.max()),
        )
    return out


def _finite(value: Any) -> float | None:
    """A number the strict JSON of /api/summary can carry (NaN and infinities become None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def training_runs(store: ObjectStore, infos: list[ObjectInfo], cache: FileCache) -> list[dict]:
    runs = []
    for info in infos:
        if not info.key.endswith("/" + METRICS_FILE):
            continue
        rows = cache.get(store, info, _metrics_rows)
        if not rows:
            continue
        stride = max(1, math.ceil(len(rows) / MAX_CURVE_POINTS))
        picked = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
        last = rows[-1]
        runs.append(
            {
                "run": info.key[len(RUNS) + 1 : -len(METRICS_FILE) - 1],
                "steps": [_finite(r["step"]) for r in picked],
                "loss": [_finite(r.get("loss")) for r in picked],  # a diverged step logs NaN: a gap, not an error
                "last": {
                    k: _finite(last.get(k)) for k in ("step", "total_steps", "loss", "lr", "clips_per_second", "time")
                },
            }
        )
    return runs


def student_reports(store: ObjectStore, infos: list[ObjectInfo], cache: FileCache) -> list[dict]:
    """Final figures of trained students (reports/student-*.json, written by flows/train_student.py)."""
    out = []
    for info in infos:
        name = info.key[len(REPORTS) + 1 :]
        if not (name.startswith("student-") and name.endswith(".json")):
            continue
        report = cache.get(store, info, json.loads)
        if not isinstance(report, dict):
            continue
        train = report.get("train") if isinstance(report.get("train"), dict) else {}
        evaluation = report.get("evaluation") if isinstance(report.get("evaluation"), dict) else {}
        metrics = {}
        for which, ev in evaluation.items():
            if isinstance(ev, dict) and isinstance(ev.get("metrics"), dict):
                metrics[which] = {k: _finite(v) for k, v in ev["metrics"].items() if _finite(v) is not None}
        out.append(
            {
                "name": name[len("student-") : -len(".json")],
                "steps": _finite(train.get("steps")),
                "first_loss": _finite(train.get("first_loss")),
                "final_loss": _finite(train.get("final_loss")),
                "metrics": metrics,
            }
        )
    return out


def _rows(table: pa.Table, columns: list[str]) -> list[dict]:
    rows = table.select(columns).to_pylist()
    for row in rows:
        if isinstance(row.get("created_at"), datetime):
            row["created_at"] = _iso(row["created_at"])
    return rows


def _newest(table: pa.Table, count: int) -> pa.Table:
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("created_at", "descending"), ("video_key", "ascending")])
    return table.take(order[:count])


def event_table(catalog: Catalog) -> pa.Table:
    """Every event, unsorted: the views aggregate, so sorting first would cost a quarter second at 100k."""
    return catalog.events(ordered=False)


def catalog_views(events: pa.Table, plans: dict[str, dict], shards: list[str] | None = None) -> dict:
    """The catalog's part of the page: counts like Catalog.summary's, per-round rows, throughput, newest rows.

    Previews come from `shards` only (committed ones) when given, so no preview points at a missing file.
    """
    latest_rows, per_round = latest_indices(events)
    latest = events.select(
        [
            "video_key",
            "status",
            "teachers",
            "stage",
            "reason",
            "filter_rule",
            "caption",
            "round_id",
            "created_at",
            "sample_key",
            "shard_id",
        ]
    ).take(latest_rows)
    status = latest["status"]
    labelled = latest.filter(pc.equal(status, "labelled"))
    failed = latest.filter(pc.equal(status, "failed"))
    filtered = latest.filter(pc.equal(status, "filtered"))
    reasons = pc.coalesce(pc.binary_join_element_wise(failed["stage"], failed["reason"], ": "), failed["reason"])
    is_work = pc.and_(
        pc.is_in(events["status"], pa.array(["labelled", "failed"])),
        pc.invert(pc.fill_null(pc.is_in(events["stage"], PLANNING_STAGES), False)),
    )
    work = events.filter(is_work).select(["status", "created_at"])
    viewable = (
        labelled
        if shards is None
        else labelled.filter(pc.fill_null(pc.is_in(labelled["shard_id"], pa.array(shards, pa.string())), False))
    )
    return {
        "totals": {"videos": latest.num_rows, "events": events.num_rows, "by_status": count_values(status)},
        "rounds": round_rows(events, per_round, is_work.to_numpy(zero_copy_only=False), plans),
        "throughput": throughput(work),
        "teachers": count_values(pc.list_flatten(labelled["teachers"])),
        "reasons": count_values(reasons),
        "filter_rules": count_values(filtered["filter_rule"]),
        "previews": _rows(
            _newest(viewable, PREVIEWS),
            ["sample_key", "video_key", "caption", "teachers", "round_id", "shard_id", "created_at"],
        ),
        "recent_failures": _rows(
            _newest(failed, RECENT_FAILURES), ["video_key", "stage", "reason", "round_id", "created_at"]
        ),
    }


def collect(store: ObjectStore, catalog: Catalog, cache: FileCache) -> dict:
    """Everything the page shows, as plain JSON-able data (also served as /api/summary)."""
    started = time.perf_counter()
    shard_infos = list(store.list(f"{SHARDS}/"))
    run_infos = list(store.list(f"{RUNS}/"))
    report_infos = list(store.list(f"{REPORTS}/", suffixes=(".json",)))
    cache.errors = []
    manifests = [m for m in (cache.get(store, i, _manifest_facts) for i in shard_infos if is_manifest(i.key)) if m]
    plans: dict[str, dict] = {}
    for info in run_infos:
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] in ("summary.json", "config.json"):
            plans.setdefault(parts[1], {})[parts[2][:-5]] = cache.get(store, info, json.loads)
    cache.keep_only({i.key for i in (*shard_infos, *run_infos, *report_infos)})

    data = catalog_views(event_table(catalog), plans, [m["shard"] for m in manifests if m.get("shard")])
    data["totals"]["shards"] = len(manifests)
    data.update(
        shards=shard_stats(manifests),
        training=training_runs(store, run_infos, cache),
        students=student_reports(store, report_infos, cache),
        errors=list(cache.errors),
    )
    # the page's script reloads when this changes: a hash of the data, not of the clock
    data["fingerprint"] = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data["query_ms"] = round(1000 * (time.perf_counter() - started), 1)
    data["generated_at"] = _iso(datetime.now(UTC))
    return data


# --------------------------------------------------------------------------- previews


def render_preview(
    store: ObjectStore,
    shard_id: str,
    sample_key: str,
    teacher: str | None = None,
    max_tracks: int = 64,
    width: int = PREVIEW_WIDTH,
) -> bytes:
    """A PNG grid of six frames with one teacher's pseudo-tracks drawn over them.

    Only the six shown frames are drawn (each with the few frames before it, for the trails).
    """
    import cv2

    from ..render import draw_tracks, frame_grid, shard_url
    from ..tasks.decode import decode_clip_bytes
    from ..tasks.shards import read_shard

    sample = next((s for s in read_shard(shard_url(store, shard_id)) if s["key"] == sample_key), None)
    if sample is None:
        raise LookupError(f"sample {sample_key} is not in shard {shard_id}")
    labels = sample["labels"]
    if not labels:
        raise LookupError(f"sample {sample_key} has no teacher labels")
    name = teacher if teacher in labels else sorted(labels)[0]
    frames = decode_clip_bytes(sample["mp4"])
    tracks, visibility = labels[name]["tracks"], labels[name]["visibility"]
    t_len = min(len(frames), len(tracks))
    scale = PREVIEW_MIN_HEIGHT / frames.shape[1]
    if scale > 1:  # small clips: enlarge first, so dots and trails are not a pixel wide on the page
        size = (round(frames.shape[2] * scale), round(frames.shape[1] * scale))
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames[:t_len]])
        tracks = (tracks + 0.5) * scale - 0.5
    # dimmed, half-desaturated frames: coloured tracks stand out on busy footage
    gray = frames.mean(axis=-1, keepdims=True)
    frames = (0.45 * frames + 0.25 * gray).astype(np.uint8)
    shown = np.linspace(0, t_len - 1, min(6, t_len)).round().astype(int)
    trail = 8
    drawn = np.stack(
        [
            draw_tracks(
                frames[max(0, t - trail) : t + 1],
                tracks[max(0, t - trail) : t + 1],
                visibility[max(0, t - trail) : t + 1],
                max_tracks,
                trail,
            )[-1]
            for t in shown
        ]
    )
    grid = frame_grid(drawn, count=len(drawn), columns=3)
    if grid.shape[1] > width:
        grid = cv2.resize(grid, (width, round(grid.shape[0] * width / grid.shape[1])), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


# --------------------------------------------------------------------------- the page


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return "–"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def _card(label: str, value: str, color: str = charts.INK) -> str:
    return f'<div class="card"><div class="num" style="color:{color}">{_e(value)}</div><div>{_e(label)}</div></div>'


def _rounds_table(rounds: list[dict], now: datetime) -> str:
    if not rounds:
        return '<p class="muted">No rounds in the catalog yet.</p>'
    head = (
        "<tr><th>round</th><th>progress</th><th>labelled</th><th>filtered</th><th>failed</th>"
        "<th>planned</th><th>videos/h</th><th>last event</th></tr>"
    )
    body = []
    for r in rounds:
        parts = [("labelled", r["labelled"]), ("failed", r["failed"]), ("filtered", r["filtered"])]
        planned = r["planned"]
        pct = f"{100 * r['progress']:.0f}%" if r["progress"] is not None else ""
        planned_cell = (
            (
                f'{planned:,}<span class="muted small" title="from {_e(r["planned_source"])}">'
                f"{' ≤' if 'most' in r['planned_source'] else ''}</span>"
            )
            if planned is not None
            else "–"
        )
        body.append(
            f'<tr class="round"><td class="key">{_e(r["round_id"])}</td>'
            f'<td class="progress">{charts.stacked_bar(parts, r["expected"])} <span class="small">{_e(pct)}</span></td>'
            f'<td class="n ok">{r["labelled"]:,}</td><td class="n warn">{r["filtered"]:,}</td>'
            f'<td class="n bad">{r["failed"]:,}</td><td class="n" title="{_e(r["planned_source"])}">{planned_cell}</td>'
            f'<td class="n">{_e(charts.fmt_count(r["videos_per_hour"]) if r["videos_per_hour"] else "–")}</td>'
            f'<td class="muted" title="{_e(r["last_event"])}">{_e(_ago(r["last_event"], now))}</td></tr>'
        )
    return f'<table id="rounds">{head}{"".join(body)}</table>'


def _failures_table(rows: list[dict], now: datetime) -> str:
    if not rows:
        return '<p class="muted">No failures.</p>'
    body = "".join(
        f'<tr><td class="key">{_e(r["video_key"])}</td><td>{_e(r["stage"] or "–")}</td>'
        f'<td class="reason">{_e(r["reason"])}</td><td class="key">{_e(r["round_id"])}</td>'
        f'<td class="muted">{_e(_ago(r["created_at"], now))}</td></tr>'
        for r in rows
    )
    head = "<tr><th>video</th><th>stage</th><th>reason</th><th>round</th><th></th></tr>"
    return f'<table id="failures">{head}{body}</table>'


def _previews(rows: list[dict]) -> str:
    if not rows:
        return '<p class="muted">No labelled samples yet.</p>'
    figures = []
    for r in rows:
        teachers = ", ".join(r.get("teachers") or [])
        figures.append(
            f'<figure class="preview"><img src="preview/{_e(r["sample_key"])}.png" loading="lazy" '
            f'alt="pseudo-tracks of {_e(r["video_key"])}">'
            f'<figcaption><div class="key">{_e(r["video_key"])}</div>'
            f'<div class="caption">{_e(r.get("caption") or "")}</div>'
            f'<div class="muted small">{_e(teachers)} · {_e(r["round_id"])}</div></figcaption></figure>'
        )
    return f'<div class="previews">{"".join(figures)}</div>'


def _training(runs: list[dict], students: list[dict]) -> str:
    parts = []
    if not runs and not students:
        return (
            '<p class="muted">No training runs yet (curves appear for every '
            f"<code>{RUNS}/&lt;run&gt;/{METRICS_FILE}</code> in the workspace).</p>"
        )
    if runs:
        cells = []
        for run in runs:
            last = run["last"]
            facts = [
                f"step {charts.fmt_count(last.get('step') or 0)}"
                + (f"/{charts.fmt_count(last['total_steps'])}" if last.get("total_steps") else "")
            ]
            if isinstance(last.get("loss"), int | float):
                facts.append(f"loss {last['loss']:.4g}")
            if isinstance(last.get("lr"), int | float):
                facts.append(f"lr {last['lr']:.2e}")
            if isinstance(last.get("clips_per_second"), int | float):
                facts.append(f"{last['clips_per_second']:.2f} clips/s")
            chart = charts.line_chart(run["steps"], run["loss"], f"loss of {run['run']}")
            cells.append(
                f'<div class="panel"><h3 class="key">{_e(run["run"])}</h3>{chart}'
                f'<div class="muted small">{_e(" · ".join(facts))}</div></div>'
            )
        parts.append(f'<div class="grid2">{"".join(cells)}</div>')
    if students:
        names = sorted({m for s in students for ev in s["metrics"].values() for m in ev})[:6]
        head = "<tr><th>student</th><th>steps</th><th>loss</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
        rows = []
        for s in students:
            trained = s["metrics"].get("trained", {})
            initial = s["metrics"].get("initial", {})
            loss = (
                f"{s['first_loss']:.3g} → {s['final_loss']:.3g}"
                if isinstance(s["first_loss"], int | float) and isinstance(s["final_loss"], int | float)
                else "–"
            )
            cells = "".join(
                f'<td class="n">{trained[n]:.3f}'
                + (f' <span class="muted small">(from {initial[n]:.3f})</span>' if n in initial else "")
                + "</td>"
                if n in trained
                else "<td>–</td>"
                for n in names
            )
            steps = f"{s['steps']:.0f}" if s["steps"] is not None else "–"
            rows.append(
                f'<tr><td class="key">{_e(s["name"])}</td><td class="n">{_e(steps)}</td>'
                f'<td class="n">{_e(loss)}</td>{cells}</tr>'
            )
        parts.append(f'<table id="students">{head}{"".join(rows)}</table>')
    return "".join(parts)


def _shards(shards: dict) -> str:
    if not shards["count"]:
        return '<p class="muted">No committed shards yet.</p>'
    chart = charts.histogram_chart(shards["edges"], shards["histogram"], "shard sizes")
    rows = "".join(
        f'<tr><td class="key">{_e(name)}</td><td class="n">{v["shards"]:,}</td><td class="n">{v["samples"]:,}</td>'
        f'<td class="n">{_e(charts.fmt_bytes(v["bytes"]))}</td></tr>'
        for name, v in sorted(shards["rounds"].items())
    )
    facts = (
        f"{shards['count']:,} shards, {charts.fmt_bytes(shards['bytes'])} in all; median "
        f"{charts.fmt_bytes(shards['median'])} (min {charts.fmt_bytes(shards['min'])}, "
        f"max {charts.fmt_bytes(shards['max'])})"
    )
    table = f"<table><tr><th>round</th><th>shards</th><th>samples</th><th>bytes</th></tr>{rows}</table>"
    return (
        f'<div class="grid2"><div class="panel">{chart}<div class="muted small">{_e(facts)}</div></div>'
        f'<div class="panel">{table}</div></div>'
    )


STYLE = """
body{margin:0;background:#f5f6f8;color:#1f2430;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
header{background:#1f2430;color:#fff;padding:14px 28px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header .where{font-family:ui-monospace,monospace;opacity:.85}
header .live{margin-left:auto;opacity:.7;font-size:12px}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px}
section{background:#fff;border:1px solid #e3e5ea;border-radius:8px;padding:14px 18px;margin:0 0 16px}
h2{font-size:15px;margin:0 0 10px}h3{font-size:13px;margin:0 0 6px;font-weight:600}
.cards{display:grid;grid-template-columns:repeat(6,1fr);gap:12px;margin-bottom:16px}
.card{background:#fff;border:1px solid #e3e5ea;border-radius:8px;padding:10px 14px;color:#6b7280}
.card .num{font-size:22px;font-weight:650}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0f3}
th{font-size:12px;color:#6b7280;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
th:nth-child(n+3),#students th:nth-child(2){text-align:right}
#rounds th:nth-child(2){text-align:left}#failures th{text-align:left}
.ok{color:#2e9d5b}.warn{color:#a87a0c}.bad{color:#d1495b}.muted{color:#6b7280}.small{font-size:12px}
.key{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
td.progress{white-space:nowrap}td.progress svg{vertical-align:middle}
.previews{display:grid;grid-template-columns:1fr 1fr;gap:16px}
figure.preview{margin:0;border:1px solid #e3e5ea;border-radius:6px;overflow:hidden;background:#fafbfc}
figure.preview img{display:block;width:100%;height:auto;background:#222;min-height:120px}
figcaption{padding:8px 10px}.caption{margin:2px 0;word-break:break-word}
.error{background:#fdecee;border-color:#f3b6bf;color:#8a1c2b}
footer{color:#6b7280;font-size:12px;text-align:center}
"""


def render_page(data: dict, workspace: str, refresh_s: float) -> str:
    """The whole page as one HTML string; `workspace` must already be display_uri()'d."""
    now = datetime.fromisoformat(data["generated_at"])
    by_status = data["totals"]["by_status"]
    throughput_data = data["throughput"]
    rate = (
        charts.rate_chart(
            throughput_data["start"],
            throughput_data["bucket_seconds"],
            throughput_data["series"],
            "labelling throughput",
        )
        if throughput_data["start"] is not None
        else charts.empty_chart("no labelling throughput yet", 1120)
    )
    width = throughput_data["bucket_seconds"]
    bucket = f", {width // 3600} h buckets" if width >= 3600 else f", {width // 60} min buckets" if width else ""
    refresh = f'<noscript><meta http-equiv="refresh" content="{int(refresh_s)}"></noscript>' if refresh_s > 0 else ""
    cards = "".join(
        [
            _card("videos", f"{data['totals']['videos']:,}"),
            _card("labelled", f"{by_status.get('labelled', 0):,}", charts.GREEN),
            _card("filtered", f"{by_status.get('filtered', 0):,}", charts.AMBER),
            _card("failed", f"{by_status.get('failed', 0):,}", charts.RED),
            _card("shards", f"{data['shards']['count']:,}"),
            _card("shard bytes", charts.fmt_bytes(data["shards"]["bytes"])),
        ]
    )
    errors = "".join(f'<section class="error">{_e(m)}</section>' for m in data.get("errors", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>pseudotrack · {_e(workspace)}</title>{refresh}<style>{STYLE}</style>
<script src="dashboard.js" defer></script></head>
<body data-refresh="{_e(refresh_s)}" data-fingerprint="{_e(data["fingerprint"])}">
<header><h1>pseudotrack</h1><span class="where" id="workspace">{_e(workspace)}</span>
<span class="live" id="live">updated {_e(now.strftime("%Y-%m-%d %H:%M:%S UTC"))}</span></header>
<main>{errors}
<div class="cards">{cards}</div>
<section><h2>Rounds</h2>{_rounds_table(data["rounds"], now)}</section>
<section><h2>Videos per hour <span class="muted small">(labelled and failed by the labelling stage{_e(bucket)})
</span></h2>{rate}</section>
<div class="grid2">
<section><h2>Teacher mix <span class="muted small">(labelled videos)</span></h2>
{charts.hbar_chart(data["teachers"], "teachers", charts.BLUE, width=540)}</section>
<section><h2>Caption filter <span class="muted small">(videos dropped, by rule)</span></h2>
{charts.hbar_chart(data["filter_rules"], "filtered videos", charts.AMBER, width=540)}</section>
</div>
<section><h2>Failure reasons <span class="muted small">(stage: reason)</span></h2>
{charts.hbar_chart(data["reasons"], "failures", charts.RED, width=1120, label_chars=80)}</section>
<section><h2>Pseudo-track previews <span class="muted small">(newest labelled samples)</span></h2>
{_previews(data["previews"])}</section>
<section><h2>Shards</h2>{_shards(data["shards"])}</section>
<section><h2>Training</h2>{_training(data["training"], data["students"])}</section>
<section><h2>Recent failures</h2>{_failures_table(data["recent_failures"], now)}</section>
<footer>read-only · {data["totals"]["events"]:,} catalog events · queries took {data["query_ms"]:.0f} ms</footer>
</main></body></html>"""


SCRIPT = """(function () {
  "use strict";
  var seconds = Number(document.body.dataset.refresh);
  var version = document.body.dataset.fingerprint;
  var live = document.getElementById("live");
  if (!(seconds > 0)) return;
  function poll() {
    fetch("api/summary", {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) {
        if (data.fingerprint !== version) { location.reload(); return; }
        live.textContent = "no change since " + new Date().toLocaleTimeString();
        setTimeout(poll, seconds * 1000);
      })
      .catch(function (err) {
        live.textContent = "cannot reach the dashboard server (" + err.message + ")";
        setTimeout(poll, seconds * 1000);
      });
  }
  setTimeout(poll, seconds * 1000);
})();
"""


# --------------------------------------------------------------------------- state shared by requests


class Dashboard:
    """The workspace, its catalog and the caches, shared by all requests of one server."""

    def __init__(self, workspace: str, refresh_s: float = 10.0):
        self._raw_uri = os.fspath(workspace)
        self.workspace = display_uri(self._raw_uri)
        self.refresh_s = refresh_s
        self.store = open_store(self._raw_uri)
        self.catalog = Catalog(self.store)
        self._files = FileCache()
        self._lock = threading.Lock()  # Catalog and FileCache are not thread-safe
        self._render_lock = threading.Lock()  # decoding clips is CPU-heavy: one at a time
        self._pngs: OrderedDict[str, bytes] = OrderedDict()
        self._samples: dict[str, tuple[str, str | None]] = {}  # sample key -> (shard, teacher) of shown previews

    def redact(self, text: str) -> str:
        return redact(text, self._raw_uri)

    def summary(self) -> dict:
        with self._lock:
            data = collect(self.store, self.catalog, self._files)
            data["errors"] = [self.redact(m) for m in data["errors"]]
            self._samples = {
                p["sample_key"]: (p["shard_id"], (p["teachers"] or [None])[0])
                for p in data["previews"]
                if p.get("shard_id")
            }
        data["workspace"] = self.workspace
        data["refresh_seconds"] = self.refresh_s
        return data

    def page(self) -> str:
        return render_page(self.summary(), self.workspace, self.refresh_s)

    def _locate(self, sample_key: str) -> tuple[str, str | None] | None:
        found = self._samples.get(sample_key)
        if found is not None:
            return found
        with self._lock:
            latest = self.catalog.latest()
            hit = latest.filter(
                pc.and_(pc.equal(latest["sample_key"], sample_key), pc.equal(latest["status"], "labelled"))
            )
        if hit.num_rows == 0 or not hit["shard_id"][0].as_py():
            return None
        teachers = hit["teachers"][0].as_py() or [None]
        return hit["shard_id"][0].as_py(), teachers[0]

    def preview(self, sample_key: str) -> bytes | None:
        """PNG bytes, or None when no labelled sample has this key. Cached: sample keys name fixed content."""
        if not is_sample_key(sample_key):
            return None
        located = self._locate(sample_key)
        if located is None:
            return None
        shard_id, teacher = located
        cache_key = f"{shard_id}#{sample_key}#{teacher}"
        with self._render_lock:
            png = self._pngs.get(cache_key)
            if png is None:
                png = render_preview(self.store, shard_id, sample_key, teacher)
                self._pngs[cache_key] = png
                while len(self._pngs) > PREVIEW_CACHE:
                    self._pngs.popitem(last=False)
            else:
                self._pngs.move_to_end(cache_key)
        return png


# --------------------------------------------------------------------------- HTTP


class DashboardHandler(BaseHTTPRequestHandler):
    """GET and HEAD only; every route reads, none writes."""

    dashboard: Dashboard  # set on the subclass make_server builds
    allowed_hosts: frozenset[str] | None = None  # None: any Host header (bound to a non-loopback address)
    server_version = "pseudotrack-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; any method but GET/HEAD is refused the same way
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request's body (if any) is left unread
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"method not allowed: this dashboard is read-only\n",
            "text/plain; charset=utf-8",
            head=False,
            extra={"Allow": "GET, HEAD"},
        )

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def _host_ok(self) -> bool:
        """Refuse foreign Host headers on a loopback server: a DNS-rebinding page cannot read the catalog."""
        if self.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        return name in self.allowed_hosts

    def _serve(self, head: bool) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.FORBIDDEN, b"unexpected Host header\n", "text/plain; charset=utf-8", head)
            return
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send_text(HTTPStatus.OK, self.dashboard.page(), "text/html; charset=utf-8", head)
            elif path == "/api/summary":
                body = json.dumps(self.dashboard.summary(), default=str, allow_nan=False)
                self._send_text(HTTPStatus.OK, body, "application/json", head)
            elif path == "/dashboard.js":
                self._send(
                    HTTPStatus.OK,
                    SCRIPT.encode(),
                    "text/javascript; charset=utf-8",
                    head,
                    extra={"Cache-Control": "max-age=60"},
                )
            elif path.startswith("/preview/") and path.endswith(".png"):
                try:
                    png = self.dashboard.preview(path[len("/preview/") : -len(".png")])
                except (LookupError, FileNotFoundError):  # the catalog names a sample its shard lacks
                    png = None
                if png is None:
                    self._send(
                        HTTPStatus.NOT_FOUND, b"no labelled sample with this key\n", "text/plain; charset=utf-8", head
                    )
                else:
                    self._send(HTTPStatus.OK, png, "image/png", head, extra={"Cache-Control": "max-age=3600"})
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a workspace that cannot be read: say why, without credentials
            message = self.dashboard.redact(f"{type(exc).__name__}: {exc}")
            log.warning("dashboard request %s failed: %s", path, message)
            self._send_text(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the dashboard cannot read the workspace: {message}\n",
                "text/plain; charset=utf-8",
                head,
            )

    def _send_text(self, status: HTTPStatus, text: str, content_type: str, head: bool) -> None:
        for value in secret_values():  # a last line of defence; data never holds environment values
            text = text.replace(value, "***")
        self._send(status, text.encode("utf-8"), content_type, head)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, head: bool, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
            **(extra or {}),
        }
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def make_server(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A threaded server bound to host:port (port 0: a free one; read it from server.server_address)."""
    loopback = host in LOOPBACK or host.startswith("127.")
    handler = type(
        "Handler",
        (DashboardHandler,),
        {
            "dashboard": dashboard,
            "allowed_hosts": frozenset(LOOPBACK | {host}) if loopback else None,
        },
    )
    server_class = ThreadingHTTPServer
    if ":" in host:
        import socket

        server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server


def start_in_thread(
    dashboard: Dashboard, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    """Serve in a daemon thread (tests, notebooks); returns (server, thread, base URL). Stop with shutdown()."""
    server = make_server(dashboard, host, port)
    thread = threading.Thread(target=server.serve_forever, name="pseudotrack-dashboard", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, thread, f"http://{shown}:{bound_port}/"


def dashboard_command(
    workspace: Annotated[str, typer.Option(help="The workspace to show (local directory or s3://...).")],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind. The page has no login: keep 127.0.0.1 unless the "
            "network is trusted (or use an SSH tunnel)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    refresh: Annotated[float, typer.Option(help="Seconds between the page's checks for new data (0: never).")] = 10.0,
) -> None:
    """Serve a read-only page over the workspace: rounds, throughput, teachers, failures, shards, training, previews."""
    from rich.console import Console

    from ..errors import ConfigError

    console = Console(stderr=True)
    try:
        dashboard = Dashboard(workspace, refresh_s=max(0.0, refresh))
        dashboard.store.check_readable()
        server = make_server(dashboard, host, port)
    except (ConfigError, OSError) as exc:
        console.print(f"[bold red]error:[/] {redact(str(exc), workspace)}", highlight=False)
        raise typer.Exit(2) from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    console.print(
        f"dashboard of {dashboard.workspace} at http://{shown}:{bound_port}/ (Ctrl-C stops it)", highlight=False
    )
    if not (host in LOOPBACK or host.startswith("127.")):
        console.print(
            f"[yellow]warning:[/] bound to {host}: anyone who can reach this port can read the catalog", highlight=False
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
