"""Benchmark readers: every published TAP-Vid layout becomes the same `BenchmarkVideo` record.

The published files differ in small ways that silently break an evaluation if
a reader guesses wrong, so each layout is read explicitly:

| benchmark | published as | entries | frames |
|---|---|---|---|
| TAP-Vid-DAVIS | one pickle | dict name -> entry | uint8 [T, H, W, 3] |
| TAP-Vid-RGB-Stacking | one pickle | list of entries | uint8 [T, H, W, 3] |
| TAP-Vid-Kinetics | a folder of ``NNNN_of_NNNN.pkl`` shards | list of entries | JPEG bytes per frame |
| RoboTAP | a folder of ``robotap_split*.pkl`` | dict name -> entry | uint8 [T, H, W, 3] |

(The Kinetics shards are what tapnet's ``generate_tapvid.py`` writes from the
published CSV and the Kinetics clips.)

An entry holds 'video', 'points' float [N, T, 2] (x, y) normalised to [0, 1]
and 'occluded' bool [N, T]. Points become pixels of the frames by multiplying
with (width, height), and resizing scales them by the size ratio, exactly as
the benchmark's own readers do, so scores at 256x256 match theirs.

Pickles can run code when loaded: open only benchmark files you trust.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError

BENCHMARK_SIZE = (256, 256)  # (height, width) at which TAP-Vid is scored


class BenchmarkFormatError(ConfigError):
    """A benchmark file is missing or not in the published layout it was read as."""


@dataclass(frozen=True)
class BenchmarkVideo:
    """One benchmark video, whatever its source.

    frames uint8 [T, H, W, 3] RGB; tracks float32 [N, T, 2] (x, y) in pixels of
    the frames; occluded bool [N, T].
    """

    name: str
    frames: np.ndarray
    tracks: np.ndarray
    occluded: np.ndarray

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        tracks = np.asarray(self.tracks, np.float32)
        occluded = np.asarray(self.occluded).astype(bool)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"video {self.name!r}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}"
            )
        if tracks.ndim != 3 or tracks.shape[-1] != 2 or occluded.shape != tracks.shape[:2]:
            raise ValueError(
                f"video {self.name!r}: need tracks [N, T, 2] and occluded [N, T], "
                f"got {tracks.shape} and {occluded.shape}"
            )
        if tracks.shape[1] != frames.shape[0]:
            raise ValueError(
                f"video {self.name!r}: tracks cover {tracks.shape[1]} frames, the video has {frames.shape[0]}"
            )
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "tracks", tracks)
        object.__setattr__(self, "occluded", occluded)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, h, w, 3]; area filter when shrinking (no aliasing), bilinear when growing.

    Close to, not bit-identical with, the benchmark's own resize (mediapy); the
    difference is sub-pixel texture detail, not geometry.
    """
    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    shrink = h * w < frames.shape[1] * frames.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def resize_video(video: BenchmarkVideo, size: tuple[int, int] = BENCHMARK_SIZE) -> BenchmarkVideo:
    """The video at ``size`` (height, width), its tracks scaled by the size ratio (the TAP-Vid convention)."""
    h, w = video.size
    if (h, w) == tuple(size):
        return video
    scale = np.array([size[1] / w, size[0] / h], np.float32)
    return BenchmarkVideo(video.name, resize_frames(video.frames, size), video.tracks * scale, video.occluded)


# --------------------------------------------------------------------------- reading


# What a TAP-Vid pickle needs to rebuild its dicts, lists, bytes and numpy arrays (under numpy 1 and 2 names).
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """The published benchmarks are pickles; a pickle can run any code, so only numpy's rebuilders may load."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a benchmark file never needs")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> object:
    if not path.is_file():
        raise BenchmarkFormatError(f"benchmark file {path} does not exist; pass the downloaded .pkl")
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f).load()
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise BenchmarkFormatError(
            f"{path} is not a readable TAP-Vid pickle ({type(exc).__name__}: {exc}); "
            "pass the .pkl from the benchmark's download, not the .zip or another file"
        ) from exc


def _decode_frames(video: object, where: str) -> np.ndarray:
    """Frames of an entry: a uint8 array, or a sequence of encoded images (Kinetics stores JPEG bytes)."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4:
        return video
    try:
        encoded = list(video)  # type: ignore[call-overload]
    except TypeError:
        encoded = []
    if not encoded or not all(isinstance(item, bytes | bytearray) for item in encoded):
        got = f"{type(video).__name__} {getattr(video, 'dtype', '')} {getattr(video, 'shape', '')}".strip()
        raise BenchmarkFormatError(f"{where}: 'video' must be uint8 [T, H, W, 3] or a list of JPEG bytes, got {got}")
    frames = []
    for i, data in enumerate(encoded):
        image = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BenchmarkFormatError(f"{where}: frame {i} is not a decodable image")
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if len({f.shape for f in frames}) != 1:
        sizes = sorted({f.shape for f in frames})
        raise BenchmarkFormatError(f"{where}: frames have different sizes {sizes}")
    return np.stack(frames)


def entry_to_video(name: str, entry: object, where: str, resize_to: tuple[int, int] | None = None) -> BenchmarkVideo:
    """One published entry -> a `BenchmarkVideo` (pixels of the frames, resized when asked)."""
    if not isinstance(entry, Mapping) or not {"video", "points", "occluded"} <= set(entry):
        keys = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise BenchmarkFormatError(f"{where}: an entry needs keys 'video', 'points', 'occluded'; got {keys}")
    frames = _decode_frames(entry["video"], where)
    points = np.asarray(entry["points"], np.float64)
    occluded = np.asarray(entry["occluded"])
    if points.ndim != 3 or points.shape[-1] != 2 or occluded.shape != points.shape[:2]:
        raise BenchmarkFormatError(
            f"{where}: need 'points' [N, T, 2] and 'occluded' [N, T], got {points.shape} and {occluded.shape}"
        )
    if points.shape[1] != len(frames):
        raise BenchmarkFormatError(f"{where}: 'points' cover {points.shape[1]} frames, 'video' has {len(frames)}")
    if resize_to is not None:
        frames = resize_frames(frames, resize_to)
    h, w = frames.shape[1:3]
    tracks = (points * np.array([w, h])).astype(np.float32)
    return BenchmarkVideo(name, frames, tracks, occluded.astype(bool))


def _entries(data: object, path: Path, want: type | None) -> Iterable[tuple[str, object]]:
    """(name, entry) pairs; ``want`` is the layout's container type, or None to accept either."""
    if want is None:
        want = dict if isinstance(data, Mapping) else list
    if isinstance(data, Mapping) and want is dict:
        return ((str(k), v) for k, v in data.items())
    if isinstance(data, list | tuple) and want is list:
        return ((f"{path.stem}_{i:04d}", v) for i, v in enumerate(data))
    expected = "a dict of video name -> entry" if want is dict else "a list of entries"
    raise BenchmarkFormatError(
        f"{path} holds {type(data).__name__}, but this layout is {expected}; try read_tapvid, which detects the layout"
    )


def _read_pickles(
    paths: list[Path], want: type | None, resize_to: tuple[int, int] | None, limit: int | None
) -> Iterator[BenchmarkVideo]:
    count = 0
    for path in paths:
        for name, entry in _entries(_load_pickle(path), path, want):
            if limit is not None and count >= limit:
                return
            yield entry_to_video(name, entry, f"{path} [{name}]", resize_to)
            count += 1


def _existing_file(path: Path, what: str) -> list[Path]:
    """Checked when the reader is created, not at the first video, so a typo fails before any work."""
    if not path.is_file():
        raise BenchmarkFormatError(f"{what} file {path} does not exist; pass the path of the downloaded .pkl")
    return [path]


def _shards(path: Path, pattern: str, what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BenchmarkFormatError(f"{what} path {path} does not exist; pass its folder of .pkl files")
    shards = sorted(path.glob(pattern))
    if not shards:
        raise BenchmarkFormatError(f"{path} holds no {pattern} files; is this the unzipped {what} folder?")
    return shards


def read_tapvid_davis(
    path: str | Path, resize_to: tuple[int, int] | None = None, limit: int | None = None
) -> Iterator[BenchmarkVideo]:
    """TAP-Vid-DAVIS (``tapvid_davis.pkl``): a dict of video name -> entry."""
    return _read_pickles(_existing_file(Path(path), "TAP-Vid-DAVIS"), dict, resize_to, limit)


def read_tapvid_rgb_stacking(
    path: str | Path, resize_to: tuple[int, int] | None = None, limit: int | None = None
) -> Iterator[BenchmarkVideo]:
    """TAP-Vid-RGB-Stacking (``tapvid_rgb_stacking.pkl``): a list of entries, named ``<stem>_<index>``."""
    return _read_pickles(_existing_file(Path(path), "TAP-Vid-RGB-Stacking"), list, resize_to, limit)


def read_tapvid_kinetics(
    path: str | Path, resize_to: tuple[int, int] | None = None, limit: int | None = None
) -> Iterator[BenchmarkVideo]:
    """TAP-Vid-Kinetics: a folder of ``*_of_*.pkl`` shards (or one), lists of entries with JPEG frames."""
    return _read_pickles(_shards(Path(path), "*_of_*.pkl", "TAP-Vid-Kinetics"), list, resize_to, limit)


def read_robotap(
    path: str | Path, resize_to: tuple[int, int] | None = None, limit: int | None = None
) -> Iterator[BenchmarkVideo]:
    """RoboTAP: a folder of ``robotap_split*.pkl`` (or one of them), each a dict of video name -> entry."""
    return _read_pickles(_shards(Path(path), "*.pkl", "RoboTAP"), dict, resize_to, limit)


def read_tapvid(
    path: str | Path, resize_to: tuple[int, int] | None = None, limit: int | None = None
) -> Iterator[BenchmarkVideo]:
    """Any of the layouts above, detected from the path: a folder of shards, or a pickle of a dict or a list.

    Names come from the dict keys, or from the file stem and index for lists.
    """
    path = Path(path)
    if path.is_dir():
        paths = sorted(path.glob("*_of_*.pkl")) or _shards(path, "*.pkl", "benchmark")
    else:
        paths = _existing_file(path, "benchmark")
    return _read_pickles(paths, None, resize_to, limit)


# --------------------------------------------------------------------------- writing and synthetic


def write_davis_pickle(videos: Iterable[BenchmarkVideo], path: str | Path) -> Path:
    """Save videos in the TAP-Vid-DAVIS layout, so any TAP-Vid reader (ours or the authors') reads them.

    Written beside and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    data = {}
    for video in videos:
        if video.name in data:
            raise ValueError(f"two videos are named {video.name!r}; DAVIS pickles key videos by name")
        h, w = video.size
        data[video.name] = {
            "video": video.frames,
            "points": (video.tracks / np.array([w, h], np.float32)).astype(np.float32),
            "occluded": video.occluded,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f, protocol=4)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def synthetic_videos(
    count: int,
    seed: int = 1000,
    num_frames: int = 24,
    height: int = 256,
    width: int = 256,
    num_points: int = 64,
    num_objects: int = 4,
) -> Iterator[BenchmarkVideo]:
    """``count`` generated scenes with exact ground truth (seeds ``seed``, ``seed + 1``, ...)."""
    from ..synthetic import render_scene

    for i in range(count):
        scene = render_scene(
            seed + i, num_frames=num_frames, height=height, width=width, num_objects=num_objects, num_points=num_points
        )
        yield BenchmarkVideo(f"synthetic_{seed + i:06d}", scene.frames, scene.tracks, scene.occluded)
