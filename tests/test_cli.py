"""The `pseudotrack` command line: help texts, demo data, and a whole round under Prefect's ephemeral API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
                "Default: 32",
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


# --------------------------------------------------------------------------- options declared once


def _click_params(name: str) -> dict:
    import typer

    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[name].params}


def test_round_watch_and_scaling_study_take_the_round_options_from_round_config():
    """Every labelling option is RoundConfig's field: same flag, help and default in each command."""
    from dataclasses import MISSING, fields

    from pseudotrack.cli.options import option_name
    from pseudotrack.config import RoundConfig

    commands = {"round": (), "watch": ("videos",), "scaling-study": ("round_id", "videos")}
    params = {name: _click_params(name) for name in commands}
    for f in fields(RoundConfig):
        flag = option_name(f.name)
        shown = [name for name, excluded in commands.items() if f.name not in excluded]
        assert "round" in shown
        for name in shown:
            param = params[name][f.name]
            assert flag in param.opts, (name, f.name, param.opts)
            assert param.help == f.metadata["help"], (name, f.name)
            if name != "scaling-study" or f.name not in ("bucket", "workspace"):  # there --config may replace them
                default = f.default
                if default is MISSING and f.default_factory is not MISSING:
                    default = f.default_factory()
                if default is MISSING:
                    assert param.required, (name, f.name)
                else:
                    assert param.default in (default, tuple(default) if isinstance(default, list) else default), (
                        name,
                        f.name,
                        param.default,
                    )
    help_text = runner.invoke(app, ["watch", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    assert "--frames" in help_text and "default: 64" in help_text
    assert "videos" not in params["watch"] and "round_id" not in params["scaling-study"]


def test_the_command_line_reaches_the_config(monkeypatch):
    """What `round` and `scaling-study` were given is what their RoundConfig holds (no field set by hand)."""
    from pseudotrack.cli import label

    seen = {}

    def capture(make_config, run=None):
        seen["config"] = make_config()
        return {"round_id": "x"}

    monkeypatch.setattr(label, "run_labelling", capture)
    monkeypatch.setattr(label, "print_summary", lambda summary: None)
    args = ["--bucket", "b", "--workspace", "w", "--teacher", "lk", "--teacher", "noop", "--frames", "12"]
    args += ["--queries", "7", "--retry-failed", "--query-start-bias", "0", "--shard-max-samples", "5"]
    result = runner.invoke(app, ["round", *args])
    assert result.exit_code == 1, result.output  # the fake summary has no "failed" key: KeyError -> exit 1
    config = seen["config"]
    assert config.teachers == ["lk", "noop"] and config.num_frames == 12 and config.num_queries == 7
    assert config.retry_failed and config.query_start_bias == 0 and config.shard_max_samples == 5
    assert config.min_frames == 12  # the config's own rule, not the CLI's
    runner.invoke(app, ["round", "--bucket", "b", "--workspace", "w"])
    assert seen["config"].teachers == ["lk"] and seen["config"].num_frames == 64 and not seen["config"].retry_failed

    from pseudotrack.cli import scaling

    monkeypatch.setattr(scaling, "_run_with_progress", lambda study, sizes: seen.update(study=study) or {})
    runner.invoke(app, ["scaling-study", "--sizes", "2", *args, "--device", "cpu"])
    study = seen["study"]
    assert study.round.teachers == ["lk", "noop"] and study.round.num_queries == 7 and study.round.retry_failed
    assert study.train.device == "cpu" and study.round.device == "cpu"
    refused = runner.invoke(app, ["scaling-study", "--sizes", "2"])
    assert refused.exit_code == 2 and "give --bucket and --workspace" in " ".join(refused.output.split())


# --------------------------------------------------------------------------- status --failed


def test_status_failed_lists_each_failed_video(tmp_path):
    from pseudotrack.storage.catalog import Catalog
    from pseudotrack.storage.uri import open_store

    catalog = Catalog(open_store(str(tmp_path)))
    catalog.append(
        [
            {"video_key": "a.mp4", "etag": "1", "status": "failed", "stage": "decode", "reason": "moov atom not found",
             "round_id": "r1"},
            {"video_key": "b.mp4", "etag": "1", "status": "failed", "stage": "caption", "reason": "no caption",
             "round_id": "r1"},
            {"video_key": "c.mp4", "etag": "1", "status": "failed", "stage": "decode", "reason": "too short",
             "round_id": "r1"},
        ]
    )  # fmt: skip
    catalog.append(
        [{"video_key": "c.mp4", "etag": "1", "status": "filtered", "filter_rule": "cartoon", "round_id": "r2"}]
    )
    result = runner.invoke(app, ["status", "--workspace", str(tmp_path), "--failed"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row_a = next(line for line in lines if "a.mp4" in line)
    assert "decode" in row_a and "moov atom not found" in row_a and "r1" in row_a
    assert "caption" in next(line for line in lines if "b.mp4" in line)
    assert "c.mp4" not in result.output  # its latest state is filtered
    assert "2 failed videos" in result.output
    as_json = runner.invoke(app, ["status", "--workspace", str(tmp_path), "--failed", "--json"])
    rows = json.loads(as_json.output)
    assert [(r["video_key"], r["stage"], r["reason"]) for r in rows] == [
        ("a.mp4", "decode", "moov atom not found"),
        ("b.mp4", "caption", "no caption"),
    ]
    only_r2 = runner.invoke(app, ["status", "--workspace", str(tmp_path), "--failed", "--round-id", "r2"])
    assert only_r2.exit_code == 0 and "no failed videos in round r2" in only_r2.output
    summary = runner.invoke(app, ["status", "--workspace", str(tmp_path)], env={"COLUMNS": "200"})
    assert "status --failed" in summary.output
    assert "all videos (latest state)" in summary.output  # a heading line, not a title wrapped to the table's width


def test_status_shows_what_bounds_each_round(tmp_path):
    from pseudotrack.storage.catalog import Catalog
    from pseudotrack.storage.uri import open_store

    store = open_store(str(tmp_path))
    Catalog(store).append(
        [
            {"video_key": f"{r}.mp4", "etag": "1", "status": "filtered", "filter_rule": "cgi", "round_id": r}
            for r in ("r1", "r2", "r3")
        ]
    )
    stages = {"r1": {"batch": 10.0, "teacher": 9.5, "cpu": 12.0}, "r2": {"batch": 8.0, "teacher": 2.0, "cpu": 14.0}}
    for name, labelled in (("r1", 20), ("r2", 4)):
        summary = {"round_id": name, "labelled": labelled, "stage_seconds": stages[name]}
        store.write_bytes(f"runs/{name}/summary.json", json.dumps(summary).encode())
    store.write_bytes("runs/r3/summary.json", b'{"round_id": "r3", "planned": 3}')  # still running: no batch time
    result = runner.invoke(app, ["status", "--workspace", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    r1 = [line for line in lines if line.strip("│ ").startswith("r1") and "%" in line]
    r2 = [line for line in lines if line.strip("│ ").startswith("r2") and "%" in line]
    assert len(r1) == 1 and "95%" in r1[0] and "2.00" in r1[0] and "teacher" in r1[0]
    assert len(r2) == 1 and "25%" in r2[0] and "0.50" in r2[0] and "cpu" in r2[0]
    assert not [line for line in lines if line.strip("│ ").startswith("r3") and "%" in line]
    as_json = json.loads(runner.invoke(app, ["status", "--workspace", str(tmp_path), "--json"]).output)
    assert as_json["throughput"]["r1"]["bound_by"] == "teacher" and as_json["throughput"]["r2"]["bound_by"] == "cpu"
    assert set(as_json["throughput"]) == {"r1", "r2"}
    only = json.loads(runner.invoke(app, ["status", "--workspace", str(tmp_path), "--round-id", "r2", "--json"]).output)
    assert set(only["throughput"]) == {"r2"}


# --------------------------------------------------------------------------- output


def test_round_summary_title_stays_on_one_line_at_140_columns():
    program = (
        "from pseudotrack.cli.common import print_summary; from pseudotrack.flows.summary import RoundSummary; "
        "s = RoundSummary('watch-20261204T150000Z-3f9a1c2b7d5e', labelled=3, seconds=2.0); "
        "s.failure_reasons = {'decode: moov atom not found': 1}; print_summary(s.to_dict())"
    )
    env = {**os.environ, "COLUMNS": "140"}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "round watch-20261204T150000Z-3f9a1c2b7d5e" in [line.strip() for line in lines], done.stdout
    assert not any(line.strip() in ("round", "watch-20261204T150000Z-3f9a1c2b7d5e") for line in lines)


def test_train_report_says_when_one_window_was_logged(capsys, monkeypatch):
    """Two steps at log_every 10 log one row: its loss is their mean, so it is not shown as a first and a last."""
    from pseudotrack.cli.student import _print_train_report
    from pseudotrack.flows.train_student import loss_windows

    monkeypatch.setenv("COLUMNS", "160")
    one = loss_windows([{"step": 2, "loss": 0.5}], resumed_from=0)
    assert one == [{"first_step": 1, "last_step": 2, "loss": 0.5}]
    rows = [{"step": s, "loss": loss} for s, loss in ((10, 3.0), (20, 2.0), (25, 1.0))]
    assert loss_windows(rows, resumed_from=0) == [
        {"first_step": 1, "last_step": 10, "loss": 3.0},
        {"first_step": 21, "last_step": 25, "loss": 1.0},
    ]
    assert loss_windows(rows[1:], resumed_from=10)[0]["first_step"] == 11
    train = {"steps": 2, "resumed_from": 0, "first_loss": 0.5, "final_loss": 0.5, "clips_per_second": 1.0}
    _print_train_report({"train": {**train, "export_path": "x", "loss_windows": one}, "report_path": "r"})
    text = capsys.readouterr().out
    assert "one logged window" in text and "steps 1-2" in text and "first" not in text and text.count("0.5000") == 1
    two = loss_windows(rows, 0)
    _print_train_report({"train": {**train, "export_path": "x", "loss_windows": two}, "report_path": "r"})
    text = capsys.readouterr().out
    assert "first logged window, steps 1-10" in text and "last logged window, steps 21-25" in text
    assert "3.0000" in text and "1.0000" in text


def test_training_reports_evaluation_progress(tmp_path, monkeypatch):
    """After training, each evaluated checkpoint reports its videos through on_progress (the CLI draws a bar)."""
    from pseudotrack.flows import train_student as flow
    from pseudotrack.student.train import TrainConfig, TrainResult

    def fake_training(config, on_log=None, **kwargs):
        history = [{"step": s, "total_steps": 4, "loss": 1.0 / s, "lr": 1e-4, "clips_per_second": 1.0} for s in (2, 4)]
        for row in history:
            on_log(row)
        export = tmp_path / "student.pth"
        export.write_bytes(b"x")
        return TrainResult(4, 0.25, 0.5, str(export), "", "", history=history)

    def fake_evaluate(checkpoint, benchmark, *args, progress=None, clips=(), **kwargs):
        for done in range(1, len(clips) + 1):
            progress(done, len(clips))
        return {"benchmark": benchmark, "metrics": {"average_jaccard": 0.5}}

    monkeypatch.setattr(flow, "run_training", fake_training)
    monkeypatch.setattr(flow, "evaluate_student", fake_evaluate)
    events = []
    config = TrainConfig(workspace=str(tmp_path / "ws"), output=str(tmp_path / "out"), init_checkpoint=None)
    (tmp_path / "out").mkdir()
    report = flow.train_student(
        config, "synthetic", on_progress=lambda e, p: events.append((e, p)), eval_clips=[1, 2, 3]
    )
    assert [p["step"] for e, p in events if e == "train"] == [2, 4]
    assert [(p["name"], p["done"], p["total"]) for e, p in events if e == "eval"] == [
        ("trained", 1, 3),
        ("trained", 2, 3),
        ("trained", 3, 3),
    ]
    assert report["train"]["loss_windows"][-1] == {"first_step": 3, "last_step": 4, "loss": 0.25}

    from rich.progress import Progress

    from pseudotrack.cli.student import train_progress

    progress = Progress()
    callback = train_progress(progress, "synthetic")
    for event, payload in events:
        callback(event, payload)
    bars = {t.description: t for t in progress.tasks}
    assert bars["training"].completed == 4 and bars["evaluating trained"].completed == 3
    assert bars["evaluating trained"].total == 3


# --------------------------------------------------------------------------- progress without listeners


def test_a_round_reports_progress_through_its_callback(tmp_path):
    """No module-global listeners: the caller's on_progress sees the plan, each video, and the end."""
    from pseudotrack import flows
    from pseudotrack.config import RoundConfig
    from pseudotrack.demo import write_demo_bucket
    from pseudotrack.flows.label_round import run_round

    write_demo_bucket(tmp_path / "bucket", videos=2, frames=12, height=64, width=96, seed=0, broken=1)
    events = []
    config = RoundConfig(
        bucket=str(tmp_path / "bucket"),
        workspace=str(tmp_path / "ws"),
        round_id="cb",
        num_frames=8,
        height=64,
        width=96,
        num_queries=16,
        num_keyframes=2,
        min_frames=4,
    )
    summary = run_round(config, on_progress=lambda event, payload: events.append((event, payload))).to_dict()
    assert summary["labelled"] >= 1 and summary["failed"] >= 1  # the broken file fails while labelling
    names = [e for e, _ in events]
    assert names[0] == "planned" and names[-1] == "done"
    assert events[0][1]["total"] == summary["planned"]
    per_video = [e for e in names if e in ("labelled", "failed")]
    assert len(per_video) == summary["planned"] and per_video.count("labelled") == summary["labelled"]
    for module in ("label_round", "scaling_round", "train_student"):
        source = (Path(flows.__file__).parent / f"{module}.py").read_text()
        assert "_listeners" not in source and "add_" + "progress_listener" not in source, module


# --------------------------------------------------------------------------- dashboard


def test_dashboard_on_a_busy_port_says_which_and_what_to_do(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app, ["dashboard", "--workspace", str(tmp_path), "--port", str(port)], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert f"port {port}" in lines[0] and "--port" in lines[0] and "already in use" in lines[0]
