"""`pseudotrack watch`: one pass of the bucket watcher, a typer command registered by `flows/cli.py`.

The hourly schedule is the `watch-bucket` deployment's (prefect.yaml); this
command runs the same flow once, with the options of `pseudotrack round` that
make sense for a watcher (no --videos: it labels whatever is new).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()


def watch_command(
    bucket: Annotated[str, typer.Option(help="Source videos: a local directory or s3://bucket/prefix.")],
    workspace: Annotated[
        str,
        typer.Option(help="Where the catalog, shards and the watch state go: a local directory or s3://bucket/prefix."),
    ],
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            help="Teacher name, repeatable, optionally NAME=CHECKPOINT. Default: lk. Known: lk, cotracker3_online, "
            "cotracker3_offline, cotracker2, tapir, bootstapir."
        ),
    ] = None,
    teachers_per_clip: Annotated[int, typer.Option(help="Teachers run on each clip, chosen at random.")] = 1,
    checkpoints: Annotated[
        str | None, typer.Option(help="Directory holding the official checkpoint files of the neural teachers.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for strides, keyframes, queries and teacher choice.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Videos per label batch (the unit of work).")] = 32,
    workers: Annotated[int, typer.Option(help="Label batches run at the same time in this process.")] = 1,
    round_id: Annotated[
        str | None,
        typer.Option(help="Name of this run's round. Default: watch-<time>, or the round a crashed run left."),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per clip (64 for an online student, up to 80 offline).")] = 64,
    height: Annotated[int, typer.Option(help="Clip height in pixels (even).")] = 384,
    width: Annotated[int, typer.Option(help="Clip width in pixels (even).")] = 512,
    max_stride: Annotated[int, typer.Option(help="Frame stride is drawn from 1..max-stride.")] = 4,
    queries: Annotated[int, typer.Option(help="Query points (tracks) per clip.")] = 384,
    keyframes: Annotated[int, typer.Option(help="Keyframes SIFT samples queries on.")] = 8,
    captions: Annotated[
        str | None, typer.Option(help="Caption manifest (JSONL/CSV/Parquet). Default: captions.* in the bucket.")
    ] = None,
    rules: Annotated[
        str | None, typer.Option(help="Caption rules file (TOML). Default: the packaged CoTracker3 rules.")
    ] = None,
    missing_caption: Annotated[
        str | None, typer.Option(help="Videos without a caption: keep, drop or fail. Default: the rules file's.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
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
    verbose: Annotated[bool, typer.Option(help="Show Prefect's logs.")] = False,
) -> None:
    """Label what is new or changed in the bucket since the last watch run; a run that overlaps one exits at once."""
    from .cli import _fail, _print_summary, _quiet_prefect, _run_with_progress

    _quiet_prefect(verbose)
    from ..config import RoundConfig
    from ..errors import ConfigError
    from .label_round import BatchesFailed
    from .watch_bucket import run_watch_flow

    try:
        config = RoundConfig(
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
            num_queries=queries,
            num_keyframes=keyframes,
            rules=rules,
            captions=captions,
            missing_caption=missing_caption,
            retry_failed=retry_failed,
            executor=executor,
        )
        result = _run_with_progress(config, lambda c: run_watch_flow(c, lease_seconds))
    except ConfigError as exc:
        _fail(str(exc))
        return
    except BatchesFailed as exc:
        _print_summary(exc.summary.to_dict())
        _fail(str(exc), code=1)
        return
    if result["round"]:
        _print_summary(result["round"])
    style = "yellow" if result["status"] in ("busy", "lease-lost") else "green"
    console.print(f"[{style}]watch: {result['status']}[/]: {result['message']}", highlight=False)
    out.print(
        f"listed {result['listed']}: {result['new']} new, {result['changed']} changed, "
        f"{result['unchanged']} unchanged, {result['removed']} removed"
    )
