"""SIFT query sampling: keyframes biased to the start, one point per location, spreading, too few features."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from videos import texture, translating_frames

from pseudotrack.errors import SampleError
from pseudotrack.tasks.decode import decode_clip
from pseudotrack.tasks.queries import allocate, choose_keyframes, keyframe_probabilities, sample_queries, sift_points


@pytest.fixture(scope="module")
def cat_clip(sample_videos):
    data = next(p for p in sample_videos if p.name == "cat.mp4").read_bytes()
    return decode_clip(data, "cat", 384, 512, 24, stride=1, rng=np.random.default_rng(0)).frames


def test_keyframes_are_distinct_sorted_and_biased_to_the_start():
    rng = np.random.default_rng(0)
    draws = [choose_keyframes(64, 8, rng) for _ in range(400)]
    assert all(len(set(d.tolist())) == 8 and np.all(np.diff(d) > 0) for d in draws)
    flat = np.concatenate(draws)
    first, last = np.mean(flat < 21), np.mean(flat >= 43)
    assert first > 0.5 and last < 0.15  # without replacement the bias is milder than for one draw (0.67 / 0.05)
    uniform = np.concatenate([choose_keyframes(64, 8, rng, start_bias=0.0) for _ in range(400)])
    assert abs(np.mean(uniform < 21) - np.mean(uniform >= 43)) < 0.05
    p = keyframe_probabilities(64)
    assert p.sum() == pytest.approx(1.0) and p[0] / p[-1] == pytest.approx(np.exp(3 * 63 / 64))
    assert choose_keyframes(5, 8, rng).tolist() == [0, 1, 2, 3, 4]


def test_sift_points_are_strongest_first_one_per_pixel_and_off_the_border():
    gray = cv2.cvtColor(texture(128, 160, seed=2), cv2.COLOR_RGB2GRAY)
    raw = cv2.SIFT_create().detect(gray, None)
    raw_cells = {(round(k.pt[0]), round(k.pt[1])) for k in raw}
    assert len(raw) > len(raw_cells)  # SIFT repeats locations, once per orientation
    xy, response = sift_points(gray, border=4.0)
    assert len(xy) > 20 and np.all(np.diff(response) <= 0)
    assert len({(round(x), round(y)) for x, y in xy}) == len(xy)
    assert xy[:, 0].min() >= 4 and xy[:, 1].min() >= 4 and xy[:, 0].max() <= 155 and xy[:, 1].max() <= 123


def test_allocate_shares_and_hands_on_shortfalls():
    assert allocate([100, 100, 100], 32) == [11, 11, 10]
    assert allocate([2, 100, 100, 5], 40) == [2, 17, 16, 5]  # 13 missing points, earliest keyframes first
    assert allocate([0, 30], 30) == [0, 30]
    with pytest.raises(ValueError):
        allocate([3, 3], 7)


def test_recipe_queries_on_a_real_clip(cat_clip):
    queries, stats = sample_queries(cat_clip, rng=np.random.default_rng(3))  # 384 queries on 8 keyframes
    assert queries.shape == (384, 3) and queries.dtype == np.float32
    assert sorted(set(queries[:, 0].astype(int).tolist())) == stats["keyframes"] and len(stats["keyframes"]) == 8
    assert sum(stats["taken"]) == 384 and stats["taken"] == [48] * 8
    assert all(f >= t for f, t in zip(stats["found"], stats["taken"], strict=True))
    assert stats["mean_response"] > 0
    x, y = queries[:, 1], queries[:, 2]
    assert x.min() >= 2 and y.min() >= 2 and x.max() <= 511 - 2 and y.max() <= 383 - 2
    for t in stats["keyframes"]:
        cells = np.round(queries[queries[:, 0] == t, 1:]).astype(int)
        assert len(np.unique(cells, axis=0)) == len(cells)
    again, stats_again = sample_queries(cat_clip, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(queries, again)
    assert stats_again == stats


def test_queries_sit_on_structure_not_on_flat_ground(sample_videos):
    data = next(p for p in sample_videos if p.name == "bear.mp4").read_bytes()
    frames = decode_clip(data, "bear", 192, 256, 12, stride=1, rng=np.random.default_rng(1)).frames
    queries, _ = sample_queries(frames, 64, 4, rng=np.random.default_rng(0))
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
    grad = np.stack([np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)) for g in gray])
    local = [grad[int(t), int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].mean() for t, x, y in queries]
    assert np.median(local) > 1.5 * np.median(grad)


def test_flat_clip_fails_with_too_few_features():
    flat = np.full((12, 96, 128, 3), 127, np.uint8)
    with pytest.raises(SampleError, match="too few features") as info:
        sample_queries(flat, num_queries=64, num_keyframes=4, rng=np.random.default_rng(0))
    assert info.value.stage == "queries"


def test_one_poor_keyframe_fails_the_clip_unless_the_rule_allows_it():
    frames = np.repeat(translating_frames(1, 96, 128, 0, 0, seed=5), 4, axis=0)
    frames[0] = 127  # every keyframe is used (4 frames, 4 keyframes); the first is flat
    with pytest.raises(SampleError, match=r"too few features: .* at least 4 on each"):
        sample_queries(frames, num_queries=64, num_keyframes=4, rng=np.random.default_rng(0))
    queries, stats = sample_queries(
        frames, num_queries=64, num_keyframes=4, rng=np.random.default_rng(0), min_per_keyframe=0
    )
    assert stats["found"][0] == 0 and stats["taken"][0] == 0 and sum(stats["taken"]) == 64
    assert not (queries[:, 0] == 0).any() and len(queries) == 64


def test_shrunk_sift_maps_points_back_to_the_keyframe():
    """SIFT on the half-size keyframe (the default at the recipe's size) reports points where the structure
    is in the full-size keyframe: blobs drawn at known sub-pixel centres are found within a third of a pixel
    (the full-size path within half a pixel: OpenCV puts its points a quarter pixel off)."""
    gx, gy = np.meshgrid(np.arange(64, 480, 80) + 0.3, np.arange(64, 340, 80) + 0.7)
    centres = np.stack([gx.ravel(), gy.ravel()], 1)
    yy, xx = np.mgrid[0:384, 0:512].astype(np.float32)
    gray = np.full((384, 512), 60.0, np.float32)
    for x, y in centres:
        gray += 150 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 5.0**2))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    for scale, tolerance in ((0.5, 1 / 3), (1.0, 0.5)):
        xy, _ = sift_points(gray, scale=scale)
        assert len(xy) >= len(centres)
        distance = np.sqrt(((xy[: len(centres), None, :] - centres[None]) ** 2).sum(-1)).min(1)
        assert distance.max() < tolerance, (scale, distance)
