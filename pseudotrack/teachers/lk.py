"""`lk`: the weight-free teacher of the embedded default, pyramidal Lucas-Kanade with a consistency check.

It lets a whole round run on a laptop with no checkpoint and no GPU, and it is
a sane baseline: on textured, rigid content it is accurate to a fraction of a
pixel, and it says "not visible" rather than guess when it is unsure.

Each point is tracked forward from its query frame to the end of the clip and
backward to the start. Every step is checked by tracking the new position back
to the frame it came from: a point whose round trip misses by `fb_threshold`
pixels or more, that LK reports as failed, or that leaves the frame, is lost.
LK cannot find a point again after an occlusion, so a lost point stays
invisible from then on, holding its last position, and `tracks_occluded` is
False (the student's loss ignores its occluded labels). Confidence is
exp(-error / fb_threshold) of the step's round-trip error: 1 at the query,
above 1/e while visible, 0 once lost.

All points that are being tracked move together, one frame pair at a time,
whatever their query frame, so a clip costs four LK calls per frame pair
(forward and check, for each direction) with as many points per call as are
alive. OpenCV 5's Python binding no longer accepts prebuilt pyramids, so each
call builds its own; at 384 points that is a small part of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError
from .base import TeacherOutput, TeacherSpec, register_teacher


@dataclass(frozen=True)
class LKParams:
    """window: LK patch side in pixels; levels: pyramid levels above the full image;
    fb_threshold: forward-backward error in pixels at which a point is lost."""

    window: int = 21
    levels: int = 3
    fb_threshold: float = 1.0
    max_iterations: int = 30
    epsilon: float = 0.01
    min_eigen: float = 1e-4

    def __post_init__(self) -> None:
        if self.window < 3 or self.levels < 0 or not self.fb_threshold > 0:
            raise ConfigError(
                f"lk teacher: window={self.window} must be >= 3, levels={self.levels} >= 0 and "
                f"fb_threshold={self.fb_threshold} > 0"
            )


def _lk(params: LKParams, src: np.ndarray, dst: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """points [M, 2] in src -> (points [M, 2] in dst, LK status [M] bool)."""
    moved, status, _ = cv2.calcOpticalFlowPyrLK(
        src,
        dst,
        points.reshape(-1, 1, 2).astype(np.float32),
        None,
        winSize=(params.window, params.window),
        maxLevel=params.levels,
        criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, params.max_iterations, params.epsilon),
        minEigThreshold=params.min_eigen,
    )
    return moved.reshape(-1, 2), status.ravel().astype(bool)


def lk_step(
    params: LKParams, src: np.ndarray, dst: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track points src -> dst and back: (new points [M, 2], ok [M], round-trip error [M] in pixels)."""
    moved, ok_forward = _lk(params, src, dst, points)
    back, ok_backward = _lk(params, dst, src, moved)
    error = np.linalg.norm(back - points, axis=1)
    h, w = src.shape[:2]
    inside = (moved[:, 0] >= 0) & (moved[:, 0] <= w - 1) & (moved[:, 1] >= 0) & (moved[:, 1] <= h - 1)
    finite = np.isfinite(moved).all(axis=1) & np.isfinite(error)
    ok = ok_forward & ok_backward & finite & inside & (error < params.fb_threshold)
    return moved, ok, np.where(finite, error, np.inf)


def _sweep(
    params: LKParams,
    grays: list[np.ndarray],
    query_t: np.ndarray,
    order: range,
    tracks: np.ndarray,
    visible: np.ndarray,
    confidence: np.ndarray,
) -> None:
    """Carry every point through the frames in `order` (forward or backward) from its query frame on."""
    started = np.zeros(len(query_t), bool)
    alive = np.zeros(len(query_t), bool)
    frames = list(order)
    for t, nxt in zip(frames[:-1], frames[1:], strict=True):
        starting = query_t == t
        started |= starting
        alive |= starting
        tracks[nxt, started] = tracks[t, started]  # lost points hold their position; live ones move below
        active = np.flatnonzero(alive)
        if active.size == 0:
            continue
        moved, ok, error = lk_step(params, grays[t], grays[nxt], tracks[t, active])
        kept = active[ok]
        tracks[nxt, kept] = moved[ok]
        visible[nxt, kept] = True
        confidence[nxt, kept] = np.exp(-error[ok] / params.fb_threshold)
        alive[active[~ok]] = False


def track_points(frames: np.ndarray, queries: np.ndarray, params: LKParams | None = None) -> TeacherOutput:
    """frames uint8 [T, H, W, 3] RGB; queries float32 [N, 3] (t, x, y) -> tracks [T, N, 2] in the same pixels."""
    params = params or LKParams()
    frames, queries = _check_inputs(frames, queries)
    t_len, n = len(frames), len(queries)
    tracks = np.zeros((t_len, n, 2), np.float32)
    visible = np.zeros((t_len, n), bool)
    confidence = np.zeros((t_len, n), np.float32)
    if n == 0:
        return TeacherOutput(tracks, visible, confidence)
    query_t = np.round(queries[:, 0]).astype(np.int64)
    rows = np.arange(n)
    tracks[query_t, rows] = queries[:, 1:]
    visible[query_t, rows] = True
    confidence[query_t, rows] = 1.0
    grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    _sweep(params, grays, query_t, range(t_len), tracks, visible, confidence)
    _sweep(params, grays, query_t, range(t_len - 1, -1, -1), tracks, visible, confidence)
    return TeacherOutput(tracks, visible, confidence)


def _check_inputs(frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"lk: frames must be uint8 [T, H, W, 3] RGB with T >= 1, got {frames.dtype} {frames.shape}")
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != 3:
        raise ValueError(f"lk: queries must be [N, 3] rows of (t, x, y), got shape {queries.shape}")
    if not np.isfinite(queries).all():
        raise ValueError("lk: queries hold NaN or infinite values")
    t = np.round(queries[:, 0])
    if len(t) and (t.min() < 0 or t.max() > len(frames) - 1):
        raise ValueError(f"lk: query frames {t.min():.0f}..{t.max():.0f} fall outside the clip's 0..{len(frames) - 1}")
    return frames, queries


class LKTeacher:
    """The registry's `lk` teacher: `track_points` behind the Teacher protocol."""

    name = "lk"
    checkpoint_sha256 = ""
    tracks_occluded = False
    queries_independent = True  # each point is tracked on its own: running queries in parts changes nothing

    def __init__(self, checkpoint: str | Path | None = None, **params):
        if checkpoint is not None:
            raise ConfigError(f"teacher 'lk' has no weights; drop the checkpoint {checkpoint} (use --teacher lk)")
        unknown = sorted(set(params) - set(LKParams.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"teacher 'lk' has no option {', '.join(unknown)}; its options are "
                f"{', '.join(LKParams.__dataclass_fields__)}"
            )
        self.params = LKParams(**params)

    def setup(self, device: str = "cpu") -> None:
        """Nothing to load; LK runs on the CPU whatever the device."""

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        """frames uint8 [T, H, W, 3] RGB; queries float32 [N, 3] (t, x, y) pixels."""
        return track_points(frames, queries, self.params)


register_teacher(
    TeacherSpec(
        name="lk",
        factory=LKTeacher,
        needs_checkpoint=False,
        description="OpenCV pyramidal Lucas-Kanade, both directions, forward-backward consistency check; no weights",
    )
)
