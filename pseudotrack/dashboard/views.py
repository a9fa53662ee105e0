"""What each part of the dashboard shows, as plain JSON-able data computed from the catalog and the workspace's files.

Why apart from the server and the templates: these figures are the page's claims
(how many videos, how fast, which teachers), so they are computed in one place,
tested against what was written, and served unchanged as /api/summary. The
catalog's own queries (latest state per video and per round) live in
storage/catalog.py; this module only aggregates what they return.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage.base import ObjectInfo, ObjectStore
from ..storage.catalog import Catalog, CatalogState
from ..storage.layout import REPORTS, RUNS, SHARDS, is_manifest

METRICS_FILE = "metrics.jsonl"  # student/train.py's METRICS_NAME; not imported to keep torch out of this module
PREVIEWS = 6
RECENT_FAILURES = 12
MAX_CURVE_POINTS = 400
BUCKET_WIDTHS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 72
PLANNING_STAGES = ("discover", "caption")  # failures recorded when a round is planned, not labelled
FINISHED = ("labelled", "failed")
CATALOG_COLUMNS = (
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
    "quality_mean",
    "quality_low_fraction",
)
VIDEOS_PER_HOUR = (
    "videos/hour = videos finished (labelled + failed by the labelling stage) "
    "/ hours a round was running (from its first to its last catalog event)"
)
# TAP-Vid's summary figures first, as papers report them (both the evaluator's names and short ones)
SUMMARY_METRICS = {
    "average_jaccard": "AJ",
    "aj": "AJ",
    "average_pts_within_thresh": "δ_avg",
    "delta_avg": "δ_avg",
    "occlusion_accuracy": "OA",
    "oa": "OA",
}
THRESHOLD_METRIC = re.compile(r"^(?P<family>.*?)_?(?P<threshold>\d+(?:\.\d+)?)$")
METRIC_FAMILIES = {"jaccard": "J", "pts_within": "δ"}


# --------------------------------------------------------------------------- the one definition of speed


def videos_per_hour(finished: float, running_s: float) -> float | None:
    """The dashboard's only definition of speed, used by the rounds table and the chart alike.

    `finished`: videos the labelling stage finished (labelled or failed; planning verdicts
    excluded); `running_s`: seconds a round was running (its first to its last catalog event).
    Without running time there is no rate (one event, or none), not an infinite one.
    """
    if running_s <= 0:
        return None
    return round(float(finished) * 3600.0 / running_s, 1)


def running_seconds(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds within [lo, hi] during which at least one of the rounds' spans (seconds) was running."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi)
    total, end = 0.0, -math.inf
    for a, b in clipped:  # union of intervals: overlapping rounds count their shared time once
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def bucket_width(span_s: float) -> int:
    """The smallest round bucket (1 min .. 1 week) that keeps the chart under MAX_BUCKETS columns."""
    return next((w for w in BUCKET_WIDTHS if span_s / w < MAX_BUCKETS), BUCKET_WIDTHS[-1])


def _seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """created_at as float seconds since the epoch (nulls never occur: the catalog fills them)."""
    return pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False) / 1e6


def finished_rows(latest_in_rounds: pa.Table) -> pa.Table:
    """Each round's latest event per video, where the labelling stage finished the video.

    The rows both the table's and the chart's videos/hour count, so their totals agree.
    """
    if latest_in_rounds.num_rows == 0:
        return latest_in_rounds
    planning = pc.fill_null(pc.is_in(latest_in_rounds["stage"], pa.array(PLANNING_STAGES)), False)
    keep = pc.and_(pc.is_in(latest_in_rounds["status"], pa.array(FINISHED)), pc.invert(planning))
    return latest_in_rounds.filter(keep)


def throughput(finished: pa.Table, spans: dict[str, tuple[datetime, datetime]]) -> dict:
    """Videos/hour over time, by status: per bucket, its finished videos over its running time.

    A bucket's running time is the part of it during which some round was running, so a round
    alone in its buckets shows the rate the rounds table gives it (the time-weighted mean of its
    buckets is that figure), whatever the bucket width.
    """
    if finished.num_rows == 0:
        return {"start": None, "bucket_seconds": 0, "series": {}, "running_seconds": []}
    when = _seconds(finished["created_at"])
    spans_s = [(a.timestamp(), b.timestamp()) for a, b in spans.values()]
    lo = min(min(a for a, _ in spans_s), float(when.min()))
    hi = max(max(b for _, b in spans_s), float(when.max()))
    width = bucket_width(hi - lo)
    start = int(lo // width * width)
    index = ((when - start) // width).astype(np.int64)
    length = int(max(index.max(), (hi - start) // width)) + 1
    running = [running_seconds(spans_s, start + i * width, start + (i + 1) * width) for i in range(length)]
    status = finished["status"].to_numpy(zero_copy_only=False)
    series = {}
    for name in FINISHED:
        counts = np.bincount(index[status == name], minlength=length)
        series[name] = [videos_per_hour(c, r) or 0.0 for c, r in zip(counts.tolist(), running, strict=True)]
    return {
        "start": start,
        "bucket_seconds": width,
        "series": series,
        "running_seconds": [round(r, 3) for r in running],
    }


# --------------------------------------------------------------------------- the catalog's part


def count_values(values: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """value -> count, most frequent first, nulls as '(none)' (as Catalog.summary counts)."""
    if len(values) == 0:
        return {}
    vc = pc.value_counts(values)
    pairs = zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
    return dict(sorted(((v if v is not None else "(none)", c) for v, c in pairs), key=lambda kv: (-kv[1], kv[0])))


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value is not None else None


def round_rows(state: CatalogState, plans: dict[str, dict]) -> list[dict]:
    """One row per round: the latest state of each video within the round, planned size, speed, last activity."""
    per_round = state.latest_in_rounds
    if per_round.num_rows == 0:
        return []
    names = pc.fill_null(per_round["round_id"], "(none)").to_pylist()
    statuses = per_round["status"].to_pylist()
    planning = pc.fill_null(pc.is_in(per_round["stage"], pa.array(PLANNING_STAGES)), False).to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for name, status, at_planning in zip(names, statuses, planning, strict=True):
        # a failure at discovery or the caption stage is a planning verdict, not a video the labelling stage finished
        kind = "failed_planning" if status == "failed" and at_planning else status
        entry = counts.setdefault(name, {})
        entry[kind] = entry.get(kind, 0) + 1
    rows = []
    for name in sorted(counts, key=lambda n: state.round_spans[n][1], reverse=True):
        c = counts[name]
        first, last = state.round_spans[name]
        labelled, failed_labelling = c.get("labelled", 0), c.get("failed", 0)
        processed = labelled + failed_labelling
        planned, source = plan_size(c, plans.get(name, {}), processed)
        rows.append(
            {
                "round_id": name,
                "labelled": labelled,
                "filtered": c.get("filtered", 0),
                "failed": failed_labelling + c.get("failed_planning", 0),
                "waiting": c.get("planned", 0),
                "planned": planned,
                "planned_source": source,
                # the bar's whole: what the round will have recorded once done (caption verdicts come at planning)
                "expected": planned + c.get("filtered", 0) + c.get("failed_planning", 0)
                if planned is not None
                else None,
                "progress": min(1.0, processed / planned) if planned else None,
                "finished": processed,
                "running_seconds": (last - first).total_seconds(),
                "videos_per_hour": videos_per_hour(processed, (last - first).total_seconds()),
                "last_event": _iso(last),
            }
        )
    return rows


def plan_size(counts: dict[str, int], plan: dict, processed: int) -> tuple[int | None, str]:
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


def catalog_views(state: CatalogState, plans: dict[str, dict], shards: list[str] | None = None) -> dict:
    """The catalog's part of the page: counts like Catalog.summary's, per-round rows, throughput, newest rows.

    Previews come from `shards` only (committed ones) when given, so no preview points at a missing file.
    """
    latest = state.latest
    status = latest["status"]
    labelled = latest.filter(pc.equal(status, "labelled"))
    failed = latest.filter(pc.equal(status, "failed"))
    filtered = latest.filter(pc.equal(status, "filtered"))
    reasons = pc.coalesce(pc.binary_join_element_wise(failed["stage"], failed["reason"], ": "), failed["reason"])
    viewable = (
        labelled
        if shards is None
        else labelled.filter(pc.fill_null(pc.is_in(labelled["shard_id"], pa.array(shards, pa.string())), False))
    )
    return {
        "totals": {"videos": latest.num_rows, "events": state.events.num_rows, "by_status": count_values(status)},
        "rounds": round_rows(state, plans),
        "throughput": throughput(finished_rows(state.latest_in_rounds), state.round_spans),
        "videos_per_hour_definition": VIDEOS_PER_HOUR,
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


def label_quality_views(state: CatalogState, plans: dict[str, dict]) -> dict:
    """The label-quality section: per round, score histograms per teacher, the worst samples (with
    previews), and the teachers' calibration from the round's summary.json. Newest round first."""
    from ..tasks.quality_report import calibration_of, histogram_edges, round_quality

    per_round = round_quality(state.latest_in_rounds)
    rounds = []
    for name in sorted(per_round.keys() | plans.keys(), key=lambda n: state.round_spans.get(n, (None, _EPOCH))[1]):
        entry = per_round.get(name, {"scored": 0, "unknown": 0, "filtered": 0, "teachers": {}, "worst": []})
        calibration = calibration_of(plans.get(name, {}).get("summary"))
        if not (entry["scored"] or entry["unknown"] or entry["filtered"] or calibration):
            continue
        rounds.append({"round_id": name, **entry, "calibration": calibration})
    return {"edges": histogram_edges(), "rounds": rounds[::-1]}


_EPOCH = datetime.min.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- the workspace's files


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


def _finite(value: Any) -> float | None:
    """A number the strict JSON of /api/summary can carry (NaN and infinities become None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


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


def metric_order(name: str) -> tuple:
    """AJ, δ_avg, OA first; then each per-threshold family by its threshold as a number (1, 2, 4, 8, 16)."""
    if name in SUMMARY_METRICS:
        return (0, list(dict.fromkeys(SUMMARY_METRICS.values())).index(SUMMARY_METRICS[name]), "", 0.0)
    match = THRESHOLD_METRIC.match(name)
    if match:
        return (1, 0, match["family"], float(match["threshold"]))
    return (2, 0, name, 0.0)


def metric_label(name: str) -> str:
    """A short column heading (the full name goes in its tooltip)."""
    if name in SUMMARY_METRICS:
        return SUMMARY_METRICS[name]
    match = THRESHOLD_METRIC.match(name)
    if match and match["family"] in METRIC_FAMILIES:
        return f"{METRIC_FAMILIES[match['family']]}@{match['threshold']}"
    return name


def metric_columns(students: list[dict]) -> list[dict]:
    """One column per metric any student report has, in metric_order, with its heading.

    A metric under both its evaluator name and a short one (average_jaccard, aj) is one column;
    `names` lists the spellings to look up, preferred first.
    """
    names = {m for s in students for ev in s["metrics"].values() for m in ev}
    columns: dict[str, dict] = {}
    for name in sorted(names, key=lambda n: (metric_order(n), -len(n), n)):  # the evaluator's long name first
        label = metric_label(name)
        columns.setdefault(label, {"label": label, "names": []})["names"].append(name)
    return list(columns.values())


def metric_value(metrics: dict[str, float], column: dict) -> float | None:
    """The column's figure in one evaluation's metrics, under whichever spelling it has."""
    return next((metrics[n] for n in column["names"] if n in metrics), None)


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


# --------------------------------------------------------------------------- labelling throughput


def pipeline_rows(plans: dict[str, dict]) -> dict:
    """Per round with batch time recorded: teacher busy fraction, clips/s and "bound by" (cpu or teacher).

    From runs/<round>/summary.json's summed stage seconds (`tasks.throughput.round_throughput`), as
    `pseudotrack status` shows them; rounds still running have none yet.
    """
    from ..tasks.throughput import TEACHER_BOUND, round_throughput

    rows = []
    for name, plan in sorted(plans.items()):
        figures = round_throughput(plan.get("summary"))
        if figures:
            rows.append({"round_id": name, **{k: _finite(v) if k != "bound_by" else v for k, v in figures.items()}})
    return {"rows": rows, "teacher_bound": TEACHER_BOUND}


# --------------------------------------------------------------------------- everything


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

    state = catalog.read_state(CATALOG_COLUMNS)
    data = catalog_views(state, plans, [m["shard"] for m in manifests if m.get("shard")])
    data["totals"]["shards"] = len(manifests)
    data["pipeline"] = pipeline_rows(plans)
    data["quality"] = label_quality_views(state, plans)
    students = student_reports(store, report_infos, cache)
    data.update(
        shards=shard_stats(manifests),
        training=training_runs(store, run_infos, cache),
        students=students,
        metric_columns=metric_columns(students),
        errors=list(cache.errors),
    )
    # the page's script reloads when this changes: a hash of the data, not of the clock
    data["fingerprint"] = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    data["query_ms"] = round(1000 * (time.perf_counter() - started), 1)
    data["generated_at"] = _iso(datetime.now(UTC))
    return data
