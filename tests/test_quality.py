"""Label quality scores (tasks/quality.py) and calibration (tasks/calibration.py) on small generated scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.errors import ConfigError, SampleError
from pseudotrack.student.calibration import CalibrationSet, calibrate
from pseudotrack.student.metrics import sample_queries
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks import quality as q
from pseudotrack.teachers.base import TeacherOutput, create_teacher

H, W, T = 96, 128, 16


def scene_queries(seed: int, points: int = 48):
    scene = render_scene(seed, num_frames=T, height=H, width=W, num_points=points)
    qs = sample_queries(scene.tracks, scene.occluded, "first")
    qp = qs.query_points
    return scene, qs, np.stack([qp[:, 0], qp[:, 2], qp[:, 1]], -1).astype(np.float32)


def true_error(out: TeacherOutput, qs, queries: np.ndarray) -> np.ndarray:
    d = np.linalg.norm((out.tracks.transpose(1, 0, 2) - qs.tracks) * np.array([256 / W, 256 / H]), axis=-1)
    seen = ~qs.occluded
    seen[np.arange(len(queries)), queries[:, 0].astype(int)] = False
    return np.where(seen, d, 0).sum(1) / np.maximum(seen.sum(1), 1), seen.any(1)


def panning_labels(n: int = 6, t_len: int = 10, step: float = 2.0):
    """Every track moves `step` pixels right per frame, all visible; queries at frame 0."""
    start = np.stack([np.linspace(10, 60, n), np.linspace(10, 50, n)], -1)
    tracks = start[None] + np.arange(t_len)[:, None, None] * np.array([step, 0.0])
    queries = np.concatenate([np.zeros((n, 1)), start], 1).astype(np.float32)
    return tracks.astype(np.float32), np.ones((t_len, n), bool), queries


def test_scores_rank_lk_tracks_by_their_true_error() -> None:
    teacher = create_teacher("lk")
    scores, errors = [], []
    for seed in (11, 12):
        scene, qs, queries = scene_queries(seed)
        out = teacher.predict(scene.frames, queries)
        fb = q.forward_backward_error(teacher.predict, scene.frames, queries, out.tracks, out.visibility)
        s, signals = q.track_quality(
            out.tracks, out.visibility, out.confidence, queries, (H, W), frames=scene.frames, fb_error=fb
        )
        assert s.dtype == np.float32 and ((s >= 0) & (s <= 1)).all()
        assert set(signals) == set(q.SIGNALS)
        err, ok = true_error(out, qs, queries)
        scores.append(s[ok])
        errors.append(err[ok])
    scores, errors = np.concatenate(scores), np.concatenate(errors)
    rho = q.spearman(scores, -errors)
    assert rho >= 0.3, rho
    kept = np.argsort(scores, kind="stable")[round(0.2 * len(scores)) :]  # the 20% lowest-scored dropped
    drop = 1.0 - errors[kept].mean() / errors.mean()
    assert drop >= 0.1, drop  # the bench's bound is 30% on bigger scenes


def test_spearman_matches_known_values() -> None:
    assert q.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert q.spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    # ties take average ranks: ranks (1.5, 1.5, 3) vs (1, 2, 3)
    assert q.spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(q.spearman(np.ones(4), np.arange(4.0)))


def test_non_finite_labels_are_a_sample_error_not_a_nan_score() -> None:
    tracks, vis, queries = panning_labels()
    tracks[3, 2, 0] = np.nan
    with pytest.raises(SampleError, match="NaN or infinite") as info:
        q.track_quality(tracks, vis, None, queries, (64, 96))
    assert info.value.stage == "quality"
    tracks, vis, queries = panning_labels()
    confidence = np.ones(vis.shape, np.float32)
    confidence[0, 0] = np.inf
    with pytest.raises(SampleError, match="confidence"):
        q.track_quality(tracks, vis, confidence, queries, (64, 96))
    with pytest.raises(SampleError, match="forward-backward"):
        q.track_quality(tracks, vis, None, queries, (64, 96), fb_error=np.full(len(queries), np.inf))


def test_a_teacher_without_confidence_is_unknown_not_perfect() -> None:
    tracks, vis, queries = panning_labels()
    ones = np.ones(vis.shape, np.float16)
    scores, signals = q.track_quality(tracks, vis, ones, queries, (64, 96))
    assert np.isnan(signals["confidence"]).all() and np.isfinite(scores).all()
    low = np.full(vis.shape, 0.2, np.float16)
    low_scores, low_signals = q.track_quality(tracks, vis, low, queries, (64, 96))
    assert low_signals["confidence"] == pytest.approx(0.2, abs=1e-3)
    assert (low_scores < scores).all()


def test_a_track_that_stays_still_while_the_scene_moves_is_scored_down() -> None:
    tracks, vis, queries = panning_labels(n=8)
    tracks[:, 5] = tracks[0, 5]  # stuck at its query point, still 'visible'
    scores, signals = q.track_quality(tracks, vis, None, queries, (64, 96))
    assert signals["motion"][5] == 0.0 and (np.delete(signals["motion"], 5) == 1.0).all()
    assert scores[5] < 0.6 * np.delete(scores, 5).min()


def test_a_teacher_whose_every_track_is_stuck_is_caught_by_the_frames_motion() -> None:
    scene, _, queries = scene_queries(21)
    held = create_teacher("noop").predict(scene.frames, queries)
    _, blind = q.track_quality(held.tracks, held.visibility, None, queries, (H, W))
    assert np.isnan(blind["motion"]).all()  # from the tracks alone the scene looks still
    _, seen = q.track_quality(held.tracks, held.visibility, None, queries, (H, W), frames=scene.frames)
    assert np.nanmax(seen["motion"]) < 0.5


def test_teachers_that_agree_score_high_and_a_disagreeing_track_scores_low() -> None:
    tracks, vis, queries = panning_labels(n=6)
    other = tracks.copy()
    other[1:, 4] += np.array([12.0, 0.0])  # the other teacher puts track 4 elsewhere
    scores, signals = q.track_quality(tracks, vis, None, queries, (64, 96), others=[(other, vis)])
    assert np.delete(signals["agreement"], 4) == pytest.approx(1.0)
    assert signals["agreement"][4] < 0.05 and scores[4] < 0.5 * np.delete(scores, 4).min()
    hidden = vis.copy()
    hidden[5:, 2] = False  # the other teacher loses track 2 halfway
    _, signals = q.track_quality(tracks, vis, None, queries, (64, 96), others=[(tracks, hidden)])
    assert signals["agreement"][2] == pytest.approx(0.5)
    _, alone = q.track_quality(tracks, vis, None, queries, (64, 96))
    assert np.isnan(alone["agreement"]).all()


def oracle(scene):
    """A perfect predictor: the scene's exact tracks of any queries."""

    def predict(frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        reversed_clip = np.array_equal(frames[0], scene.frames[-1]) and not np.array_equal(frames[0], scene.frames[0])
        t_len = len(scene.frames)
        forward = queries.astype(np.float64).copy()
        if reversed_clip:
            forward[:, 0] = t_len - 1 - forward[:, 0]
        tracks, occluded, _ = scene.track_queries(forward)
        tracks, visible = tracks.transpose(1, 0, 2), ~occluded.T
        if reversed_clip:
            tracks, visible = tracks[::-1], visible[::-1]
        return TeacherOutput(tracks, visible, np.ones(visible.shape))

    return predict


def test_forward_backward_of_a_perfect_predictor_is_consistent_and_of_a_bad_one_is_not() -> None:
    scene, _, queries = scene_queries(31)
    predict = oracle(scene)
    out = predict(scene.frames, queries)
    error = q.forward_backward_error(predict, scene.frames, queries, out.tracks, out.visibility)
    checked = np.isfinite(error)
    assert checked.mean() > 0.8 and error[checked].max() < 0.05
    assert q.consistency_signal(error, len(error))[checked].min() > 0.99
    held = create_teacher("noop")  # holds every point still: its round trip lands where the clip's end was
    error = q.forward_backward_error(held.predict, scene.frames, queries, out.tracks, out.visibility)
    assert np.nanmedian(error) > 5.0


def test_the_forward_backward_draw_is_per_video_stable_and_near_its_fraction() -> None:
    keys = [f"videos/{i:05d}.mp4" for i in range(2000)]
    chosen = [q.forward_backward_chosen(7, k, 0.05) for k in keys]
    assert 0.03 < np.mean(chosen) < 0.07
    assert chosen == [q.forward_backward_chosen(7, k, 0.05) for k in keys]
    assert not any(q.forward_backward_chosen(7, k, 0.0) for k in keys[:50])
    assert all(q.forward_backward_chosen(7, k, 1.0) for k in keys[:50])


def test_sample_summary_is_plain_json_and_feeds_filters_masks_and_weights() -> None:
    scores = np.array([0.9, 0.8, 0.2, 0.6], np.float32)
    signals = {"coverage": np.array([1, 1, 0.5, 1], np.float32), "agreement": np.full(4, np.nan, np.float32)}
    summary = q.sample_quality({"lk": (scores, signals), "tapir": (scores * 0.5, signals)}, forward_backward=True)
    text = json.dumps(summary)  # numpy scalars would raise here
    assert json.loads(text) == summary
    assert summary["teachers"]["lk"]["mean"] == pytest.approx(0.625) and summary["mean"] == pytest.approx(0.46875)
    assert (
        summary["teachers"]["lk"]["low_fraction"] == 0.25 and summary["teachers"]["lk"]["signals"]["agreement"] is None
    )
    columns = q.catalog_columns(summary, ["tapir", "lk"])
    assert columns["quality_min_teacher"] == pytest.approx(0.3125) and columns["quality_fb"] is True
    assert columns.pop("quality_teachers") == pytest.approx([0.3125, 0.625])  # in the row's teacher order
    assert all(isinstance(v, (float, bool)) for v in columns.values())
    assert q.sample_quality_reason(summary, 0.5) == "quality: 0.469 < 0.5"
    assert q.sample_quality_reason(summary, 0.4) is None and q.sample_quality_reason(summary, None) is None
    assert q.track_quality_mask(scores, 0.6).tolist() == [True, True, False, True]
    assert q.track_quality_mask(scores, None).all()
    assert q.quality_field("cotracker3_online") == "cotracker3_online.quality.npy"
    weights = q.quality_loss_weights(np.array([0.9, 0.0, 0.3, np.nan]))
    assert weights.dtype == np.float32 and weights.tolist() == pytest.approx([0.9, 0.05, 0.3, 0.05])


def test_a_clip_without_tracks_scores_nothing_and_does_not_fail() -> None:
    scores, signals = q.track_quality(np.zeros((5, 0, 2)), np.zeros((5, 0), bool), None, np.zeros((0, 3)), (32, 32))
    assert scores.shape == (0,) and all(v.shape == (0,) for v in signals.values())
    summary = q.sample_quality({"lk": (scores, signals)})
    assert summary["mean"] is None and q.sample_quality_reason(summary, 0.9) is None


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_quality_options_out_of_range_are_clear_errors(value) -> None:
    for name in ("quality_sample", "min_track_quality", "min_sample_quality"):
        with pytest.raises(ConfigError, match=f"{name}=.* between 0 and 1"):
            RoundConfig(bucket="b", workspace="w", **{name: value})
    with pytest.raises(ConfigError, match="min_track_quality"):
        q.track_quality_mask(np.ones(3), value)
    with pytest.raises(ConfigError, match="min_sample_quality"):
        q.sample_quality_reason({"mean": 0.5}, value)
    with pytest.raises(ConfigError, match="quality_sample"):
        q.forward_backward_chosen(0, "k", value)


def test_quality_options_default_and_round_trip() -> None:
    config = RoundConfig(bucket="b", workspace="w", min_track_quality=0.3, min_sample_quality=0.0)
    assert config.quality_sample == 0.05
    again = RoundConfig.from_dict(json.loads(config.to_json()))
    assert (again.min_track_quality, again.min_sample_quality, again.quality_sample) == (0.3, 0.0, 0.05)


def test_calibration_scores_lk_against_exact_tracks_and_a_still_teacher_lower() -> None:
    small = CalibrationSet(scenes=2, frames=12, height=64, width=96, points=24)
    lk = calibrate(create_teacher("lk"), small)
    still = calibrate(create_teacher("noop"), small)
    assert lk.teacher == "lk" and lk.scenes == 2 and lk.failed == 0 and lk.queries > 0
    for value in (lk.delta_avg, lk.average_jaccard, lk.occlusion_accuracy):
        assert 0.0 <= value <= 1.0
    assert lk.delta_avg > still.delta_avg + 0.1
    assert json.loads(json.dumps(lk.to_dict()))["teacher"] == "lk"
    with pytest.raises(ConfigError, match="scenes"):
        CalibrationSet(scenes=0)


def test_clip_quality_scores_every_teacher_against_the_others_in_one_call() -> None:
    scene, _, queries = scene_queries(41, points=24)
    lk, held = create_teacher("lk"), create_teacher("noop")
    labels = {"lk": lk.predict(scene.frames, queries), "noop": held.predict(scene.frames, queries)}
    scores, summary = q.clip_quality(scene.frames, queries, labels, predicts={"lk": lk.predict})
    assert set(scores) == {"lk", "noop"} and all(s.shape == (len(queries),) for s in scores.values())
    assert summary["forward_backward"] is True and json.loads(json.dumps(summary)) == summary
    lk_part, noop_part = summary["teachers"]["lk"], summary["teachers"]["noop"]
    assert lk_part["signals"]["consistency"] is not None and noop_part["signals"]["consistency"] is None
    assert noop_part["signals"]["confidence"] is None  # all ones: no confidence, unknown
    assert lk_part["mean"] > noop_part["mean"]


def test_report_gives_each_teacher_its_own_scores_and_reads_older_rows() -> None:
    """A clip two teachers labelled counts in each one's distribution with that teacher's own mean; a row from
    before the per-teacher column counts under the joined label with the sample's mean; unscored is unknown."""
    import pyarrow as pa

    from pseudotrack.tasks.quality_report import round_quality

    rows = [
        {"teachers": ["lk", "tapir"], "quality_mean": 0.5, "quality_teachers": [0.9, 0.1]},
        {"teachers": ["lk"], "quality_mean": 0.7, "quality_teachers": [0.7]},
        {"teachers": ["lk", "tapir"], "quality_mean": 0.4, "quality_teachers": None},  # written before the column
        {"teachers": ["lk"], "quality_mean": None, "quality_teachers": None},  # before scores existed
    ]
    table = pa.table(
        {
            "round_id": ["r"] * len(rows),
            "status": ["labelled"] * len(rows),
            "stage": pa.array([None] * len(rows), pa.string()),
            "video_key": [f"v{i}" for i in range(len(rows))],
            "sample_key": [f"s{i}" for i in range(len(rows))],
            "teachers": [r["teachers"] for r in rows],
            "quality_mean": pa.array([r["quality_mean"] for r in rows], pa.float64()),
            "quality_low_fraction": pa.array([None] * len(rows), pa.float64()),
            "quality_teachers": pa.array([r["quality_teachers"] for r in rows], pa.list_(pa.float64())),
        }
    )
    report = round_quality(table)["r"]
    teachers = report["teachers"]
    assert set(teachers) == {"lk", "tapir", "lk+tapir"}
    assert teachers["lk"]["count"] == 2 and teachers["lk"]["mean"] == pytest.approx(0.8)
    assert teachers["tapir"]["count"] == 1 and teachers["tapir"]["mean"] == pytest.approx(0.1)
    assert teachers["tapir"]["histogram"][1] == 1  # 0.1 falls in the second of ten bins
    assert teachers["lk+tapir"]["count"] == 1 and teachers["lk+tapir"]["mean"] == pytest.approx(0.4)
    assert report["scored"] == 3 and report["unknown"] == 1
