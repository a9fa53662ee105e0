"""SIFT query points on keyframes biased to the start of the clip (CoTracker3 §3.1, App. A).

SIFT fires on distinctive structure and stays silent on flat or ambiguous
regions, so it doubles as a filter: the paper skips a video when SIFT fails to
give enough points on a keyframe, rather than filling the training set with
points no teacher can follow. Here that rule is explicit: a clip fails with
`too few features` when any keyframe gives fewer than `min_per_keyframe` points
or all keyframes together give fewer than `num_queries`.

Keyframes. K distinct frames are drawn without replacement with
P(t) proportional to exp(-start_bias * t / T), t = 0..T-1. With the default
start_bias = 3 the last frame is 20 times less likely than the first and one
draw falls in the first third of the clip with probability
(1 - e^-1) / (1 - e^-3) = 0.67; start_bias = 0 is uniform. Early queries suit
online students, which track forward only (App. A: "frame sampling biased
towards the beginning of the video").

Points. SIFT reports one location several times, once per dominant
orientation (DESIGN.md pitfalls): `teachers.support_points.sift_points` (shared
with the teachers' support points) sorts them by response and drops points
that fall on the same pixel as a stronger one before the strongest are taken.
Each keyframe is due N // K points, the remainder going to the
earliest keyframes; what a keyframe cannot supply is handed, one point at a
time, to the keyframes that still have points, earliest first.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import SampleError
from ..teachers.support_points import BORDER, SIFT_MIN_SIDE, sift_points, sift_sigma

START_BIAS = 3.0
# SIFT runs on the keyframe shrunk by SIFT_SCALE (support_points.sift_points maps its points back): a quarter
# of the CPU time, as many queries per keyframe, the same clips refused, a few more queries off the strongest
# edges (its finest scale is gone; bench/bench_cpu_stages.py prints both paths). SIFT_SCALE = 1.0 is the old
# path (RoundConfig.query_sift_scale sets it per round).
SIFT_SCALE = 0.5


def keyframe_probabilities(num_frames: int, start_bias: float = START_BIAS) -> np.ndarray:
    """P(t) for one draw, proportional to exp(-start_bias * t / T)."""
    weights = np.exp(-start_bias * np.arange(num_frames) / max(num_frames, 1))
    return weights / weights.sum()


def choose_keyframes(
    num_frames: int, num_keyframes: int, rng: np.random.Generator, start_bias: float = START_BIAS
) -> np.ndarray:
    """Sorted distinct frame indices, drawn with `keyframe_probabilities`; all frames when the clip is shorter."""
    count = min(num_keyframes, num_frames)
    picks = rng.choice(num_frames, size=count, replace=False, p=keyframe_probabilities(num_frames, start_bias))
    return np.sort(picks).astype(np.int64)


def allocate(available: list[int], total: int) -> list[int]:
    """How many points each keyframe gives: equal shares (remainder to the first), shortfalls handed on."""
    k = len(available)
    share, extra = divmod(total, k)
    taken = [min(share + (i < extra), a) for i, a in enumerate(available)]
    missing = total - sum(taken)
    while missing > 0:
        spare = [i for i in range(k) if taken[i] < available[i]]
        if not spare:
            raise ValueError(f"{sum(available)} points cannot fill {total}")
        for i in spare[:missing]:
            taken[i] += 1
        missing = total - sum(taken)
    return taken


def sample_queries(
    frames: np.ndarray,
    num_queries: int = 384,
    num_keyframes: int = 8,
    *,
    rng: np.random.Generator,
    start_bias: float = START_BIAS,
    min_per_keyframe: int | None = None,
    border: float = BORDER,
    sift_scale: float | None = None,
) -> tuple[np.ndarray, dict]:
    """frames: uint8 [T, H, W, 3] RGB -> (queries float32 [num_queries, 3] (t, x, y) in pixels, stats).

    sift_scale: SIFT on keyframes shrunk by this factor (None: SIFT_SCALE; 1.0: full size, the old path).
    min_per_keyframe: the fewest SIFT points a keyframe may give before the
    clip fails; None means a quarter of its share (at least 1), 0 checks only
    the total. Rows are grouped by keyframe in time order, strongest first.
    stats: keyframes, found (distinct points per keyframe), taken, mean_response.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be [T, H, W, 3] RGB with T >= 1, got {frames.shape}")
    if num_queries < 1 or num_keyframes < 1:
        raise ValueError(f"num_queries ({num_queries}) and num_keyframes ({num_keyframes}) must be at least 1")
    keyframes = choose_keyframes(len(frames), num_keyframes, rng, start_bias)
    share = num_queries // len(keyframes)
    minimum = max(1, share // 4) if min_per_keyframe is None else min_per_keyframe
    sift_scale = SIFT_SCALE if sift_scale is None else sift_scale
    if min(frames.shape[1:3]) * sift_scale < SIFT_MIN_SIDE:
        sift_scale = 1.0
    detector = cv2.SIFT_create(sigma=sift_sigma(sift_scale))
    found = [sift_points(cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY), detector, border, sift_scale) for t in keyframes]
    counts = [len(xy) for xy, _ in found]
    poor = [int(t) for t, c in zip(keyframes, counts, strict=True) if c < minimum]
    if poor or sum(counts) < num_queries:
        raise SampleError(
            "queries",
            f"too few features: SIFT found {counts} points on keyframes {keyframes.tolist()}; "
            f"need {num_queries} in all and at least {minimum} on each",
        )
    taken = allocate(counts, num_queries)
    rows, responses = [], []
    for t, (xy, response), n in zip(keyframes, found, taken, strict=True):
        rows.append(np.column_stack([np.full(n, t, np.float32), xy[:n]]))
        responses.append(response[:n])
    queries = np.concatenate(rows).astype(np.float32)
    stats = {
        "keyframes": keyframes.tolist(),
        "found": counts,
        "taken": taken,
        "mean_response": float(np.concatenate(responses).mean()),
        "start_bias": float(start_bias),
        "min_per_keyframe": int(minimum),
    }
    return queries, stats
