"""Benchmark readers: small files written in each published layout are read back as `BenchmarkVideo`s."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from pseudotrack.errors import ConfigError
from pseudotrack.student.benchmarks import (
    BenchmarkFormatError,
    BenchmarkVideo,
    read_robotap,
    read_tapvid,
    read_tapvid_davis,
    read_tapvid_kinetics,
    read_tapvid_rgb_stacking,
    resize_video,
    synthetic_videos,
    write_davis_pickle,
)


def entry(seed: int, t: int = 5, h: int = 40, w: int = 60, n: int = 7) -> dict:
    """An entry as published: uint8 frames, points normalised to [0, 1] (x, y), occlusion flags."""
    rng = np.random.default_rng(seed)
    return {
        "video": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8),
        "points": rng.uniform(0, 1, (n, t, 2)).astype(np.float32),
        "occluded": rng.random((n, t)) < 0.3,
    }


def dump(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path


def smooth_frames(t: int, h: int, w: int) -> np.ndarray:
    """Frames JPEG keeps nearly intact (random noise would not survive compression)."""
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 255 / w, ys * 255 / h, (xs + ys) * 127 / (w + h)], axis=-1)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(t)]).astype(np.uint8)


def kinetics_entry(seed: int) -> dict:
    """The layout tapnet's generate_tapvid.py writes: a numpy array of JPEG bytes, float64 points."""
    e = entry(seed, t=4, h=48, w=64)
    frames = smooth_frames(4, 48, 64)
    quality = [cv2.IMWRITE_JPEG_QUALITY, 95]
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), quality)[1].tobytes() for f in frames]
    return {
        "video": np.array(jpegs),
        "points": e["points"].astype(np.float64),
        "occluded": e["occluded"],
        "_frames": frames,
    }


def check(video: BenchmarkVideo, source: dict, name: str) -> None:
    h, w = source["video"].shape[1:3]
    assert video.name == name
    np.testing.assert_array_equal(video.frames, source["video"])
    np.testing.assert_allclose(video.tracks, source["points"] * np.array([w, h]), rtol=1e-6)
    np.testing.assert_array_equal(video.occluded, source["occluded"])
    assert video.tracks.dtype == np.float32 and video.occluded.dtype == bool


def test_davis_layout_is_a_dict_by_name(tmp_path: Path) -> None:
    data = {"bear": entry(0), "car-turn": entry(1, h=30, w=50)}
    path = dump(data, tmp_path / "tapvid_davis.pkl")
    videos = list(read_tapvid_davis(path))
    assert [v.name for v in videos] == ["bear", "car-turn"]
    for video in videos:
        check(video, data[video.name], video.name)
    assert [v.name for v in read_tapvid(path, limit=1)] == ["bear"]


def test_rgb_stacking_layout_is_a_list_named_by_index(tmp_path: Path) -> None:
    data = [entry(2), entry(3)]
    path = dump(data, tmp_path / "tapvid_rgb_stacking.pkl")
    videos = list(read_tapvid_rgb_stacking(path))
    check(videos[0], data[0], "tapvid_rgb_stacking_0000")
    check(videos[1], data[1], "tapvid_rgb_stacking_0001")
    assert [v.name for v in read_tapvid(path)] == [v.name for v in videos]


def test_kinetics_layout_is_sharded_lists_with_jpeg_frames(tmp_path: Path) -> None:
    shards = [[kinetics_entry(4), kinetics_entry(5)], [kinetics_entry(6)]]
    folder = tmp_path / "kinetics"
    for i, shard in enumerate(shards):
        dump([{k: v for k, v in e.items() if k != "_frames"} for e in shard], folder / f"{i:04d}_of_0002.pkl")
    (folder / "notes.txt").write_text("not a shard")
    videos = list(read_tapvid_kinetics(folder))
    assert [v.name for v in videos] == ["0000_of_0002_0000", "0000_of_0002_0001", "0001_of_0002_0000"]
    for video, source in zip(videos, [e for shard in shards for e in shard], strict=True):
        assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
        assert np.abs(video.frames.astype(int) - source["_frames"]).mean() < 3  # decoded, in RGB order
        np.testing.assert_allclose(video.tracks, source["points"] * [64, 48], rtol=1e-6)
        np.testing.assert_array_equal(video.occluded, source["occluded"])
    assert len(list(read_tapvid(folder))) == 3
    assert len(list(read_tapvid_kinetics(folder, limit=2))) == 2


def test_robotap_layout_is_a_folder_of_split_dicts(tmp_path: Path) -> None:
    folder = tmp_path / "robotap"
    dump({"robot_a": entry(7)}, folder / "robotap_split0.pkl")
    dump({"robot_b": entry(8), "robot_c": entry(9)}, folder / "robotap_split1.pkl")
    videos = list(read_robotap(folder))
    assert [v.name for v in videos] == ["robot_a", "robot_b", "robot_c"]
    check(videos[2], entry(9), "robot_c")
    assert [v.name for v in read_tapvid(folder)] == ["robot_a", "robot_b", "robot_c"]
    assert [v.name for v in read_robotap(folder / "robotap_split1.pkl")] == ["robot_b", "robot_c"]


def test_resize_to_256_scales_tracks_like_the_benchmark(tmp_path: Path) -> None:
    data = {"clip": entry(10, h=40, w=60)}
    path = dump(data, tmp_path / "davis.pkl")
    (video,) = read_tapvid_davis(path, resize_to=(256, 256))
    assert video.frames.shape == (5, 256, 256, 3)
    np.testing.assert_allclose(video.tracks, data["clip"]["points"] * 256, rtol=1e-6)
    (native,) = read_tapvid_davis(path)
    again = resize_video(native, (256, 256))
    np.testing.assert_allclose(again.tracks, video.tracks, rtol=1e-5)
    np.testing.assert_array_equal(again.frames, video.frames)


def test_synthetic_scenes_round_trip_through_the_davis_layout(tmp_path: Path) -> None:
    scenes = list(synthetic_videos(2, seed=40, num_frames=6, height=64, width=96, num_points=12))
    assert [v.name for v in scenes] == ["synthetic_000040", "synthetic_000041"]
    path = write_davis_pickle(scenes, tmp_path / "out" / "synthetic.pkl")
    assert sorted(p.name for p in path.parent.iterdir()) == ["synthetic.pkl"]  # no temporary left behind
    for written, read in zip(scenes, read_tapvid_davis(path), strict=True):
        assert read.name == written.name
        np.testing.assert_array_equal(read.frames, written.frames)
        np.testing.assert_allclose(read.tracks, written.tracks, atol=1e-4)
        np.testing.assert_array_equal(read.occluded, written.occluded)
    with pytest.raises(ValueError, match="two videos are named"):
        write_davis_pickle([scenes[0], scenes[0]], tmp_path / "dup.pkl")


def test_wrong_files_fail_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkFormatError, match="does not exist"):
        read_tapvid_davis(tmp_path / "missing.pkl")
    assert issubclass(BenchmarkFormatError, ConfigError)
    garbage = tmp_path / "tapvid_davis.zip"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not a pickle")
    with pytest.raises(BenchmarkFormatError, match="not a readable TAP-Vid pickle"):
        list(read_tapvid(garbage))
    as_list = dump([entry(0)], tmp_path / "list.pkl")
    with pytest.raises(BenchmarkFormatError, match="dict of video name"):
        list(read_tapvid_davis(as_list))
    no_occluded = {k: v for k, v in entry(0).items() if k != "occluded"}
    missing_key = dump({"clip": no_occluded}, tmp_path / "k.pkl")
    with pytest.raises(BenchmarkFormatError, match=r"k\.pkl \[clip\].*'occluded'"):
        list(read_tapvid(missing_key))
    short = entry(0)
    short["points"] = short["points"][:, :3]
    short["occluded"] = short["occluded"][:, :3]
    with pytest.raises(BenchmarkFormatError, match="cover 3 frames"):
        list(read_tapvid(dump({"clip": short}, tmp_path / "short.pkl")))
    bad_jpeg = dump(
        [{"video": np.array([b"\xff\xd8 broken"]), "points": np.zeros((1, 1, 2)), "occluded": np.zeros((1, 1), bool)}],
        tmp_path / "0000_of_0001.pkl",
    )
    with pytest.raises(BenchmarkFormatError, match="frame 0 is not a decodable image"):
        list(read_tapvid_kinetics(bad_jpeg.parent))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkFormatError, match="no"):
        read_robotap(empty)


def test_benchmark_video_checks_its_arrays() -> None:
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="frames must be uint8"):
        BenchmarkVideo("v", frames.astype(np.float32), np.zeros((1, 3, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="tracks cover 2 frames"):
        BenchmarkVideo("v", frames, np.zeros((1, 2, 2)), np.zeros((1, 2)))
    video = BenchmarkVideo("v", frames, np.zeros((1, 3, 2), np.float64), np.zeros((1, 3), np.int64))
    assert video.tracks.dtype == np.float32 and video.occluded.dtype == bool and video.size == (8, 8)


class _Payload:
    """A pickle that would create a file when loaded, as a booby-trapped download could."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_benchmark_pickles_load_arrays_only_and_never_run_code(tmp_path: Path, protocol: int) -> None:
    published = tmp_path / f"davis_p{protocol}.pkl"  # protocol 2 spells numpy's rebuilders by their old names
    published.write_bytes(pickle.dumps({"clip": entry(0)}, protocol=protocol))
    (video,) = list(read_tapvid_davis(published))
    np.testing.assert_array_equal(video.occluded, entry(0)["occluded"])

    fired = tmp_path / f"fired{protocol}"
    trap = tmp_path / f"trap{protocol}.pkl"
    trap.write_bytes(pickle.dumps({"clip": dict(entry(0), extra=_Payload(fired))}, protocol=protocol))
    with pytest.raises(BenchmarkFormatError, match=r"asks for .*which a benchmark file never needs"):
        list(read_tapvid_davis(trap))
    assert not fired.exists()
