"""Our teacher networks against the authors' own code: same weights, same input, time and peak memory.

Usage:
  python bench/bench_authors.py --authors-repo /tmp/authors/co-tracker [--tapnet-repo /tmp/authors/tapnet]
      [--extra-path DIR] [--teachers cotracker3_offline cotracker3_online cotracker2 tapir bootstapir]
      [--frames 24] [--queries 128] [--repeat 3] [--threads 2] [--device cpu|cuda] [--iters K]

The authors' code is not part of pseudotrack and is never copied into it: point
`--authors-repo` at a checkout of facebookresearch/co-tracker and
`--tapnet-repo` at one of google-deepmind/tapnet (its `tapnet/torch` port
needs the `dm-tree` and `einshape` packages; `--extra-path` adds a folder
holding them to the authors' import path only). A teacher whose authors' repo
is not given is skipped.

Both sides get the stand-in weights of the parity tests (the reference rule
applied to the official state-dict names, shared/reference/weights_rule.py),
loaded strictly: ours through our checkpoint loader, theirs with
`load_state_dict`. Both run the network call the reference README documents
(offline: one forward; online: windows of 16 moving by 8; CoTracker2: its
sliding windows; TAPIR: the port's forward) on the same frames, already at the
model's resolution (384x512 for CoTracker, 256x256 for TAPIR), and on the same
queries, under `torch.inference_mode`. Ours runs with the chunk sizes our
teachers use when labelling.

Each run is its own subprocess, so the peak resident set (`ru_maxrss`) is that
run's alone; the table gives it whole and as growth over the resident set just
before the forward (the weights, the input and torch itself are in the
baseline). On CUDA the peak is torch's allocator's. Runs alternate ours/theirs
`--repeat` times (order swapped every round, since the machine is shared and
its speed drifts), and the medians are printed: wall time and the process's
CPU time (user + system, all threads), which a busy machine disturbs less. The outputs of the first
round are compared: the max track gap in pixels must be float noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEACHERS = ("cotracker3_offline", "cotracker3_online", "cotracker2", "tapir", "bootstapir")
COTRACKER = {"cotracker3_offline", "cotracker3_online", "cotracker2"}
DEFAULT_ITERS = {"cotracker3_offline": 4, "cotracker3_online": 4, "cotracker2": 6, "tapir": 4, "bootstapir": 4}
AGREE_PX = {"cotracker2": 0.1}  # the README's tolerances: 0.05 px, 0.1 for cotracker2's livelier dynamics


def shared_dir() -> Path:
    return Path(os.environ.get("PSEUDOTRACK_SHARED") or REPO.parent / "shared")


def _bench_teachers():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_teachers

    return bench_teachers


# ---------------------------------------------------------------- one run, in its own process


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine it tracks the work done better than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(impl: str, teacher: str, weights: Path, device: str):
    """The network of `teacher`, ours or the authors', with the weights file loaded strictly."""
    import torch

    if impl == "ours":
        if teacher.startswith("cotracker3"):
            from pseudotrack.teachers.cotracker3 import default_config, load_cotracker3

            return load_cotracker3(weights, default_config(offline=teacher.endswith("offline")), device)
        if teacher == "cotracker2":
            from pseudotrack.teachers.cotracker2 import load_cotracker2

            return load_cotracker2(weights, window_len=16, device=device)
        from pseudotrack.teachers.tapir import BOOTSTAPIR_CONFIG, TAPIR_CONFIG, load_tapir

        return load_tapir(weights, BOOTSTAPIR_CONFIG if teacher == "bootstapir" else TAPIR_CONFIG, device)
    if teacher == "cotracker3_offline":
        from cotracker.models.core.cotracker.cotracker3_offline import CoTrackerThreeOffline

        net = CoTrackerThreeOffline(stride=4, corr_radius=3, window_len=60, model_resolution=(384, 512))
    elif teacher == "cotracker3_online":
        from cotracker.models.core.cotracker.cotracker3_online import CoTrackerThreeOnline

        net = CoTrackerThreeOnline(stride=4, corr_radius=3, window_len=16, model_resolution=(384, 512))
    elif teacher == "cotracker2":
        from cotracker.models.core.cotracker.cotracker import CoTracker2

        net = CoTracker2(stride=4, window_len=16, model_resolution=(384, 512))
    else:
        from tapnet.torch import tapir_model

        boots = teacher == "bootstapir"
        net = tapir_model.TAPIR(pyramid_level=1 if boots else 0, extra_convs=boots)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.to(device).eval()


def forward(impl: str, teacher: str, net, video, queries, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented call; video [1, T, 3, H, W] 0..255, queries [1, N, 3] (t, x, y) model pixels
    -> tracks [T, N, 2] pixels, and visibility probabilities (CoTracker) or occlusion logits (TAPIR) [T, N]."""
    import torch

    if teacher in COTRACKER:
        if impl == "ours":
            if teacher == "cotracker2":
                tracks, vis = net(video, queries, iters)  # the teacher's point_chunk and frame_chunk defaults
            else:
                from pseudotrack.teachers.cotracker3 import CoTracker3Teacher

                chunks = CoTracker3Teacher(offline=teacher.endswith("offline")).chunks
                out = net(video, queries, iters, chunks)
                tracks, vis = out.tracks, out.visibility
        elif teacher == "cotracker3_online":
            net.init_video_online_processing()
            t = video.shape[1]
            for ind in range(0, max(t - 8, 1), 8):
                tracks, vis, _conf, _ = net(video[:, ind : ind + 16], queries, iters=iters, is_online=True)
        elif teacher == "cotracker3_offline":
            tracks, vis, _conf, _ = net(video, queries, iters=iters)
        else:
            tracks, vis, _ = net(video, queries, iters=iters)
        return tracks[0].float().cpu().numpy(), vis[0].float().cpu().numpy()
    frames = (video / 255 * 2 - 1).permute(0, 1, 3, 4, 2)  # B T H W 3 in [-1, 1]
    q = torch.cat([queries[..., :1], queries[..., 2:3], queries[..., 1:2]], dim=-1)  # (t, y, x)
    out = net(frames, q, 64, 10) if impl == "ours" else net(frames, q, query_chunk_size=64)
    return (
        out["tracks"][0].permute(1, 0, 2).float().cpu().numpy(),
        out["occlusion"][0].permute(1, 0).float().cpu().numpy(),
    )


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    data = np.load(args.inputs)
    net = build(args.impl, args.teacher, Path(args.weights), args.device)
    video = torch.from_numpy(data["video"]).permute(0, 3, 1, 2)[None].float().to(args.device)
    queries = torch.from_numpy(data["queries"])[None].to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib("VmRSS")
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    with torch.inference_mode():
        tracks, vis = forward(args.impl, args.teacher, net, video, queries, args.iters)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    if args.out:
        np.savez(args.out, tracks=tracks, vis=vis)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "growth_mib": peak - before}))
    return 0


# ---------------------------------------------------------------- the comparison


def make_inputs(teacher: str, frames: int, count: int, folder: Path) -> Path:
    bt = _bench_teachers()
    h, w = (384, 512) if teacher in COTRACKER else (256, 256)
    clip = bt.load_clip(frames, h, w)
    queries = bt.make_queries(clip, count)
    path = folder / f"inputs_{teacher}.npz"
    np.savez(path, video=clip, queries=np.concatenate([np.rint(queries[:, :1]), queries[:, 1:]], 1))
    return path


def run_one(args, impl: str, teacher: str, inputs: Path, weights: Path, out: Path | None) -> dict:
    env = dict(os.environ)
    paths = [str(REPO)]
    if impl == "theirs":
        repo = args.authors_repo if teacher in COTRACKER else args.tapnet_repo
        paths = [str(repo), *args.extra_path, *paths]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--worker", impl, teacher, str(inputs), str(weights)]
    cmd += [
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--iters",
        str(args.iters or DEFAULT_ITERS[teacher]),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
    if done.returncode:
        raise RuntimeError(f"{impl} {teacher} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args) -> int:
    bt = _bench_teachers()
    rule = bt.weights_rule()
    print(
        f"# {args.frames} frames, {args.queries} queries, device {args.device}, {args.threads} threads, "
        f"{args.repeat} alternating runs each, medians"
    )
    print(f"{'teacher':<20}{'impl':<8}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}{'growth MiB':>12}{'max gap px':>12}")
    with tempfile.TemporaryDirectory(prefix="bench_authors_") as tmp:
        folder = Path(tmp)
        for teacher in args.teachers:
            repo = args.authors_repo if teacher in COTRACKER else args.tapnet_repo
            if repo is None:
                print(f"# {teacher}: skipped, no {'--authors-repo' if teacher in COTRACKER else '--tapnet-repo'}")
                continue
            weights = folder / f"{teacher}.pth"
            import torch

            torch.save(rule.make_state_dict(shared_dir() / "reference" / teacher), weights)
            inputs = make_inputs(teacher, args.frames, args.queries, folder)
            runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
            outs = {impl: folder / f"{teacher}_{impl}.npz" for impl in runs}
            for rep in range(args.repeat):
                order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
                for impl in order:
                    runs[impl].append(run_one(args, impl, teacher, inputs, weights, outs[impl] if rep == 0 else None))
            a, b = np.load(outs["ours"]), np.load(outs["theirs"])
            gap = float(np.abs(a["tracks"] - b["tracks"]).max())
            vis_gap = float(np.abs(a["vis"] - b["vis"]).max())
            for impl, rows in runs.items():
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                shown = f"{gap:>12.2e}" if impl == "ours" else ""
                print(
                    f"{teacher:<20}{impl:<8}{med['seconds']:>9.2f}{med['cpu_seconds']:>9.2f}{med['peak_mib']:>10.0f}"
                    f"{med['growth_mib']:>12.0f}"
                    f"{shown}",
                    flush=True,
                )
            agree = gap <= AGREE_PX.get(teacher, 0.05)
            print(
                f"#   outputs {'agree' if agree else 'DIFFER'}: tracks max gap {gap:.2e} px, "
                f"{'visibility' if teacher in COTRACKER else 'occlusion logit'} max gap {vis_gap:.2e}; "
                f"times ours {[round(r['seconds'], 2) for r in runs['ours']]}, "
                f"theirs {[round(r['seconds'], 2) for r in runs['theirs']]}",
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "TEACHER", "INPUTS", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--authors-repo", type=Path, help="checkout of facebookresearch/co-tracker")
    parser.add_argument("--tapnet-repo", type=Path, help="checkout of google-deepmind/tapnet")
    parser.add_argument("--extra-path", nargs="*", default=[], help="folders added to the authors' import path")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=None, help="refinement steps (default: the teacher's own)")
    args = parser.parse_args(argv)
    if args.worker:
        args.impl, args.teacher, args.inputs, args.weights = args.worker
        return worker(args)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
