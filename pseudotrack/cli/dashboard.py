"""`pseudotrack dashboard`: the command over `dashboard.app.serve` (the page itself lives in dashboard/)."""

from __future__ import annotations

import errno
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
    from ..dashboard.app import LOOPBACK, redact, serve
    from ..errors import ConfigError

    def on_ready(url: str, shown: str) -> None:
        console.print(f"dashboard of {shown} at {url} (Ctrl-C stops it)", highlight=False)
        if not (host in LOOPBACK or host.startswith("127.")):
            console.print(
                f"[yellow]warning:[/] bound to {host}: anyone who can reach this port can read the catalog",
                highlight=False,
            )

    try:
        serve(workspace, host=host, port=port, refresh_s=refresh, on_ready=on_ready)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is already in use: choose another with --port (0 picks a free one)")
        fail(redact(str(exc), workspace))
    except ConfigError as exc:
        fail(redact(str(exc), workspace))
