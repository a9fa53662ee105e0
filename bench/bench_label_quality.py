"""Does the label quality score mean something? Its rank correlation with the true track error, and what it costs.

    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/bench_label_quality.py
    ... --student /tmp/quality_student.pth     # reuse a trained tiny student (trained and saved there otherwise)

Setting. Generated scenes (`synthetic.render_scene`: exact tracks and
occlusions; by default 12 scenes from seed EVAL_SEED, 24 frames at 192x256,
64 points, 'first' queries) are labelled by `lk` (weight-free) and by a tiny
CoTracker3 (the tiny architecture has no published weights) trained here on
other generated scenes: 1000 steps of one new 16-frame 192x256 scene each
(seeds from TRAIN_SEED, never the scored ones), resized to the model's
resolution as the teacher does, AdamW at 1e-3 with warm-up and cosine decay,
tracks, visibility and confidence supervised with the exact labels. Trained
on 16 frames it crosses online windows, and it is scored on 24-frame clips,
longer than it saw. It is used as the `cotracker3_online` teacher with a
visibility threshold of 0.5 (0.9 in rounds). Each teacher's tracks are scored
by `tasks.quality.track_quality` with the frames, the other teacher's labels
(agreement) and the forward-backward check on every clip (the round runs it
on a sampled fraction); the score's formula and weights are the module's, the
same for both teachers, and were not fitted to these scenes.

The true track error of a track is its mean distance to the exact track, in
pixels of a 256x256 frame, over the frames where the exact point is visible,
the query frame excluded (tracks visible on no other frame are left out).
Per teacher it prints the Spearman correlation between score and minus the
error (1 = the score ranks tracks exactly by error), each signal's own, and
how much the mean error of the kept tracks drops when the 20% lowest-scored
tracks are dropped (beside an oracle's drop, which drops the truly worst 20%:
the most any score can reach); then the same without forward-backward.

Costs, per teacher: the quality signals per clip as a share of the teacher's
time on that clip, with and without forward-backward (on the scored clips, and
on round-default clips: 384x512, 64 frames, 384 queries); and calibration
(`student.calibration`, the round's default set) as a share of labelling 100
round-default clips with that teacher, timed on `--round-clips` clips and
scaled to 100. All on this machine's CPU.
The last line: `spearman=S error_drop=D teachers=...`, S and D the worst over teachers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pseudotrack.student.calibration import CalibrationSet, calibrate
from pseudotrack.student.metrics import sample_queries
from pseudotrack.student.model import read_export_meta
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks.quality import forward_backward_error, spearman, track_quality
from pseudotrack.teachers.base import create_teacher

EVAL_SEED = 4200  # scenes scored here; the student trains on seeds from TRAIN_SEED, never these
TRAIN_SEED = 90000


def train_tiny_student(
    path: Path,
    steps: int,
    frames: int = 16,
    size: tuple[int, int] = (192, 256),
    points: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    snapshots: int = 0,
) -> Path:
    """A tiny online CoTracker3 trained on exact synthetic labels (tracks + visibility + confidence), exported.

    Each step renders one new scene (seeds from TRAIN_SEED) at `size` and resizes it to the model's
    resolution the way the teacher does (bilinear, corners aligned), so the student trains on clips
    like the ones it labels; `frames` spans several online windows, so it learns to carry tracks from
    one window to the next. The learning rate warms up over the first 5% of the steps and falls on a
    cosine to a twentieth of `lr`. `snapshots` > 0 also exports every that many steps (to
    `<path>.step<k>`), so a run cut short still leaves a student.
    """
    import math

    from pseudotrack.student.loss import huber
    from pseudotrack.student.model import Student, export_student
    from pseudotrack.teachers import cotracker3 as ct3

    torch.manual_seed(seed)
    net = ct3.CoTracker3(ct3.tiny_config())
    net.updateformer.flow_head.reset_parameters()
    net.to(device).train()
    mh, mw = net.cfg.model_resolution
    h, w = size
    to_model = torch.tensor([(mw - 1) / (w - 1), (mh - 1) / (h - 1)], dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    warmup = max(1, steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    recipe = f"synthetic exact labels, {frames} frames at {h}x{w}, {points} points, seeds {TRAIN_SEED}+, lr {lr}"

    def export(to: Path, done: int) -> Path:
        net.to("cpu").eval()
        to.parent.mkdir(parents=True, exist_ok=True)
        saved = export_student(Student(net, "online"), to, {"step": done, "of_steps": steps, "trained_on": recipe})
        for param in net.parameters():  # the Student wrapper freezes the head; training goes on
            param.requires_grad_(True)
        return saved

    bce = torch.nn.functional.binary_cross_entropy
    start = time.perf_counter()
    for step in range(steps):
        scene = render_scene(TRAIN_SEED + step, num_frames=frames, height=h, width=w, num_points=points)
        qs = sample_queries(scene.tracks, scene.occluded, "first")
        qp = qs.query_points
        queries = torch.tensor(np.stack([qp[:, 0], qp[:, 2], qp[:, 1]], -1), dtype=torch.float32, device=device)[None]
        queries[..., 1:] *= to_model
        video = torch.tensor(scene.frames, dtype=torch.float32, device=device).permute(0, 3, 1, 2)
        video = torch.nn.functional.interpolate(video, size=(mh, mw), mode="bilinear", align_corners=True)[None]
        gt = torch.tensor(qs.tracks, dtype=torch.float32, device=device).permute(1, 0, 2)[None] * to_model
        gt_vis = torch.tensor(~qs.occluded, dtype=torch.float32, device=device).T[None]  # [1, T, N]
        after = (torch.arange(frames, device=device)[:, None] >= queries[0, :, 0].long()[None])[None].float()
        out = net.forward_windowed(video, queries, iters=3)
        loss = video.new_zeros(())
        for win in out.windows:
            s = slice(win.start, win.start + win.tracks[0].shape[1])
            mask = after[:, s]
            for k, (tr, vis, conf) in enumerate(zip(win.tracks, win.visibility, win.confidence, strict=True)):
                weight = 0.8 ** (len(win.tracks) - 1 - k)
                err = huber(tr - gt[:, s], 6.0).mean(-1)
                loss = loss + weight * (err * mask * gt_vis[:, s]).sum() / mask.sum().clamp(min=1) * 0.05
                close = ((tr.detach() - gt[:, s]).norm(dim=-1) < 2.0).float()
                loss = loss + weight * (bce(vis.clamp(1e-4, 1 - 1e-4), gt_vis[:, s], reduction="none") * mask).mean()
                loss = loss + weight * (bce(conf.clamp(1e-4, 1 - 1e-4), close, reduction="none") * mask).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  student step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if snapshots and (step + 1) % snapshots == 0 and step + 1 < steps:
            export(path.with_name(f"{path.name}.step{step + 1}"), step + 1)
            net.to(device).train()
    return export(path, steps)


def true_error(pred_tracks: np.ndarray, gt_tracks: np.ndarray, gt_occluded: np.ndarray, query_t, size) -> np.ndarray:
    """Mean distance [N] (256x256 pixels) over frames where the exact point is visible, query frame excluded."""
    h, w = size
    d = np.linalg.norm((pred_tracks.transpose(1, 0, 2) - gt_tracks) * np.array([256.0 / w, 256.0 / h]), axis=-1)
    seen = ~gt_occluded
    seen[np.arange(len(query_t)), query_t] = False
    count = seen.sum(axis=1)
    return np.where(count > 0, np.where(seen, d, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def error_drop(scores: np.ndarray, errors: np.ndarray, drop: float = 0.2) -> float:
    """Relative fall of the mean true error when the `drop` lowest-scored tracks are left out."""
    order = np.argsort(scores, kind="stable")
    kept = order[int(round(drop * len(order))) :]
    return float(1.0 - errors[kept].mean() / errors.mean())


def label_and_score(
    teachers: dict, scenes: int, frames: int, size: tuple[int, int], points: int, seed: int = EVAL_SEED
) -> tuple[dict, dict]:
    """Per teacher: scores with and without forward-backward, true errors, and the timings per clip."""
    names = list(teachers)
    rows = {
        n: {"score": [], "score_nofb": [], "error": [], "t_teacher": [], "t_quality": [], "t_fb": []} for n in names
    }
    for i in range(scenes):
        scene = render_scene(seed + i, num_frames=frames, height=size[0], width=size[1], num_points=points)
        qs = sample_queries(scene.tracks, scene.occluded, "first")
        qp = qs.query_points
        queries = np.stack([qp[:, 0], qp[:, 2], qp[:, 1]], -1).astype(np.float32)
        query_t = np.rint(qp[:, 0]).astype(int)
        outs = {}
        for n in names:
            start = time.perf_counter()
            outs[n] = teachers[n].predict(scene.frames, queries)
            rows[n]["t_teacher"].append(time.perf_counter() - start)
        for n in names:
            out = outs[n]
            others = [(outs[m].tracks, outs[m].visibility, teachers[m].tracks_occluded) for m in names if m != n]
            through = teachers[n].tracks_occluded
            start = time.perf_counter()
            fb = forward_backward_error(teachers[n].predict, scene.frames, queries, out.tracks, out.visibility)
            t_fb = time.perf_counter() - start
            start = time.perf_counter()
            score_nofb, _ = track_quality(
                out.tracks,
                out.visibility,
                out.confidence,
                queries,
                size,
                frames=scene.frames,
                others=others,
                tracks_occluded=through,
            )
            rows[n]["t_quality"].append(time.perf_counter() - start)
            score, signals = track_quality(
                out.tracks,
                out.visibility,
                out.confidence,
                queries,
                size,
                frames=scene.frames,
                others=others,
                fb_error=fb,
                tracks_occluded=through,
            )
            rows[n]["t_fb"].append(t_fb)
            err = true_error(out.tracks, qs.tracks, qs.occluded, query_t, size)
            keep = np.isfinite(err)
            rows[n]["score"].append(score[keep])
            rows[n]["score_nofb"].append(score_nofb[keep])
            for signal, values in signals.items():
                rows[n].setdefault("signal_" + signal, []).append(values[keep])
            rows[n]["error"].append(err[keep])
    return {
        n: {k: np.concatenate(v) if k.startswith(("score", "error", "signal_")) else np.array(v) for k, v in r.items()}
        for n, r in rows.items()
    }, outs


def round_default_costs(teacher, clips: int) -> dict:
    """On round-default clips (384x512, 64 frames, 384 queries), median seconds of `teacher`, of the quality
    signals without forward-backward, and of the forward-backward re-run."""
    times = {"teacher": [], "quality": [], "fb": []}
    for i in range(clips):
        scene = render_scene(EVAL_SEED + 500 + i, num_frames=64, height=384, width=512, num_points=384)
        queries = np.concatenate([np.zeros((384, 1)), scene.tracks[:, 0]], axis=1).astype(np.float32)
        start = time.perf_counter()
        out = teacher.predict(scene.frames, queries)
        times["teacher"].append(time.perf_counter() - start)
        start = time.perf_counter()
        track_quality(out.tracks, out.visibility, out.confidence, queries, (384, 512), frames=scene.frames)
        times["quality"].append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_backward_error(teacher.predict, scene.frames, queries, out.tracks, out.visibility)
        times["fb"].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument(
        "--student",
        type=Path,
        default=None,
        help="a trained tiny student to reuse; default /tmp/pseudotrack_quality_student_<steps>x<frames>_<h>x<w>.pth, "
        "trained (with --train-steps, --train-frames, --height, --width) and saved there when missing",
    )
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--train-frames", type=int, default=16)
    parser.add_argument(
        "--student-visibility-threshold",
        type=float,
        default=0.5,
        help="the student teacher's visibility x confidence threshold (0.9 in rounds; a briefly trained "
        "head rarely reaches it, so every point would read as occluded)",
    )
    parser.add_argument("--round-clips", type=int, default=2, help="round-default clips timed per teacher for costs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    size = (args.height, args.width)
    recipe = f"{args.train_steps}x{args.train_frames}_{args.height}x{args.width}"
    path = args.student or Path(f"/tmp/pseudotrack_quality_student_{recipe}.pth")
    if not path.is_file():
        print(f"training a tiny student for {args.train_steps} steps on {args.train_frames}-frame clips -> {path}")
        train_tiny_student(path, args.train_steps, args.train_frames, size)
    student = create_teacher(
        "cotracker3_online", checkpoint=path, visibility_threshold=args.student_visibility_threshold
    )
    print(f"student: {path} ({read_export_meta(path)})")
    teachers = {"lk": create_teacher("lk"), "student": student}
    for t in teachers.values():
        t.setup("cpu")
    results, _ = label_and_score(teachers, args.scenes, args.frames, size, args.points)

    print(f"{args.scenes} scenes x {args.frames} frames at {args.height}x{args.width}, {args.points} points each")
    worst_s, worst_d = 1.0, 1.0
    for name, r in results.items():
        s, d = spearman(r["score"], -r["error"]), error_drop(r["score"], r["error"])
        s0, d0 = spearman(r["score_nofb"], -r["error"]), error_drop(r["score_nofb"], r["error"])
        worst_s, worst_d = min(worst_s, s), min(worst_d, d)
        quality_share = np.sum(r["t_quality"]) / np.sum(r["t_teacher"])
        fb_share = (np.sum(r["t_quality"]) + np.sum(r["t_fb"])) / np.sum(r["t_teacher"])
        best = error_drop(-r["error"], r["error"])  # dropping the truly worst 20%: the most any score can do
        print(
            f"{name}: tracks={len(r['error'])} mean_true_error={r['error'].mean():.2f}px "
            f"spearman={s:.3f} error_drop={d:.1%} (an oracle's: {best:.1%}) | without forward-backward: "
            f"spearman={s0:.3f} error_drop={d0:.1%}"
        )
        parts = []
        for key in sorted(k for k in r if k.startswith("signal_")):
            known = np.isfinite(r[key])
            rho = spearman(r[key][known], -r["error"][known]) if known.sum() > 2 else float("nan")
            parts.append(f"{key[7:]}={rho:.2f} ({known.mean():.0%} known)")
        print(f"{name}: per-signal spearman: {', '.join(parts)}")
        print(
            f"{name}: teacher {np.mean(r['t_teacher']) * 1000:.0f} ms/clip; quality signals "
            f"{quality_share:.1%} of teacher time without forward-backward, {fb_share:.1%} with"
        )
    cs = CalibrationSet()
    print(
        f"calibration set (the round's default, --calibration-scenes {cs.scenes}): {cs.scenes} scenes x "
        f"{cs.frames} frames at {cs.height}x{cs.width}, {cs.points} points"
    )
    for name, teacher in teachers.items():
        cal = calibrate(teacher)
        costs = round_default_costs(teacher, args.round_clips)
        per_clip = costs["teacher"]
        print(
            f"calibration {name}: delta_avg={cal.delta_avg:.3f} AJ={cal.average_jaccard:.3f} "
            f"OA={cal.occlusion_accuracy:.3f}; {cal.seconds:.2f} s per round = "
            f"{cal.seconds / (100 * per_clip):.2%} of labelling 100 round-default clips with {name}"
        )
        print(
            f"round-default clip (384x512, 64 frames, 384 queries, median of {args.round_clips}): {name} "
            f"{per_clip:.2f} s; quality signals {costs['quality']:.2f} s = {costs['quality'] / per_clip:.1%} of it "
            f"without forward-backward, {(costs['quality'] + costs['fb']) / per_clip:.1%} with"
        )
    print(f"spearman={worst_s:.3f} error_drop={worst_d:.3f} teachers={','.join(results)} (worst over teachers)")


if __name__ == "__main__":
    main()
