"""The `lk` teacher: known motion is recovered, lost points become invisible, both directions work."""

from __future__ import annotations

import numpy as np
from videos import translating_frames

from pseudotrack.teachers.base import Teacher, create_teacher, teacher_names


def test_registered_without_checkpoint():
    assert "lk" in teacher_names()
    teacher = create_teacher("lk")
    assert isinstance(teacher, Teacher)
    assert teacher.checkpoint_sha256 == "" and teacher.tracks_occluded is False


def test_tracks_a_known_translation_both_ways():
    dx, dy, t_len = 1.5, -0.75, 12
    frames = translating_frames(t_len, 96, 128, dx, dy, seed=3)
    grid = np.stack(np.meshgrid(np.linspace(40, 88, 5), np.linspace(30, 66, 4)), -1).reshape(-1, 2)
    q_t = np.array([0, 5, 11] * 7)[: len(grid)]
    queries = np.column_stack([q_t, grid]).astype(np.float32)
    teacher = create_teacher("lk")
    teacher.setup("cpu")
    out = teacher.predict(frames, queries)
    assert out.tracks.shape == (t_len, len(grid), 2) and out.visibility.shape == (t_len, len(grid))
    t = np.arange(t_len)[:, None]
    expected = grid[None] + (t - q_t[None])[..., None] * np.array([dx, dy])
    assert out.visibility.mean() > 0.95
    err = np.linalg.norm(out.tracks - expected, axis=-1)
    assert np.median(err) < 0.3 and err[out.visibility].max() < 1.0
    np.testing.assert_allclose(out.tracks[q_t, np.arange(len(grid))], grid, atol=1e-5)
    assert out.confidence.dtype == np.float16 and (out.confidence <= 1).all() and (out.confidence >= 0).all()


def test_points_leaving_the_frame_become_invisible_and_hold_position():
    frames = translating_frames(16, 64, 96, 4.0, 0.0, seed=1)  # content moves right 4 px per frame
    queries = np.array([[0, 80, 32], [0, 20, 32]], np.float32)
    out = create_teacher("lk").predict(frames, queries)
    leaving = out.visibility[:, 0]
    assert leaving[0] and not leaving[-1]
    first_lost = int(np.argmin(leaving))
    assert (out.tracks[first_lost:, 0] == out.tracks[first_lost, 0]).all()
    assert not leaving[first_lost:].any()
    assert out.visibility[:, 1].sum() > out.visibility[:, 0].sum()
    assert np.isfinite(out.tracks).all()


def test_no_queries():
    out = create_teacher("lk").predict(translating_frames(4, 32, 32, 1, 0), np.zeros((0, 3), np.float32))
    assert out.tracks.shape == (4, 0, 2)
