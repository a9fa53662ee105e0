"""CPU seconds per clip of a label batch's CPU stages (decode, SIFT queries, encode), and what SIFT's speed-up
does to the queries: the old path (SIFT on the full keyframe) beside the new one (`queries.SIFT_SCALE`).

On the clips in the shared videos folder, each drawn several times (a draw is a video key: its own stride,
start and keyframes, as in a round), at the recipe's size (64 frames of 384x512, 384 queries on 8 keyframes):

  - CPU seconds (process time, one OpenCV thread, as in a CPU worker) of decode (probe + clip), SIFT
    queries per SIFT variant, and clip encoding; and of the two codecs alone (FFmpeg's H.264 decoder on the
    frames the clip needs, libjpeg-turbo on its frames), the part no change can cut while the stored pixels
    stay as they are;
  - per SIFT variant: distinct SIFT points per keyframe, queries taken per keyframe, the fraction of queries
    within 2 px of a strong gradient (Sobel magnitude at or above the keyframe's 90th percentile), the
    fraction of queries within 2 px of one of the old path's queries, and how many draws fail
    `too few features`, on the clips as they are and blurred (a Gaussian of sigma --blur px: fewer features,
    so the rule is exercised).

It also decodes each clip through PyAV with swscale's area filter (the alternative to decord's bilinear scaler
that the README weighs: other pixels), and prints its CPU and how far its frames are from decord's.

With `--base COMMIT` (e.g. 36fd075, before decode and encode were cut) it also times decode, SIFT at
`queries.SIFT_SCALE` and encode with that commit's package (`git archive` into a temporary folder, run in a
subprocess on the same draws), and prints both, and their sums, in one run. On a host without the git
history (a GPU host), `--base-dir DIR` names a folder holding that commit's package instead
(`git archive 36fd075 pseudotrack | tar -x -C DIR`).

    python bench/bench_cpu_stages.py [--draws 6] [--scales 1.0,0.5] [--blur 2.5] [--base 36fd075]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pseudotrack.errors import SampleError
from pseudotrack.tasks import queries as Q
from pseudotrack.tasks.clip_codec import encode_clip, psnr
from pseudotrack.tasks.decode import decode_clip, probe_video
from pseudotrack.tasks.prepare import video_rng


def shared_videos() -> Path:
    root = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
    return root / "videos"


def near_strong(frames: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of queries within 2 px of a pixel whose gradient magnitude is in its keyframe's top 10%."""
    hits = 0
    for t in np.unique(queries[:, 0]).astype(int):
        gray = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
        strong = cv2.dilate((mag >= np.percentile(mag, 90)).astype(np.uint8), np.ones((5, 5), np.uint8))
        rows = queries[queries[:, 0] == t]
        x = np.clip(np.round(rows[:, 1]).astype(int), 0, gray.shape[1] - 1)
        y = np.clip(np.round(rows[:, 2]).astype(int), 0, gray.shape[0] - 1)
        hits += int(strong[y, x].sum())
    return hits / len(queries)


def near_old(queries: np.ndarray, old: np.ndarray) -> float:
    """Fraction of `queries` within 2 px of an `old` query on the same keyframe."""
    close = 0
    for t in np.unique(queries[:, 0]):
        a, b = queries[queries[:, 0] == t, 1:], old[old[:, 0] == t, 1:]
        if len(b):
            d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(1)
            close += int((d <= 2.0).sum())
    return close / len(queries)


def stage_seconds(paths: list[Path], draws: int, frames: int) -> dict[str, float]:
    """Mean CPU seconds per clip of decode (probe + clip), SIFT queries at `queries.SIFT_SCALE` and encode."""
    got = {"decode": [], "sift": [], "encode": []}
    decode_clip(paths[0].read_bytes(), "warm-up", rng=np.random.default_rng(0))  # torch and decord imports
    for path in paths:
        data = path.read_bytes()
        for draw in range(draws):
            key = f"{path.stem}-{draw}.mp4"
            rng = video_rng(0, key)
            t = time.process_time()
            clip = decode_clip(data, key, num_frames=frames, min_frames=16, rng=rng, facts=probe_video(data, key))
            got["decode"].append(time.process_time() - t)
            t = time.process_time()
            Q.sample_queries(clip.frames, 384, 8, rng=rng, sift_scale=Q.SIFT_SCALE)
            got["sift"].append(time.process_time() - t)
            t = time.process_time()
            encode_clip(clip.frames, clip.fps)
            got["encode"].append(time.process_time() - t)
    return {k: float(np.mean(v)) for k, v in got.items()}


def base_stage_seconds(commit: str, draws: int, frames: int, base_dir: str | None = None) -> dict[str, float]:
    """`stage_seconds` with the package as it was at `commit`, in a subprocess (this file run with --stages-only).

    `base_dir`: a folder already holding that commit's `pseudotrack` package, for a host without the history."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        if base_dir:
            tmp = str(Path(base_dir).resolve())
        else:
            archive = subprocess.run(
                ["git", "-C", str(root), "archive", commit, "pseudotrack"], check=True, capture_output=True
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        out = subprocess.run(
            [sys.executable, __file__, "--stages-only", "--draws", str(draws), "--frames", str(frames)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def pyav_decode(data: bytes, indices: np.ndarray, size: tuple[int, int] | None = None) -> tuple[float, np.ndarray]:
    """(CPU seconds, frames) of PyAV decoding what a clip must decode, on one thread.

    That is the frames from the keyframe at or before the clip's first through its last, as decord decodes
    them; the clock starts at that keyframe. Without `size`: FFmpeg's decoder alone, no conversion (no frames
    back), the part of the decode stage no change of ours can cut without changing the pixels. With `size`
    (height, width): the clip's frames brought to it by swscale's area filter, the alternative to decord's
    bilinear scaler the README weighs, which gives other pixels.
    """
    import av

    first, last, wanted = int(indices[0]), int(indices[-1]), set(indices.tolist())
    out = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        start = time.process_time()
        for n, frame in enumerate(container.decode(stream)):
            if frame.key_frame and n <= first:
                start, out = time.process_time(), []
            if size is not None and n in wanted:
                out.append(frame.to_ndarray(width=size[1], height=size[0], format="rgb24", interpolation="AREA"))
            if n >= last:
                break
        seconds = time.process_time() - start
    return seconds, np.stack(out) if out else np.zeros((0,), np.uint8)


def jpeg_seconds(frames: np.ndarray) -> float:
    """CPU seconds of libjpeg-turbo alone on a clip's frames at the stored quality and sampling."""
    from pseudotrack.tasks.clip_codec import CLIP_QUALITY, jpegs

    t = time.process_time()
    jpegs(frames, CLIP_QUALITY)
    return time.process_time() - t


def print_stages(label: str, got: dict[str, float]) -> None:
    total = got["decode"] + got["sift"] + got["encode"]
    print(
        f"{label}: decode {got['decode']:.3f}  sift scale={Q.SIFT_SCALE:g} {got['sift']:.3f}  "
        f"encode {got['encode']:.3f}  sum {total:.3f} CPU s/clip"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=6, help="draws (video keys) per clip")
    parser.add_argument("--scales", default=f"1.0,{Q.SIFT_SCALE}", help="SIFT scales; the first is the baseline")
    parser.add_argument("--blur", type=float, default=2.5)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--base", help="a commit whose decode and encode to time beside this tree's (e.g. 36fd075)")
    parser.add_argument(
        "--base-dir", help="a folder holding --base's pseudotrack package (git archive BASE pseudotrack | tar -x)"
    )
    parser.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as in a CPU worker: CPU seconds on one core
    if args.stages_only:
        print(json.dumps(stage_seconds(sorted(shared_videos().glob("*.mp4")), args.draws, args.frames)))
        return
    if args.base:
        before = base_stage_seconds(args.base, args.draws, args.frames, args.base_dir)
        after = stage_seconds(sorted(shared_videos().glob("*.mp4")), args.draws, args.frames)
        print_stages(f"before ({args.base})", before)
        print_stages("after (this tree)", after)
    scales = list(dict.fromkeys(float(s) for s in args.scales.split(",")))
    paths = sorted(shared_videos().glob("*.mp4"))
    decode_s, encode_s, clips = [], [], 0
    h264_s, jpeg_s, area_s, area_db = [], [], [], []
    sift_s = {s: [] for s in scales}
    stats = {
        (s, kind): {"found": [], "taken": [], "strong": [], "same": [], "fail": 0} for s in scales for kind in "cb"
    }
    decode_clip(paths[0].read_bytes(), "warm-up", rng=np.random.default_rng(0))  # torch and decord imports
    for path in paths:
        data = path.read_bytes()
        for draw in range(args.draws):
            key = f"{path.stem}-{draw}.mp4"
            rng = video_rng(0, key)
            t = time.process_time()
            facts = probe_video(data, key)
            clip = decode_clip(data, key, num_frames=args.frames, min_frames=16, rng=rng, facts=facts)
            decode_s.append(time.process_time() - t)
            t = time.process_time()
            encode_clip(clip.frames, clip.fps)
            encode_s.append(time.process_time() - t)
            h264_s.append(pyav_decode(data, clip.frame_indices)[0])
            jpeg_s.append(jpeg_seconds(clip.frames))
            seconds, area = pyav_decode(data, clip.frame_indices, clip.frames.shape[1:3])
            area_s.append(seconds)
            area_db.append(psnr(area, clip.frames))
            clips += 1
            blurred = np.stack([cv2.GaussianBlur(f, (0, 0), args.blur) for f in clip.frames])
            state = rng.bit_generator.state
            for kind, frames in (("c", clip.frames), ("b", blurred)):
                old = None
                for s in scales:
                    rng.bit_generator.state = state  # every variant gets the same keyframes
                    t = time.process_time()
                    try:
                        queries, qs = Q.sample_queries(frames, 384, 8, rng=rng, sift_scale=s)
                    except SampleError:
                        stats[s, kind]["fail"] += 1
                        continue
                    finally:
                        if kind == "c":
                            sift_s[s].append(time.process_time() - t)
                    got = stats[s, kind]
                    got["found"] += qs["found"]
                    got["taken"] += qs["taken"]
                    got["strong"].append(near_strong(frames, queries))
                    old = queries if old is None else old
                    got["same"].append(near_old(queries, old))
    print(f"clips: {len(paths)} videos x {args.draws} draws = {clips}, {args.frames} frames at 384x512, one thread")
    print(
        f"decode  {np.mean(decode_s):.3f} CPU s/clip, of which FFmpeg's H.264 decoder alone "
        f"{np.mean(h264_s):.3f} (the rest: probe, decord's scaler to RGB)"
    )
    print(
        f"        decoded by PyAV with swscale's area filter instead (other pixels: {np.min(area_db):.1f}-"
        f"{np.max(area_db):.1f} dB from decord's): {np.mean(area_s):.3f} CPU s/clip, without the probe"
    )
    print(
        f"encode  {np.mean(encode_s):.3f} CPU s/clip, of which libjpeg-turbo alone {np.mean(jpeg_s):.3f} "
        f"(the rest: the quality check, the Matroska mux)"
    )
    for s in scales:
        print(f"sift scale={s:g}  {np.mean(sift_s[s]):.3f} CPU s/clip")
    for kind, what in (("c", "as they are"), ("b", f"blurred sigma={args.blur:g}")):
        print(f"queries on the clips {what}:")
        for s in scales:
            g = stats[s, kind]
            if not g["found"]:
                print(f"  scale={s:g}: every draw failed ({g['fail']})")
                continue
            print(
                f"  scale={s:g}: found/keyframe mean={np.mean(g['found']):.0f} min={np.min(g['found'])}"
                f"  taken/keyframe mean={np.mean(g['taken']):.1f} min={np.min(g['taken'])} max={np.max(g['taken'])}"
                f"  near strong gradient={np.mean(g['strong']):.3f} (sd {np.std(g['strong']):.3f})"
                f"  within 2px of old={np.mean(g['same']):.3f}  too few features={g['fail']}/{clips}"
            )
    base = np.mean(decode_s) + np.mean(sift_s[scales[0]]) + np.mean(encode_s)
    for s in scales:
        total = np.mean(decode_s) + np.mean(sift_s[s]) + np.mean(encode_s)
        print(f"decode+sift+encode scale={s:g}: {total:.3f} CPU s/clip ({total / base:.2f} of scale={scales[0]:g})")
    if args.base:  # against the baseline: the base commit's decode and encode with SIFT on full keyframes
        start = before["decode"] + np.mean(sift_s[scales[0]]) + before["encode"]
        now = after["decode"] + after["sift"] + after["encode"]
        print(
            f"decode+sift+encode: {args.base} with sift scale={scales[0]:g} {start:.3f} -> this tree "
            f"{now:.3f} CPU s/clip ({now / start:.2f}x)"
        )
        # what would be left if everything but the two codecs' own work cost nothing: stored pixels unchanged
        floor = np.mean(h264_s) + after["sift"] + np.mean(jpeg_s)
        print(
            f"floor with today's pixels (H.264 decoder + sift + libjpeg alone): {floor:.3f} CPU s/clip "
            f"({floor / start:.2f}x of {args.base})"
        )


if __name__ == "__main__":
    main()
