"""The `lk` teacher: known motion is recovered both ways, lost points stay lost, inputs are checked."""

from __future__ import annotations

import numpy as np
import pytest
from videos import translating_frames

from pseudotrack.errors import ConfigError
from pseudotrack.teachers.base import Teacher, create_teacher, teacher_names
from pseudotrack.teachers.lk import LKTeacher, track_points


def truth(queries: np.ndarray, t_len: int, dx: float, dy: float) -> np.ndarray:
    """[T, N, 2] positions of queries under a translation of (dx, dy) per frame."""
    steps = np.arange(t_len)[:, None] - queries[None, :, 0]
    return queries[None, :, 1:] + steps[..., None] * np.array([dx, dy], np.float32)


def test_registered_without_checkpoint():
    assert "lk" in teacher_names()
    teacher = create_teacher("lk")
    assert isinstance(teacher, Teacher) and isinstance(teacher, LKTeacher)
    assert teacher.name == "lk" and teacher.checkpoint_sha256 == "" and teacher.tracks_occluded is False
    teacher.setup("cuda")  # nothing to load, whatever the device
    with pytest.raises(ConfigError, match="no weights"):
        create_teacher("lk", checkpoint="weights.pth")
    with pytest.raises(ConfigError, match="no option windw"):
        LKTeacher(windw=15)
    with pytest.raises(ConfigError, match="fb_threshold"):
        LKTeacher(fb_threshold=0)


def test_tracks_a_known_translation_both_ways():
    dx, dy, t_len = 1.5, -0.75, 16
    frames = translating_frames(t_len, 96, 128, dx, dy, seed=3)
    grid = np.stack(np.meshgrid(np.linspace(40, 88, 5), np.linspace(34, 62, 4)), -1).reshape(-1, 2)
    query_t = np.array([0, 7, 15] * 7)[: len(grid)]
    queries = np.column_stack([query_t, grid]).astype(np.float32)
    out = create_teacher("lk").predict(frames, queries)
    assert out.tracks.shape == (t_len, 20, 2) and out.tracks.dtype == np.float32
    assert out.visibility.shape == (t_len, 20) and out.visibility.dtype == bool
    assert out.confidence.shape == (t_len, 20) and out.confidence.dtype == np.float16
    assert out.visibility.all()  # points tracked forward from frame 0, backward from 15, and both ways from 7
    error = np.linalg.norm(out.tracks - truth(queries, t_len, dx, dy), axis=-1)
    assert error.max() < 0.5 and np.median(error) < 0.15
    np.testing.assert_array_equal(out.tracks[query_t, np.arange(20)], grid.astype(np.float32))
    assert (out.confidence[query_t, np.arange(20)] == 1).all()
    confidence = out.confidence.astype(np.float32)
    assert (confidence > np.exp(-1) - 1e-3).all() and (confidence <= 1).all()


def test_points_leaving_the_frame_become_invisible_and_hold_position():
    frames = translating_frames(16, 64, 96, 4.0, 0.0, seed=1)  # content moves right 4 px per frame
    queries = np.array([[0, 76, 32], [0, 16, 32], [15, 14, 32]], np.float32)
    out = track_points(frames, queries)
    leaving = out.visibility[:, 0]  # reaches x = 95 near frame 5
    assert leaving[:4].all() and not leaving[6:].any()
    lost = int(np.argmin(leaving))
    assert (out.tracks[lost:, 0] == out.tracks[lost - 1, 0]).all()  # holds the last position it had
    assert 0 <= out.tracks[lost, 0, 0] <= 95
    assert out.visibility[:, 1].all()  # moves from x = 16 to 76, always inside
    backward = out.visibility[:, 2]  # queried on the last frame at x = 14: backward in time it leaves left
    assert backward[13:].all() and not backward[:12].any()  # lost once LK's window hangs over the edge
    assert np.isfinite(out.tracks).all() and (out.confidence[~out.visibility] == 0).all()


def test_a_lost_point_stays_lost_when_its_content_comes_back():
    frames = translating_frames(12, 64, 64, 1.0, 0.0, seed=2)
    frames[5:8] = translating_frames(3, 64, 64, 0.0, 0.0, seed=9)  # a cut to another texture, then back
    queries = np.array([[0, 24, 32], [11, 40, 20]], np.float32)
    out = track_points(frames, queries)
    assert out.visibility[:5, 0].all() and not out.visibility[5:, 0].any()
    assert out.visibility[8:, 1].all() and not out.visibility[:8, 1].any()


def test_forward_backward_threshold_decides_visibility(sample_videos):
    from pseudotrack.tasks.decode import decode_clip
    from pseudotrack.tasks.queries import sample_queries

    data = next(p for p in sample_videos if p.name == "cat.mp4").read_bytes()
    frames = decode_clip(data, "cat", 96, 128, 12, stride=1, rng=np.random.default_rng(0)).frames
    queries, _ = sample_queries(frames, 48, 4, rng=np.random.default_rng(0))
    loose = LKTeacher().predict(frames, queries)
    strict = LKTeacher(fb_threshold=0.01).predict(frames, queries)
    assert loose.is_finite() and strict.is_finite()
    near = np.abs(np.arange(12)[:, None] - queries[None, :, 0]) <= 1
    assert loose.visibility[near].mean() > 0.8
    assert strict.visibility.sum() < 0.8 * loose.visibility.sum()
    assert not (strict.visibility & ~loose.visibility).any()  # a stricter check only removes points


def test_no_queries_and_bad_inputs():
    frames = translating_frames(4, 32, 32, 1, 0)
    out = track_points(frames, np.zeros((0, 3), np.float32))
    assert out.tracks.shape == (4, 0, 2) and out.visibility.shape == (4, 0)
    with pytest.raises(ValueError, match="query frames"):
        track_points(frames, np.array([[4, 10, 10]], np.float32))
    with pytest.raises(ValueError, match=r"queries must be \[N, 3\]"):
        track_points(frames, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        track_points(frames.astype(np.float32), np.zeros((0, 3), np.float32))
