"""TAP-Vid metrics (reference parity, the definitions, query sampling) and the evaluation protocol.

The protocol tests run on generated scenes, whose exact ground truth gives an
oracle predictor for any query (``SyntheticScene.track_queries``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pseudotrack.student.benchmarks import BenchmarkVideo
from pseudotrack.student.evaluate import (
    SupportConfig,
    evaluate,
    support_queries,
    with_backward_pass,
)
from pseudotrack.student.metrics import (
    METRIC_NAMES,
    THRESHOLDS,
    compute_tapvid_metrics,
    mean_metrics,
    sample_queries_first,
    sample_queries_strided,
)
from pseudotrack.synthetic import render_scene

SHARED = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
CASES = sorted((SHARED / "reference" / "metrics").glob("tapvid_metrics_case_*.npz"))


# --------------------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("case", CASES or [None], ids=[c.stem for c in CASES] or ["missing"])
def test_reference_cases_match_to_1e6(case: Path | None) -> None:
    assert case is not None, f"no metrics cases in {SHARED}/reference/metrics; set PSEUDOTRACK_SHARED"
    arrays = np.load(case)
    expected = json.loads(case.with_suffix(".json").read_text())["expected"]
    assert set(expected) == {"first", "strided"}
    for mode, want in expected.items():
        got = compute_tapvid_metrics(
            arrays["query_points"],
            arrays["gt_occluded"],
            arrays["gt_tracks"],
            arrays["pred_occluded"],
            arrays["pred_tracks"],
            query_mode=mode,
        )
        assert set(want) <= set(got), f"{case.name} {mode}: missing {set(want) - set(got)}"
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"{mode} {name}")


# --------------------------------------------------------------------------- definitions


def brute_force_metrics(qp, gt_occ, gt_tracks, pred_occ, pred_tracks, mode):
    """The TAP-Vid definitions written point by point, to check the vectorised version on random data."""
    b, n, t = gt_occ.shape
    out = {name: np.zeros(b) for name in METRIC_NAMES}
    for v in range(b):
        scored = [
            (i, f)
            for i in range(n)
            for f in range(t)
            if (f > round(qp[v, i, 0]) if mode == "first" else f != round(qp[v, i, 0]))
        ]
        out["occlusion_accuracy"][v] = np.mean([gt_occ[v, i, f] == pred_occ[v, i, f] for i, f in scored])
        for d in THRESHOLDS:
            tp = fp = visible = close_visible = 0
            for i, f in scored:
                dist = np.hypot(*(pred_tracks[v, i, f] - gt_tracks[v, i, f]))
                close = dist * dist < d * d
                if not gt_occ[v, i, f]:
                    visible += 1
                    close_visible += close
                    tp += close and not pred_occ[v, i, f]
                if not pred_occ[v, i, f] and (gt_occ[v, i, f] or not close):
                    fp += 1
            out[f"pts_within_{d}"][v] = close_visible / visible
            out[f"jaccard_{d}"][v] = tp / (visible + fp)
        out["average_jaccard"][v] = np.mean([out[f"jaccard_{d}"][v] for d in THRESHOLDS])
        out["average_pts_within_thresh"][v] = np.mean([out[f"pts_within_{d}"][v] for d in THRESHOLDS])
    return out


@pytest.mark.parametrize("mode", ["first", "strided"])
def test_vectorised_metrics_equal_the_definitions_on_random_data(mode: str) -> None:
    rng = np.random.default_rng(3)
    b, n, t = 2, 9, 11
    gt_tracks = rng.uniform(0, 256, (b, n, t, 2))
    pred_tracks = gt_tracks + rng.normal(0, 6, (b, n, t, 2))
    gt_occ, pred_occ = rng.random((b, n, t)) < 0.3, rng.random((b, n, t)) < 0.3
    qt = rng.integers(0, t - 1, (b, n))
    qp = np.stack([qt, gt_tracks[..., 1].max(-1), gt_tracks[..., 0].max(-1)], axis=-1).astype(float)
    got = compute_tapvid_metrics(qp, gt_occ, gt_tracks, pred_occ, pred_tracks, mode)
    want = brute_force_metrics(qp, gt_occ, gt_tracks, pred_occ, pred_tracks, mode)
    for name in METRIC_NAMES:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)


def one_track(pred_dx: float, pred_occ: list[bool], gt_occ: list[bool], query_t: int, mode: str) -> dict:
    t = len(gt_occ)
    gt = np.zeros((1, 1, t, 2)) + 100.0
    pred = gt.copy()
    pred[..., 0] += pred_dx
    qp = np.array([[[query_t, 100.0, 100.0]]])
    return compute_tapvid_metrics(qp, np.array([[gt_occ]]), gt, np.array([[pred_occ]]), pred, mode)


def test_first_mode_ignores_frames_up_to_the_query_and_strided_only_the_query_frame() -> None:
    # frames 0 and 1 are predicted wrongly occluded; the query is on frame 1
    gt_occ = [False, False, False, False]
    pred_occ = [True, True, False, False]
    first = one_track(0.0, pred_occ, gt_occ, query_t=1, mode="first")
    strided = one_track(0.0, pred_occ, gt_occ, query_t=1, mode="strided")
    assert first["occlusion_accuracy"][0] == 1.0  # frames 2, 3 only
    assert strided["occlusion_accuracy"][0] == pytest.approx(2 / 3)  # frames 0, 2, 3
    assert strided["jaccard_1"][0] == pytest.approx(2 / 3)  # frame 0 is a miss: 2 TP / 3 visible


def test_threshold_is_strict_and_jaccard_counts_false_positives() -> None:
    gt_occ = [False, False, True, True]
    exactly_4 = one_track(4.0, [False] * 4, gt_occ, query_t=0, mode="first")
    # frame 1 is 4 px off: not within 4, within 8; frames 2, 3 are predicted visible but occluded
    assert exactly_4["pts_within_4"][0] == 0.0
    assert exactly_4["pts_within_8"][0] == 1.0
    assert exactly_4["jaccard_8"][0] == pytest.approx(1 / 3)  # 1 TP / (1 visible + 2 FP)
    assert exactly_4["jaccard_4"][0] == 0.0
    assert exactly_4["occlusion_accuracy"][0] == pytest.approx(1 / 3)


def test_perfect_prediction_scores_one_and_per_track_keeps_tracks() -> None:
    rng = np.random.default_rng(0)
    tracks = rng.uniform(0, 256, (1, 5, 8, 2))
    occ = rng.random((1, 5, 8)) < 0.3
    occ[..., :2] = False
    qp = np.zeros((1, 5, 3))
    per_video = compute_tapvid_metrics(qp, occ, tracks, occ, tracks, "first")
    per_track = compute_tapvid_metrics(qp, occ, tracks, occ, tracks, "first", per_track=True)
    assert all(per_video[name].shape == (1,) and per_video[name][0] == 1.0 for name in METRIC_NAMES)
    assert per_track["average_jaccard"].shape == (1, 5)


def test_bad_inputs_name_the_array_and_the_mode() -> None:
    z = np.zeros((1, 2, 3, 2))
    occ = np.zeros((1, 2, 3), bool)
    with pytest.raises(ValueError, match="pred_tracks"):
        compute_tapvid_metrics(np.zeros((1, 2, 3)), occ, z, occ, z[:, :1], "first")
    with pytest.raises(ValueError, match="query_mode"):
        compute_tapvid_metrics(np.zeros((1, 2, 3)), occ, z, occ, z, "last")
    with pytest.raises(ValueError, match="frame indices"):
        compute_tapvid_metrics(np.full((1, 2, 3), 7.0), occ, z, occ, z, "first")


def test_mean_weighs_videos_equally() -> None:
    a = {name: np.array([1.0]) for name in METRIC_NAMES}
    b = {name: 0.5 for name in METRIC_NAMES}
    assert mean_metrics([a, b, b])["average_jaccard"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one"):
        mean_metrics([])


# --------------------------------------------------------------------------- query sampling


def test_first_queries_take_the_first_visible_frame_and_drop_never_visible_tracks() -> None:
    tracks = np.arange(3 * 4 * 2, dtype=float).reshape(3, 4, 2)
    occ = np.array([[True, False, False, True], [True] * 4, [False, True, True, True]])
    q = sample_queries_first(tracks, occ)
    assert q.track_index.tolist() == [0, 2]
    np.testing.assert_array_equal(
        q.query_points, [[1, tracks[0, 1, 1], tracks[0, 1, 0]], [0, tracks[2, 0, 1], tracks[2, 0, 0]]]
    )
    np.testing.assert_array_equal(q.occluded, occ[[0, 2]])


def test_strided_queries_every_stride_frames_where_visible_ordered_by_frame() -> None:
    rng = np.random.default_rng(1)
    tracks = rng.uniform(0, 50, (4, 12, 2))
    occ = rng.random((4, 12)) < 0.4
    q = sample_queries_strided(tracks, occ, query_stride=5)
    expected = [(f, i) for f in (0, 5, 10) for i in range(4) if not occ[i, f]]
    assert [(int(t), int(i)) for t, i in zip(q.query_points[:, 0], q.track_index, strict=True)] == expected
    i, f = q.track_index[-1], int(q.query_points[-1, 0])
    np.testing.assert_array_equal(q.query_points[-1, 1:], tracks[i, f, ::-1])
    np.testing.assert_array_equal(q.tracks, tracks[q.track_index])


# --------------------------------------------------------------------------- the evaluation protocol


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(seed, num_frames=16, num_points=12) for seed in (11, 12)]


def as_videos(scenes) -> list[BenchmarkVideo]:
    return [BenchmarkVideo(f"scene{i}", s.frames, s.tracks, s.occluded) for i, s in enumerate(scenes)]


def oracle_for(scenes, scale: tuple[float, float] = (1.0, 1.0)):
    """Exact tracks for any query, on a scene's frames played forward or reversed, or resized by (sx, sy)."""
    by_key = {}
    for s in scenes:
        by_key[s.frames[0, ::7, ::7].tobytes()] = (s, False)
        by_key[s.frames[-1, ::7, ::7].tobytes()] = (s, True)
    calls = []

    def predict(frames, queries):
        calls.append(queries.copy())
        resized = frames.shape[1:3] != scenes[0].frames.shape[1:3]
        scene, reverse = (scenes[0], False) if resized else by_key[frames[0, ::7, ::7].tobytes()]
        q = queries.astype(np.float64).copy()
        q[:, 1:] /= scale
        if reverse:
            q[:, 0] = len(frames) - 1 - q[:, 0]
        tracks, occluded, _ = scene.track_queries(q)
        tracks, visible = tracks.transpose(1, 0, 2) * scale, ~occluded.T
        return (tracks[::-1].copy(), visible[::-1].copy()) if reverse else (tracks, visible)

    predict.calls = calls
    return predict


@pytest.mark.parametrize("mode", ["first", "strided"])
def test_oracle_scores_perfectly_one_call_per_query(scenes, mode: str) -> None:
    oracle = oracle_for(scenes)
    result = evaluate(oracle, as_videos(scenes), mode)
    for name in METRIC_NAMES:
        assert result[name] == 1.0, name
        assert all(v[name] == 1.0 for v in result["per_video"].values())
    info = result["info"]
    assert info["videos"] == 2 and info["predict_calls"] == info["queries"] == len(oracle.calls)
    assert all(len(call) == 1 + 64 + 25 for call in oracle.calls)


def test_constant_predictor_scores_low(scenes) -> None:
    def stay(frames, queries):
        tracks = np.broadcast_to(queries[None, :, 1:], (len(frames), len(queries), 2))
        return tracks, np.ones((len(frames), len(queries)), bool)

    result = evaluate(stay, as_videos(scenes), "first")
    assert result["average_jaccard"] < 0.5
    assert result["average_pts_within_thresh"] < 0.6
    assert result["occlusion_accuracy"] < 1.0


def test_support_points_surround_the_query_on_its_frame_and_are_dropped(scenes) -> None:
    video = as_videos(scenes[:1])
    oracle = oracle_for(scenes)

    def oracle_then_noise(frames, queries):
        tracks, visible = oracle(frames, queries)
        tracks[:, 1:] = -1000.0  # support predictions must not reach the scores
        visible[:, 1:] = ~visible[:, 1:]
        return tracks, visible

    assert evaluate(oracle_then_noise, video, "first")["average_jaccard"] == 1.0
    h, w = scenes[0].frames.shape[1:3]
    scale = np.array([(w - 1) / 511, (h - 1) / 383])
    for call in oracle.calls:
        query, local, glob = call[0], call[1:65], call[65:]
        assert np.all(call[:, 0] == query[0])  # on the query's frame
        np.testing.assert_allclose(local[:, 1:].mean(0), query[1:], atol=1e-3)  # centred on the query
        span = local[:, 1:].max(0) - local[:, 1:].min(0)
        np.testing.assert_allclose(span, (50 - 2 * 50 / 64) * scale, atol=1e-3)
        np.testing.assert_allclose(glob[:, 1:].min(0), 8 * scale, atol=1e-3)
        np.testing.assert_allclose(glob[:, 1:].max(0), [504 * scale[0], 376 * scale[1]], atol=1e-3)


def test_authors_frame_zero_support_and_all_at_once_mode(scenes) -> None:
    rows = support_queries(np.array([7.0, 30.0, 40.0]), (256, 256), SupportConfig(on_query_frame=False))
    assert rows[0, 0] == 7.0 and np.all(rows[1:, 0] == 0.0)
    oracle = oracle_for(scenes)
    result = evaluate(oracle, as_videos(scenes), "first", one_query_at_a_time=False)
    assert result["average_jaccard"] == 1.0
    assert result["info"]["predict_calls"] == len(oracle.calls) == 2
    assert sum(len(call) - 25 for call in oracle.calls) == result["info"]["queries"]


def test_grid_points_keep_a_margin_and_centre() -> None:
    from pseudotrack.teachers.support_points import grid_points  # the one grid, shared with the teachers

    grid = grid_points(5, 384.0, 512.0)
    assert grid.shape == (25, 2)
    np.testing.assert_allclose(grid[0], [8, 8])
    np.testing.assert_allclose(grid[-1], [504, 376])
    np.testing.assert_allclose(grid_points(8, 50.0, 50.0, (100.0, 30.0)).mean(0), [30, 100])


def test_backward_pass_fills_frames_before_the_query_for_strided_queries(scenes) -> None:
    oracle = oracle_for(scenes)

    def forward_only(frames, queries):  # an online tracker: nothing before the query frame
        tracks, visible = oracle(frames, queries)
        before = np.arange(len(frames))[:, None] < np.rint(queries[:, 0])[None]
        tracks[before] = 0.0
        visible[before] = False
        return tracks, visible

    videos = as_videos(scenes)
    assert evaluate(forward_only, videos, "first")["average_jaccard"] == 1.0
    assert evaluate(forward_only, videos, "strided")["average_jaccard"] < 0.95
    assert evaluate(with_backward_pass(forward_only), videos, "strided")["average_jaccard"] == 1.0


def test_scores_are_computed_at_256_whatever_the_frame_size() -> None:
    scene = render_scene(21, num_frames=10, height=128, width=192, num_points=10)
    video = [BenchmarkVideo("small", scene.frames, scene.tracks, scene.occluded)]
    oracle = oracle_for([scene])

    def off_by_1_65_px(frames, queries):  # 1.65 px at 192 wide is 2.2 px at 256
        tracks, visible = oracle(frames, queries)
        return tracks + np.array([1.65, 0.0], np.float32), visible

    native = evaluate(off_by_1_65_px, video, "first", resize_to=None)
    assert native["pts_within_2"] == 0.0 and native["pts_within_4"] == 1.0
    resized = evaluate(oracle_for([scene], scale=(256 / 192, 256 / 128)), video, "first")
    assert resized["average_jaccard"] == 1.0


def test_unscorable_videos_are_listed_and_bad_predictors_named(scenes) -> None:
    s = scenes[0]
    hidden = BenchmarkVideo("hidden", s.frames, s.tracks, np.ones_like(s.occluded))
    oracle = oracle_for(scenes)
    result = evaluate(oracle, [hidden, *as_videos(scenes[:1])], "first")
    assert result["info"]["skipped_videos"] == ["hidden"] and result["info"]["videos"] == 1
    with pytest.raises(ValueError, match="no video could be scored"):
        evaluate(oracle, [hidden], "first")

    def three_coordinates(frames, queries):
        return np.zeros((len(frames), len(queries), 3)), np.zeros((len(frames), len(queries)))

    with pytest.raises(ValueError, match="predict_fn must return"):
        evaluate(three_coordinates, as_videos(scenes), "first")
