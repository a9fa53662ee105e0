"""How good a teacher is on scenes with exact ground truth: δ_avg, AJ and OA per teacher, per round.

The quality score (`tasks/quality.py`) ranks tracks within a teacher's output;
it cannot say whether a teacher is good at all. Calibration can: a small fixed
set of generated scenes (`synthetic.render_scene`, exact tracks and
occlusions) is labelled by the round's teacher through the same
`predict_clips` call the labelling stage uses, and scored with the TAP-Vid
metrics at 256x256, as the benchmarks are.

The default set is 3 scenes of 24 frames at 128x160 with 48 points each ('first'
queries: each point from its first visible frame), fixed seeds, so the figures
of two rounds compare. It is meant to cost under 5% of a 100-video round's
teacher time (`bench/bench_label_quality.py` prints the measured share).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..synthetic import render_scene
from ..teachers.base import Teacher, TeacherOutput, predict_clips
from .metrics import compute_tapvid_metrics, sample_queries

CALIBRATION_SEED = 7100
BENCHMARK_SIDE = 256.0


@dataclass(frozen=True)
class CalibrationSet:
    """Which generated scenes a teacher is calibrated on; the defaults are the round's."""

    scenes: int = 3
    frames: int = 24
    height: int = 128
    width: int = 160
    points: int = 48
    seed: int = CALIBRATION_SEED
    query_mode: str = "first"

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.scenes < 1 or self.frames < 2 or self.points < 1:
            raise ConfigError(
                f"calibration set: scenes={self.scenes} must be >= 1, frames={self.frames} >= 2 and "
                f"points={self.points} >= 1"
            )
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ConfigError(f"calibration set: {self.height}x{self.width} must be even and at least 16x16")
        if self.query_mode not in ("first", "strided"):
            raise ConfigError(f"calibration set: query_mode={self.query_mode!r}: choose first or strided")


@dataclass(frozen=True)
class Calibration:
    """One teacher's scores on the set: means over its scenes, plain floats (for the round's JSON)."""

    teacher: str
    delta_avg: float
    average_jaccard: float
    occlusion_accuracy: float
    scenes: int
    queries: int
    seconds: float
    failed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(teacher: Teacher, calibration_set: CalibrationSet = CalibrationSet(), max_clips: int = 1) -> Calibration:
    """Label the set's scenes with `teacher` (already set up) and score them against the exact tracks.

    A scene the teacher fails on counts in `failed` and is left out of the means; if every
    scene fails, the means are NaN (the caller records that, it does not stop a round).
    """
    cs = calibration_set
    start = time.perf_counter()
    clips, query_sets = [], []
    for i in range(cs.scenes):
        scene = render_scene(cs.seed + i, num_frames=cs.frames, height=cs.height, width=cs.width, num_points=cs.points)
        queries = sample_queries(scene.tracks, scene.occluded, cs.query_mode)
        qp = queries.query_points  # (t, y, x)
        clips.append((scene.frames, np.stack([qp[:, 0], qp[:, 2], qp[:, 1]], axis=-1).astype(np.float32)))
        query_sets.append(queries)
    outputs = predict_clips(teacher, clips, max_clips=max_clips)
    to_256 = np.array([BENCHMARK_SIDE / cs.width, BENCHMARK_SIDE / cs.height])
    rows, failed, total = [], 0, 0
    for out, queries in zip(outputs, query_sets, strict=True):
        if not isinstance(out, TeacherOutput) or not out.is_finite():
            failed += 1
            continue
        qp = queries.query_points
        metrics = compute_tapvid_metrics(
            query_points=np.concatenate([qp[:, :1], qp[:, 1:] * to_256[::-1]], axis=1)[None],
            gt_occluded=queries.occluded[None],
            gt_tracks=(queries.tracks * to_256)[None],
            pred_occluded=~out.visibility.T[None],
            pred_tracks=(out.tracks.transpose(1, 0, 2) * to_256)[None],
            query_mode=cs.query_mode,
        )
        rows.append({k: float(v[0]) for k, v in metrics.items()})
        total += len(qp)

    def mean(name: str) -> float:
        values = [r[name] for r in rows if np.isfinite(r[name])]
        return float(np.mean(values)) if values else float("nan")

    return Calibration(
        teacher=getattr(teacher, "name", type(teacher).__name__),
        delta_avg=mean("average_pts_within_thresh"),
        average_jaccard=mean("average_jaccard"),
        occlusion_accuracy=mean("occlusion_accuracy"),
        scenes=len(rows),
        queries=total,
        seconds=time.perf_counter() - start,
        failed=failed,
    )


def calibrate_teachers(
    get_teacher, names: list[str], calibration_set: CalibrationSet = CalibrationSet()
) -> dict[str, dict]:
    """Each teacher's calibration as a plain dict for a round's record, never raising for a teacher.

    get_teacher: name -> a set-up teacher (the round's `TeacherPool.get`, so nothing is loaded twice).
    A teacher that cannot be set up or calibrated gets {"error": why} instead of figures, and the
    round goes on: calibration describes the teachers, it does not gate the labels. NaN (every scene
    failed) is written as None, since strict JSON has no NaN.
    """
    out: dict[str, dict] = {}
    for name in names:
        try:
            figures = calibrate(get_teacher(name), calibration_set).to_dict()
        except Exception as exc:  # recorded, not raised: a round never fails on its calibration
            out[name] = {"teacher": name, "error": f"{type(exc).__name__}: {exc}"}
            continue
        figures["teacher"] = name
        out[name] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()}
    return out
