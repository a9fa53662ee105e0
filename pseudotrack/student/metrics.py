"""TAP-Vid metrics (occlusion accuracy, position accuracy, Jaccard), query sampling, and benchmark means.

The numbers must match the published TAP-Vid evaluation to the last digit, or
our scores cannot be compared with the papers'. So the conventions are the
benchmark's, not ours, and `tests/test_metrics.py` pins them against the
reference cases in ``shared/reference/metrics``:

- query points are ``(t, y, x)``, tracks ``(x, y)``, arrays ``[B, N, T, ...]``;
- positions are compared in pixels of a 256x256 frame, as the benchmark resizes;
- a prediction counts as within ``d`` pixels when its squared distance is
  strictly below ``d**2``;
- ``first`` mode scores only frames after the query frame (the benchmark takes
  the first visible point as the query, so a tracker may assume the point is
  occluded before it); ``strided`` mode scores every frame but the query frame;
- a video's score is a ratio of counts over all its points and frames, and a
  benchmark's score is the plain mean of its videos' scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

THRESHOLDS = (1, 2, 4, 8, 16)
QUERY_MODES = ("first", "strided")
METRIC_NAMES = (
    "occlusion_accuracy",
    *[name for d in THRESHOLDS for name in (f"pts_within_{d}", f"jaccard_{d}")],
    "average_jaccard",
    "average_pts_within_thresh",
)


def check_query_mode(query_mode: str) -> str:
    if query_mode not in QUERY_MODES:
        raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
    return query_mode


def evaluation_mask(query_frames: np.ndarray, num_frames: int, query_mode: str) -> np.ndarray:
    """bool [..., T]: which frames of each track are scored, given its query frame index.

    The query frame itself is never scored: the tracker was told where the point is there.
    """
    check_query_mode(query_mode)
    q = np.rint(np.asarray(query_frames)).astype(np.int64)[..., None]
    t = np.arange(num_frames)
    return t > q if query_mode == "first" else t != q


def _check_inputs(query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks) -> None:
    gt_tracks = np.asarray(gt_tracks)
    if gt_tracks.ndim != 4 or gt_tracks.shape[-1] != 2:
        raise ValueError(f"gt_tracks must be [B, N, T, 2] (x, y), got shape {gt_tracks.shape}")
    b, n, t, _ = gt_tracks.shape
    expected = {
        "query_points": (np.shape(query_points), (b, n, 3)),
        "gt_occluded": (np.shape(gt_occluded), (b, n, t)),
        "pred_occluded": (np.shape(pred_occluded), (b, n, t)),
        "pred_tracks": (np.shape(pred_tracks), (b, n, t, 2)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(
                f"{name} has shape {tuple(got)} but gt_tracks {gt_tracks.shape} needs {want}; "
                "TAP-Vid arrays are [B, N, T, ...] with query points (t, y, x)"
            )
    frames = np.rint(np.asarray(query_points)[..., 0])
    if frames.size and (frames.min() < 0 or frames.max() >= t):
        raise ValueError(f"query_points frame indices must lie in [0, {t - 1}], got {frames.min()}..{frames.max()}")


def compute_tapvid_metrics(
    query_points: np.ndarray,
    gt_occluded: np.ndarray,
    gt_tracks: np.ndarray,
    pred_occluded: np.ndarray,
    pred_tracks: np.ndarray,
    query_mode: str,
    per_track: bool = False,
) -> dict[str, np.ndarray]:
    """TAP-Vid metrics per video ([B]), or per track ([B, N]) with ``per_track``.

    query_points [B, N, 3] (t, y, x); gt_occluded / pred_occluded bool [B, N, T];
    gt_tracks / pred_tracks [B, N, T, 2] (x, y) in pixels of 256x256 frames.

    Jaccard at threshold d: true positives are points visible in both ground
    truth and prediction and within d; its denominator is every visible ground
    truth point plus the false positives (predicted visible but occluded, or
    too far). A video with nothing to score gives NaN, as in the benchmark.
    """
    check_query_mode(query_mode)
    _check_inputs(query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks)
    gt_occluded = np.asarray(gt_occluded, bool)
    pred_occluded = np.asarray(pred_occluded, bool)
    gt_tracks = np.asarray(gt_tracks, np.float64)
    pred_tracks = np.asarray(pred_tracks, np.float64)
    axes = (2,) if per_track else (1, 2)

    scored = evaluation_mask(np.asarray(query_points)[..., 0], gt_tracks.shape[2], query_mode)
    gt_vis = ~gt_occluded
    pred_vis = ~pred_occluded
    num_scored = scored.sum(axis=axes)
    num_gt_visible = (gt_vis & scored).sum(axis=axes)

    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {
            "occlusion_accuracy": ((gt_occluded == pred_occluded) & scored).sum(axis=axes) / num_scored
        }
        sq_dist = np.sum(np.square(pred_tracks - gt_tracks), axis=-1)
        within_all, jaccard_all = [], []
        for d in THRESHOLDS:
            close = sq_dist < d * d
            hits = close & gt_vis & scored
            within = hits.sum(axis=axes) / num_gt_visible
            true_pos = (hits & pred_vis).sum(axis=axes)
            false_pos = (pred_vis & (gt_occluded | ~close) & scored).sum(axis=axes)
            jaccard = true_pos / (num_gt_visible + false_pos)
            out[f"pts_within_{d}"] = within
            out[f"jaccard_{d}"] = jaccard
            within_all.append(within)
            jaccard_all.append(jaccard)
    out["average_jaccard"] = np.mean(np.stack(jaccard_all, axis=0), axis=0)
    out["average_pts_within_thresh"] = np.mean(np.stack(within_all, axis=0), axis=0)
    return {name: out[name] for name in METRIC_NAMES}


def mean_metrics(per_video: Iterable[Mapping[str, np.ndarray | float]]) -> dict[str, float]:
    """Benchmark score: the plain mean over videos of each metric (the benchmark weighs videos, not points).

    Each item is one video's metrics (scalars or length-1 arrays, as
    `compute_tapvid_metrics` returns for B = 1). A NaN video stays NaN in the
    mean, as in the benchmark; the evaluator skips videos with nothing to score.
    """
    rows = list(per_video)
    if not rows:
        raise ValueError("mean_metrics needs at least one video's metrics; the benchmark yielded none")
    out = {}
    for name in METRIC_NAMES:
        values = [np.asarray(row[name], np.float64).reshape(-1) for row in rows]
        out[name] = float(np.mean(np.concatenate(values)))
    return out


@dataclass(frozen=True)
class QuerySet:
    """Benchmark queries built from ground truth, with the tracks they are scored against.

    query_points [Q, 3] (t, y, x) in the tracks' pixels; tracks [Q, T, 2] (x, y);
    occluded bool [Q, T]; track_index [Q]: the ground-truth track each query came from.
    """

    query_points: np.ndarray
    tracks: np.ndarray
    occluded: np.ndarray
    track_index: np.ndarray

    def __len__(self) -> int:
        return len(self.query_points)


def _check_tracks(tracks: np.ndarray, occluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tracks = np.asarray(tracks)
    occluded = np.asarray(occluded, bool)
    if tracks.ndim != 3 or tracks.shape[-1] != 2 or occluded.shape != tracks.shape[:2]:
        raise ValueError(f"need tracks [N, T, 2] (x, y) and occluded [N, T], got {tracks.shape} and {occluded.shape}")
    return tracks, occluded


def _query_set(tracks: np.ndarray, occluded: np.ndarray, index: np.ndarray, frames: np.ndarray) -> QuerySet:
    xy = tracks[index, frames]
    points = np.stack([frames.astype(np.float64), xy[:, 1], xy[:, 0]], axis=-1)
    return QuerySet(points, tracks[index], occluded[index], index)


def sample_queries_first(tracks: np.ndarray, occluded: np.ndarray) -> QuerySet:
    """One query per track at its first visible frame; tracks never visible are dropped (nothing to query)."""
    tracks, occluded = _check_tracks(tracks, occluded)
    index = np.flatnonzero((~occluded).any(axis=1))
    frames = np.argmax(~occluded[index], axis=1) if len(index) else np.zeros(0, np.int64)
    return _query_set(tracks, occluded, index, frames)


def sample_queries_strided(tracks: np.ndarray, occluded: np.ndarray, query_stride: int = 5) -> QuerySet:
    """A query on every ``query_stride``-th frame for each track visible there, ordered by frame then track.

    The order matters only for parity of per-query outputs with the benchmark's
    readers; the scores do not depend on it.
    """
    tracks, occluded = _check_tracks(tracks, occluded)
    if query_stride < 1:
        raise ValueError(f"query_stride must be at least 1, got {query_stride}")
    query_frames = np.arange(0, tracks.shape[1], query_stride)
    frame_grid, track_grid = np.nonzero(~occluded[:, query_frames].T)
    return _query_set(tracks, occluded, track_grid, query_frames[frame_grid])


def sample_queries(tracks: np.ndarray, occluded: np.ndarray, query_mode: str, query_stride: int = 5) -> QuerySet:
    """The benchmark's queries for ``query_mode`` ('first' or 'strided')."""
    if check_query_mode(query_mode) == "first":
        return sample_queries_first(tracks, occluded)
    return sample_queries_strided(tracks, occluded, query_stride)
