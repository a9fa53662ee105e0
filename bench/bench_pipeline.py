"""Pipeline overhead per clip without the teacher, by stage, and the `lk` teacher's time per clip.

Usage: python bench/bench_pipeline.py [--videos 12] [--frames 64] [--height 384] [--width 512] [--queries 384]

Builds a local bucket of real-looking clips (the real sample clips when the
shared folder is beside the repo, else generated scenes), runs a round in
process with a teacher that returns its queries unchanged (so only the
pipeline is timed), prints seconds per clip for each stage, then times `lk`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.flows.label_round import run_round
from pseudotrack.teachers.base import TeacherOutput, TeacherSpec, create_teacher, register_teacher


class NullTeacher:
    """Returns each query's location in every frame: no tracking cost at all."""

    name = "null"
    checkpoint_sha256 = ""
    tracks_occluded = True

    def setup(self, device: str = "cpu") -> None:
        pass

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        t, n = len(frames), len(queries)
        tracks = np.broadcast_to(queries[None, :, 1:], (t, n, 2))
        return TeacherOutput(tracks, np.ones((t, n), bool), np.ones((t, n), np.float16))


def shared_videos() -> Path | None:
    root = Path(os.environ.get("PSEUDOTRACK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    return root / "videos" if (root / "videos").is_dir() else None


def make_bucket(root: Path, videos: int, frames: int) -> None:
    real = shared_videos()
    if real is None:
        write_demo_bucket(root, videos=videos, frames=frames, height=480, width=640, broken=0)
        return
    clips = sorted(real.glob("*.mp4"))
    lines = []
    for i in range(videos):
        src = clips[i % len(clips)]
        shutil.copyfile(src, root / f"{src.stem}_{i:03d}.mp4")
        lines.append(f'{{"file": "{src.stem}_{i:03d}.mp4", "caption": "a person walks a dog"}}')
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--queries", type=int, default=384)
    args = parser.parse_args()
    register_teacher(TeacherSpec("null", NullTeacher, needs_checkpoint=False))
    with tempfile.TemporaryDirectory() as tmp:
        bucket, workspace = Path(tmp) / "bucket", Path(tmp) / "ws"
        bucket.mkdir()
        make_bucket(bucket, args.videos, args.frames)
        config = RoundConfig(
            bucket=str(bucket),
            workspace=str(workspace),
            teachers=["null"],
            num_frames=args.frames,
            min_frames=min(16, args.frames),
            height=args.height,
            width=args.width,
            num_queries=args.queries,
            batch_size=args.videos,
            max_stride=1,
        )
        t0 = time.perf_counter()
        summary = run_round(config)
        total = time.perf_counter() - t0
        clips = max(1, summary.labelled)
        print(
            f"pipeline overhead, {summary.labelled} clips of {args.frames}x{args.height}x{args.width}, "
            f"{args.queries} queries ({summary.failed} failed):"
        )
        staged = sum(summary.stage_seconds.values())
        for stage, seconds in sorted(summary.stage_seconds.items(), key=lambda kv: -kv[1]):
            if stage != "teacher":
                print(f"  {stage:10s} {seconds / clips * 1000:8.1f} ms/clip")
        other = total - staged
        print(f"  {'plan+other':10s} {other / clips * 1000:8.1f} ms/clip (discover, caption filter, catalog reads)")
        no_teacher = total - summary.stage_seconds.get("teacher", 0.0)
        print(f"  {'total':10s} {no_teacher / clips * 1000:8.1f} ms/clip without the teacher")

        rng = np.random.default_rng(0)
        frames = rng.integers(0, 255, (args.frames, args.height, args.width, 3), dtype=np.uint8)
        from pseudotrack.tasks.decode import decode_clip

        data = (bucket / sorted(os.listdir(bucket))[0]).read_bytes()
        clip = decode_clip(
            data,
            "bench",
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            stride=1,
            min_frames=8,
            rng=rng,
        )
        frames = clip.frames
        from pseudotrack.tasks.queries import sample_queries

        queries, _ = sample_queries(frames, num_queries=args.queries, rng=rng)
        lk = create_teacher("lk")
        lk.setup("cpu")
        lk.predict(frames[:8], queries[queries[:, 0] < 8])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            lk.predict(frames, queries)
            times.append(time.perf_counter() - t0)
        print(f"lk teacher: {np.median(times):.2f} s/clip ({len(frames)} frames, {len(queries)} queries, median of 3)")


if __name__ == "__main__":
    main()
