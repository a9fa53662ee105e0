"""`pseudotrack train` and `pseudotrack eval`: the student's commands, registered by `cli/main.py`.

Heavy imports (torch, prefect) happen inside the commands so `--help` stays
instant. Both commands show a rich progress bar on stderr, print a metrics
table on stdout and save a JSON report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import bar_progress, console, fail, out, print_table, quiet_prefect
from .options import Verbose


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)


def print_metrics(title: str, reports: dict[str, dict]) -> None:
    """One column per evaluated checkpoint (e.g. initial vs trained), one row per metric."""
    table = Table()
    table.add_column("metric")
    names = list(reports)
    for name in names:
        table.add_column(name, justify="right")
    keys = [k for k, v in next(iter(reports.values()))["metrics"].items() if isinstance(v, float)]
    for key in keys:
        table.add_row(key, *(f"{reports[n]['metrics'].get(key, float('nan')):.4f}" for n in names))
    print_table(title, table)


def train_command(
    workspace: Annotated[str, typer.Option(help="Workspace holding the labelled shards (local dir or s3://).")],
    output: Annotated[
        Path, typer.Option(help="Local folder for checkpoints, TensorBoard logs, metrics, student.pth, report.")
    ],
    init: Annotated[
        str | None,
        typer.Option(
            help="Starting weights: an official CoTracker3 file (scaled_online.pth, baseline_*.pth) or "
            "a student.pth of ours. Without it the student starts from random weights."
        ),
    ] = None,
    round_id: Annotated[
        list[str] | None, typer.Option("--round", help="Train on this round's shards (repeatable). Default: all.")
    ] = None,
    variant: Annotated[str, typer.Option(help="online (sliding windows) or offline (whole clip).")] = "online",
    model_size: Annotated[
        str, typer.Option(help="full (published architecture) or tiny (a small student for CPU trials).")
    ] = "full",
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps. Default: one per training video at batch 32 (App. C).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Clips per optimiser step over all GPUs (recipe: 32).")] = 32,
    micro_batch_size: Annotated[int, typer.Option(help="Clips per forward pass on one GPU.")] = 1,
    frames: Annotated[int, typer.Option(help="Frames per clip (online), longest clip (offline).")] = 64,
    tracks: Annotated[int, typer.Option(help="Tracks per clip.")] = 384,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay, no warm-up).")] = 5e-5,
    iters: Annotated[int, typer.Option(help="Iterative updates per window while training.")] = 4,
    workers: Annotated[int, typer.Option(help="Data loader worker processes per GPU.")] = 2,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the sampling, teacher choice and clip handling.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    evaluate_on: Annotated[
        str | None, typer.Option(help="After training evaluate on 'synthetic' or a TAP-Vid pickle; 'none' skips.")
    ] = "synthetic",
    eval_videos: Annotated[int, typer.Option(help="Benchmark videos to evaluate on.")] = 8,
    min_track_quality: Annotated[
        float | None,
        typer.Option(
            help="Do not supervise tracks whose label quality score is below this (0..1); they stay in the "
            "shards. Default: each sample's round threshold (round --min-track-quality), if any."
        ),
    ] = None,
    quality_weighting: Annotated[
        bool,
        typer.Option(
            help="Weigh each track's loss by its label quality score (floor 0.05). Shards without scores "
            "are weighed equally."
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Fine-tune a CoTracker3 student on pseudo-label shards; run it again to resume from the last checkpoint.

    Several GPUs: torchrun --nproc-per-node N -m pseudotrack.student.train OUTPUT/config.json
    (config.json is written into the output folder by any run, and can be edited).
    """
    quiet_prefect(verbose)
    from ..errors import ConfigError
    from ..flows.train_student import train_student_flow
    from ..student.train import TrainConfig

    try:
        config = TrainConfig(
            workspace=workspace,
            output=str(output),
            rounds=round_id or None,
            init_checkpoint=init,
            variant=variant,
            model_size=model_size,
            steps=steps,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            num_frames=frames,
            num_tracks=tracks,
            lr=lr,
            iters=iters,
            workers=workers,
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            min_track_quality=min_track_quality,
            quality_weighting=quality_weighting,
        )
    except ConfigError as exc:
        fail(str(exc))
        return
    bench = None if (evaluate_on or "").lower() in ("", "none") else evaluate_on
    progress = bar_progress()
    try:
        console.print("starting Prefect (the first start of the ephemeral API takes a few seconds)...")
        with progress:
            report = train_student_flow(config, bench, eval_videos, train_progress(progress, bench))
    except ConfigError as exc:
        fail(str(exc))
        return
    _print_train_report(report)


def train_progress(progress, benchmark: str | None):
    """The train command's `on_progress`: a training bar, then one bar per evaluated checkpoint."""
    tasks: dict[str, int] = {}

    def on_progress(event: str, payload: dict) -> None:
        if event == "train":
            if "train" not in tasks:
                tasks["train"] = progress.add_task("training", total=payload["total_steps"], info="")
            progress.update(
                tasks["train"],
                completed=payload["step"],
                info=f"loss {payload['loss']:.3f} lr {payload['lr']:.1e} {payload['clips_per_second']:.2f} clips/s",
            )
        elif event == "eval":
            name = payload["name"]
            if name not in tasks:
                total = payload["total"] or None
                tasks[name] = progress.add_task(f"evaluating {name}", total=total, info=benchmark or "")
            progress.update(tasks[name], completed=payload["done"], total=payload["total"] or None)

    return on_progress


def _print_train_report(report: dict) -> None:
    train = report["train"]
    table = Table()
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("steps", str(train["steps"]))
    table.add_row("resumed from step", str(train["resumed_from"]))
    windows = train.get("loss_windows")
    if windows is None:  # a report written before loss windows were recorded
        windows = [{"first_step": None, "last_step": None, "loss": train["first_loss"]}]
        windows += [{"first_step": None, "last_step": None, "loss": train["final_loss"]}]
    if len(windows) == 1:  # one logged row: its loss is the mean of every step, not a first and a last
        w = windows[0]
        table.add_row(f"loss (mean of steps {w['first_step']}-{w['last_step']}, one logged window)", f"{w['loss']:.4f}")
    else:
        for label, w in zip(("first", "last"), windows, strict=True):
            steps = f", steps {w['first_step']}-{w['last_step']}" if w["first_step"] is not None else ""
            table.add_row(f"loss ({label} logged window{steps})", f"{w['loss']:.4f}")
    table.add_row("clips/s", f"{train['clips_per_second']:.2f}")
    table.add_row("exported", train["export_path"] or "(not finished)")
    print_table("training", table)
    if report.get("evaluation"):
        benchmark = next(iter(report["evaluation"].values()))["benchmark"]
        print_metrics(f"evaluation on {benchmark}", report["evaluation"])
    out.print(f"report: {report.get('report_path')}")


def eval_command(
    checkpoint: Annotated[str, typer.Option(help="Student export (student.pth) or an official CoTracker3 file.")],
    benchmark: Annotated[
        str, typer.Option(help="'synthetic' (generated, exact ground truth) or a TAP-Vid pickle file or folder.")
    ] = "synthetic",
    query_mode: Annotated[str, typer.Option(help="first or strided (TAP-Vid query modes).")] = "first",
    variant: Annotated[
        str | None, typer.Option(help="online or offline. Default: from the export, online for official files.")
    ] = None,
    videos: Annotated[int, typer.Option(help="Evaluate at most this many videos.")] = 8,
    one_query_at_a_time: Annotated[
        bool,
        typer.Option(
            "--one-query-at-a-time/--joint",
            help="TAP-Vid protocol: each benchmark query in its own call (default), or all at once "
            "(cheaper; a different, joint setting).",
        ),
    ] = True,
    resize: Annotated[
        bool, typer.Option("--resize/--native-size", help="Run at 256x256 as TAP-Vid does, or at each video's size.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    report: Annotated[
        Path | None,
        typer.Option(help="Where to save the JSON report. Default: <checkpoint>.eval-<benchmark>-<mode>.json"),
    ] = None,
) -> None:
    """Evaluate a checkpoint with the TAP-Vid metrics (AJ, δ_avg, OA), print them and save a JSON report."""
    from ..errors import ConfigError
    from ..flows.train_student import evaluate_student

    if query_mode not in ("first", "strided"):
        fail(f"query mode {query_mode!r}: choose first or strided")
    if not Path(checkpoint).is_file():
        fail(f"checkpoint {checkpoint} does not exist")
    path = report or Path(f"{checkpoint}.eval-{Path(benchmark).stem}-{query_mode}.json")
    progress = bar_progress()
    with progress:
        task = progress.add_task("evaluating", total=videos, info=benchmark)

        def on_video(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or videos)

        try:
            result = evaluate_student(
                checkpoint,
                benchmark,
                query_mode,
                variant,
                videos,
                device=device,
                output=str(path),
                resize_to=(256, 256) if resize else None,
                one_query_at_a_time=one_query_at_a_time,
                progress=on_video,
            )
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            fail(str(exc))
            return
    protocol = result["info"]["protocol"]
    title = f"{Path(checkpoint).name} on {benchmark} ({query_mode} queries, {protocol}, {result['videos']} videos)"
    print_metrics(title, {"value": result})
    out.print(f"report: {path}")
