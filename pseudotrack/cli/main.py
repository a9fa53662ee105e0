"""The `pseudotrack` command line.

Heavy modules (torch, prefect) are imported inside the commands, so `--help`
is instant and Prefect's settings can be defaulted before Prefect loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import options as ro
from .common import console, counts_table, fail, out, print_summary, quiet_prefect

app = typer.Typer(
    name="pseudotrack",
    help="Pseudo-label real videos with frozen point trackers and fine-tune a student tracker on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("round")
def round_command(
    bucket: ro.Bucket,
    workspace: Annotated[
        str,
        typer.Option(help="Where the catalog, shards and reports go: a local directory or s3://bucket/prefix."),
    ],
    videos: Annotated[
        int | None, typer.Option(help="Label at most this many eligible videos (stable order). Default: all.")
    ] = None,
    teacher: ro.Teacher = None,
    teachers_per_clip: ro.TeachersPerClip = 1,
    checkpoints: ro.Checkpoints = None,
    seed: ro.Seed = 0,
    batch_size: ro.BatchSize = 32,
    workers: ro.Workers = 1,
    teacher_batch: Annotated[
        int | None,
        typer.Option(help="Clips per teacher forward pass (halved on out-of-memory). Default: 4 on a GPU, 1 on CPU."),
    ] = None,
    cpu_workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes per label batch for decode, SIFT and encode, ahead of the teacher. "
            "Default: the host's cores minus one; 0: all in the batch's own process."
        ),
    ] = None,
    round_id: Annotated[
        str | None,
        typer.Option(help="Name of the round ([A-Za-z0-9_-]); reuse one to resume it. Default: new."),
    ] = None,
    frames: ro.Frames = 64,
    height: ro.Height = 384,
    width: ro.Width = 512,
    max_stride: ro.MaxStride = 4,
    queries: ro.Queries = 384,
    keyframes: ro.Keyframes = 8,
    captions: ro.Captions = None,
    rules: ro.Rules = None,
    missing_caption: ro.MissingCaption = None,
    device: ro.Device = "auto",
    retry_failed: Annotated[bool, typer.Option(help="Label videos that failed in earlier runs again.")] = False,
    executor: Annotated[
        str,
        typer.Option(
            help="local: batches run in this process; pool: each batch is a flow run of the label-batch "
            "deployment on the gpu work pool (needs a Prefect server and workers)."
        ),
    ] = "local",
    verbose: ro.Verbose = False,
) -> None:
    """Run a labelling round: discover, filter captions, sample queries, run teachers, write shards."""
    quiet_prefect(verbose)
    from ..config import RoundConfig

    summary = ro.run_labelling(
        lambda: RoundConfig(
            bucket=bucket,
            workspace=workspace,
            round_id=round_id,
            videos=videos,
            teachers=teacher or ["lk"],
            teachers_per_clip=teachers_per_clip,
            checkpoints=checkpoints,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            teacher_batch=teacher_batch,
            cpu_workers=cpu_workers,
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
    )
    print_summary(summary)
    if summary["failed"] and not summary["labelled"]:
        raise typer.Exit(1)


@app.command()
def status(
    workspace: Annotated[str, typer.Option(help="The workspace of the rounds (local directory or s3://...).")],
    round_id: Annotated[str | None, typer.Option(help="Only this round. Default: every round.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Counts per round by state, teacher and failure reason, read from the catalog."""
    from ..errors import ConfigError
    from ..storage.catalog import Catalog
    from ..storage.objects import open_store

    try:
        store = open_store(workspace)
        store.check_readable()
        summary = Catalog(store).summary(round_id=round_id)
    except ConfigError as exc:
        fail(str(exc))
        return
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    _print_status(summary)


def _print_status(summary: dict) -> None:
    rounds = summary.get("rounds", {})
    table = Table(title="rounds", title_justify="left")
    table.add_column("round")
    for state in ("labelled", "filtered", "failed"):
        table.add_column(state, justify="right")
    for name, counts in sorted(rounds.items()):
        table.add_row(name, *(str(counts.get(s, 0)) for s in ("labelled", "filtered", "failed")))
    out.print(table)
    if summary.get("by_status"):
        out.print(counts_table("all videos (latest state)", summary["by_status"], "state"))
    if summary.get("by_teacher"):
        out.print(counts_table("teachers", summary["by_teacher"], "teacher"))
    if summary.get("by_reason"):
        out.print(counts_table("failure reasons", summary["by_reason"], "reason"))
    if summary.get("by_filter_rule"):
        out.print(counts_table("caption filter", summary["by_filter_rule"], "rule"))


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the demo bucket into (created).")],
    videos: Annotated[int, typer.Option(help="Generated videos to write.")] = 12,
    frames: Annotated[int, typer.Option(help="Frames per generated video.")] = 48,
    height: Annotated[int, typer.Option(help="Height of the generated videos.")] = 240,
    width: Annotated[int, typer.Option(help="Width of the generated videos.")] = 320,
    seed: Annotated[int, typer.Option(help="Seed of the generated scenes and captions.")] = 0,
    broken: Annotated[int, typer.Option(help="Also write this many broken files, to show failed rows.")] = 1,
    include: Annotated[
        Path | None, typer.Option(help="Also copy the videos (and captions.jsonl) of this directory.")
    ] = None,
) -> None:
    """Write a local bucket of generated videos with captions, some of which the caption filter drops."""
    from ..demo import write_demo_bucket

    written = write_demo_bucket(out_dir, videos, frames, height, width, seed, broken, include)
    out.print(
        f"wrote {written['videos']} videos ({written['droppable']} with captions the filter drops, "
        f"{written['broken']} broken) and {written['captions']} captions to {out_dir}"
    )


@app.command()
def show(
    workspace: Annotated[str, typer.Option(help="The workspace holding the shards and catalog.")],
    video: Annotated[str | None, typer.Option(help="Source key of the video to show.")] = None,
    sample: Annotated[str | None, typer.Option(help="Sample key to show (instead of --video).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Which teacher's labels. Default: the first.")] = None,
    output: Annotated[Path, typer.Option("--out", help="Output .png (frame grid) or .mp4 (all frames).")] = Path(
        "tracks.png"
    ),
    max_tracks: Annotated[int, typer.Option(help="Draw at most this many tracks.")] = 96,
) -> None:
    """Render one sample's pseudo-tracks over its frames to a PNG or MP4."""
    from ..errors import ConfigError
    from ..render import render_sample_file

    if (video is None) == (sample is None):
        fail("give exactly one of --video KEY or --sample KEY")
    try:
        info = render_sample_file(
            workspace, output, video_key=video, sample_key=sample, teacher=teacher, max_tracks=max_tracks
        )
    except ConfigError as exc:
        fail(str(exc))
        return
    out.print(f"wrote {output} ({info['teacher']} labels of {info['source_key']}, {info['frames']} frames)")


def _register_other_commands() -> None:
    """Commands that live beside the flows they drive (training, evaluation, the dashboard)."""
    from ..dashboard.app import dashboard_command
    from .scaling import scaling_study_command
    from .student import eval_command, train_command
    from .watch import watch_command

    app.command("watch")(watch_command)
    app.command("scaling-study")(scaling_study_command)
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("dashboard")(dashboard_command)


_register_other_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
