"""How good a teacher's labels are, per track and per sample, without ground truth.

A round records which teacher labelled a clip; this module says how well. It
reads one teacher's output on one clip (and, when there are any, the other
teachers' outputs on the same queries and a forward-backward re-run) and gives
every track a score in [0, 1], so the student can skip or down-weight tracks
that are probably wrong and a person can find bad samples.

Signals, each per track, in [0, 1] with 1 = good, NaN = unknown (not measured):

* ``confidence``: the teacher's own confidence, averaged over the clip's frames
  other than the query frame (CoTracker3's confidence, TAPIR's 1 - sigmoid of
  its expected distance, lk's exp(-round-trip error)). A teacher without one
  gives all ones; that is *unknown*, not perfect.
* ``coverage``: the fraction of the clip's frames where the teacher sees the
  point inside the frame; short tracks, lost tracks and tracks that leave the
  frame score low (their labels are guesses or missing).
* ``motion``: one minus the fraction of frame pairs on which the track is
  stuck, i.e. moves less than ``STUCK_RATIO`` of the scene's motion on that
  pair while the scene moves at least ``MIN_SCENE_MOTION``. The scene's motion
  is the median step of the tracks seen on both frames, raised to the frame's
  global shift (phase correlation) when the frames are given, so a teacher
  whose every track is stuck is caught too. Unknown when the scene is still.
* ``appearance``: exp(-d / APPEARANCE_TOLERANCE), d the mean absolute colour
  difference (grey levels) between a 3x3 grid of colours around the track and
  the same grid at the query, over the frames the teacher sees. It catches a
  track that slid, consistently, onto another surface (a background point
  carried along by the object beside it), which the teacher's own checks and
  forward-backward miss. Unknown without frames.
* ``agreement``: with other teachers on the same queries, per other teacher
  exp(-d / TOLERANCE) times the fraction of frames whose visibility agrees,
  where d is the mean distance over the frames where at least one of the two
  sees the point and both positions are labels (a teacher that tracks through
  occlusion labels every frame; lk and TAPIR only where they see the point);
  averaged over the others. It cannot say which teacher is wrong, so it
  weighs no more than the teacher's own confidence.
* ``consistency``: forward-backward. The track's last visible frame after
  its query becomes a query on the time-reversed clip; the distance e between
  where that track lands on the query frame and the query point gives
  exp(-e / TOLERANCE). It doubles a teacher's cost, so it runs on a sampled
  fraction of clips (`forward_backward_chosen`).

Distances are in pixels of a 256x256 frame (x and y scaled separately, as the
TAP-Vid metrics do), so the tolerances mean the same at any clip size.

The score (one formula, for every teacher):

    score = exp( sum_i w_i * log(max(s_i, EPS)) / sum_i w_i ),  over the signals i that are known

a weighted geometric mean, with weights ``WEIGHTS`` (confidence 2, coverage 2,
motion 1, appearance 1, agreement 1, consistency 2) and EPS = 1e-3: one bad
signal pulls the score down far more than in an arithmetic mean; unknown
signals drop out rather than count as perfect; coverage is always known, so
every track gets a score. The teacher's own word (confidence, and where it
says it sees the point) weighs most: for a tracker that learnt them, a point
it loses shows there first. The weights were chosen on generated scenes of
other seeds than the ones `bench/bench_label_quality.py` scores, as the best
worse-of-two error drop of `lk` and a small trained CoTracker3 over a small
grid (each weight 0.5, 1 or 2).

A sample's summary (`sample_quality`) is, per teacher, the mean score, the
fraction of tracks below a threshold and each signal's mean: plain Python
floats for the sample's JSON, and a few columns for the catalog
(`catalog_columns`). Nothing non-finite ever leaves: non-finite labels or a
non-finite score raise `SampleError("quality", ...)`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, SampleError

SIGNALS = ("confidence", "coverage", "motion", "appearance", "agreement", "consistency")
WEIGHTS = {"confidence": 2.0, "coverage": 2.0, "motion": 1.0, "appearance": 1.0, "agreement": 1.0, "consistency": 2.0}
EPS = 1e-3
BENCHMARK_SIDE = 256.0
APPEARANCE_TOLERANCE = 10.0  # grey levels of mean colour difference that score 1/e
APPEARANCE_SPACING = 3.0  # pixels of a 256x256 frame between the colours compared around a point
TOLERANCE = 8.0  # pixels of a 256x256 frame: a distance this large scores 1/e
STUCK_RATIO = 0.2  # a step below this share of the scene's step is 'stuck'
MIN_SCENE_MOTION = 0.5  # pixels of 256x256 per frame: below it the scene counts as still
LOW_QUALITY = 0.5  # default threshold of a sample's 'low' fraction
FB_SALT = 0x9E3779B1  # separates the forward-backward draw from the labelling draws of the same video

# what another teacher said about the same queries: (tracks [T, N, 2], visibility [T, N]), optionally with a
# third item, whether that teacher tracks through occlusion (its positions on frames it does not see count)
OtherLabels = tuple
# a teacher's predict: frames uint8 [T, H, W, 3], queries [M, 3] -> object with .tracks [T, M, 2], .visibility
Predict = Callable[[np.ndarray, np.ndarray], object]


# ---------------------------------------------------------------- checks and units


def check_fraction(name: str, value: float | None, allow_none: bool = False) -> None:
    """Options that are fractions or scores live in [0, 1]; anything else is a ConfigError naming the option."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value!r} must be a number between 0 and 1")


def _to_256(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"clip size {size} must be (height, width) in pixels")
    return np.array([BENCHMARK_SIDE / w, BENCHMARK_SIDE / h], np.float64)


def _check_labels(tracks: np.ndarray, visibility: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    tracks = np.asarray(tracks, np.float64)
    visibility = np.asarray(visibility, bool)
    if tracks.ndim != 3 or tracks.shape[2] != 2 or visibility.shape != tracks.shape[:2]:
        raise ValueError(
            f"{what}: tracks must be [T, N, 2] and visibility [T, N], got {tracks.shape} and {visibility.shape}"
        )
    if not np.isfinite(tracks).all():
        raise SampleError("quality", f"{what} holds NaN or infinite track positions")
    return tracks, visibility


def _query_frames(queries: np.ndarray, t_len: int, n: int) -> np.ndarray:
    q = np.asarray(queries, np.float64)
    if q.shape != (n, 3):
        raise ValueError(f"queries must be [N, 3] (t, x, y) with N={n}, got {q.shape}")
    if not np.isfinite(q).all():
        raise SampleError("quality", "queries hold NaN or infinite values")
    t = np.rint(q[:, 0]).astype(np.int64)
    if n and (t.min() < 0 or t.max() >= t_len):
        raise ValueError(f"query frames {t.min()}..{t.max()} fall outside the clip's 0..{t_len - 1}")
    return t


# ---------------------------------------------------------------- signals


def confidence_signal(confidence: np.ndarray | None, query_t: np.ndarray, has_confidence: bool | None = None):
    """Mean confidence over the frames other than each track's query frame; NaN [N] when the teacher has none.

    has_confidence None: decided from the values (all exactly one means the teacher has none).
    """
    if confidence is None:
        return np.full(len(query_t), np.nan)
    conf = np.asarray(confidence, np.float64)
    if not np.isfinite(conf).all():
        raise SampleError("quality", "the teacher's confidence holds NaN or infinite values")
    if has_confidence is None:
        has_confidence = not bool(np.all(conf == 1.0))
    if not has_confidence:
        return np.full(len(query_t), np.nan)
    t_len, n = conf.shape
    others = np.arange(t_len)[:, None] != query_t[None, :]
    count = others.sum(axis=0)
    total = np.where(others, np.clip(conf, 0.0, 1.0), 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def inside_frame(tracks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [T, N]: positions within the image, which spans [-0.5, W - 0.5) x [-0.5, H - 0.5)."""
    h, w = size
    x, y = tracks[..., 0], tracks[..., 1]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def coverage_signal(tracks: np.ndarray, visibility: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fraction of the clip's frames where the teacher sees the point inside the frame, [N]."""
    return (visibility & inside_frame(tracks, size)).mean(axis=0).astype(np.float64)


def frame_motion(frames: np.ndarray, side: int = 128) -> np.ndarray:
    """Global shift per frame pair, [T - 1] in 256x256 pixels, by phase correlation on small grey frames.

    Cheap (one FFT pair per frame at `side` pixels) and blind to local motion: it
    only has to say whether the camera or most of the picture moves.
    """
    frames = np.asarray(frames)
    t_len, h, w = frames.shape[:3]
    if t_len < 2:
        return np.zeros(0)
    scale = min(1.0, side / max(h, w))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    greys = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames]
    greys = [g.astype(np.float32) for g in greys]
    window = cv2.createHanningWindow(size, cv2.CV_32F)
    to_256 = np.array([BENCHMARK_SIDE / size[0], BENCHMARK_SIDE / size[1]])
    shifts = np.zeros(t_len - 1)
    for t in range(t_len - 1):
        (dx, dy), _ = cv2.phaseCorrelate(greys[t], greys[t + 1], window)
        shifts[t] = float(np.hypot(dx * to_256[0], dy * to_256[1]))
    return np.where(np.isfinite(shifts), shifts, 0.0)


def motion_signal(
    tracks: np.ndarray, visibility: np.ndarray, size: tuple[int, int], frames: np.ndarray | None = None
) -> np.ndarray:
    """1 - fraction of frame pairs on which a track is stuck while the scene moves, [N]; NaN where never tested."""
    steps = np.linalg.norm(np.diff(tracks, axis=0) * _to_256(size), axis=-1)  # [T-1, N]
    both = visibility[1:] & visibility[:-1]
    scene = np.array([np.median(s[b]) if b.any() else 0.0 for s, b in zip(steps, both, strict=True)])
    if frames is not None and len(scene):
        scene = np.maximum(scene, frame_motion(frames))
    tested = both & (scene[:, None] >= MIN_SCENE_MOTION)
    stuck = tested & (steps < STUCK_RATIO * scene[:, None])
    count = tested.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, 1.0 - stuck.sum(axis=0) / np.maximum(count, 1), np.nan)


def appearance_signal(
    frames: np.ndarray | None,
    tracks: np.ndarray,
    visibility: np.ndarray,
    query_t: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """exp(-d / APPEARANCE_TOLERANCE) of how far the picture under a track drifts from the query's, [N].

    A 3x3 grid of colours around the point (spacing `APPEARANCE_SPACING` in 256x256 pixels, on
    slightly blurred frames) is compared with the same grid at the query; d is the mean absolute
    difference in grey levels over the frames the teacher sees, query frame excluded. It catches
    what a teacher's own checks cannot: a track that slid consistently onto another surface
    (e.g. a background point carried along by the object beside it). NaN without frames, or where
    the teacher sees the point only at its query.
    """
    t_len, n, _ = tracks.shape
    if frames is None or n == 0:
        return np.full(n, np.nan)
    frames = np.asarray(frames)
    h, w = size
    step = APPEARANCE_SPACING / _to_256(size)  # (x, y) pixels of the clip
    sigma = max(0.5, float(step.mean()) / 2)
    offsets = np.stack(np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]), axis=-1).reshape(-1, 2) * step
    colours = np.empty((t_len, n, len(offsets), 3), np.float32)
    for t in range(t_len):
        blurred = cv2.GaussianBlur(frames[t], (0, 0), sigma).astype(np.float32)
        pts = (tracks[t][:, None, :] + offsets[None]).astype(np.float32)  # [N, 9, 2]
        colours[t] = cv2.remap(blurred, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    reference = colours[query_t, np.arange(n)]  # [N, 9, 3]
    diff = np.abs(colours - reference[None]).mean(axis=(2, 3))  # [T, N]
    seen = visibility & inside_frame(tracks, size) & (np.arange(t_len)[:, None] != query_t[None, :])
    count = seen.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.where(seen, diff, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return np.exp(-mean / APPEARANCE_TOLERANCE)


def agreement_signal(
    tracks: np.ndarray,
    visibility: np.ndarray,
    others: Sequence[OtherLabels],
    query_t: np.ndarray,
    size: tuple[int, int],
    tracks_occluded: bool = False,
) -> np.ndarray:
    """Agreement with other teachers on the same queries, [N]; NaN without others.

    Positions are compared on the frames where at least one of the two sees the point and both
    positions mean something: a teacher's position counts where it sees the point, or everywhere
    when it tracks through occlusion (`tracks_occluded`; lk and TAPIR only hold a lost point).
    """
    n = tracks.shape[1]
    if not others:
        return np.full(n, np.nan)
    to_256 = _to_256(size)
    not_query = np.arange(tracks.shape[0])[:, None] != query_t[None, :]
    mine = visibility | tracks_occluded
    scores = []
    for k, other in enumerate(others):
        other_tracks, other_vis = _check_labels(other[0], other[1], f"other teacher {k}")
        other_through = bool(other[2]) if len(other) > 2 else False
        if other_tracks.shape != tracks.shape:
            raise ValueError(f"other teacher {k}'s tracks {other_tracks.shape} differ from {tracks.shape}")
        dist = np.linalg.norm((tracks - other_tracks) * to_256, axis=-1)
        both = mine & (other_vis | other_through) & (visibility | other_vis) & not_query
        count = both.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_d = np.where(count > 0, np.where(both, dist, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
        position = np.where(np.isfinite(mean_d), np.exp(-mean_d / TOLERANCE), 1.0)
        vis_agree = ((visibility == other_vis) | ~not_query).mean(axis=0)
        scores.append(position * vis_agree)
    return np.mean(scores, axis=0)


def consistency_signal(fb_error: np.ndarray | None, n: int) -> np.ndarray:
    """exp(-e / TOLERANCE) of forward-backward errors in 256x256 pixels, [N]; NaN where not measured."""
    if fb_error is None:
        return np.full(n, np.nan)
    err = np.asarray(fb_error, np.float64)
    if err.shape != (n,):
        raise ValueError(f"forward-backward errors must be [N] with N={n}, got {err.shape}")
    if np.isinf(err).any():
        raise SampleError("quality", "forward-backward errors hold infinite values")
    return np.exp(-err / TOLERANCE)  # NaN stays NaN: not measured


# ---------------------------------------------------------------- the score


def combine(signals: Mapping[str, np.ndarray]) -> np.ndarray:
    """The module's formula: weighted geometric mean of the known signals, float64 [N]."""
    logs, weights = [], []
    for name in SIGNALS:
        if name not in signals:
            continue
        s = np.asarray(signals[name], np.float64)
        known = np.isfinite(s)
        logs.append(np.where(known, WEIGHTS[name] * np.log(np.clip(np.where(known, s, 1.0), EPS, 1.0)), 0.0))
        weights.append(np.where(known, WEIGHTS[name], 0.0))
    if not logs:
        raise ValueError("no quality signals to combine")
    total = np.sum(weights, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.exp(np.sum(logs, axis=0) / total)


def track_quality(
    tracks: np.ndarray,
    visibility: np.ndarray,
    confidence: np.ndarray | None,
    queries: np.ndarray,
    size: tuple[int, int],
    *,
    frames: np.ndarray | None = None,
    others: Sequence[OtherLabels] = (),
    fb_error: np.ndarray | None = None,
    has_confidence: bool | None = None,
    tracks_occluded: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-track scores float32 [N] in [0, 1] and the signals behind them (float32 [N] each, NaN = unknown).

    tracks [T, N, 2] pixels of a clip of `size` (height, width); visibility [T, N] bool;
    confidence [T, N] or None; queries [N, 3] (t, x, y); frames uint8 [T, H, W, 3] for the
    scene's global motion (optional); others: the other teachers' (tracks, visibility) on the
    same queries, each optionally with whether it tracks through occlusion; fb_error [N] from
    `forward_backward_error` (NaN where not measured); tracks_occluded: whether this teacher's
    positions on frames it does not see are labels too (CoTracker) or held guesses (lk, TAPIR).
    Raises SampleError("quality", reason) for non-finite labels or scores.
    """
    tracks, visibility = _check_labels(tracks, visibility, "the teacher's labels")
    t_len, n, _ = tracks.shape
    query_t = _query_frames(queries, t_len, n)
    if frames is not None and (np.ndim(frames) != 4 or len(frames) != t_len):
        raise ValueError(f"frames must be [T, H, W, 3] with T={t_len}, got shape {np.shape(frames)}")
    if confidence is not None and np.shape(confidence) != (t_len, n):
        raise ValueError(f"confidence must be [T, N] = {(t_len, n)}, got {np.shape(confidence)}")
    signals = {
        "confidence": confidence_signal(confidence, query_t, has_confidence),
        "coverage": coverage_signal(tracks, visibility, size),
        "motion": motion_signal(tracks, visibility, size, frames),
        "appearance": appearance_signal(frames, tracks, visibility, query_t, size),
        "agreement": agreement_signal(tracks, visibility, others, query_t, size, tracks_occluded),
        "consistency": consistency_signal(fb_error, n),
    }
    scores = combine(signals)
    if n and not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise SampleError("quality", f"{bad} of {n} track quality scores are NaN or infinite")
    return np.clip(scores, 0.0, 1.0).astype(np.float32), {k: v.astype(np.float32) for k, v in signals.items()}


def clip_quality(
    frames: np.ndarray,
    queries: np.ndarray,
    labels: Mapping[str, object],
    predicts: Mapping[str, Predict] | None = None,
    has_confidence: Mapping[str, bool] | None = None,
    tracks_occluded: Mapping[str, bool] | None = None,
    threshold: float = LOW_QUALITY,
) -> tuple[dict[str, np.ndarray], dict]:
    """Every teacher's scores on one clip and the sample's `quality` object: the labelling stage's one call.

    labels: teacher name -> its output (anything with .tracks, .visibility, .confidence), all on the
    same `queries`; each teacher is compared with the others. predicts: teacher name -> its predict,
    given only for clips chosen for the forward-backward check (`forward_backward_chosen`).
    has_confidence: teacher name -> whether it has a confidence output (unset: read off the values).
    tracks_occluded: teacher name -> the teacher's `tracks_occluded` (unset: False).
    Returns ({name: float32 [N] scores}, quality object); raises SampleError("quality", ...).
    """
    predicts = predicts or {}
    has_confidence = has_confidence or {}
    through = tracks_occluded or {}
    size = tuple(np.shape(frames)[1:3])
    scores, parts = {}, {}
    for name, out in labels.items():
        others = [(o.tracks, o.visibility, through.get(other, False)) for other, o in labels.items() if other != name]
        fb = None
        if name in predicts:
            fb = forward_backward_error(predicts[name], frames, queries, out.tracks, out.visibility)
        scores[name], signals = track_quality(
            out.tracks,
            out.visibility,
            out.confidence,
            queries,
            size,
            frames=frames,
            others=others,
            fb_error=fb,
            has_confidence=has_confidence.get(name),
            tracks_occluded=through.get(name, False),
        )
        parts[name] = (scores[name], signals)
    return scores, sample_quality(parts, threshold, forward_backward=bool(predicts))


# ---------------------------------------------------------------- forward-backward


def forward_backward_chosen(seed: int, key: str, fraction: float) -> bool:
    """Whether a video gets the forward-backward check: a draw from the round seed and the video key alone.

    Independent of the labelling draws (its own salt), of batch composition and of worker count,
    so a rerun checks the same clips.
    """
    check_fraction("quality_sample", fraction)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return bool(np.random.default_rng([seed, int.from_bytes(digest[:8], "little"), FB_SALT]).random() < fraction)


def forward_backward_error(
    predict: Predict,
    frames: np.ndarray,
    queries: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
) -> np.ndarray:
    """Track each point back from its last visible frame on the time-reversed clip, float64 [N].

    The error is the distance (256x256 pixels) between where the re-run lands on the
    query frame and the query point; NaN for tracks seen on no frame after their query.
    Only frames after the query are used, and the clip is reversed (rather than querying
    a later frame of the same clip), so online teachers, which only look forward, can
    run the check too.
    """
    tracks, visibility = _check_labels(tracks, visibility, "the teacher's labels")
    t_len, n, _ = tracks.shape
    query_t = _query_frames(queries, t_len, n)
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) != t_len:
        raise ValueError(f"frames must be [T, H, W, 3] with T={t_len}, got shape {frames.shape}")
    size = frames.shape[1:3]
    frame_index = np.arange(t_len)[:, None]
    usable = visibility & inside_frame(tracks, size) & (frame_index > query_t[None, :])
    distance = np.where(usable, frame_index - query_t[None, :], -1)
    end_t = distance.argmax(axis=0)
    checked = distance.max(axis=0) > 0 if n else np.zeros(0, bool)
    error = np.full(n, np.nan)
    if not checked.any():
        return error
    rows = np.flatnonzero(checked)
    start = tracks[end_t[rows], rows]
    reversed_queries = np.concatenate([(t_len - 1 - end_t[rows])[:, None], start], axis=1).astype(np.float32)
    out = predict(np.ascontiguousarray(frames[::-1]), reversed_queries)
    back = np.asarray(out.tracks, np.float64)
    if back.shape != (t_len, len(rows), 2):
        raise ValueError(f"the forward-backward predict returned tracks {back.shape}, expected {(t_len, len(rows), 2)}")
    if not np.isfinite(back).all():
        raise SampleError("quality", "the forward-backward re-run returned NaN or infinite tracks")
    landed = back[t_len - 1 - query_t[rows], np.arange(len(rows))]
    query_xy = np.asarray(queries, np.float64)[rows, 1:]
    error[rows] = np.linalg.norm((landed - query_xy) * _to_256(size), axis=-1)
    return error


# ---------------------------------------------------------------- per sample, catalog, masks, weights


def _mean_or_none(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def teacher_summary(scores: np.ndarray, signals: Mapping[str, np.ndarray], threshold: float = LOW_QUALITY) -> dict:
    """One teacher's part of a sample's `quality` object: plain floats (None for unknown signals)."""
    check_fraction("threshold", threshold)
    scores = np.asarray(scores, np.float64)
    if scores.size and not np.isfinite(scores).all():
        raise SampleError("quality", "track quality scores hold NaN or infinite values")
    return {
        "mean": float(scores.mean()) if scores.size else None,
        "low_fraction": float((scores < threshold).mean()) if scores.size else None,
        "signals": {name: _mean_or_none(signals[name]) for name in SIGNALS if name in signals},
    }


def sample_quality(
    per_teacher: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]],
    threshold: float = LOW_QUALITY,
    forward_backward: bool = False,
) -> dict:
    """The sample JSON's `quality` object from each teacher's (scores, signals).

    {"mean": mean over teachers of their mean score, "low_fraction": likewise,
     "threshold": threshold, "forward_backward": whether the clip had the check,
     "teachers": {name: {"mean", "low_fraction", "signals": {signal: mean or None}}}}
    Only Python floats, bools and None: the `.json` field rejects numpy scalars.
    """
    teachers = {name: teacher_summary(scores, signals, threshold) for name, (scores, signals) in per_teacher.items()}
    means = [t["mean"] for t in teachers.values() if t["mean"] is not None]
    lows = [t["low_fraction"] for t in teachers.values() if t["low_fraction"] is not None]
    return {
        "mean": float(np.mean(means)) if means else None,
        "low_fraction": float(np.mean(lows)) if lows else None,
        "threshold": float(threshold),
        "forward_backward": bool(forward_backward),
        "teachers": teachers,
    }


def catalog_columns(quality: Mapping | None, names: list[str] | None = None) -> dict:
    """A few catalog columns from a sample's `quality` object (None when the sample has none).

    `quality_teachers` holds each of `names`' mean track score (None where unknown), in that order: the
    row's `teachers`, so a report can show each teacher's distribution even for clips two teachers labelled.
    """
    quality = quality or {}
    teachers = quality.get("teachers", {})
    worst = [t["mean"] for t in teachers.values() if t.get("mean") is not None]
    means = [teachers.get(n, {}).get("mean") for n in (names if names is not None else list(teachers))]
    return {
        "quality_mean": quality.get("mean"),
        "quality_min_teacher": float(min(worst)) if worst else None,
        "quality_low_fraction": quality.get("low_fraction"),
        "quality_fb": bool(quality.get("forward_backward", False)),
        "quality_teachers": [None if m is None else float(m) for m in means] if teachers else None,
    }


def quality_field(teacher: str) -> str:
    """The shard field holding a teacher's per-track scores, float32 [N]."""
    return f"{teacher}.quality.npy"


def track_quality_mask(scores: np.ndarray, min_track_quality: float | None) -> np.ndarray:
    """bool [N]: tracks the student may be supervised on (score >= the option); all True when it is unset.

    Masked tracks stay in the shard (their labels and scores are kept); the loader only
    leaves them out of the loss.
    """
    check_fraction("min_track_quality", min_track_quality, allow_none=True)
    scores = np.asarray(scores, np.float32)
    if min_track_quality is None:
        return np.ones(scores.shape, bool)
    return np.isfinite(scores) & (scores >= min_track_quality)


def sample_quality_reason(quality: Mapping | None, min_sample_quality: float | None) -> str | None:
    """The filter reason `quality: <value> < S` when a sample's mean score is below the option, else None.

    A sample without a score (no tracks) is not filtered on quality.
    """
    check_fraction("min_sample_quality", min_sample_quality, allow_none=True)
    if min_sample_quality is None or not quality or quality.get("mean") is None:
        return None
    value = float(quality["mean"])
    return f"quality: {value:.3f} < {min_sample_quality:g}" if value < min_sample_quality else None


def quality_loss_weights(scores: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """Per-track loss weights float32 [N] from scores: the score itself, never below `floor`.

    The loss divides by the sum of the weights it uses (see `student/loss.py`'s masked_mean),
    so only ratios matter: a track of score 0.9 counts three times one of 0.3. The floor keeps
    every supervised track in the gradient, so a teacher scored low everywhere still teaches.
    """
    check_fraction("floor", floor)
    scores = np.asarray(scores, np.float32)
    return np.clip(np.where(np.isfinite(scores), scores, floor), floor, 1.0).astype(np.float32)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two [M] arrays (average ranks for ties); NaN when either is constant.

    numpy only, so benches and tests need no scipy.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two [M] arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]
