"""`pseudotrack checkpoints verify DIR`: are the teacher files in DIR the authors' files, unmodified?

The table of official files, sources and hashes is `teachers/official.py`. A student export of ours
(student.pth with its .json sidecar) is no official file but is a valid checkpoint: it is accepted
with a note.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import fail, out, print_table

checkpoints_app = typer.Typer(
    help="Check teacher checkpoint files against the official releases.", no_args_is_help=True
)

DEFAULT_REFERENCE_ENV = "PSEUDOTRACK_REFERENCE"


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoints_app, name="checkpoints")


@checkpoints_app.command("verify")
def verify_command(
    directory: Annotated[Path, typer.Argument(help="The checkpoints folder (what --checkpoints of `round` names).")],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the reference key/shape manifests (<model>/manifest.json), for files without a "
            f"published hash and to describe altered ones. Default: ${DEFAULT_REFERENCE_ENV} if set."
        ),
    ] = None,
) -> None:
    """Compare each file with the official checkpoints' SHA-256; name unknown and altered files (exit 1 if any)."""
    from ..student.model import read_export_meta, sidecar_path
    from ..teachers.official import Verdict, verify_file

    if not directory.is_dir():
        fail(f"{directory} is not a directory: give the folder holding the checkpoint files")
    if reference is None and os.environ.get(DEFAULT_REFERENCE_ENV):
        reference = Path(os.environ[DEFAULT_REFERENCE_ENV])
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        fail(f"{directory} holds no files")
    exports = {p for p in files if read_export_meta(p) is not None}
    sidecars = {sidecar_path(p) for p in exports}
    verdicts: list[Verdict] = []
    for path in files:
        if path in sidecars:
            continue
        if path in exports:
            meta = read_export_meta(path) or {}
            model = meta.get("model", {})
            verdicts.append(
                Verdict(
                    path.name,
                    "student",
                    f"a student export of ours ({model.get('variant', '?')} student, step {meta.get('step', '?')}), "
                    "not an official file: accepted, not hash-checked",
                )
            )
            continue
        verdicts.append(verify_file(path, reference))
    table = Table()
    for column in ("file", "verdict", "detail"):
        table.add_column(column, overflow="fold")
    styles = {"ok": "green", "structure-ok": "green", "student": "cyan"}
    for v in verdicts:
        style = styles.get(v.status, "red")
        table.add_row(v.file, f"[{style}]{v.status}[/]", v.detail)
    print_table(f"checkpoints in {directory}", table)
    bad = [v for v in verdicts if not (v.accepted or v.status == "student")]
    if bad:
        names = ", ".join(f"{v.file} ({v.status})" for v in bad)
        out.print(f"{len(bad)} of {len(verdicts)} files are not the official checkpoints: {names}", highlight=False)
        raise typer.Exit(1)
    out.print(f"all {len(verdicts)} files verified", highlight=False)
