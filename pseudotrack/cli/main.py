"""The `pseudotrack` command line: the app and its entry point; each command group lives in its own module.

Heavy modules (torch, prefect) are imported inside the commands, so `--help`
is instant and Prefect's settings can be defaulted before Prefect loads.
"""

from __future__ import annotations

import sys

import typer

from . import checkpoints, dashboard, label, scaling, student
from .common import console

app = typer.Typer(
    name="pseudotrack",
    help="Pseudo-label real videos with frozen point trackers and fine-tune a student tracker on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for group in (label, student, scaling, dashboard, checkpoints):
    group.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
