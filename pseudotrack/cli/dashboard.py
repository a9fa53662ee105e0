"""`pseudotrack dashboard`: the command over `dashboard.app.serve` (the page itself lives in dashboard/)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import console, fail


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard_command)


def dashboard_command(
    workspace: Annotated[str, typer.Option(help="The workspace to show (local directory or s3://...).")],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind. The page has no login: keep 127.0.0.1 unless the "
            "network is trusted (or use an SSH tunnel)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    refresh: Annotated[float, typer.Option(help="Seconds between the page's checks for new data (0: never).")] = 10.0,
) -> None:
    """Serve a read-only page over the workspace: rounds, throughput, teachers, failures, shards, training, previews."""
    from ..dashboard.app import redact, serve
    from ..errors import ConfigError

    try:
        serve(workspace, host=host, port=port, refresh=refresh, announce=lambda m: console.print(m, highlight=False))
    except ConfigError as exc:  # an unreadable workspace, or a busy port named with what to do
        fail(redact(str(exc), workspace))
