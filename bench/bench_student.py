"""Student training cost: time and peak memory of one training step, and shard-loader throughput.

    /work/venv/bin/python bench/bench_student.py                      # tiny student on CPU + loader
    /work/venv/bin/python bench/bench_student.py --size full --frames 64 --tracks 384   # the paper's setting
    /work/venv/bin/python bench/bench_student.py --skip-step --loader-frames 64 --loader-height 384 \\
        --loader-width 512 --workers 0 2

A step is forward + backward + AdamW on one clip (batch 1), the frozen
visibility/confidence head excluded, as `student.train` runs it; on CUDA under
bf16 autocast (the paper's setting is 64 frames at 384x512, 384 tracks). Peak
memory is `torch.cuda.max_memory_allocated` on GPU, and the growth of the
process's peak resident set on CPU (a coarse, upper-bound figure).

The loader is timed on local shards of generated clips, through the same
`make_loader` the trainer uses (decode, teacher choice, re-timing, track
sampling, batching), in samples per second after the first batch.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from pseudotrack.student.data import ClipSpec, make_loader, shard_refs
from pseudotrack.student.loss import online_supervision_mask, track_loss
from pseudotrack.student.model import build_student


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def bench_step(size: str, variant: str, frames: int, tracks: int, iters: int, repeats: int, device: str) -> dict:
    """Seconds per training step (median of `repeats` after one warm-up) and peak memory."""
    dev = torch.device(device)
    torch.manual_seed(0)
    student = build_student(variant, size).to(dev).train()
    height, width = student.resolution
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-5)
    video = (torch.rand(1, frames, 3, height, width, device=dev) * 255).float()
    queries = torch.stack(
        [
            torch.randint(0, max(1, frames // 4), (tracks,)).float(),
            torch.rand(tracks) * (width - 1),
            torch.rand(tracks) * (height - 1),
        ],
        dim=-1,
    )[None].to(dev)
    target = queries[:, None, :, 1:].expand(1, frames, tracks, 2) + torch.randn(1, frames, tracks, 2, device=dev)
    visible = torch.rand(1, frames, tracks, device=dev) > 0.2
    valid = torch.ones(1, tracks, dtype=torch.bool, device=dev)
    occluded_ok = torch.ones(1, dtype=torch.bool, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    rss_before = peak_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        with amp:
            windows = student(video, queries, iters=iters)
            supervised = (
                online_supervision_mask(queries[..., 0], frames, valid)
                if variant == "online"
                else valid[:, None].expand(1, frames, tracks)
            )
            loss = track_loss(windows, target, visible, supervised, occluded_ok)
        (loss * 0.05).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first step pays one-off allocation and kernel selection
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else max(0.0, peak_rss_mb() - rss_before)
    return {
        "size": size,
        "variant": variant,
        "device": str(dev),
        "frames": frames,
        "resolution": f"{height}x{width}",
        "tracks": tracks,
        "iters": iters,
        "step_s": float(np.median(times)),
        "peak_mb": peak,
        "threads": torch.get_num_threads(),
        "bf16": dev.type == "cuda",
    }


def write_shards(root: str, samples: int, frames: int, height: int, width: int, tracks: int) -> None:
    """Generated scenes with exact labels under two teacher names, as a labelling round would store them."""
    from pseudotrack.storage.uri import open_store
    from pseudotrack.synthetic import render_scene
    from pseudotrack.tasks.clip_codec import encode_clip
    from pseudotrack.tasks.shards import Sample, ShardSink
    from pseudotrack.teachers.base import TeacherOutput

    sink = ShardSink(open_store(root), "bench", "b0", max_samples=max(1, samples // 4))
    for seed in range(samples):
        scene = render_scene(seed, num_frames=frames, height=height, width=width, num_points=tracks)
        queries = np.concatenate([np.zeros((tracks, 1)), scene.tracks[:, 0]], axis=1).astype(np.float32)
        label = TeacherOutput(scene.tracks.transpose(1, 0, 2), ~scene.occluded.T, np.ones((frames, tracks), np.float16))
        meta = {
            "teachers": ["cotracker3_online", "tapir"],
            "tracks_occluded": {"cotracker3_online": True, "tapir": False},
        }
        sink.add(
            Sample(
                f"s{seed:05d}",
                encode_clip(scene.frames, 24.0),
                queries,
                {"cotracker3_online": label, "tapir": label},
                meta,
            ),
            {},
        )
    sink.close()


def bench_loader(
    root: str, frames: int, height: int, width: int, tracks: int, workers: int, batches: int, batch_size: int
) -> dict:
    refs = shard_refs(root)
    spec = ClipSpec(num_frames=frames, num_tracks=tracks, height=height, width=width)
    loader = iter(make_loader(refs, spec, batch_size, seed=0, num_workers=workers))
    next(loader)  # worker start-up and the first shard opening are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "batch_size": batch_size,
        "clip": f"{frames}x{height}x{width}",
        "tracks": tracks,
        "samples_per_s": batches * batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--variant", default="online", choices=["online", "offline"])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tracks", type=int, default=64)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--loader-samples", type=int, default=16)
    parser.add_argument("--loader-frames", type=int, default=24)
    parser.add_argument("--loader-height", type=int, default=192)
    parser.add_argument("--loader-width", type=int, default=256)
    parser.add_argument("--loader-tracks", type=int, default=64)
    parser.add_argument("--loader-batches", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_step:
        r = bench_step(args.size, args.variant, args.frames, args.tracks, args.iters, args.repeats, args.device)
        print(
            f"step  {r['size']} {r['variant']} on {r['device']} ({r['threads']} threads, bf16={r['bf16']}): "
            f"{r['frames']} frames {r['resolution']}, {r['tracks']} tracks, {r['iters']} iters -> "
            f"{r['step_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB"
        )
    if not args.skip_loader:
        with tempfile.TemporaryDirectory(prefix="bench-student-") as root:
            t0 = time.perf_counter()
            write_shards(
                root, args.loader_samples, args.loader_frames, args.loader_height, args.loader_width, args.loader_tracks
            )
            print(f"wrote {args.loader_samples} samples in {time.perf_counter() - t0:.1f} s")
            for workers in args.workers:
                r = bench_loader(
                    root,
                    args.loader_frames,
                    args.loader_height,
                    args.loader_width,
                    args.loader_tracks,
                    workers,
                    args.loader_batches,
                    1,
                )
                print(
                    f"loader {r['workers']} workers, clips {r['clip']}, {r['tracks']} tracks: "
                    f"{r['samples_per_s']:.1f} samples/s"
                )


if __name__ == "__main__":
    main()
