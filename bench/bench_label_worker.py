"""A label batch on a GPU worker, CPU stages sequential vs pipelined: the teacher's busy fraction and clips/s.

By default the teacher is a stand-in that holds "the GPU" for a fixed time per
clip (it sleeps, releasing the GIL, as a CUDA forward does while the GPU
works), so the figure measures the pipeline, not a model. The clips are the
real videos of the shared folder, looped to --clips keys (each key its own
frames and queries), at the recipe's size: 64 frames of 384x512 with 384 SIFT
queries. A whole label batch runs (reads, decode, SIFT, encode, teacher, shard
writing, catalog events) through `tasks.labelling.label_batch`, the plain
function a round's batch task runs, into a local workspace: once with
cpu_workers=0 (every stage in turn, as before) and once pipelined. No
orchestrator is involved, so the bench also runs on a GPU host that has the
package's data dependencies and not Prefect.

The stand-in's time is chosen so the CPU can keep up with it on this machine:
the CPU stages of one clip are timed first (CPU seconds, median of three, one
process) and the teacher gets --margin (3) times that over the workers, unless
--teacher-s is given. The workers default to the host's cores minus one. A
one-clip pipelined batch runs first so the worker processes' forkserver
(started once per process, then reused by every batch) and the teacher's
first forward (CUDA context, kernel selection) are not counted.

`--teacher NAME --device cuda` runs a real teacher instead (bf16 autocast on
CUDA, the teachers' default), with stand-in weights made by the reference
weight rule (`shared/reference/<teacher>/manifest.json`, as bench_teachers.py
does): the work per clip is fixed by the sizes, not by the weight values.
`--sequential-clips` bounds the slow sequential run.

    python bench/bench_label_worker.py [--clips 24] [--workers N] [--teacher-s T]
    python bench/bench_label_worker.py --teacher cotracker3_offline --device cuda --clips 96 --sequential-clips 16

The last line reads:
    pipelined busy=B clips/s=R sequential busy=B0 clips/s=R0 workers=N teacher_s=T
(teacher_s: the stand-in's seconds per clip, or the real teacher's measured
teacher seconds per clip in the pipelined run.)
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
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_workspace
from pseudotrack.tasks import pipeline
from pseudotrack.tasks.clip_codec import encode_clip
from pseudotrack.tasks.cpu_pool import cpu_worker_count
from pseudotrack.tasks.labelling import label_batch, resolve_checkpoints
from pseudotrack.tasks.prepare import PlannedVideo, prepare_video
from pseudotrack.tasks.quality import clip_quality
from pseudotrack.tasks.throughput import teacher_busy
from pseudotrack.teachers.base import TeacherOutput, TeacherSpec, register_teacher, teacher_spec

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


def cpu_seconds_per_clip(sources: list[Path], config: RoundConfig) -> tuple[float, float]:
    """CPU seconds of one clip's CPU stages in this process (decode, SIFT, encode), and of scoring its labels
    (`clip_quality` on tracks drifting from the queries, one thread, as a scoring thread does): medians of three.

    CPU, not wall, seconds: on a machine shared with other work the wall time of one clip swings with the load
    of the moment, the work it needs does not."""

    class Names:
        names = ["standin"]

    times, scoring = [], []
    for i, path in enumerate([*sources, *sources][:4]):
        data = path.read_bytes()
        t = time.process_time()
        p = prepare_video(PlannedVideo(f"calibrate-{i}", len(data), "e"), data, config, Names(), {})
        encode_clip(p.clip.frames, p.clip.fps)
        if i:  # the first pays for importing torch and decord
            times.append(time.process_time() - t)
        frames, queries = p.clip.frames, p.queries
        drift = np.random.default_rng(i).normal(0, 1, (len(frames), len(queries), 2)).cumsum(0)
        labels = TeacherOutput(
            (queries[None, :, 1:] + drift).astype(np.float32),
            np.ones((len(frames), len(queries)), bool),
            np.ones((len(frames), len(queries)), np.float16),
        )
        t = time.thread_time()
        clip_quality(frames, queries, {"standin": labels})
        if i:
            scoring.append(time.thread_time() - t)
    return statistics.median(times), statistics.median(scoring)


def label(bucket: Path, workspace: Path, workers: int, clips: int, teacher: str, device: str, **extra) -> tuple:
    """One label batch over the bucket's first `clips` videos: (teacher busy, clips/s, stage seconds)."""
    config = RoundConfig(
        bucket=str(bucket),
        workspace=str(workspace),
        round_id="bench",
        teachers=[teacher],
        device=device,
        cpu_workers=workers,
        batch_size=clips,
        missing_caption="keep",
        **extra,
    )
    store, ws = open_workspace(config)
    videos = [PlannedVideo(o.key, o.size, o.etag) for o in store.list(suffixes=(".mp4",))][:clips]
    result = label_batch(videos, config, resolve_checkpoints(config), store, ws, Catalog(ws))
    assert result.labelled == len(videos) and result.failed == 0, result
    stages = result.stage_seconds
    return teacher_busy(stages), result.labelled / stages["batch"], stages


def reaped_children_cpu() -> float:
    """CPU seconds of the processes this one's children have reaped: the forkserver reaps the CPU workers, so
    this counts all their work, the sending of results included (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16 and 17 of stat)
    return total / ticks


def label_costed(bucket: Path, workspace: Path, workers: int, clips: int, teacher: str, device: str, **extra) -> tuple:
    """`label`, and the CPU seconds per clip of the batch's own process and of its CPU workers."""
    own, reaped = time.process_time(), reaped_children_cpu()
    busy, rate, stages = label(bucket, workspace, workers, clips, teacher, device, **extra)
    own = time.process_time() - own
    time.sleep(1.0)  # the forkserver reaps the stopped workers
    return busy, rate, stages, own / clips, (reaped_children_cpu() - reaped) / clips


def _brief(stages: dict) -> str:
    return " ".join(f"{k}={v:.1f}" for k, v in sorted(stages.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument(
        "--sequential-clips", type=int, default=None, help="clips of the sequential run (default --clips)"
    )
    parser.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: cores - 1)")
    parser.add_argument("--teacher-s", type=float, default=None, help="stand-in teacher seconds per clip")
    parser.add_argument("--margin", type=float, default=3.0, help="teacher time / one clip's CPU stages")
    parser.add_argument("--teacher", default="standin", help="a registered teacher instead of the stand-in")
    parser.add_argument("--device", default="cpu", help="the teacher's device (cuda for a real teacher on a GPU)")
    parser.add_argument("--teacher-batch", type=int, default=None, help="clips per forward (default: the round's)")
    args = parser.parse_args()
    workers = cpu_worker_count(args.workers)
    seq_clips = args.sequential_clips or args.clips
    with tempfile.TemporaryDirectory(prefix="bench-label-worker-") as tmp:
        root = Path(tmp)
        extra: dict = {"teacher_batch": args.teacher_batch}
        if args.teacher != "standin":
            from bench_teachers import stand_in_checkpoint  # bench/ is on the path when run as a script

            (root / "ckpt").mkdir()
            if teacher_spec(args.teacher).needs_checkpoint:
                assert stand_in_checkpoint(args.teacher, root / "ckpt"), f"no reference manifest for {args.teacher}"
            extra["checkpoints"] = str(root / "ckpt")
        sources = write_bucket(root / "bucket", max(args.clips, seq_clips))
        cpu_s, scoring_s = cpu_seconds_per_clip(sources, RoundConfig(bucket="b", workspace="w"))
        print(f"one clip's CPU stages (decode, SIFT, encode) in one process: {cpu_s:.3f} CPU s")
        print(
            f"scoring one clip's labels (one thread): {scoring_s:.3f} CPU s; the batch's {pipeline.finisher_count()} "
            f"scoring thread(s) keep up with up to {pipeline.finisher_count() / scoring_s:.1f} clips/s"
        )
        if args.teacher == "standin":
            teacher_s = args.teacher_s or round(args.margin * cpu_s / workers, 2)
            TEACHER_SECONDS[0] = teacher_s
            print(f"stand-in teacher: {teacher_s:.2f} s per clip; CPU workers: {workers}; clips: {args.clips}")
        else:
            print(f"teacher {args.teacher} on {args.device}; CPU workers: {workers}; clips: {args.clips}")
        write_bucket(root / "warm", 1)
        label(root / "warm", root / "ws-warm", workers, 1, args.teacher, args.device, **extra)
        busy0, rate0, stages0 = label(
            root / "bucket", root / "ws-seq", 0, seq_clips, args.teacher, args.device, **extra
        )
        print(
            f"sequential ({seq_clips} clips): teacher busy {busy0:.3f}, {rate0:.3f} clips/s; seconds {_brief(stages0)}"
        )
        busy, rate, stages, own, work = label_costed(
            root / "bucket", root / "ws-pipe", workers, args.clips, args.teacher, args.device, **extra
        )
        print(f"pipelined ({args.clips} clips):  teacher busy {busy:.3f}, {rate:.3f} clips/s; seconds {_brief(stages)}")
        pipeline.USE_FRAME_SLOTS = False  # the same batch with the frames pickled through the workers' pipes
        busy_p, rate_p, _, own_p, work_p = label_costed(
            root / "bucket", root / "ws-pipe-frames", workers, args.clips, args.teacher, args.device, **extra
        )
        pipeline.USE_FRAME_SLOTS = True
        print(
            f"frames back from the workers, CPU s per clip of the batch's process / of its workers: "
            f"shared memory {own:.3f} / {work:.3f} (busy {busy:.3f}, {rate:.3f} clips/s); "
            f"through the pipes {own_p:.3f} / {work_p:.3f} (busy {busy_p:.3f}, {rate_p:.3f} clips/s)"
        )
        if args.teacher != "standin":
            teacher_s = stages.get("teacher", 0.0) / args.clips
    print(
        f"pipelined busy={busy:.3f} clips/s={rate:.3f} sequential busy={busy0:.3f} clips/s={rate0:.3f} "
        f"workers={workers} teacher_s={teacher_s:.2f}"
    )


if __name__ == "__main__":
    main()
