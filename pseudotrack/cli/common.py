"""What every `pseudotrack` command shares: the consoles, Prefect's quiet defaults, errors, the round's progress bar."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console()


def quiet_prefect(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if verbose:  # asked for on this command line, so it wins over a level left in the environment
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # the ephemeral API's cold start can exceed Prefect's 20 s default on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def counts_table(title: str, counts: dict, column: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(column)
    table.add_column("videos", justify="right")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        table.add_row(str(name), str(count))
    return table


def run_with_progress(config, run=None) -> dict:
    """`run(config)` (default: the label-round flow) with a progress bar fed by the round's listeners."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..flows.label_round import add_progress_listener, run_label_round_flow
    from ..storage.uri import open_workspace
    from ..tasks.labelling import resolve_checkpoints

    open_workspace(config)  # a missing bucket, unwritable workspace or checkpoint stops here, before Prefect starts
    resolve_checkpoints(config)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("labelled {task.fields[labelled]} failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    state = {"task": None, "labelled": 0, "failed": 0}

    def listener(event: str, payload: dict) -> None:
        if event == "planned":
            state["task"] = progress.add_task(
                f"round {payload['round_id']}", total=payload["total"], labelled=0, failed=0
            )
            console.print(
                f"planned {payload['total']} videos to label "
                f"({payload['filtered']} filtered by caption, {payload['reused']} already done)"
            )
        elif event in ("labelled", "failed") and state["task"] is not None:
            state[event] += 1
            progress.update(state["task"], advance=1, labelled=state["labelled"], failed=state["failed"])

    remove = add_progress_listener(listener)
    try:
        console.print("starting Prefect (the first start of the ephemeral API takes a few seconds)...")
        with progress:
            return (run or run_label_round_flow)(config)
    finally:
        remove()


def print_summary(summary: dict) -> None:
    table = Table(title=f"round {summary['round_id']}", title_justify="left")
    table.add_column("state")
    table.add_column("videos", justify="right")
    for name in ("labelled", "filtered", "failed", "reused", "recovered"):
        table.add_row(name, str(summary[name]))
    out.print(table)
    if summary["teachers"]:
        out.print(counts_table("teachers", summary["teachers"], "teacher"))
    if summary["failure_reasons"]:
        out.print(counts_table("failure reasons", summary["failure_reasons"], "reason"))
    if summary["filter_rules"]:
        out.print(counts_table("caption filter", summary["filter_rules"], "rule"))
    if summary.get("skipped"):  # claimed by a round running beside this one, which labels them
        out.print(counts_table("left to another run", summary["skipped"], "why"))
    rate = (summary["labelled"] + summary["failed"]) / max(summary["seconds"], 1e-9)
    out.print(f"{len(summary['shards'])} shards written in {summary['seconds']:.1f} s ({rate * 3600:.0f} videos/hour)")
