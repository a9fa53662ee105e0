"""Our student's training step against the authors' CoTracker3 training step, same weights, same input.

    git --git-dir=<mirror of facebookresearch/co-tracker> archive HEAD | tar -x -C /tmp/authors/co-tracker
    /work/venv/bin/python bench/bench_authors_training.py --authors-repo /tmp/authors/co-tracker \\
        --frames 16 --tracks 64 --repeats 3

The authors' code is imported at run time from the path you give; nothing of it
lives in this repository. Both models get the same randomly initialised
published architecture (their state dict loaded into ours through our normal
checkpoint loader), the same clip, queries and pseudo-labels, and one training
step each: forward in training mode with sliding windows, the Huber track loss
over every refinement with gamma = 0.8 and occluded points weighted 0.01, a
backward pass, gradient clipping and an AdamW step. Their loss is built the way
their real-data training script builds it (visible Huber loss plus 0.01 times
the plain L1 loss on occluded points, per window); ours is `student.loss`.
The printed first losses are a sanity check only: the two normalise over
windows and frames differently, so they are close but not equal.

Each implementation runs in its own subprocess, alternating, so peak resident
memory (ru_maxrss) is its own and slow drifts of a shared machine hit both.
On CUDA the step runs under bf16 autocast and memory is max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_inputs(frames: int, tracks: int, height: int, width: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(1, frames, 3, height, width, generator=g) * 255
    t0 = torch.randint(0, max(1, frames // 4), (tracks,), generator=g).float()
    xy = torch.rand(tracks, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    queries = torch.cat([t0[:, None], xy], dim=1)[None]
    target = xy[None, None].expand(1, frames, tracks, 2) + torch.randn(1, frames, tracks, 2, generator=g) * 3
    visible = torch.rand(1, frames, tracks, generator=g) > 0.2
    return {"video": video, "queries": queries, "target": target, "visible": visible}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _authors_step(repo: str, weights: str, inputs: dict, iters: int, window: int, device: torch.device):
    """Build the authors' online model and return a closure running one of their training steps."""
    sys.path.insert(0, repo)
    from cotracker.models.core.cotracker.cotracker3_online import CoTrackerThreeOnline
    from cotracker.models.core.cotracker.losses import sequence_loss

    model = CoTrackerThreeOnline(stride=4, corr_radius=3, window_len=window).to(device)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("vis_conf_head")]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("vis_conf_head"))
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-5)
    video, queries = inputs["video"].to(device), inputs["queries"].to(device)
    target, visible = inputs["target"].to(device), inputs["visible"].to(device)
    frames = video.shape[1]

    def step() -> float:
        _, _, _, train_data = model(video=video, queries=queries, iters=iters, is_train=True)
        coords, _, _, valid_mask = train_data
        traj_gts, vis_gts, invis_gts, valids = [], [], [], []
        for ind in range(0, frames - window // 2, window // 2):
            traj_gts.append(target[:, ind : ind + window])
            vis_gts.append(visible[:, ind : ind + window].float())
            invis_gts.append(1 - visible[:, ind : ind + window].float())
            valids.append(valid_mask[:, ind : ind + window].float())
        seen = sequence_loss(
            coords, traj_gts, valids, vis=vis_gts, gamma=0.8, add_huber_loss=True, loss_only_for_visible=True
        )
        unseen = sequence_loss(coords, traj_gts, valids, vis=invis_gts, gamma=0.8, loss_only_for_visible=True)
        loss = seen.mean() * 0.05 + unseen.mean() * 0.01 * 0.05
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _our_step(weights: str, inputs: dict, iters: int, device: torch.device):
    from pseudotrack.student.loss import online_supervision_mask, track_loss
    from pseudotrack.student.model import build_student

    student = build_student("online", "full", weights).to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-5)
    video, queries = inputs["video"].to(device), inputs["queries"].to(device)
    target, visible = inputs["target"].to(device), inputs["visible"].to(device)
    frames, tracks = video.shape[1], queries.shape[1]
    valid = torch.ones(1, tracks, dtype=torch.bool, device=device)
    occluded_ok = torch.ones(1, dtype=torch.bool, device=device)

    def step() -> float:
        windows = student(video, queries, iters=iters)
        supervised = online_supervision_mask(queries[..., 0], frames, valid)
        loss = track_loss(windows, target, visible, supervised, occluded_ok)
        scaled = loss * 0.05
        scaled.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(scaled)

    return step


def worker(args: argparse.Namespace) -> None:
    """One implementation, timed in this process; prints one JSON line."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs, weights_only=True)
    torch.manual_seed(0)
    if args.which == "authors":
        step = _authors_step(args.authors_repo, args.weights, inputs, args.iters, 16, device)
    else:
        step = _our_step(args.weights, inputs, args.iters, device)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    rss_before = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with amp:
            losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step pays one-off allocations
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else max(0.0, _peak_rss_mb() - rss_before)
    )
    print(json.dumps({"which": args.which, "times": times, "first_loss": losses[0], "peak_mb": peak}))


def _export_weights(repo: str, path: Path) -> None:
    """A random initialisation of the authors' published online architecture, as a plain state dict."""
    sys.path.insert(0, repo)
    from cotracker.models.core.cotracker.cotracker3_online import CoTrackerThreeOnline

    torch.manual_seed(0)
    torch.save(CoTrackerThreeOnline(stride=4, corr_radius=3, window_len=16).state_dict(), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-repo", required=True, help="a checkout of facebookresearch/co-tracker")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tracks", type=int, default=64)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--which", choices=["ours", "authors"], help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.which:
        worker(args)
        return

    repo = str(Path(args.authors_repo).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-authors-train-") as tmp:
        weights, inputs = Path(tmp) / "weights.pth", Path(tmp) / "inputs.pt"
        _export_weights(repo, weights)
        torch.save(make_inputs(args.frames, args.tracks, 384, 512), inputs)
        results: dict[str, list[dict]] = {"ours": [], "authors": []}
        for _ in range(args.rounds):
            for which in ("ours", "authors"):
                cmd = [sys.executable, __file__, "--which", which, "--authors-repo", repo, "--inputs", str(inputs)]
                cmd += ["--weights", str(weights), "--iters", str(args.iters), "--repeats", str(args.repeats)]
                cmd += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[which].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"training step, published online architecture at 384x512, {args.frames} frames, {args.tracks} tracks, "
        f"{args.iters} iters, batch 1, {args.device}{' bf16' if args.device.startswith('cuda') else ' fp32'}"
    )
    for which, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        print(
            f"  {which:8s} median {statistics.median(times):.3f} s/step (min {min(times):.3f}, n={len(times)}), "
            f"peak {max(r['peak_mb'] for r in runs):.0f} MB, first loss {runs[0]['first_loss']:.4f}"
        )
    ours = statistics.median([t for r in results["ours"] for t in r["times"]])
    theirs = statistics.median([t for r in results["authors"] for t in r["times"]])
    print(f"  ours / authors = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
