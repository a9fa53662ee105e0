"""What a round's calibration costs, per teacher: its seconds beside the teacher's time on 100 round-default clips.

Each round labels the default calibration set (`student.calibration.CalibrationSet`: 3 generated scenes of
24 frames at 128x160 with 48 points) with every configured teacher and scores it against the exact tracks. This
times `calibrate` (rendering, the teacher, the metrics) after one untimed warm-up call, and one
`predict` on a round-default clip (64 frames of 384x512, 384 queries: the real bear clip, as bench_teachers.py
uses), and prints the calibration's share of 100 such clips. Neural teachers get stand-in weights from the
reference weight rule (as bench_teachers.py does); on CUDA they run in bf16, as in a round.

    python bench/bench_calibration.py [--teachers lk cotracker3_offline ...] [--device cuda] [--repeat 3]

Last line: `calibration share=S teachers=...`, S the largest share over the teachers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_teachers import build_teacher, load_clip, make_queries  # bench/ is on the path when run as a script

from pseudotrack.student.calibration import CalibrationSet, calibrate


def best_seconds(call, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=["lk", "cotracker3_offline", "cotracker3_online", "tapir"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--round-videos", type=int, default=100)
    args = parser.parse_args()
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    clip = load_clip(64, 384, 512)
    queries = make_queries(clip, 384)
    cs = CalibrationSet()
    print(
        f"# device {args.device}, {dtype}; calibration set: {cs.scenes} scenes, {cs.frames} frames at "
        f"{cs.height}x{cs.width}, {cs.points} points; round: {args.round_videos} clips of 64x384x512, 384 queries"
    )
    print(f"{'teacher':<22}{'calibration s':>14}{'clip s':>9}{'share of round':>16}")
    shares = {}
    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as tmp:
        for name in args.teachers:
            teacher = build_teacher(name, Path(tmp), args.device, dtype, None)
            if teacher is None:
                continue
            calibrate(teacher, cs)  # warm-up: kernels chosen, caches filled
            teacher.predict(clip, queries)
            cal_s = best_seconds(lambda t=teacher: calibrate(t, cs), args.repeat, args.device)
            clip_s = best_seconds(lambda t=teacher: t.predict(clip, queries), args.repeat, args.device)
            shares[name] = cal_s / (args.round_videos * clip_s)
            print(f"{name:<22}{cal_s:>14.3f}{clip_s:>9.3f}{shares[name]:>15.2%}", flush=True)
            del teacher
    print(f"calibration share={max(shares.values()):.4f} teachers={','.join(shares)}")


if __name__ == "__main__":
    main()
