"""The dashboard's preview images: one teacher's pseudo-tracks drawn over six frames of a labelled sample.

Why a picture on a monitoring page: counts say labels were written, not that they
follow the things in the video; a glance at the tracks does.
"""

from __future__ import annotations

import numpy as np

from ..storage.base import ObjectStore

PREVIEW_WIDTH = 960
PREVIEW_MIN_HEIGHT = 288
FRAMES_SHOWN = 6
TRAIL = 8
# frames keep most of their colour: the tracks are drawn bright, thick and outlined, so they stand out anyway
FRAME_KEEP = 0.8
FRAME_GRAY = 0.1


def render_preview(
    store: ObjectStore,
    shard_id: str,
    sample_key: str,
    teacher: str | None = None,
    max_tracks: int = 64,
    width: int = PREVIEW_WIDTH,
) -> bytes:
    """A PNG grid of six frames with one teacher's pseudo-tracks drawn over them.

    Only the six shown frames are drawn (each with the few frames before it, for the trails).
    """
    import cv2

    from ..render import draw_tracks, frame_grid, shard_url
    from ..tasks.clip_codec import decode_clip_bytes
    from ..tasks.shards import read_shard

    sample = next((s for s in read_shard(shard_url(store, shard_id)) if s["key"] == sample_key), None)
    if sample is None:
        raise LookupError(f"sample {sample_key} is not in shard {shard_id}")
    labels = sample["labels"]
    if not labels:
        raise LookupError(f"sample {sample_key} has no teacher labels")
    name = teacher if teacher in labels else sorted(labels)[0]
    frames = decode_clip_bytes(sample["clip"])
    tracks, visibility = labels[name]["tracks"], labels[name]["visibility"]
    t_len = min(len(frames), len(tracks))
    scale = PREVIEW_MIN_HEIGHT / frames.shape[1]
    if scale > 1:  # small clips: enlarge first, so dots and trails are not a pixel wide on the page
        size = (round(frames.shape[2] * scale), round(frames.shape[1] * scale))
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames[:t_len]])
        tracks = (tracks + 0.5) * scale - 0.5
    gray = frames.mean(axis=-1, keepdims=True)
    frames = np.clip(FRAME_KEEP * frames + FRAME_GRAY * gray, 0, 255).astype(np.uint8)
    shown = np.linspace(0, t_len - 1, min(FRAMES_SHOWN, t_len)).round().astype(int)
    drawn = np.stack(
        [
            draw_tracks(
                frames[max(0, t - TRAIL) : t + 1],
                tracks[max(0, t - TRAIL) : t + 1],
                visibility[max(0, t - TRAIL) : t + 1],
                max_tracks,
                TRAIL,
            )[-1]
            for t in shown
        ]
    )
    grid = frame_grid(drawn, count=len(drawn), columns=3)
    if grid.shape[1] > width:
        grid = cv2.resize(grid, (width, round(grid.shape[0] * width / grid.shape[1])), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
