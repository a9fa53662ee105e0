"""SIFT query sampling: keyframes biased to the start, spread, reproducibility, too few features."""

from __future__ import annotations

import numpy as np
import pytest
from videos import translating_frames

from pseudotrack.errors import SampleError
from pseudotrack.tasks.decode import decode_clip
from pseudotrack.tasks.queries import choose_keyframes, sample_queries, sift_points


def test_keyframes_are_distinct_and_biased_to_the_start():
    rng = np.random.default_rng(0)
    draws = np.concatenate([choose_keyframes(64, 8, rng) for _ in range(300)])
    assert all(len(set(choose_keyframes(64, 8, rng))) == 8 for _ in range(20))
    assert np.mean(draws < 21) > np.mean(draws >= 43) + 0.15
    assert choose_keyframes(5, 8, rng).tolist() == [0, 1, 2, 3, 4]


def test_queries_on_a_real_clip(sample_videos):
    clip = decode_clip(sample_videos[1].read_bytes(), "bear", 192, 256, 24, rng=np.random.default_rng(2))
    queries, stats = sample_queries(clip.frames, num_queries=128, num_keyframes=8, rng=np.random.default_rng(3))
    assert queries.shape == (128, 3) and queries.dtype == np.float32
    assert sorted(set(queries[:, 0].astype(int).tolist())) == stats["keyframes"]
    assert sum(stats["taken"]) == 128 and max(stats["taken"]) - min(stats["taken"]) <= 1
    assert (queries[:, 1] >= 2).all() and (queries[:, 1] <= 256 - 3).all()
    assert (queries[:, 2] >= 2).all() and (queries[:, 2] <= 192 - 3).all()
    per_frame = {t: queries[queries[:, 0] == t, 1:] for t in stats["keyframes"]}
    for points in per_frame.values():  # one query per location
        assert len(np.unique(np.round(points, 1), axis=0)) == len(points)
    again, _ = sample_queries(clip.frames, num_queries=128, num_keyframes=8, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(queries, again)


def test_strongest_points_first_and_no_duplicate_locations():
    import cv2

    frame = translating_frames(1, 128, 128, 0, 0)[0]
    xy, response = sift_points(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.SIFT_create())
    assert len(xy) > 20
    assert np.all(np.diff(response) <= 0)
    assert len(np.unique(np.round(xy, 1), axis=0)) == len(xy)


def test_flat_clip_fails_with_too_few_features():
    flat = np.full((12, 96, 128, 3), 127, np.uint8)
    with pytest.raises(SampleError, match="too few features") as info:
        sample_queries(flat, num_queries=64, num_keyframes=4, rng=np.random.default_rng(0))
    assert info.value.stage == "queries"


def test_a_poor_keyframe_fails_the_clip():
    frames = translating_frames(8, 96, 128, 1, 0)
    frames[:] = frames[0]
    frames[0] = 127  # the first frame, always likely a keyframe, is flat
    with pytest.raises(SampleError, match="too few features"):
        sample_queries(frames, num_queries=32, num_keyframes=8, rng=np.random.default_rng(0))
