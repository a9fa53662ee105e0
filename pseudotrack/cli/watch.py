"""`pseudotrack watch`: one pass of the bucket watcher, a typer command registered by `flows/cli.py`.

The hourly schedule is the `watch-bucket` deployment's (prefect.yaml); this
command runs the same flow once, with the options of `pseudotrack round` that
make sense for a watcher (no --videos: it labels whatever is new).
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as ro
from .common import console, out


def watch_command(
    bucket: ro.Bucket,
    workspace: Annotated[
        str,
        typer.Option(help="Where the catalog, shards and the watch state go: a local directory or s3://bucket/prefix."),
    ],
    teacher: ro.Teacher = None,
    teachers_per_clip: ro.TeachersPerClip = 1,
    checkpoints: ro.Checkpoints = None,
    seed: ro.Seed = 0,
    batch_size: ro.BatchSize = 32,
    workers: ro.Workers = 1,
    round_id: Annotated[
        str | None,
        typer.Option(help="Name of this run's round. Default: watch-<time>, or the round a crashed run left."),
    ] = None,
    frames: ro.Frames = 64,
    height: ro.Height = 384,
    width: ro.Width = 512,
    max_stride: ro.MaxStride = 4,
    resize: ro.Resize = "mixed",
    queries: ro.Queries = 384,
    keyframes: ro.Keyframes = 8,
    captions: ro.Captions = None,
    rules: ro.Rules = None,
    missing_caption: ro.MissingCaption = None,
    device: ro.Device = "auto",
    retry_failed: Annotated[
        bool, typer.Option(help="Also label again the videos that failed in earlier runs (unchanged ones too).")
    ] = False,
    executor: Annotated[
        str,
        typer.Option(help="local: batches run in this process; pool: each batch is a label-batch flow run."),
    ] = "local",
    lease_seconds: Annotated[
        float,
        typer.Option(help="How long the watch lease outlives a holder that stopped renewing it (crashed)."),
    ] = 900.0,
    verbose: ro.Verbose = False,
) -> None:
    """Label what is new or changed in the bucket since the last watch run; a run that overlaps one exits at once."""
    from .common import print_summary, quiet_prefect

    quiet_prefect(verbose)
    from ..config import RoundConfig
    from ..flows.watch_bucket import run_watch_flow

    result = ro.run_labelling(
        lambda: RoundConfig(
            bucket=bucket,
            workspace=workspace,
            round_id=round_id,
            teachers=teacher or ["lk"],
            teachers_per_clip=teachers_per_clip,
            checkpoints=checkpoints,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            device=device,
            height=height,
            width=width,
            num_frames=frames,
            max_stride=max_stride,
            resize=resize,
            num_queries=queries,
            num_keyframes=keyframes,
            rules=rules,
            captions=captions,
            missing_caption=missing_caption,
            retry_failed=retry_failed,
            executor=executor,
        ),
        lambda c: run_watch_flow(c, lease_seconds),
    )
    if result["round"]:
        print_summary(result["round"])
    style = "yellow" if result["status"] in ("busy", "lease-lost") else "green"
    console.print(f"[{style}]watch: {result['status']}[/]: {result['message']}", highlight=False)
    out.print(
        f"listed {result['listed']}: {result['new']} new, {result['changed']} changed, "
        f"{result['unchanged']} unchanged, {result['removed']} removed"
    )
