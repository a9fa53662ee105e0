"""Synthetic scenes: the rendering agrees with the exact tracks and occlusions, fast and deterministic."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pseudotrack.synthetic import render_scene


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(seed) for seed in (0, 1, 2)]


def bilinear(frame: np.ndarray, xy: np.ndarray) -> np.ndarray:
    x0, y0 = int(np.floor(xy[0])), int(np.floor(xy[1]))
    fx, fy = xy[0] - x0, xy[1] - y0
    patch = frame[y0 : y0 + 2, x0 : x0 + 2].astype(np.float64)
    top = patch[0, 0] * (1 - fx) + patch[0, 1] * fx
    bottom = patch[1, 0] * (1 - fx) + patch[1, 1] * fx
    return top * (1 - fy) + bottom * fy


def interior_samples(scene, i: int):
    """(t, colour) where track i is visible and its 3x3 neighbourhood shows only its own layer (no edge)."""
    h, w = scene.frames.shape[1:3]
    for t in range(len(scene.frames)):
        x, y = scene.tracks[i, t]
        if scene.occluded[i, t] or not (1 <= x < w - 2 and 1 <= y < h - 2):
            continue
        xi, yi = int(np.floor(x)), int(np.floor(y))
        if np.all(scene.layer_map[t, yi - 1 : yi + 3, xi - 1 : xi + 3] == scene.point_layer[i]):
            yield t, bilinear(scene.frames[t], scene.tracks[i, t])


def test_shapes_types_and_determinism(scenes) -> None:
    scene = scenes[0]
    assert scene.frames.shape == (24, 256, 256, 3) and scene.frames.dtype == np.uint8
    assert scene.tracks.shape == (64, 24, 2) and scene.tracks.dtype == np.float32
    assert scene.occluded.shape == (64, 24) and scene.occluded.dtype == bool
    assert scene.depth_order == (0, 1, 2, 3, 4)
    again = render_scene(0)
    np.testing.assert_array_equal(again.frames, scene.frames)
    np.testing.assert_array_equal(again.tracks, scene.tracks)
    assert not np.array_equal(scenes[1].frames, scene.frames)
    assert (~scene.occluded).any(axis=1).all(), "every track is visible somewhere"


def test_fast_enough_for_tests_and_demos() -> None:
    best = min(_timed(lambda: render_scene(7)) for _ in range(2))
    assert best < 1.0, f"24 frames at 256x256 took {best:.2f} s"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_colour_under_each_track_is_constant_and_equals_its_texture(scenes) -> None:
    stds, means, texture_gaps = [], [], []
    for scene in scenes:
        for i in range(len(scene.tracks)):
            samples = list(interior_samples(scene, i))
            if len(samples) < 4:
                continue
            colours = np.array([c for _, c in samples])
            stds.append(colours.std(axis=0).mean())
            means.append(colours.mean(axis=0))
            layer = scene.layers[scene.point_layer[i]]
            t0 = samples[0][0]
            u = layer.to_local(scene.tracks[i, t0].astype(np.float64), t0) + layer.texture_centre
            texture_gaps.append(np.abs(bilinear(layer.texture, u) - colours.mean(axis=0)).mean())
    assert len(stds) > 100
    spread = np.array(means).std(axis=0).mean()
    assert spread > 20, "points should sit on different colours"
    assert np.median(stds) < 2.0 and np.percentile(stds, 90) < 4.0, (np.median(stds), spread)
    assert np.median(texture_gaps) < 2.0


def test_occluded_points_are_covered_by_a_nearer_object_or_outside(scenes) -> None:
    visible_ok, visible_n, covered_ok, covered_n = 0, 0, 0, 0
    for scene in scenes:
        t_len, h, w = scene.layer_map.shape
        x, y = scene.tracks[..., 0], scene.tracks[..., 1]
        outside = (x < -0.5) | (x >= w - 0.5) | (y < -0.5) | (y >= h - 0.5)
        assert scene.occluded[outside].all(), "points outside the image must be occluded"
        n_idx, t_idx = np.nonzero(~outside)
        xi = np.clip(np.rint(x[n_idx, t_idx]).astype(int), 0, w - 1)
        yi = np.clip(np.rint(y[n_idx, t_idx]).astype(int), 0, h - 1)
        drawn = scene.layer_map[t_idx, yi, xi]
        own = scene.point_layer[n_idx]
        occ = scene.occluded[n_idx, t_idx]
        visible_ok += int((drawn[~occ] == own[~occ]).sum())
        visible_n += int((~occ).sum())
        covered_ok += int((drawn[occ] > own[occ]).sum())
        covered_n += int(occ.sum())
    assert covered_n >= 20, "the scenes should have occlusions by objects"
    assert visible_ok / visible_n > 0.98
    assert covered_ok / covered_n > 0.95


def test_track_queries_reproduce_the_tracks_from_any_visible_frame(scenes) -> None:
    scene = scenes[1]
    first = np.argmax(~scene.occluded, axis=1)
    last = scene.occluded.shape[1] - 1 - np.argmax(~scene.occluded[:, ::-1], axis=1)
    for frames in (first, last):
        idx = np.arange(len(frames))
        queries = np.concatenate([frames[:, None], scene.tracks[idx, frames]], axis=1)
        tracks, occluded, layer = scene.track_queries(queries)
        np.testing.assert_allclose(tracks, scene.tracks, atol=1e-3)
        assert (occluded == scene.occluded).mean() > 0.999
        assert (layer == scene.point_layer).mean() > 0.99


def test_objects_move_turn_and_points_cover_several_layers(scenes) -> None:
    scene = scenes[2]
    assert len(np.unique(scene.point_layer)) >= 3
    on_objects = scene.point_layer > 0
    displacement = np.linalg.norm(scene.tracks[on_objects, -1] - scene.tracks[on_objects, 0], axis=-1)
    assert np.median(displacement) > 5.0
    # not a pure translation: the vector between two points of one object changes
    layer = np.bincount(scene.point_layer[on_objects]).argmax()
    a, b = np.flatnonzero(scene.point_layer == layer)[:2]
    between = scene.tracks[a] - scene.tracks[b]
    assert np.abs(between[-1] - between[0]).max() > 0.2


def test_other_sizes_and_bad_arguments() -> None:
    small = render_scene(3, num_frames=6, height=64, width=96, num_objects=0, num_points=10)
    assert small.frames.shape == (6, 64, 96, 3) and (small.point_layer == 0).all()
    with pytest.raises(ValueError, match="num_frames"):
        render_scene(0, num_frames=0)
    with pytest.raises(ValueError, match="num_points"):
        render_scene(0, num_points=-1)
    with pytest.raises(ValueError, match="queries"):
        small.track_queries(np.zeros((3, 2)))
