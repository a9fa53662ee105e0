"""Time and peak memory per clip of each neural teacher, with stand-in weights (no real checkpoints needed).

Usage:
  python bench/bench_teachers.py [--teachers cotracker3_online cotracker3_offline] [--frames 64]
      [--height 384] [--width 512] [--queries 384] [--device cpu|cuda] [--dtype float32|bfloat16]
      [--iters K] [--repeat 1] [--batch 1] [--sweep [--sweep-n 64 256 1024 4096] [--sweep-t 24 48 80 128]]

Any registered teacher works: it is built through `create_teacher`. A teacher
that needs a checkpoint gets one made by the reference weight rule from
`shared/reference/<teacher>/manifest.json` (the same stand-in weights the
parity tests use), saved under the teacher's first official file name; a
teacher without a manifest there is skipped with a note. Timing covers the
whole `predict` call (resizing, support points, model, mapping back), i.e.
what the labelling stage pays per clip. Weights this random do not change the
cost: the work per clip is fixed by the sizes.

Memory: on CUDA the peak of allocated tensors; on the CPU the process's peak
resident set (VmHWM, reset before each run where Linux allows it) and its
growth over the resident set before the run.

`--batch K` runs K copies of the clip through one `predict_batch` call (one
forward of K clips, as labelling does with `teacher_batch`) and reports the
time per clip and the peak of the whole call: on a GPU that is the figure that
says whether batching pays.

`--profile` (CUDA) also profiles one more `predict` per teacher with
`torch.profiler` and prints its heaviest operators by GPU time, the GPU's
busy share of that call, and the host-device synchronisations it made: the
figures that say whether CUDA graphs, compilation or fewer syncs would pay.

`--sweep` times the offline CoTracker3 teacher over query counts x clip
lengths (its 100 support points included), the table that sizes GPU workers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pseudotrack.errors import SampleError
from pseudotrack.teachers.base import Teacher, create_teacher, predict_batch, teacher_names, teacher_spec

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("PSEUDOTRACK_SHARED") or REPO.parent / "shared")


def weights_rule():
    path = shared_dir() / "reference" / "weights_rule.py"
    spec = importlib.util.spec_from_file_location("weights_rule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_checkpoint(name: str, folder: Path) -> Path | None:
    """A rule-weights file under the teacher's official name; None when no manifest exists for it."""
    model_dir = shared_dir() / "reference" / name
    if not (model_dir / "manifest.json").is_file():
        return None
    names = teacher_spec(name).checkpoint_names or (f"{name}.pth",)
    path = folder / names[0]
    if not path.exists():
        torch.save(weights_rule().make_state_dict(model_dir), path)
    return path


def build_teacher(name: str, folder: Path, device: str, dtype: str, iters: int | None) -> Teacher | None:
    spec = teacher_spec(name)
    checkpoint = stand_in_checkpoint(name, folder) if spec.needs_checkpoint else None
    if spec.needs_checkpoint and checkpoint is None:
        print(f"# {name}: skipped, no {shared_dir() / 'reference' / name / 'manifest.json'} for stand-in weights")
        return None
    teacher = create_teacher(name, checkpoint)
    if hasattr(teacher, "amp"):
        teacher.amp = dtype == "bfloat16"
    if iters is not None and hasattr(teacher, "iters"):
        teacher.iters = iters
    teacher.setup(device)
    return teacher


def load_clip(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: the real bear clip resized and looped when available, else a moving texture."""
    import cv2

    source = shared_dir() / "videos" / "bear.mp4"
    images = []
    capture = cv2.VideoCapture(str(source)) if source.is_file() else None
    while capture is not None and len(images) < frames:
        ok, bgr = capture.read()
        if not ok:
            break
        images.append(cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    if not images:
        base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        images = [np.roll(base, 2 * i, axis=1) for i in range(frames)]
    while len(images) < frames:  # play the clip back and forth
        images.extend(images[::-1][1 : frames - len(images) + 1])
    return np.stack(images[:frames])


def make_queries(clip: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """SIFT queries as the labelling stage makes them; uniform ones if the clip has too few features."""
    rng = np.random.default_rng(seed)
    try:
        from pseudotrack.tasks.queries import sample_queries

        return sample_queries(clip, num_queries=count, rng=rng)[0]
    except (ImportError, SampleError):
        t, h, w = clip.shape[:3]
        return np.stack(
            [
                rng.integers(0, max(1, t // 4), count),
                rng.uniform(0, w - 1, count),
                rng.uniform(0, h - 1, count),
            ],
            axis=1,
        ).astype(np.float32)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(
    teacher: Teacher, clip: np.ndarray, queries: np.ndarray, device: str, dtype: str, repeat: int, batch: int = 1
) -> dict:
    """Best wall time per clip over `repeat` runs and the peak memory of one run (MiB).

    batch > 1: `batch` copies of the clip in one `predict_batch` call; seconds are per clip."""
    cpu_bf16 = device == "cpu" and dtype == "bfloat16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else nullcontext()
    times = []
    peak = growth = 0.0
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        with autocast:
            out = predict_batch(teacher, [(clip, queries)] * batch)[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            growth = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = _rss_kib("VmHWM") / 1024
            growth = peak - base / 2**20
        times.append((time.perf_counter() - start) / batch)
    assert out.tracks.shape == (len(clip), len(queries), 2)
    return {"seconds": min(times), "peak_mib": peak, "growth_mib": growth}


def profile(name: str, teacher: Teacher, clip: np.ndarray, queries: np.ndarray, rows: int = 12) -> None:
    """One `predict` under torch.profiler: the heaviest GPU operators, the GPU's busy share, host syncs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        teacher.predict(clip, queries)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::nonzero")}
    copies = {e.key: e.count for e in events if e.key.startswith("Memcpy")}
    print(
        f"# profile {name}: wall {wall:.3f} s (profiled), GPU kernels {kernels_us / 1e6:.3f} s "
        f"({kernels_us / 1e6 / wall:.0%} busy); syncs {syncs}; copies {copies}"
    )
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
    print("\n".join("#   " + line for line in table.splitlines()), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teachers",
        nargs="*",
        default=["cotracker3_online", "cotracker3_offline"],
        help="registered teacher names (none: only the sweep)",
    )
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--queries", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--iters", type=int, default=None, help="refinement steps (default: the teacher's own)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per setting (best is reported)")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward (predict_batch); s/clip reported")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="profile one predict per teacher (CUDA)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the offline CoTracker3 over N x T")
    parser.add_argument("--sweep-n", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--sweep-t", type=int, nargs="+", default=[24, 48, 80, 128])
    args = parser.parse_args(argv)

    unknown = sorted(set(args.teachers) - set(teacher_names()))
    if unknown:
        parser.error(f"unknown teachers {unknown}; registered: {', '.join(teacher_names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    warmup = args.warmup if args.warmup is not None else int(args.device.startswith("cuda"))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"# device {device_name}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="bench_teachers_") as tmp:
        folder = Path(tmp)
        clip = load_clip(args.frames, args.height, args.width)
        queries = make_queries(clip, args.queries)
        print(
            f"# clip {clip.shape[0]} frames {clip.shape[2]}x{clip.shape[1]}, {len(queries)} queries, "
            f"{args.batch} clip(s) per forward"
        )
        print(f"{'teacher':<22}{'s/clip':>9}{'peak MiB':>10}{'growth MiB':>12}")
        for name in args.teachers:
            teacher = build_teacher(name, folder, args.device, args.dtype, args.iters)
            if teacher is None:
                continue
            for _ in range(warmup):
                teacher.predict(clip, queries)
            r = measure(teacher, clip, queries, args.device, args.dtype, args.repeat, args.batch)
            print(f"{name:<22}{r['seconds']:>9.2f}{r['peak_mib']:>10.0f}{r['growth_mib']:>12.0f}", flush=True)
            if args.profile and args.device.startswith("cuda"):
                try:
                    profile(name, teacher, clip, queries)
                except Exception as exc:  # a profiler problem must not cost the other teachers' figures
                    print(f"# profile {name} failed: {exc!r}", flush=True)
            del teacher

        if args.sweep:
            teacher = build_teacher("cotracker3_offline", folder, args.device, args.dtype, args.iters)
            assert teacher is not None
            print(f"\n# sweep: cotracker3_offline, {args.height}x{args.width}, N queries (+100 support) x T frames")
            print(f"{'N':>6}{'T':>6}{'s/clip':>9}{'peak MiB':>10}{'growth MiB':>12}")
            long_clip = load_clip(max(args.sweep_t), args.height, args.width)
            for t in args.sweep_t:
                for n in args.sweep_n:
                    clip_t = long_clip[:t]
                    q = make_queries(clip_t, n, seed=n)
                    for _ in range(warmup):
                        teacher.predict(clip_t, q)
                    r = measure(teacher, clip_t, q, args.device, args.dtype, args.repeat)
                    print(
                        f"{n:>6}{t:>6}{r['seconds']:>9.2f}{r['peak_mib']:>10.0f}{r['growth_mib']:>12.0f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
