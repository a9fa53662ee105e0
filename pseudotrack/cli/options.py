"""The labelling options `pseudotrack round` and `pseudotrack watch` share, and how both run a round.

One definition per option, so the two commands cannot drift apart in names,
help or meaning; defaults stay in each command's signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

Bucket = Annotated[str, typer.Option(help="Source videos: a local directory or s3://bucket/prefix.")]
Teacher = Annotated[
    list[str] | None,
    typer.Option(
        help="Teacher name, repeatable, optionally NAME=CHECKPOINT. Default: lk. Known: lk, cotracker3_online, "
        "cotracker3_offline, cotracker2, tapir, bootstapir."
    ),
]
TeachersPerClip = Annotated[int, typer.Option(help="Teachers run on each clip, chosen at random.")]
Checkpoints = Annotated[
    str | None, typer.Option(help="Directory holding the official checkpoint files of the neural teachers.")
]
Seed = Annotated[int, typer.Option(help="Seed for strides, keyframes, queries and teacher choice.")]
BatchSize = Annotated[int, typer.Option(help="Videos per label batch (the unit of work).")]
Workers = Annotated[int, typer.Option(help="Label batches run at the same time in this process.")]
Frames = Annotated[int, typer.Option(help="Frames per clip (64 for an online student, up to 80 offline).")]
Height = Annotated[int, typer.Option(help="Clip height in pixels (even).")]
Width = Annotated[int, typer.Option(help="Clip width in pixels (even).")]
MaxStride = Annotated[int, typer.Option(help="Frame stride is drawn from 1..max-stride.")]
Queries = Annotated[int, typer.Option(help="Query points (tracks) per clip.")]
Keyframes = Annotated[int, typer.Option(help="Keyframes SIFT samples queries on.")]
Captions = Annotated[
    str | None, typer.Option(help="Caption manifest (JSONL/CSV/Parquet). Default: captions.* in the bucket.")
]
Rules = Annotated[str | None, typer.Option(help="Caption rules file (TOML). Default: the packaged CoTracker3 rules.")]
MissingCaption = Annotated[
    str | None, typer.Option(help="Videos without a caption: keep, drop or fail. Default: the rules file's.")
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Verbose = Annotated[bool, typer.Option(help="Show Prefect's logs.")]


def run_labelling(make_config: Callable, run: Callable | None = None) -> dict:
    """Build the round's config and run it with a progress bar; bad input and failures end the command.

    Bad input exits 2 with what is wrong. Failed batches print the summary and exit 1. A store
    outage past every retry exits 1 saying how to resume: everything committed is kept.
    """
    from ..errors import ConfigError
    from ..flows.label_round import BatchesFailed
    from ..storage.base import StorageUnavailable
    from .common import fail, print_summary, run_with_progress

    try:
        config = make_config()
        return run_with_progress(config, run)
    except ConfigError as exc:
        fail(str(exc))
    except BatchesFailed as exc:
        print_summary(exc.summary.to_dict())
        fail(str(exc), code=1)
    except StorageUnavailable as exc:
        resume = f" --round-id {config.round_id}" if config.round_id else ""
        fail(f"{exc}\nEverything committed is kept; run the same command again{resume} once the store answers.", 1)
    raise AssertionError("unreachable: _fail exits")
