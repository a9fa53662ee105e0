"""Time the `lk` teacher on one recipe-sized clip: 64 frames at 384x512 with 384 SIFT queries.

The clip is a real video from the shared folder, decoded and queried exactly as
a labelling round does it, so the figure is what the embedded default costs per
video. Decode and query times are printed beside it for scale.

    /work/venv/bin/python bench/bench_lk.py [--video bear.mp4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from pseudotrack.tasks.clip_codec import encode_clip
from pseudotrack.tasks.decode import decode_clip, probe_video
from pseudotrack.tasks.queries import sample_queries
from pseudotrack.teachers.lk import LKTeacher


def shared_videos() -> Path:
    root = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
    return root / "videos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="bear.mp4", help="a file in the shared videos folder, or a path")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--queries", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path = Path(args.video) if Path(args.video).is_file() else shared_videos() / args.video
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    facts = probe_video(data, path.name)  # also imports torch and decord, which is not decoding time
    t0 = time.perf_counter()
    clip = decode_clip(
        data, path.name, args.height, args.width, args.frames, stride=1, min_frames=8, rng=rng, facts=facts
    )
    t1 = time.perf_counter()
    queries, stats = sample_queries(clip.frames, args.queries, rng=rng)
    t2 = time.perf_counter()
    stored = encode_clip(clip.frames, clip.fps)
    t3 = time.perf_counter()
    teacher = LKTeacher()
    teacher.setup("cpu")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = teacher.predict(clip.frames, queries)
        times.append(time.perf_counter() - start)
    t_len = len(clip.frames)
    print(
        f"clip: {path.name}, {t_len} frames at {args.height}x{args.width}, {len(queries)} queries "
        f"on keyframes {stats['keyframes']}"
    )
    print(f"decode   {t1 - t0:6.2f} s")
    print(f"queries  {t2 - t1:6.2f} s  ({(t2 - t1) / len(stats['keyframes']) * 1000:.0f} ms per keyframe)")
    print(f"encode   {t3 - t2:6.2f} s  ({len(stored) / 1e6:.2f} MB stored)")
    print(
        f"lk       {min(times):6.2f} s per clip (best of {args.repeats}; all: "
        f"{', '.join(f'{t:.2f}' for t in times)}), {min(times) / t_len * 1000:.1f} ms per frame"
    )
    print(f"lk visible: {out.visibility.mean():.1%} of points x frames")


if __name__ == "__main__":
    main()
