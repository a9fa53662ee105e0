"""The `pseudotrack` command line: help texts, demo data, and a whole round under Prefect's ephemeral API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pseudotrack.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "round",
            [
                "--bucket",
                "--workspace",
                "--videos",
                "--teacher",
                "--checkpoints",
                "--seed",
                "--batch-size",
                "default: 32",
                "--teacher-batch",
            ],
        ),
        ("status", ["--workspace", "--round-id", "--json"]),
        ("demo-data", ["out_dir", "--videos", "default: 12"]),
        ("show", ["--video", "--sample", "--out", "tracks.png"]),
    ],
)
def test_help_lists_options_with_defaults(command, expected):
    result = runner.invoke(app, [command, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output, (text, result.output)


def test_round_refuses_bad_input_with_a_clear_message(tmp_path):
    result = runner.invoke(app, ["round", "--bucket", str(tmp_path / "missing"), "--workspace", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "missing" in result.output and "error" in result.output
    result = runner.invoke(
        app, ["round", "--bucket", str(tmp_path), "--workspace", str(tmp_path / "w"), "--batch-size", "0"]
    )
    assert result.exit_code == 2 and "batch_size" in result.output
    result = runner.invoke(
        app, ["round", "--bucket", str(tmp_path), "--workspace", str(tmp_path / "w"), "--teacher-batch", "0"]
    )
    assert result.exit_code == 2 and "teacher_batch=0 must be at least 1" in result.output


def test_main_command_runs_a_round_on_the_ephemeral_api(tmp_path):
    """The README's main command: demo data, then a round, with no Prefect server started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="160")
    cli = [sys.executable, "-m", "pseudotrack.cli.main"]
    bucket, workspace = tmp_path / "bucket", tmp_path / "ws"
    subprocess.run(
        [
            *cli,
            "demo-data",
            str(bucket),
            "--videos",
            "4",
            "--frames",
            "16",
            "--height",
            "96",
            "--width",
            "128",
        ],
        check=True,
        env=env,
        timeout=120,
    )
    done = subprocess.run(
        [
            *cli,
            "round",
            "--bucket",
            str(bucket),
            "--workspace",
            str(workspace),
            "--round-id",
            "demo",
            "--frames",
            "12",
            "--height",
            "96",
            "--width",
            "128",
            "--queries",
            "32",
            "--keyframes",
            "4",
        ],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round demo" in done.stdout and "labelled" in done.stdout and "filtered" in done.stdout
    status = subprocess.run(
        [*cli, "status", "--workspace", str(workspace), "--json"],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(status.stdout)
    total = sum(counts["by_status"].values())
    assert total == 5  # 4 generated videos and the broken one, each in one terminal state
    assert counts["by_status"].get("failed", 0) == 1
    key = next(p.name for p in sorted(bucket.glob("clip_*.mp4")))
    shown = subprocess.run(
        [*cli, "show", "--workspace", str(workspace), "--video", key, "--out", str(tmp_path / "t.png")],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_the_summary_shows_videos_left_to_another_run(capsys, monkeypatch):
    """Videos a concurrent round had claimed are neither labelled nor failed here: the summary says where they went."""
    from pseudotrack.cli import common as cli
    from pseudotrack.flows.summary import RoundSummary

    monkeypatch.setenv("COLUMNS", "160")
    summary = RoundSummary("r1", labelled=3, seconds=2.0)
    summary.skipped = {"claimed by round r0 (contended)": 2}
    cli.print_summary(summary.to_dict())
    text = capsys.readouterr().out
    assert "left to another run" in text and "claimed by round r0" in text and " 2 " in text
    summary.skipped = {}
    cli.print_summary(summary.to_dict())
    assert "left to another run" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["round", "watch"])
def test_a_store_outage_ends_the_round_with_what_to_do(command, tmp_path, monkeypatch, prefect_server):
    """An outage past every retry outside a batch (here reading the catalog) ends in a message, not a crash."""
    from pseudotrack.demo import write_demo_bucket
    from pseudotrack.storage.base import StorageUnavailable
    from pseudotrack.storage.catalog import Catalog

    write_demo_bucket(tmp_path / "bucket", videos=1, frames=12, height=64, width=96, seed=0, broken=0)

    def outage(self, *args, **kwargs):
        raise StorageUnavailable("s3://bucket/ws/catalog/: LIST kept failing for 60.0 s")

    monkeypatch.setattr(Catalog, "done", outage)
    monkeypatch.setattr(Catalog, "latest", outage)
    args = [command, "--bucket", str(tmp_path / "bucket"), "--workspace", str(tmp_path / "ws"), "--round-id", "r7"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "LIST kept failing" in result.output and "--round-id r7" in result.output
    # Prefect logs the failed flow run its own way; the command itself ends with what to do, not a traceback
    assert " ".join(result.output.split()).endswith("--round-id r7 once the store answers.")
    assert not isinstance(result.exception, StorageUnavailable)
