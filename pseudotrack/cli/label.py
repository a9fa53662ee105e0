"""The labelling commands: `round`, `watch`, `status`, `show` and `demo-data`.

`round` and `watch` take the round's options from `RoundConfig` (cli/options.py), so they share
names, defaults and help. The hourly schedule of the watcher is the `watch-bucket` deployment's
(prefect.yaml); `watch` runs the same flow once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import console, fail, out, print_counts, print_summary, print_table, quiet_prefect, round_progress
from .options import Verbose, with_round_options


def register(app: typer.Typer) -> None:
    app.command("round")(round_command)
    app.command("watch")(watch_command)
    app.command("status")(status)
    app.command("show")(show)
    app.command("demo-data")(demo_data)


def run_labelling(make_config: Callable, run: Callable | None = None) -> dict:
    """Build the round's config and run it (`run(config, on_progress)`, default the label-round flow) with a
    progress bar; bad input and failures end the command.

    Bad input exits 2 with what is wrong. Failed batches print the summary and exit 1. A store
    outage past every retry exits 1 saying how to resume: everything committed is kept.
    """
    from ..errors import ConfigError
    from ..flows.label_round import BatchesFailed, run_label_round_flow
    from ..storage.base import StorageUnavailable
    from ..storage.uri import open_workspace
    from ..tasks.labelling import resolve_checkpoints

    config = None
    try:
        config = make_config()
        open_workspace(config)  # a missing bucket, unwritable workspace or checkpoint stops here, before Prefect
        resolve_checkpoints(config)
        progress, on_progress = round_progress()
        console.print("starting Prefect (the first start of the ephemeral API takes a few seconds)...")
        with progress:
            return (run or run_label_round_flow)(config, on_progress)
    except ConfigError as exc:
        fail(str(exc))
    except BatchesFailed as exc:
        print_summary(exc.summary.to_dict())
        fail(str(exc), code=1)
    except StorageUnavailable as exc:
        resume = f" --round-id {config.round_id}" if config is not None and config.round_id else ""
        fail(f"{exc}\nEverything committed is kept; run the same command again{resume} once the store answers.", 1)
    raise AssertionError("unreachable: fail exits")


@with_round_options()
def round_command(round_options: dict, verbose: Verbose = False) -> None:
    """Run a labelling round: discover, filter captions, sample queries, run teachers, write shards.

    Try it on the CPU with small clips first, e.g. --frames 16 --height 96 --width 128 --queries 64.
    """
    quiet_prefect(verbose)
    from ..config import RoundConfig

    summary = run_labelling(lambda: RoundConfig(**round_options))
    print_summary(summary)
    if summary["failed"] and not summary["labelled"]:
        raise typer.Exit(1)


@with_round_options(exclude=("videos",))
def watch_command(
    round_options: dict,
    lease_seconds: Annotated[
        float,
        typer.Option(help="How long the watch lease outlives a holder that stopped renewing it (crashed)."),
    ] = 900.0,
    verbose: Verbose = False,
) -> None:
    """Label what is new or changed in the bucket since the last watch run; a run that overlaps one exits at once.

    The watch state goes to the workspace beside the catalog. There is no --videos: a watcher labels whatever is new.
    """
    quiet_prefect(verbose)
    from ..config import RoundConfig
    from ..flows.watch_bucket import run_watch_flow

    result = run_labelling(
        lambda: RoundConfig(**round_options),
        lambda config, on_progress: run_watch_flow(config, lease_seconds, on_progress),
    )
    if result["round"]:
        print_summary(result["round"])
    style = "yellow" if result["status"] in ("busy", "lease-lost") else "green"
    console.print(f"[{style}]watch: {result['status']}[/]: {result['message']}", highlight=False)
    out.print(
        f"listed {result['listed']}: {result['new']} new, {result['changed']} changed, "
        f"{result['unchanged']} unchanged, {result['removed']} removed"
    )


def status(
    workspace: Annotated[str, typer.Option(help="The workspace of the rounds (local directory or s3://...).")],
    round_id: Annotated[str | None, typer.Option(help="Only this round. Default: every round.")] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="List each failed video: key, stage, reason (latest state).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Counts per round by state, teacher and failure reason, read from the catalog (--failed: the failed videos).

    Finished rounds also show the teacher's busy fraction, clips/s and what bounded them (cpu or teacher),
    from runs/<round>/summary.json.
    """
    from ..errors import ConfigError
    from ..storage.catalog import Catalog
    from ..storage.uri import open_store

    try:
        store = open_store(workspace)
        store.check_readable()
        catalog = Catalog(store)
        result = catalog.failures(round_id=round_id) if failed else catalog.summary(round_id=round_id)
        if not failed:
            result["quality"] = _label_quality(store, catalog, round_id)
    except ConfigError as exc:
        fail(str(exc))
        return
    if not failed:
        result["throughput"] = _rounds_throughput(store, sorted(result.get("rounds", {})), round_id)
    if as_json:
        out.print_json(json.dumps(result, default=str))
    elif failed:
        _print_failures(result, round_id)
    else:
        _print_status(result)
        _print_throughput(result["throughput"])
        _print_label_quality(result["quality"])


def _rounds_throughput(store, rounds: list[str], round_id: str | None) -> dict[str, dict]:
    """round -> `round_throughput` of its runs/<round>/summary.json, for rounds that recorded batch time."""
    from ..storage.layout import runs_prefix
    from ..tasks.throughput import round_throughput

    found = {}
    for name in [round_id] if round_id else rounds:
        try:
            summary = json.loads(store.read_bytes(f"{runs_prefix(name)}summary.json"))
        except (FileNotFoundError, ValueError):  # not written yet, cut short, or not a round id: nothing to show
            continue
        figures = round_throughput(summary)
        if figures:
            found[name] = figures
    return found


def _print_throughput(rows: dict[str, dict]) -> None:
    """Per round: whether more CPU workers would help (bound by cpu) or only a faster teacher would."""
    if not rows:
        return
    table = Table()
    for column in ("round", "teacher busy", "clips/s", "bound by"):
        table.add_column(column, justify="left" if column in ("round", "bound by") else "right")
    for name, row in sorted(rows.items()):
        table.add_row(name, f"{row['teacher_busy']:.0%}", f"{row['clips_per_s']:.2f}", row["bound_by"])
    print_table("labelling throughput (from runs/<round>/summary.json)", table)


def _label_quality(store, catalog, round_id: str | None) -> dict:
    """Per round: the samples' quality scores and the teachers' calibration (tasks/quality_report.py)."""
    from ..tasks.quality_report import quality_report

    return quality_report(store, catalog, round_id)


def _print_label_quality(report: dict) -> None:
    """Two tables: label quality per round and teacher, then calibration per round and teacher."""
    from ..tasks.quality_report import CALIBRATION_FIGURES

    def fmt(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    scores = Table()
    for column in ("round", "teacher", "samples", "mean score"):
        scores.add_column(column, justify="left" if column in ("round", "teacher") else "right")
    for name, entry in sorted(report.items()):
        for teacher, t in entry.get("teachers", {}).items():
            scores.add_row(name, teacher, str(t["count"]), fmt(t["mean"]))
        if entry.get("unknown"):
            scores.add_row(name, "(no scores: older shards)", str(entry["unknown"]), "unknown")
        if entry.get("filtered"):
            scores.add_row(name, "(filtered on quality)", str(entry["filtered"]), "")
    if scores.row_count:
        print_table("label quality (labelled samples)", scores)
    calibration = Table()
    for column in ("round", "teacher", "δ_avg", "AJ", "OA", "seconds"):
        calibration.add_column(column, justify="left" if column in ("round", "teacher") else "right")
    for name, entry in sorted(report.items()):
        for teacher, c in sorted(entry.get("calibration", {}).items()):
            if c.get("error"):
                calibration.add_row(name, teacher, f"not calibrated: {c['error']}", "", "", "")
            else:
                figures = [fmt(c.get(k)) for k in CALIBRATION_FIGURES]
                calibration.add_row(name, teacher, *figures, f"{c.get('seconds') or 0.0:.1f}")
    if calibration.row_count:
        print_table("teacher calibration (generated scenes)", calibration)


def _print_failures(rows: list[dict], round_id: str | None) -> None:
    where = f" in round {round_id}" if round_id else ""
    if not rows:
        out.print(f"no failed videos{where}")
        return
    table = Table()
    for column in ("video", "stage", "reason", "round"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["video_key"], row["stage"] or "", row["reason"] or "", row["round_id"] or "")
    print_table(f"{len(rows)} failed video{'' if len(rows) == 1 else 's'}{where} (latest state)", table)


def _print_status(summary: dict) -> None:
    rounds = summary.get("rounds", {})
    table = Table()
    table.add_column("round")
    for state in ("labelled", "filtered", "failed"):
        table.add_column(state, justify="right")
    for name, counts in sorted(rounds.items()):
        table.add_row(name, *(str(counts.get(s, 0)) for s in ("labelled", "filtered", "failed")))
    print_table("rounds", table)
    if summary.get("by_status"):
        print_counts("all videos (latest state)", summary["by_status"], "state")
    if summary.get("by_teacher"):
        print_counts("teachers", summary["by_teacher"], "teacher")
    if summary.get("by_reason"):
        print_counts("failure reasons", summary["by_reason"], "reason")
    if summary.get("by_filter_rule"):
        print_counts("caption filter", summary["by_filter_rule"], "rule")
    if summary.get("by_status", {}).get("failed"):
        out.print("pseudotrack status --failed lists the failed videos", highlight=False)


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


def show(
    workspace: Annotated[str, typer.Option(help="The workspace holding the shards and catalog.")],
    video: Annotated[str | None, typer.Option(help="Source key of the video to show.")] = None,
    sample: Annotated[str | None, typer.Option(help="Sample key to show (instead of --video).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Which teacher's labels. Default: the first.")] = None,
    output: Annotated[Path, typer.Option("--out", help="Output .png (frame grid) or .mp4 (all frames).")] = Path(
        "tracks.png"
    ),
    max_tracks: Annotated[int, typer.Option(help="Draw at most this many tracks.")] = 96,
    color_by_quality: Annotated[
        bool,
        typer.Option(
            help="Colour tracks by their label quality score: red (low) to green (high); grey when the "
            "shard has no scores."
        ),
    ] = False,
) -> None:
    """Render one sample's pseudo-tracks over its frames to a PNG or MP4."""
    from ..errors import ConfigError
    from ..render import render_sample_file

    if (video is None) == (sample is None):
        fail("give exactly one of --video KEY or --sample KEY")
    try:
        info = render_sample_file(
            workspace,
            output,
            video_key=video,
            sample_key=sample,
            teacher=teacher,
            max_tracks=max_tracks,
            color_by_quality=color_by_quality,
        )
    except ConfigError as exc:
        fail(str(exc))
        return
    out.print(f"wrote {output} ({info['teacher']} labels of {info['source_key']}, {info['frames']} frames)")
    if color_by_quality:
        mean = info["quality"]
        out.print(f"label quality: {'unknown (no scores in this shard)' if mean is None else f'mean {mean:.3f}'}")
