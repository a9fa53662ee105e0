"""SIFT query points on keyframes biased to the start of the clip (CoTracker3 §3.1, App. A).

SIFT fires on distinctive, trackable structure and stays silent on flat or
ambiguous regions, so it doubles as a filter: a clip whose keyframes give too
few points is not labelled (`failed: too few features`) rather than filling the
training set with points no teacher can follow.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import SampleError

BORDER = 2.0  # pixels: points this close to the edge are dropped (trackers sample patches around them)


def choose_keyframes(num_frames: int, count: int, rng: np.random.Generator, decay: float = 0.35) -> np.ndarray:
    """`count` distinct frames drawn with probability decaying exponentially with time.

    With decay 0.35 the first third of the clip holds about 60% of the mass, which
    suits online students that track forward from early queries.
    """
    count = min(count, num_frames)
    t = np.arange(num_frames)
    weights = np.exp(-t / max(1.0, decay * num_frames))
    return np.sort(rng.choice(num_frames, size=count, replace=False, p=weights / weights.sum()))


def sift_points(gray: np.ndarray, detector) -> tuple[np.ndarray, np.ndarray]:
    """(xy [M,2], response [M]) strongest first, one per location (SIFT repeats locations per orientation)."""
    keypoints = detector.detect(gray, None)
    if not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    xy = np.array([k.pt for k in keypoints], np.float32)
    response = np.array([k.response for k in keypoints], np.float32)
    order = np.argsort(-response, kind="stable")
    xy, response = xy[order], response[order]
    _, first = np.unique(np.round(xy, 1), axis=0, return_index=True)
    keep = np.sort(first)
    xy, response = xy[keep], response[keep]
    h, w = gray.shape
    inside = (xy[:, 0] >= BORDER) & (xy[:, 1] >= BORDER) & (xy[:, 0] <= w - 1 - BORDER) & (xy[:, 1] <= h - 1 - BORDER)
    return xy[inside], response[inside]


def sample_queries(
    frames: np.ndarray,
    num_queries: int = 384,
    num_keyframes: int = 8,
    rng: np.random.Generator | None = None,
    min_per_keyframe: int | None = None,
    decay: float = 0.35,
) -> tuple[np.ndarray, dict]:
    """(queries float32 [N,3] (t, x, y), stats) with N = num_queries spread over the keyframes.

    Each keyframe gets an equal share (remainder to the earliest); a keyframe short of
    its share hands the rest to keyframes with spare points. The clip fails when any
    keyframe gives fewer than `min_per_keyframe` points (default: a quarter of its
    share, at least 1), or when all keyframes together cannot give N points.
    """
    rng = rng if rng is not None else np.random.default_rng()
    t_len = len(frames)
    keyframes = choose_keyframes(t_len, num_keyframes, rng, decay)
    share = num_queries // len(keyframes)
    minimum = min_per_keyframe if min_per_keyframe is not None else max(1, share // 4)
    detector = cv2.SIFT_create()
    found = []
    for t in keyframes:
        gray = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY)
        found.append(sift_points(gray, detector))
    counts = [len(xy) for xy, _ in found]
    stats = {"keyframes": keyframes.tolist(), "found": counts}
    poor = [int(t) for t, c in zip(keyframes, counts, strict=True) if c < minimum]
    if poor or sum(counts) < num_queries:
        raise SampleError(
            "queries",
            f"too few features: SIFT found {counts} points on keyframes {keyframes.tolist()}; "
            f"need {num_queries} in all and at least {minimum} on each",
        )
    quotas = np.full(len(keyframes), share)
    quotas[: num_queries - share * len(keyframes)] += 1
    taken = np.minimum(quotas, counts)
    spare = np.array(counts) - taken
    missing = num_queries - taken.sum()
    while missing > 0:  # hand the shortfall to keyframes with points left, earliest first
        for i in np.flatnonzero(spare):
            if missing == 0:
                break
            taken[i] += 1
            spare[i] -= 1
            missing -= 1
    rows = []
    responses = []
    for t, (xy, response), n in zip(keyframes, found, taken, strict=True):
        rows.append(np.column_stack([np.full(n, t, np.float32), xy[:n]]))
        responses.append(response[:n])
    queries = np.concatenate(rows).astype(np.float32)
    stats.update(
        taken=taken.tolist(),
        mean_response=float(np.concatenate(responses).mean()) if num_queries else 0.0,
    )
    return queries, stats
