"""The TAP-Vid evaluation protocol as a plain function, independent of any model.

A model enters only through ``predict_fn(frames, queries) -> (tracks, visible)``:
frames uint8 [T, H, W, 3], queries float32 [M, 3] rows of (t, x, y) in pixels
of those frames; it returns tracks float32 [T, M, 2] (x, y) in the same pixels
and visible bool [T, M] (thresholding is the predictor's business). Support
points near a border may lie up to half the local grid outside the frame, as
in the authors' protocol; the predictor must accept them. Frames before a
query are scored in 'strided' mode: wrap a forward-only (online) predictor in
`with_backward_pass`.

One query at a time (CoTracker3 §4, App. A, after CoTracker): benchmark
points sit on objects, so a joint tracker given all of them at once learns
which pixels move together from the benchmark's own choice of points. Each
benchmark query is therefore tracked in its own call, with support points
that carry no benchmark information: a global grid over the frame and a local
grid around the query, both on the query's frame. Only the query's own track
is kept.

The grids are placed as the authors place them: in the frame of the model's
input (``support_shape``, 384x512 for CoTracker3), the query mapped there by
(size - 1) ratios, the local grid spanning ``local_extent`` pixels of that frame
around it, the margin of each grid a 64th of its width; then everything is
mapped back to the pixels ``predict_fn`` receives. The authors' current code
queries the support points on frame 0 rather than on the query's frame (its
earlier version cropped the video to start at the query frame, which puts them
on the query frame); ``support_on_query_frame=False`` reproduces the former.

Batching: two benchmark queries never share a call, not even on the same
frame, because each would then be support for the other and the protocol's
point is lost. ``one_query_at_a_time=False`` sends all of a video's queries in
one call with only the global grid; that is equivalent (and M times cheaper)
only for trackers that treat points independently (TAPIR, LK), and is the
authors' "joint" setting for the others, reported as such.

Scores are computed at 256x256 (the benchmark's resolution) whatever the
frames' size, and averaged over videos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..teachers.support_points import grid_points
from .benchmarks import BENCHMARK_SIZE, BenchmarkVideo, resize_video
from .metrics import METRIC_NAMES, compute_tapvid_metrics, mean_metrics, sample_queries

PredictFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
SUMMARY_ORDER = ("average_jaccard", "average_pts_within_thresh", "occlusion_accuracy")


@dataclass(frozen=True)
class SupportConfig:
    """Support points added to each benchmark query (sizes are per side: 5 means a 5x5 grid)."""

    global_grid: int = 5
    local_grid: int = 8
    local_extent: float = 50.0
    support_shape: tuple[int, int] | None = (384, 512)
    on_query_frame: bool = True


def _support_scale(frame_size: tuple[int, int], config: SupportConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Factors (x, y) from frame pixels to the support frame (align-corners resize), and its size."""
    h, w = frame_size
    sh, sw = config.support_shape or (h, w)
    return np.array([(sw - 1) / max(w - 1, 1), (sh - 1) / max(h - 1, 1)]), (sh, sw)


def global_grid(frame_size: tuple[int, int], config: SupportConfig) -> np.ndarray:
    """[G, 2] (x, y) in frame pixels: the global support grid."""
    scale, (sh, sw) = _support_scale(frame_size, config)
    return grid_points(config.global_grid, float(sh), float(sw)) / scale


def support_queries(query: np.ndarray, frame_size: tuple[int, int], config: SupportConfig) -> np.ndarray:
    """[1 + L + G, 3] (t, x, y): the query first, then its local grid, then the global grid.

    query: (t, x, y) in pixels of frames of ``frame_size`` (h, w).
    """
    scale, _ = _support_scale(frame_size, config)
    t, xy = float(query[0]), np.asarray(query[1:3], np.float64)
    qx, qy = xy * scale
    local = grid_points(config.local_grid, config.local_extent, config.local_extent, (qy, qx)) / scale
    support = np.concatenate([local, global_grid(frame_size, config)])
    frame = t if config.on_query_frame else 0.0
    rows = np.concatenate([np.full((len(support), 1), frame), support], axis=1)
    return np.concatenate([np.array([[t, *xy]]), rows]).astype(np.float32)


def _call(predict_fn: PredictFn, frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tracks, visible = predict_fn(frames, queries)
    tracks, visible = np.asarray(tracks, np.float32), np.asarray(visible).astype(bool)
    t, m = len(frames), len(queries)
    if tracks.shape != (t, m, 2) or visible.shape != (t, m):
        raise ValueError(
            f"predict_fn must return tracks [T, M, 2] and visible [T, M] = [{t}, {m}, 2] and [{t}, {m}] "
            f"for {m} queries on {t} frames, got {tracks.shape} and {visible.shape}"
        )
    return tracks, visible


def predict_queries(
    predict_fn: PredictFn,
    frames: np.ndarray,
    queries: np.ndarray,
    one_query_at_a_time: bool = True,
    config: SupportConfig = SupportConfig(),
) -> tuple[np.ndarray, np.ndarray, int]:
    """Tracks [T, M, 2] and visible [T, M] of queries [M, 3] (t, x, y) under the protocol; the calls made."""
    t_len, m = len(frames), len(queries)
    frame_size = frames.shape[1:3]
    if m == 0:
        return np.zeros((t_len, 0, 2), np.float32), np.zeros((t_len, 0), bool), 0
    if not one_query_at_a_time:
        grid = global_grid(frame_size, config)
        rows = np.concatenate([np.zeros((len(grid), 1)), grid], axis=1)
        tracks, visible = _call(predict_fn, frames, np.concatenate([queries, rows]).astype(np.float32))
        return tracks[:, :m], visible[:, :m], 1
    tracks = np.zeros((t_len, m, 2), np.float32)
    visible = np.zeros((t_len, m), bool)
    for i, query in enumerate(queries):
        one_tracks, one_visible = _call(predict_fn, frames, support_queries(query, frame_size, config))
        tracks[:, i], visible[:, i] = one_tracks[:, 0], one_visible[:, 0]
    return tracks, visible, m


def with_backward_pass(predict_fn: PredictFn) -> PredictFn:
    """A forward-only (online) predictor made to fill the frames before each query, by running it on the
    reversed video; 'strided' queries score those frames.

    Frames from the query on come from the forward run, earlier ones from the
    backward run, as the authors do for their online model.
    """

    def predict(frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t_len = len(frames)
        fwd_tracks, fwd_visible = _call(predict_fn, frames, queries)
        reverse = np.array(queries, np.float32, copy=True)
        reverse[:, 0] = t_len - 1 - reverse[:, 0]
        bwd_tracks, bwd_visible = _call(predict_fn, frames[::-1].copy(), reverse)
        before = np.arange(t_len)[:, None] < np.rint(queries[:, 0])[None, :]
        tracks = np.where(before[..., None], bwd_tracks[::-1], fwd_tracks)
        visible = np.where(before, bwd_visible[::-1], fwd_visible)
        return tracks, visible

    return predict


def evaluate_video(
    predict_fn: PredictFn,
    video: BenchmarkVideo,
    query_mode: str,
    resize_to: tuple[int, int] | None = BENCHMARK_SIZE,
    one_query_at_a_time: bool = True,
    config: SupportConfig = SupportConfig(),
    query_stride: int = 5,
) -> tuple[dict[str, float], int, int]:
    """One video's metrics (scored at 256x256), its number of queries and of predict calls.

    A video with nothing to query (no visible point) returns empty metrics.
    """
    if resize_to is not None:
        video = resize_video(video, resize_to)
    queries = sample_queries(video.tracks, video.occluded, query_mode, query_stride)
    if len(queries) == 0:
        return {}, 0, 0
    qp = queries.query_points  # (t, y, x)
    xy_queries = np.stack([qp[:, 0], qp[:, 2], qp[:, 1]], axis=-1).astype(np.float32)
    tracks, visible, calls = predict_queries(predict_fn, video.frames, xy_queries, one_query_at_a_time, config)
    h, w = video.size
    to_256 = np.array([BENCHMARK_SIZE[1] / w, BENCHMARK_SIZE[0] / h])
    metrics = compute_tapvid_metrics(
        query_points=np.concatenate([qp[:, :1], qp[:, 1:] * to_256[::-1]], axis=1)[None],
        gt_occluded=queries.occluded[None],
        gt_tracks=(queries.tracks * to_256)[None],
        pred_occluded=~visible.T[None],
        pred_tracks=(tracks.transpose(1, 0, 2) * to_256)[None],
        query_mode=query_mode,
    )
    return {name: float(metrics[name][0]) for name in METRIC_NAMES}, len(queries), calls


def _ordered(metrics: dict[str, float]) -> dict[str, float]:
    """AJ, delta_avg and OA first, as papers report them; then the per-threshold numbers."""
    rest = tuple(n for n in METRIC_NAMES if n not in SUMMARY_ORDER)
    return {name: metrics[name] for name in SUMMARY_ORDER + rest}


def evaluate(
    predict_fn: PredictFn,
    videos: Iterable[BenchmarkVideo],
    query_mode: str = "first",
    resize_to: tuple[int, int] | None = BENCHMARK_SIZE,
    one_query_at_a_time: bool = True,
    global_grid: int = 5,
    local_grid: int = 8,
    local_extent: float = 50.0,
    support_shape: tuple[int, int] | None = (384, 512),
    support_on_query_frame: bool = True,
    query_stride: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """TAP-Vid metrics of ``predict_fn`` on ``videos``: the means first, then 'per_video' and 'info'.

    resize_to: (h, w) the predictor sees, 256x256 as in the benchmark; None keeps
    each video's own size (scores are still computed at 256x256).
    progress(done, total) is called after each video (total 0 when unknown).
    Means are over videos that have at least one query; 'info' lists the rest.
    """
    config = SupportConfig(global_grid, local_grid, local_extent, support_shape, support_on_query_frame)
    total = len(videos) if hasattr(videos, "__len__") else 0  # type: ignore[arg-type]
    per_video: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    num_queries = num_calls = done = 0
    for video in videos:
        metrics, queries, calls = evaluate_video(
            predict_fn, video, query_mode, resize_to, one_query_at_a_time, config, query_stride
        )
        num_queries += queries
        num_calls += calls
        if metrics:
            name, k = video.name, 2
            while name in per_video:
                name, k = f"{video.name}#{k}", k + 1
            per_video[name] = _ordered(metrics)
        else:
            skipped.append(video.name)
        done += 1
        if progress is not None:
            progress(done, total)
    if not per_video:
        raise ValueError(
            f"no video could be scored: {done} videos given, none with a visible ground-truth point; "
            "check the benchmark path and its 'occluded' arrays"
        )
    return {
        **_ordered(mean_metrics(per_video.values())),
        "per_video": per_video,
        "info": {
            "query_mode": query_mode,
            "protocol": "one query at a time" if one_query_at_a_time else "all queries at once",
            "videos": len(per_video),
            "skipped_videos": skipped,
            "queries": num_queries,
            "predict_calls": num_calls,
        },
    }
