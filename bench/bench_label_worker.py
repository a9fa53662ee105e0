"""A label batch on a GPU worker, CPU stages sequential vs pipelined: the teacher's busy fraction and clips/s.

The teacher is a stand-in that holds "the GPU" for a fixed time per clip (it
sleeps, releasing the GIL, as a CUDA forward does while the GPU works), so the
figure measures the pipeline, not a model. The clips are the real videos of
the shared folder, looped to --clips keys (each key its own frames and
queries), at the recipe's size: 64 frames of 384x512 with 384 SIFT queries.
A whole label batch runs (reads, decode, SIFT, encode, teacher, shard writing,
catalog events) through `run_round` into a local workspace, once with
cpu_workers=0 (every stage in turn, as before) and once pipelined.

The teacher's time is chosen so the CPU can keep up with it on this machine:
the CPU stages of one clip are timed first (CPU seconds, median of three, one process) and
the teacher gets --margin (3) times that over the workers, unless --teacher-s is given. The
workers default to the host's cores minus one. A one-clip pipelined round runs
first so the worker processes' forkserver (started once per process, then
reused by every batch) is not counted.

    python bench/bench_label_worker.py [--clips 24] [--workers N] [--teacher-s T]

The last line reads:
    pipelined busy=B clips/s=R sequential busy=B0 clips/s=R0 workers=N teacher_s=T
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pseudotrack.config import RoundConfig
from pseudotrack.flows.label_round import run_round
from pseudotrack.tasks.clip_codec import encode_clip
from pseudotrack.tasks.pipeline import cpu_worker_count, teacher_busy
from pseudotrack.tasks.prepare import PlannedVideo, prepare_video
from pseudotrack.teachers.base import TeacherOutput, TeacherSpec, register_teacher

TEACHER_SECONDS = [0.5]  # set before the rounds run


class StandIn:
    """Holds "the GPU" for TEACHER_SECONDS per clip; tracks that stay on their queries."""

    name = "standin"
    checkpoint_sha256 = ""
    tracks_occluded = True
    queries_independent = True

    def setup(self, device: str = "cpu") -> None:
        pass

    def predict(self, frames: np.ndarray, queries: np.ndarray) -> TeacherOutput:
        time.sleep(TEACHER_SECONDS[0])
        t, n = len(frames), len(queries)
        tracks = np.broadcast_to(queries[None, :, 1:], (t, n, 2))
        return TeacherOutput(tracks, np.ones((t, n), bool), np.ones((t, n), np.float16))


register_teacher(TeacherSpec("standin", StandIn, needs_checkpoint=False, description="bench stand-in"))


def shared_videos() -> Path:
    root = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
    return root / "videos"


def write_bucket(root: Path, clips: int) -> list[Path]:
    sources = sorted(shared_videos().glob("*.mp4"))
    root.mkdir(parents=True)
    for i in range(clips):
        shutil.copy(sources[i % len(sources)], root / f"clip_{i:03d}.mp4")
    return sources


def cpu_seconds_per_clip(sources: list[Path], config: RoundConfig) -> float:
    """CPU seconds of one clip's CPU stages in this process (decode, SIFT, encode): median of three.

    CPU, not wall, seconds: on a machine shared with other work the wall time of one clip swings with the load
    of the moment, the work it needs does not."""

    class Names:
        names = ["standin"]

    times = []
    for i, path in enumerate([*sources, *sources][:4]):
        data = path.read_bytes()
        t = time.process_time()
        p = prepare_video(PlannedVideo(f"calibrate-{i}", len(data), "e"), data, config, Names(), {})
        encode_clip(p.clip.frames, p.clip.fps)
        if i:  # the first pays for importing torch and decord
            times.append(time.process_time() - t)
    return statistics.median(times)


def label(bucket: Path, workspace: Path, workers: int, clips: int) -> tuple[float, float, dict]:
    config = RoundConfig(
        bucket=str(bucket),
        workspace=str(workspace),
        round_id="bench",
        teachers=["standin"],
        device="cpu",
        cpu_workers=workers,
        batch_size=clips,
        missing_caption="keep",
    )
    summary = run_round(config)
    assert summary.labelled == clips and summary.failed == 0, summary
    stages = summary.stage_seconds
    return teacher_busy(stages), summary.labelled / stages["batch"], stages


def _brief(stages: dict) -> str:
    return " ".join(f"{k}={v:.1f}" for k, v in sorted(stages.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: cores - 1)")
    parser.add_argument("--teacher-s", type=float, default=None, help="stand-in teacher seconds per clip")
    parser.add_argument("--margin", type=float, default=3.0, help="teacher time / one clip's CPU stages")
    args = parser.parse_args()
    workers = cpu_worker_count(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-label-worker-") as tmp:
        root = Path(tmp)
        sources = write_bucket(root / "bucket", args.clips)
        cpu_s = cpu_seconds_per_clip(sources, RoundConfig(bucket="b", workspace="w"))
        teacher_s = args.teacher_s or round(args.margin * cpu_s / workers, 2)
        TEACHER_SECONDS[0] = teacher_s
        print(f"one clip's CPU stages (decode, SIFT, encode) in one process: {cpu_s:.3f} CPU s")
        print(f"stand-in teacher: {teacher_s:.2f} s per clip; CPU workers: {workers}; clips: {args.clips}")
        write_bucket(root / "warm", 1)
        label(root / "warm", root / "ws-warm", workers, 1)
        busy0, rate0, stages0 = label(root / "bucket", root / "ws-seq", 0, args.clips)
        print(f"sequential: teacher busy {busy0:.3f}, {rate0:.3f} clips/s; seconds {_brief(stages0)}")
        busy, rate, stages = label(root / "bucket", root / "ws-pipe", workers, args.clips)
        print(f"pipelined:  teacher busy {busy:.3f}, {rate:.3f} clips/s; seconds {_brief(stages)}")
    print(
        f"pipelined busy={busy:.3f} clips/s={rate:.3f} sequential busy={busy0:.3f} clips/s={rate0:.3f} "
        f"workers={workers} teacher_s={teacher_s:.2f}"
    )


if __name__ == "__main__":
    main()
