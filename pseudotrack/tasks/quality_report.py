"""Label quality as a person reads it: per round, the score distribution per teacher, the worst samples,
and the teachers' calibration, for `pseudotrack status` and the dashboard.

Read from the catalog's quality columns (`tasks/quality.py` `catalog_columns`) and the rounds'
summary.json; rows written before scores existed count as *unknown*, never as zero.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage.layout import runs_prefix

QUALITY_COLUMNS = ("quality_mean", "quality_min_teacher", "quality_low_fraction", "quality_fb", "quality_teachers")
BINS = 10  # histogram of per-sample mean scores over [0, 1]
WORST = 6  # worst samples listed per round
CALIBRATION_FIGURES = ("delta_avg", "average_jaccard", "occlusion_accuracy")


def round_quality(latest_in_rounds: pa.Table, worst: int = WORST) -> dict[str, dict]:
    """round id -> {scored, unknown, mean, low_fraction, filtered, teachers: {label: {count, mean, histogram}},
    worst: [{sample_key, video_key, quality_mean, teachers, shard_id}]}, over each round's labelled samples.

    Each teacher's distribution holds its own mean score on every sample it labelled (the catalog's
    `quality_teachers`); a row written before that column existed counts under its teacher, or the
    names joined with '+' when several labelled it, with the sample's mean score.
    `filtered` counts videos dropped on quality (--min-sample-quality).
    Empty when the table lacks the quality columns. Vectorised: the dashboard asks on every refresh.
    """
    names = set(latest_in_rounds.column_names)
    if "quality_mean" not in names or latest_in_rounds.num_rows == 0:
        return {}
    table = latest_in_rounds
    rounds = np.asarray(pc.fill_null(table["round_id"], "(none)").to_pylist(), dtype=object)
    status = np.asarray(table["status"].to_pylist(), dtype=object)
    stage = np.asarray(pc.fill_null(table["stage"], "").to_pylist(), dtype=object) if "stage" in names else None
    score = np.asarray(pc.fill_null(table["quality_mean"].cast(pa.float64()), float("nan")), np.float64)
    low = (
        np.asarray(pc.fill_null(table["quality_low_fraction"].cast(pa.float64()), float("nan")), np.float64)
        if "quality_low_fraction" in names
        else np.full(len(score), np.nan)
    )
    labelled = status == "labelled"
    known = labelled & np.isfinite(score)
    quality_filtered = (status == "filtered") & (stage == "quality") if stage is not None else np.zeros_like(known)
    labels = np.asarray(pc.fill_null(pc.binary_join(table["teachers"], "+"), "(none)").to_pylist(), dtype=object)
    names_per_row = table["teachers"].to_pylist()
    own = table["quality_teachers"].to_pylist() if "quality_teachers" in names else [None] * table.num_rows
    out: dict[str, dict] = {}
    for name in sorted(set(rounds[labelled | quality_filtered].tolist())):
        mine = rounds == name
        scored = np.flatnonzero(mine & known)
        lows = low[scored][np.isfinite(low[scored])]
        by_label: dict[str, list[float]] = {}
        for i in scored:
            pairs = list(zip(names_per_row[i] or [], own[i], strict=False)) if own[i] else []
            if pairs:
                for teacher, value in pairs:
                    if value is not None and np.isfinite(value):
                        by_label.setdefault(teacher, []).append(value)
            else:
                by_label.setdefault(labels[i], []).append(score[i])
        teachers = {}
        for label in sorted(by_label):
            values = np.asarray(by_label[label], np.float64)
            teachers[label] = {
                "count": int(len(values)),
                "mean": float(values.mean()),
                "histogram": np.histogram(values, bins=BINS, range=(0.0, 1.0))[0].tolist(),
            }
        order = scored[np.lexsort((np.arange(len(scored)), score[scored]))][:worst]
        columns = [c for c in ("sample_key", "video_key", "teachers", "shard_id") if c in names]
        picked = table.take(pa.array(order, pa.int64())).select(columns).to_pylist() if len(order) else []
        out[name] = {
            "scored": int(len(scored)),
            "unknown": int((mine & labelled & ~known).sum()),
            "filtered": int((mine & quality_filtered).sum()),
            "mean": float(score[scored].mean()) if len(scored) else None,
            "low_fraction": float(lows.mean()) if len(lows) else None,
            "teachers": teachers,
            "worst": [
                {
                    "sample_key": row.get("sample_key"),
                    "video_key": row.get("video_key"),
                    "quality_mean": float(score[i]),
                    "teachers": list(row.get("teachers") or []),
                    "shard_id": row.get("shard_id"),
                }
                for i, row in zip(order, picked, strict=True)
            ],
        }
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
