"""Draw pseudo-tracks over a sample's frames, for `pseudotrack show` and the dashboard's previews."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError

OUTLINE = (0, 0, 0)
UNKNOWN_QUALITY = (160, 160, 160)  # grey: a track without a score (shards written before scores existed)


def track_colors(n: int) -> np.ndarray:
    """[n, 3] uint8 RGB, fully saturated and bright, hues spread so neighbouring tracks differ."""
    if n == 0:
        return np.zeros((0, 3), np.uint8)
    hues = (np.arange(n) * 0.618033988749895 % 1.0 * 179).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 255, np.uint8)], axis=-1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def quality_colors(scores: np.ndarray | None, n: int) -> np.ndarray:
    """[n, 3] uint8 RGB by label quality score: red (0) through yellow to green (1); grey when unknown.

    Unknown (None, or a non-finite score) is a neutral grey, never the colour of a zero score.
    """
    if scores is None:
        return np.tile(np.array(UNKNOWN_QUALITY, np.uint8), (n, 1))
    s = np.asarray(scores, np.float64)
    known = np.isfinite(s)
    hues = (np.clip(np.where(known, s, 0.0), 0.0, 1.0) * 60).astype(np.uint8)  # OpenCV hue 0 red .. 60 green
    hsv = np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 230, np.uint8)], axis=-1)[None]
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    rgb[~known] = UNKNOWN_QUALITY
    return rgb


def draw_tracks(
    frames: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
    max_tracks: int = 96,
    trail: int = 8,
    colors: np.ndarray | None = None,
) -> np.ndarray:
    """frames uint8 [T,H,W,3]; tracks [T,N,2]; visibility [T,N] -> frames with tracks drawn.

    Visible points are filled dots with a trail; occluded ones are rings. Dots and trails are
    a few pixels thick with a dark outline, so they read on bright and busy footage alike.
    colors: uint8 [N, 3] RGB per track (e.g. `quality_colors`); None spreads hues.
    """
    t_len, n = tracks.shape[:2]
    pick = np.linspace(0, n - 1, min(n, max_tracks)).round().astype(int) if n else np.zeros(0, int)
    colors = track_colors(len(pick)) if colors is None else np.asarray(colors, np.uint8)[pick]
    out = frames.copy()
    short_side = min(frames.shape[1:3])
    radius = max(3, round(short_side / 80))
    thickness = max(2, round(short_side / 160))
    for t in range(t_len):
        canvas = np.ascontiguousarray(out[t])
        for c, i in enumerate(pick):
            color = tuple(int(v) for v in colors[c])
            segments = [
                (tuple(np.round(tracks[s, i]).astype(int)), tuple(np.round(tracks[s + 1, i]).astype(int)))
                for s in range(max(0, t - trail), t)
                if visibility[s, i] and visibility[s + 1, i]
            ]
            for p0, p1 in segments:
                cv2.line(canvas, p0, p1, OUTLINE, thickness + 2, cv2.LINE_AA)
            for p0, p1 in segments:
                cv2.line(canvas, p0, p1, color, thickness, cv2.LINE_AA)
            center = tuple(np.round(tracks[t, i]).astype(int))
            if visibility[t, i]:
                cv2.circle(canvas, center, radius + 1, OUTLINE, -1, cv2.LINE_AA)
                cv2.circle(canvas, center, radius, color, -1, cv2.LINE_AA)
            else:
                cv2.circle(canvas, center, radius, OUTLINE, thickness + 2, cv2.LINE_AA)
                cv2.circle(canvas, center, radius, color, thickness, cv2.LINE_AA)
        out[t] = canvas
    return out


def frame_grid(frames: np.ndarray, count: int = 6, columns: int = 3) -> np.ndarray:
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    tiles = [frames[i] for i in idx]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + columns], axis=1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def find_sample(workspace_uri: str, video_key: str | None = None, sample_key: str | None = None) -> dict:
    """Locate a labelled sample through the catalog and read it from its shard."""
    from .storage.catalog import Catalog
    from .storage.uri import open_store
    from .tasks.shards import read_shard

    store = open_store(workspace_uri)
    store.check_readable()
    latest = Catalog(store).latest()
    rows = [r for r in latest.to_pylist() if r["status"] == "labelled"]
    if video_key is not None:
        match = [r for r in rows if r["video_key"] == video_key]
    else:
        match = [r for r in rows if r["sample_key"] == sample_key]
    if not match:
        what = f"video {video_key!r}" if video_key is not None else f"sample {sample_key!r}"
        raise ConfigError(f"{what} has no labelled sample in {workspace_uri} (see `pseudotrack status`)")
    row = match[0]
    url = shard_url(store, row["shard_id"])
    for sample in read_shard(url):
        if sample["key"] == row["sample_key"]:
            return sample
    raise ConfigError(f"sample {row['sample_key']} is missing from shard {url}: the shard may have been replaced")


def shard_url(store, key: str) -> str:
    """A URL webdataset can open: the plain local path, or the s3:// URI."""
    path = store.local_path(key)
    return str(path) if path is not None else store.uri(key)


def render_sample_file(
    workspace_uri: str,
    output: str | Path,
    video_key: str | None = None,
    sample_key: str | None = None,
    teacher: str | None = None,
    max_tracks: int = 96,
    color_by_quality: bool = False,
) -> dict:
    """Draw a sample's tracks to a PNG grid or MP4; color_by_quality colours each track by its score.

    Returns {teacher, source_key, frames}, and with color_by_quality `quality`: the teacher's mean
    score, or None when the shard has no scores (written before they existed), drawn grey.
    """
    from .demo import write_video
    from .tasks.clip_codec import decode_clip_bytes

    sample = find_sample(workspace_uri, video_key, sample_key)
    labels = sample["labels"]
    name = teacher or sorted(labels)[0]
    if name not in labels:
        raise ConfigError(f"sample has no labels from teacher {name!r}; it has: {', '.join(sorted(labels))}")
    frames = decode_clip_bytes(sample["clip"])
    scores = labels[name].get("quality")
    colors = quality_colors(scores, len(sample["queries"])) if color_by_quality else None
    drawn = draw_tracks(frames, labels[name]["tracks"], labels[name]["visibility"], max_tracks, colors=colors)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".mp4":
        write_video(drawn, output, fps=float(sample["meta"].get("fps") or 12.0))
    elif output.suffix.lower() in (".png", ".jpg", ".jpeg"):
        cv2.imwrite(str(output), cv2.cvtColor(frame_grid(drawn), cv2.COLOR_RGB2BGR))
    else:
        raise ConfigError(f"--out {output}: use a .png (frame grid) or .mp4 (all frames) file name")
    info = {"teacher": name, "source_key": sample["meta"]["source_key"], "frames": len(frames)}
    if color_by_quality:
        info["quality"] = float(np.mean(scores)) if scores is not None and len(scores) else None
    return info
