"""Label quality as a person reads it: per round, the score distribution per teacher, the worst samples,
and the teachers' calibration, for `pseudotrack status` and the dashboard.

Read from the catalog's quality columns (`tasks/quality.py` `catalog_columns`) and the rounds'
summary.json; rows written before scores existed count as *unknown*, never as zero.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage.layout import runs_prefix

QUALITY_COLUMNS = ("quality_mean", "quality_min_teacher", "quality_low_fraction", "quality_fb")
BINS = 10  # histogram of per-sample mean scores over [0, 1]
WORST = 6  # worst samples listed per round
CALIBRATION_FIGURES = ("delta_avg", "average_jaccard", "occlusion_accuracy")


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def round_quality(latest_in_rounds: pa.Table, worst: int = WORST) -> dict[str, dict]:
    """round id -> {scored, unknown, mean, low_fraction, filtered, teachers: {label: {count, mean, histogram}},
    worst: [{sample_key, video_key, quality_mean, teachers, shard_id}]}, over each round's labelled samples.

    A sample's teacher label is its teacher, or the names joined with '+' when several labelled it
    (its score is then their mean). `filtered` counts videos dropped on quality (--min-sample-quality).
    Empty when the table lacks the quality columns.
    """
    names = set(latest_in_rounds.column_names)
    if not set(QUALITY_COLUMNS[:1]) <= names or latest_in_rounds.num_rows == 0:
        return {}
    rows = latest_in_rounds.select(
        [c for c in ("round_id", "status", "stage", "video_key", "sample_key", "teachers", "shard_id") if c in names]
        + [c for c in QUALITY_COLUMNS if c in names]
    ).to_pylist()
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(
            row.get("round_id") or "(none)",
            {"scored": 0, "unknown": 0, "filtered": 0, "_scores": [], "_lows": [], "teachers": {}, "_rows": []},
        )
        if row["status"] == "filtered" and row.get("stage") == "quality":
            entry["filtered"] += 1
            continue
        if row["status"] != "labelled":
            continue
        score = _finite(row.get("quality_mean"))
        if score is None:
            entry["unknown"] += 1
            continue
        entry["scored"] += 1
        entry["_scores"].append(score)
        if _finite(row.get("quality_low_fraction")) is not None:
            entry["_lows"].append(row["quality_low_fraction"])
        label = "+".join(row.get("teachers") or []) or "(none)"
        entry["teachers"].setdefault(label, []).append(score)
        entry["_rows"].append(row)
    for entry in out.values():
        scores, lows, kept = entry.pop("_scores"), entry.pop("_lows"), entry.pop("_rows")
        entry["mean"] = float(np.mean(scores)) if scores else None
        entry["low_fraction"] = float(np.mean(lows)) if lows else None
        entry["teachers"] = {
            label: {
                "count": len(values),
                "mean": float(np.mean(values)),
                "histogram": np.histogram(values, bins=BINS, range=(0.0, 1.0))[0].tolist(),
            }
            for label, values in sorted(entry["teachers"].items())
        }
        kept.sort(key=lambda r: (r["quality_mean"], r.get("video_key") or ""))
        entry["worst"] = [
            {
                "sample_key": r.get("sample_key"),
                "video_key": r.get("video_key"),
                "quality_mean": float(r["quality_mean"]),
                "teachers": list(r.get("teachers") or []),
                "shard_id": r.get("shard_id"),
            }
            for r in kept[:worst]
        ]
    return out


def histogram_edges() -> list[float]:
    return np.linspace(0.0, 1.0, BINS + 1).tolist()


def calibration_of(summary: dict | None) -> dict[str, dict]:
    """A round summary's calibration (teacher -> figures or {"error"}); {} for rounds recorded before it."""
    calibration = (summary or {}).get("calibration") if isinstance(summary, dict) else None
    return calibration if isinstance(calibration, dict) else {}


def read_round_summary(store, round_id: str) -> dict | None:
    """runs/<round>/summary.json, or None when the round has none (yet) or it cannot be read."""
    try:
        data = json.loads(store.read_bytes(f"{runs_prefix(round_id)}summary.json"))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def quality_report(store, catalog, round_id: str | None = None) -> dict[str, dict]:
    """round id -> `round_quality`'s figures plus `calibration`, for every round in the catalog (or one)."""
    from ..storage.catalog import latest_by

    events = catalog.events(round_id, ordered=False)
    per_round = latest_by(events, ("round_id", "video_key"))
    report = round_quality(per_round)
    rounds = sorted(set(pc.fill_null(events["round_id"], "(none)").to_pylist())) if events.num_rows else []
    for name in rounds:
        entry = report.setdefault(name, {"scored": 0, "unknown": 0, "filtered": 0, "teachers": {}, "worst": []})
        entry.setdefault("mean", None)
        entry.setdefault("low_fraction", None)
        try:
            summary = read_round_summary(store, name)
        except ValueError:  # not a valid round id ("(none)")
            summary = None
        entry["calibration"] = calibration_of(summary)
    return report
