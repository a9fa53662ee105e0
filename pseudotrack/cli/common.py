"""What every `pseudotrack` command shares: the consoles, Prefect's quiet defaults, errors, tables, progress bars."""

from __future__ import annotations

import os
from collections.abc import Callable

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

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


def print_counts(title: str, counts: dict, column: str) -> None:
    """A titled two-column table of counts, largest first."""
    table = Table()
    table.add_column(column)
    table.add_column("videos", justify="right")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        table.add_row(str(name), str(count))
    print_table(title, table)


def heading(title: str) -> Text:
    """A table's title as its own line: a rich Table title wraps to the table's width (a long round id
    over a two-column table took three lines), a heading line does not."""
    return Text(title, style="bold", no_wrap=True, overflow="ellipsis")


def print_table(title: str, table: Table) -> None:
    out.print(heading(title))
    out.print(table)


def round_progress() -> tuple[Progress, Callable[[str, dict], None]]:
    """A progress bar for a labelling round and the `on_progress(event, payload)` callback that feeds it."""
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

    def on_progress(event: str, payload: dict) -> None:
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
        elif event == "filtered" and state["task"] is not None:  # labelled, then dropped on its quality score
            progress.update(state["task"], advance=1)

    return progress, on_progress


def print_calibration(calibration: dict) -> None:
    """The round's teacher calibration on generated scenes (δ_avg, AJ, OA), or why a teacher has none."""
    if not calibration:
        return
    table = Table()
    for column in ("teacher", "δ_avg", "AJ", "OA"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for name, c in sorted(calibration.items()):
        if c.get("error"):
            table.add_row(name, f"not calibrated: {c['error']}", "", "")
        else:
            keys = ("delta_avg", "average_jaccard", "occlusion_accuracy")
            table.add_row(name, *("–" if c.get(k) is None else f"{c[k]:.3f}" for k in keys))
    print_table("teacher calibration", table)


def bar_progress(remaining: bool = True) -> Progress:
    """A bar per task with a free `info` field (training loss, evaluation, a study's stages)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console)


def print_summary(summary: dict) -> None:
    table = Table()
    table.add_column("state")
    table.add_column("videos", justify="right")
    for name in ("labelled", "filtered", "failed", "reused", "recovered"):
        table.add_row(name, str(summary[name]))
    print_table(f"round {summary['round_id']}", table)
    if summary["teachers"]:
        print_counts("teachers", summary["teachers"], "teacher")
    if summary["failure_reasons"]:
        print_counts("failure reasons", summary["failure_reasons"], "reason")
    if summary["filter_rules"]:
        print_counts("caption and quality filter", summary["filter_rules"], "rule")
    print_calibration(summary.get("calibration") or {})
    if summary.get("skipped"):  # claimed by a round running beside this one, which labels them
        print_counts("left to another run", summary["skipped"], "why")
    rate = (summary["labelled"] + summary["failed"]) / max(summary["seconds"], 1e-9)
    out.print(f"{len(summary['shards'])} shards written in {summary['seconds']:.1f} s ({rate * 3600:.0f} videos/hour)")
    for step in summary.get("next_steps", []):  # summaries saved before next_steps existed have none
        out.print(f"next: {step}", highlight=False)
