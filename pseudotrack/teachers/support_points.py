"""Where points come from when nobody chose them: regular grids and SIFT corners.

Both the query sampler (`tasks/queries.py`) and the teachers' support points
use these. SIFT reports one location several times, once per dominant
orientation (DESIGN.md pitfalls), so `sift_points` keeps the strongest point of
each pixel; it also drops points too close to the border, where a tracker's
patches would run off the frame.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

BORDER = 2.0  # pixels: trackers sample patches around a point, so points this close to an edge are dropped
# SIFT on a shrunk image starts with a first blur of SIFT_SIGMA (OpenCV's default, DEFAULT_SIFT_SIGMA, is for
# an image it doubles first); an image whose short side would shrink below SIFT_MIN_SIDE is searched at full size
SIFT_SIGMA = 1.0
DEFAULT_SIFT_SIGMA = 1.6
SIFT_MIN_SIDE = 192  # pixels


def grid_points(size: int, height: float, width: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """[size^2, 2] float64 (x, y) of a size x size grid, row-major, over a height x width extent.

    The points keep a margin of width / 64 from the extent's border (the
    authors' support grid); `centre` (y, x) defaults to the middle of the extent.
    """
    if size <= 0:
        return np.zeros((0, 2))
    cy, cx = centre if centre is not None else (height / 2.0, width / 2.0)
    if size == 1:
        return np.array([[cx, cy]], np.float64)
    margin = width / 64.0
    ys = np.linspace(cy - height / 2.0 + margin, cy + height / 2.0 - margin, size)
    xs = np.linspace(cx - width / 2.0 + margin, cx + width / 2.0 - margin, size)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.reshape(-1), gy.reshape(-1)], axis=-1)


def sift_points(
    gray: np.ndarray, detector=None, border: float = BORDER, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(xy float32 [M, 2], response float32 [M]): strongest first, one per pixel, `border` px from the edges.

    scale: detect on the image resized by this factor and map the points back to `gray`'s pixels (the query
    sampler shrinks keyframes: SIFT doubles its input before the first octave, so most of its time goes to the
    finest scale). Below SIFT_MIN_SIDE pixels on the short side the image is searched at full size.
    """
    if min(gray.shape[:2]) * scale < SIFT_MIN_SIDE:
        scale = 1.0
    detector = detector if detector is not None else cv2.SIFT_create(sigma=sift_sigma(scale))
    if scale != 1.0:
        small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        keypoints = detector.detect(small, None)
    else:
        keypoints = detector.detect(gray, None)
    if not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    xy = np.array([k.pt for k in keypoints], np.float32)
    if scale != 1.0:
        # OpenCV reports a point found on the image it doubled a quarter of the shrunk image's pixel off
        # (x = column / 2); the true position there is x - 0.25, and pixel centres map as (x + 0.5) / scale - 0.5
        factor = np.float32([gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]])
        xy = ((xy + 0.25) * factor - 0.5).astype(np.float32)
    response = np.array([k.response for k in keypoints], np.float32)
    order = np.argsort(-response, kind="stable")
    xy, response = xy[order], response[order]
    h, w = gray.shape[:2]
    inside = (xy[:, 0] >= border) & (xy[:, 1] >= border) & (xy[:, 0] <= w - 1 - border) & (xy[:, 1] <= h - 1 - border)
    xy, response = xy[inside], response[inside]
    cells = np.round(xy).astype(np.int64)
    _, first = np.unique(cells[:, 1] * (w + 1) + cells[:, 0], return_index=True)
    keep = np.sort(first)  # the strongest point of each pixel, still in order of response
    return xy[keep], response[keep]


def sift_sigma(scale: float) -> float:
    """The detector's first blur for SIFT on an image shrunk by `scale` (OpenCV's default on a full image)."""
    return DEFAULT_SIFT_SIGMA if scale == 1.0 else SIFT_SIGMA


def early_sift_points(frames: np.ndarray, count: int, rng: np.random.Generator, keyframes: int = 4) -> np.ndarray:
    """[M <= count, 3] (t, x, y) SIFT points from keyframes in the first quarter of the clip, in frame pixels.

    The online CoTracker3's extra support points (its authors' training
    labels): up to count / keyframes per keyframe, strongest first overall.
    """
    if count <= 0:
        return np.zeros((0, 3), np.float32)
    t = len(frames)
    chosen = np.unique(rng.integers(0, int(t * 0.25) + 1, keyframes).clip(0, t - 1))
    per_frame = math.ceil(count / len(chosen))
    detector = cv2.SIFT_create(nfeatures=per_frame * 2)
    found = []
    for k in chosen:
        xy, response = sift_points(cv2.cvtColor(np.ascontiguousarray(frames[k]), cv2.COLOR_RGB2GRAY), detector)
        xy, response = xy[:per_frame], response[:per_frame]
        found.append(np.column_stack([response, np.full(len(xy), k, np.float32), xy]))
    rows = np.concatenate(found)
    rows = rows[np.argsort(-rows[:, 0], kind="stable")][:count]
    return rows[:, 1:].astype(np.float32).reshape(-1, 3)
