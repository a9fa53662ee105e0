"""Scaling rounds and the scaling study: `--videos N` prefixes, a student per size, Figure 1 and its table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.errors import ConfigError
from pseudotrack.flows.scaling_round import (
    METRICS,
    EvalSettings,
    ScalingConfig,
    first_eligible,
    label_size,
    parse_sizes,
    run_scaling_study,
    training_shards,
)
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.student.model import build_student, export_student
from pseudotrack.student.train import TrainConfig

H, W = 64, 96  # the tiny student's resolution


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: two OpenMP threads contend on the shared 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """12 generated clips; every third has a caption the filter drops, so 8 are eligible."""
    root = tmp_path_factory.mktemp("scaling-bucket")
    write_demo_bucket(root, videos=12, frames=12, height=H, width=W, seed=4, broken=0)
    return root


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return str(export_student(build_student("online", "tiny"), tmp_path_factory.mktemp("init") / "start.pth"))


def tiny_round(bucket: Path, workspace: Path, **overrides) -> RoundConfig:
    values = dict(
        bucket=str(bucket),
        workspace=str(workspace),
        height=H,
        width=W,
        num_frames=8,
        min_frames=8,
        max_stride=1,
        num_queries=16,
        num_keyframes=2,
        batch_size=4,
        device="cpu",
    )
    return RoundConfig(**{**values, **overrides})


def labelled_keys(workspace: Path, round_id: str | None = None) -> set[str]:
    latest = Catalog(open_store(str(workspace))).latest(round_id).to_pylist()
    return {r["video_key"] for r in latest if r["status"] == "labelled"}


def test_larger_rounds_hold_smaller_ones_counted_after_the_caption_filter(bucket, tmp_path):
    workspace = tmp_path / "ws"
    from pseudotrack.flows.label_round import run_round

    small = run_round(tiny_round(bucket, workspace, videos=3, round_id="n3"))
    assert small.labelled + small.failed == 3 and small.reused == 0
    big = run_round(tiny_round(bucket, workspace, videos=7, round_id="n7"))
    assert big.reused == 3 and big.labelled + big.failed == 4
    # N counts eligible videos only: the filtered ones the walk passed are recorded but not counted
    latest = Catalog(open_store(str(workspace))).latest().to_pylist()
    assert sum(r["status"] == "filtered" for r in latest) >= 1
    assert sum(r["status"] != "filtered" for r in latest) == 7
    # the plan of 7 is the plan of 3 followed by 4 more, in the stable (hashed) order, not by name
    first3 = [v.key for v in first_eligible(tiny_round(bucket, workspace, videos=3))]
    first7 = [v.key for v in first_eligible(tiny_round(bucket, workspace, videos=7))]
    assert first7[:3] == first3 and first7 != sorted(first7)
    assert labelled_keys(workspace, "n3") == set(first3) and labelled_keys(workspace) == set(first7)


@pytest.fixture(scope="module")
def broken_bucket(tmp_path_factory) -> Path:
    """12 generated clips (8 eligible) and a broken file whose caption the filter keeps: 9 eligible, 8 labellable."""
    root = tmp_path_factory.mktemp("scaling-broken-bucket")
    write_demo_bucket(root, videos=12, frames=12, height=H, width=W, seed=5, broken=1)
    return root


def test_a_size_counts_labelled_videos_so_a_broken_file_is_replaced_by_the_next(broken_bucket, tmp_path):
    """Issue 18: "n=4" trained on 3 videos when a broken file was among the first 4 eligible."""
    workspace = tmp_path / "ws"
    order = [v.key for v in first_eligible(tiny_round(broken_bucket, workspace, videos=100))]
    assert len(order) == 9 and "broken_00.mp4" in order
    n = max(3, order.index("broken_00.mp4") + 1)  # the broken file is among the first n eligible
    assert n < len(order), "the bucket must hold an eligible video past the first n"
    config = ScalingConfig(
        round=tiny_round(broken_bucket, workspace),
        train=TrainConfig(workspace=str(workspace), output=str(tmp_path / "out")),
        videos=n,
    )
    round_config, videos, counts = label_size(config)
    assert [v.key for v in videos] == order[: n + 1]  # one more eligible video, in the stable order
    assert round_config.videos == n + 1 and round_config.round_id == f"scale-n{n}"
    assert counts["labelled"] == n and counts["failed"] == 1
    assert labelled_keys(workspace) == set(order[: n + 1]) - {"broken_00.mp4"}
    shards, shard_counts = training_shards(str(workspace), videos)
    assert shard_counts["labelled"] == n and sum(ref.count for ref in shards) == n  # the student's set: n videos

    # a size past the bucket: every labellable video, no endless re-running, and the true count reported
    round_config, videos, counts = label_size(config.for_size(len(order) + 3))
    assert len(videos) == len(order) and len(labelled_keys(workspace)) == len(order) - 1
    assert training_shards(str(workspace), videos)[1]["labelled"] == len(order) - 1


def test_configuration_round_trips_and_refuses_what_cannot_run(bucket, tmp_path):
    config = ScalingConfig(
        round=tiny_round(bucket, tmp_path / "ws"),
        train=TrainConfig(workspace=str(tmp_path / "ws"), output=str(tmp_path / "out"), model_size="tiny"),
        eval=EvalSettings(videos=3, resize_to=None),
        study="s1",
    )
    path = tmp_path / "scaling.json"
    path.write_text(config.for_size(5).to_json())
    loaded = ScalingConfig.from_json_file(path)
    assert loaded == config.for_size(5)
    assert loaded.round_config().videos == 5 and loaded.round_config().round_id == "scale-n5"
    assert loaded.train_config().output == str(tmp_path / "out" / "n5")
    assert parse_sizes("1000, 100,100,5000") == [100, 1000, 5000]
    with pytest.raises(ConfigError, match="'ten' is not a whole number"):
        parse_sizes("100,ten")
    with pytest.raises(ConfigError, match="differs from round.workspace"):
        ScalingConfig(round=config.round, train=TrainConfig(workspace=str(tmp_path / "other"), output="o"))
    with pytest.raises(ConfigError, match="unknown scaling configuration keys: sizez"):
        ScalingConfig.from_dict({**config.to_dict(), "sizez": [1]})
    with pytest.raises(ConfigError, match="neither 'synthetic' nor an existing TAP-Vid path"):
        EvalSettings(benchmark=str(tmp_path / "missing.pkl"))


def test_scaling_study_command_writes_figure_table_and_results(bucket, tmp_path, start_checkpoint, prefect_server):
    """`pseudotrack scaling-study --sizes 4,8` end to end on the CPU: lk labels, a tiny student, synthetic scenes."""
    workspace = tmp_path / "ws"
    args = ["scaling-study", "--sizes", "8,4", "--bucket", str(bucket), "--workspace", str(workspace)]
    args += ["--output", str(tmp_path / "students"), "--study", "tiny", "--init", start_checkpoint]
    args += ["--height", str(H), "--width", str(W), "--frames", "8", "--queries", "16", "--keyframes", "2"]
    args += ["--batch-size", "4", "--device", "cpu", "--model-size", "tiny", "--steps", "2"]
    args += ["--train-batch-size", "2", "--train-frames", "8", "--tracks", "8", "--iters", "2", "--lr", "1e-3"]
    args += ["--loader-workers", "0", "--eval-videos", "2", "--joint", "--native-size"]
    args += ["--synthetic-frames", "8", "--synthetic-size", f"{H}x{W}", "--synthetic-points", "8"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output

    store = open_store(str(workspace))
    png = store.read_bytes("scaling/tiny/figure1.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] >= 300 and image.shape[1] >= 900
    assert image.std() > 10  # drawn, not blank

    table = store.read_bytes("scaling/tiny/table.md").decode()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0 (start)", "4", "8"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][-3:]
        assert all(math.isfinite(float(c)) and 0 <= float(c) <= 100 for c in cells), row
    assert "| 4 |" in result.output and "figure1.png" in result.output  # printed too

    results = json.loads(store.read_bytes("scaling/tiny/results.json"))
    n4, n8 = results["rows"]
    assert (n4["videos"], n8["videos"]) == (4, 8) and (n4["labelled"], n8["labelled"]) == (4, 8)
    for row in (n4, n8, results["baseline"]):
        assert all(math.isfinite(row["metrics"][k]) for k in METRICS.values())
    # the larger round reuses the smaller one's labels and labels only the rest
    assert n8["round"]["reused"] == 4 and n8["round"]["labelled"] == 4
    assert labelled_keys(workspace, "scale-n4") < labelled_keys(workspace)
    eligible8 = {v.key for v in first_eligible(tiny_round(bucket, workspace, videos=8))}
    assert labelled_keys(workspace, "scale-n4") <= eligible8 == labelled_keys(workspace)
    # and the student of 8 trained on the shards of both rounds
    shards8 = json.loads((tmp_path / "students" / "tiny" / "n8" / "scaling_shards.json").read_text())["shards"]
    assert {Path(s["url"]).parent.name for s in shards8} == {"scale-n4", "scale-n8"}
    assert sum(s["count"] for s in shards8) == 8

    # a second run with the saved configuration reuses every size's result: no training, same numbers
    metrics_log = tmp_path / "students" / "tiny" / "n8" / "metrics.jsonl"
    before = metrics_log.read_text()
    again = run_scaling_study(ScalingConfig.from_dict(results["config"]), [4, 8])
    assert [r["fingerprint"] for r in again["rows"]] == [n4["fingerprint"], n8["fingerprint"]]
    assert again["rows"][1]["metrics"] == n8["metrics"] and metrics_log.read_text() == before
