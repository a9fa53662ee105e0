"""`pseudotrack scaling-study`: Figure 1 for this data, registered by `cli/main.py`.

Runs the `scaling-study` flow: per size a labelling round (reusing the smaller
sizes' labels), a student trained on exactly those videos, and its evaluation;
then prints the table and names the figure, table and results in the workspace. The labelling
options are RoundConfig's (cli/options.py), the same as `round`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import bar_progress, console, fail, out, quiet_prefect
from .options import Verbose, with_round_options


def register(app: typer.Typer) -> None:
    app.command("scaling-study")(scaling_study_command)


def _size_pair(text: str, what: str) -> tuple[int, int]:
    from ..errors import ConfigError

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: write HEIGHTxWIDTH, e.g. 256x256") from None
    return h, w


@with_round_options(exclude=("round_id", "videos"), defaults={"bucket": None, "workspace": None})
def scaling_study_command(
    round_options: dict,
    sizes: Annotated[str, typer.Option(help="Numbers of videos, comma-separated: 100,1000,5000,15000,30000,100000.")],
    output: Annotated[
        Path, typer.Option(help="Local folder for the students' checkpoints (one n<N>/ per size).")
    ] = Path("runs/scaling"),
    study: Annotated[str, typer.Option(help="Name of the study: results go to scaling/<study>/ in the workspace.")] = (
        "study"
    ),
    config: Annotated[
        Path | None,
        typer.Option(help="A saved ScalingConfig (JSON, e.g. the 'config' of results.json); other options ignored."),
    ] = None,
    # ---- training
    init: Annotated[
        str | None,
        typer.Option(help="Starting weights of every student (official CoTracker3 file or our export); the baseline."),
    ] = None,
    variant: Annotated[str, typer.Option(help="online or offline student.")] = "online",
    model_size: Annotated[
        str, typer.Option(help="full (published architecture) or tiny (a small student for CPU trials).")
    ] = "full",
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps per student. Default: one per training video at batch 32.")
    ] = None,
    train_batch_size: Annotated[int, typer.Option(help="Clips per optimiser step (recipe: 32).")] = 32,
    micro_batch_size: Annotated[int, typer.Option(help="Clips per forward pass.")] = 1,
    train_frames: Annotated[int, typer.Option(help="Frames per training clip.")] = 64,
    tracks: Annotated[int, typer.Option(help="Tracks per training clip.")] = 384,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 5e-5,
    iters: Annotated[int, typer.Option(help="Iterative updates per window while training.")] = 4,
    loader_workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 2,
    # ---- evaluation
    benchmark: Annotated[str, typer.Option(help="'synthetic' or a TAP-Vid pickle file or folder.")] = "synthetic",
    eval_videos: Annotated[int, typer.Option(help="Benchmark videos to evaluate on.")] = 8,
    query_mode: Annotated[str, typer.Option(help="first or strided.")] = "first",
    one_query_at_a_time: Annotated[
        bool, typer.Option("--one-query-at-a-time/--joint", help="TAP-Vid protocol, or all queries at once.")
    ] = True,
    eval_resize: Annotated[
        bool, typer.Option("--eval-resize/--native-size", help="Evaluate at 256x256 or native size.")
    ] = True,
    synthetic_frames: Annotated[int, typer.Option(help="Frames of each synthetic benchmark scene.")] = 24,
    synthetic_size: Annotated[str, typer.Option(help="HEIGHTxWIDTH of the synthetic scenes.")] = "256x256",
    synthetic_points: Annotated[int, typer.Option(help="Ground-truth tracks per synthetic scene.")] = 64,
    verbose: Verbose = False,
) -> None:
    """Label, train and evaluate a student per number of videos; write Figure 1 (PNG), a table and results.json.

    --bucket and --workspace are needed unless --config gives a saved study. --seed and --device serve the
    labelling and the training alike.
    """
    quiet_prefect(verbose)
    from ..config import RoundConfig
    from ..errors import ConfigError
    from ..flows.label_round import BatchesFailed
    from ..flows.scaling_round import EvalSettings, ScalingConfig, parse_sizes
    from ..student.train import TrainConfig

    try:
        size_list = parse_sizes(sizes)
        if config is not None:
            scaling = ScalingConfig.from_json_file(config)
        else:
            workspace, seed, device = (round_options[k] for k in ("workspace", "seed", "device"))
            if not round_options["bucket"] or not workspace:
                raise ConfigError("give --bucket and --workspace (or --config with a saved ScalingConfig)")
            scaling = ScalingConfig(
                round=RoundConfig(**round_options),
                train=TrainConfig(
                    workspace=workspace,
                    output=str(output / study),
                    init_checkpoint=init,
                    variant=variant,
                    model_size=model_size,
                    steps=steps,
                    batch_size=train_batch_size,
                    micro_batch_size=micro_batch_size,
                    num_frames=train_frames,
                    num_tracks=tracks,
                    lr=lr,
                    iters=iters,
                    workers=loader_workers,
                    seed=seed,
                    device=device,
                ),
                eval=EvalSettings(
                    benchmark=benchmark,
                    videos=eval_videos,
                    query_mode=query_mode,
                    resize_to=(256, 256) if eval_resize else None,
                    one_query_at_a_time=one_query_at_a_time,
                    synthetic_frames=synthetic_frames,
                    synthetic_size=_size_pair(synthetic_size, "--synthetic-size"),
                    synthetic_points=synthetic_points,
                ),
                study=study,
            )
        results = _run_with_progress(scaling, size_list)
    except ConfigError as exc:
        fail(str(exc))
        return
    except BatchesFailed as exc:
        fail(f"{exc}; run the study again to resume", code=1)
        return
    out.print(results["table"], markup=False, highlight=False)
    for name, uri in results["uris"].items():
        out.print(f"{name}: {uri}", highlight=False)


def _run_with_progress(scaling, sizes: list[int]) -> dict:
    from ..flows.scaling_round import scaling_study

    progress = bar_progress(remaining=False)
    console.print("starting Prefect (the first start of the ephemeral API takes a few seconds)...")
    with progress:
        return scaling_study(scaling, sizes, study_progress(progress))


def study_progress(progress):
    """The study's `on_progress`: its stages as lines, a bar per labelling round, training and evaluation."""
    bars: dict[str, int] = {}

    def bar(name: str, total: int | None) -> int:
        if name not in bars:
            bars[name] = progress.add_task(name, total=total, info="")
        return bars[name]

    def on_progress(event: str, payload: dict) -> None:
        n = payload.get("videos")
        if event == "size":
            progress.console.print(f"[bold]size {payload['index']}/{payload['count']}: {n} videos[/]")
        elif event == "stage":
            stage = payload["stage"]
            if stage == "training":
                detail = f" on {payload['labelled']} labelled videos in {payload['shards']} shards"
            elif stage == "done":
                m = payload["metrics"]
                detail = (
                    f": AJ {100 * m['average_jaccard']:.1f}  δ_avg {100 * m['average_pts_within_thresh']:.1f}  "
                    f"OA {100 * m['occlusion_accuracy']:.1f}"
                )
            elif stage == "reused":
                detail = ": same settings and labels as a finished run, its result is reused"
            else:
                detail = ""
            who = "starting checkpoint" if stage == "baseline" else f"n={n}"
            progress.console.print(f"  {who}: {stage}{detail}", highlight=False)
        elif event == "train":
            task = bar(f"training n={n}", payload["total_steps"])
            progress.update(task, completed=payload["step"], info=f"loss {payload['loss']:.3f}")
        elif event == "eval":
            task = bar(f"evaluating n={n}" if n else "evaluating start", payload["total"] or None)
            progress.update(task, completed=payload["done"])
        elif event == "skipped":
            progress.console.print(
                f"[yellow]the bucket holds only {payload['eligible']} eligible videos: sizes "
                f"{', '.join(map(str, payload['sizes']))} would repeat the last one and are skipped[/]"
            )
        elif event == "planned":  # the labelling round of a size
            task = bar(f"labelling {payload['round_id']}", payload["total"])
            progress.update(task, info=f"{payload['reused']} reused")
            bars["_current"] = task
        elif event in ("labelled", "failed") and "_current" in bars:
            progress.update(bars["_current"], advance=1)

    return on_progress
