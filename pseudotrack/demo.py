"""A demo bucket: generated videos with captions, some of which the filter drops, and a broken file.

It lets a new user watch a whole round (labelled, filtered and failed rows)
without downloading anything.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .synthetic import render_scene

KEPT_CAPTIONS = [
    "A dog runs across a park chasing a ball.",
    "A woman walks her bicycle along a cobbled street.",
    "Two children play catch in a backyard.",
    "A horse trots around a paddock.",
    "A man juggles three balls in a square.",
    "A cat jumps from a sofa onto the floor.",
    "A skater performs a trick in a skate park.",
    "A bear climbs over rocks in an enclosure.",
]
DROPPED_CAPTIONS = [
    "An animated cartoon fox dances in a forest.",  # animation
    "Time-lapse of clouds rolling over a mountain.",  # time-lapse
    "Waves crash on a rocky beach at sunset.",  # water
    "A campfire burns in the dark.",  # fire
    "A red apple lies on a grey carpet.",  # no person or animal
]


def write_video(frames: np.ndarray, path: Path, fps: float = 24.0) -> None:
    """frames: uint8 [T, H, W, 3] RGB -> an MPEG-4 file any decoder reads."""
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def write_demo_bucket(
    out_dir: str | Path,
    videos: int = 12,
    frames: int = 48,
    height: int = 240,
    width: int = 320,
    seed: int = 0,
    broken: int = 1,
    include: str | Path | None = None,
) -> dict[str, int]:
    """Write `videos` generated clips (about a third with captions the filter drops) plus `broken` bad files.

    Captions go to a `captions.jsonl` manifest, except every fourth video, which
    gets a `.txt` sidecar instead, so both caption sources are exercised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest, droppable, sidecars = [], 0, 0
    for i in range(videos):
        scene = render_scene(seed=seed * 1000 + i, num_frames=frames, height=height, width=width)
        name = f"clip_{i:04d}.mp4"
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / name
            write_video(scene.frames, tmp_path, fps=float(rng.choice([24, 25, 30])))
            shutil.move(str(tmp_path), out / name)
        if i % 3 == 2:
            caption = DROPPED_CAPTIONS[(i // 3) % len(DROPPED_CAPTIONS)]
            droppable += 1
        else:
            caption = KEPT_CAPTIONS[i % len(KEPT_CAPTIONS)]
        if i % 4 == 3:
            (out / f"clip_{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
            sidecars += 1
        else:
            manifest.append({"file": name, "caption": caption})
    for j in range(broken):
        name = f"broken_{j:02d}.mp4"
        (out / name).write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(2048))
        manifest.append({"file": name, "caption": "A man walks his dog, but the upload was cut short."})
    if include is not None:
        include = Path(include)
        extra = sorted(p for p in include.iterdir() if p.suffix.lower() in (".mp4", ".mov", ".avi", ".mkv"))
        for path in extra:
            shutil.copyfile(path, out / path.name)
        captions_file = include / "captions.jsonl"
        if captions_file.is_file():
            for line in captions_file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    manifest.append(json.loads(line))
        videos += len(extra)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as fh:
        for record in manifest:
            fh.write(json.dumps(record) + "\n")
    return {"videos": videos, "droppable": droppable, "broken": broken, "captions": len(manifest) + sidecars}
