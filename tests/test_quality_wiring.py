"""Label quality wired through a round: scores in shards, JSON and catalog; the quality filter; the loader's
mask and weights; calibration in summary.json and `status`; the dashboard section; old shards without scores."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.errors import ConfigError
from pseudotrack.flows.label_round import run_round
from pseudotrack.render import quality_colors, shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.student.data import ClipSpec, collate, prepare_clip
from pseudotrack.student.loss import WindowPrediction, track_loss
from pseudotrack.synthetic import render_scene
from pseudotrack.tasks.clip_codec import encode_clip
from pseudotrack.tasks.quality import quality_field
from pseudotrack.tasks.shards import Sample, ShardSink, committed_shards, read_shard
from pseudotrack.teachers.base import TeacherOutput

runner = CliRunner()
SMALL = dict(height=64, width=96, num_frames=12, min_frames=8, num_queries=24, num_keyframes=2, batch_size=4)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbucket")
    write_demo_bucket(root, videos=4, frames=16, height=80, width=112, seed=5, broken=0)
    return root


@pytest.fixture(scope="module")
def scored_round(bucket, tmp_path_factory):
    """A round with the forward-backward check on every clip (quality_sample 1)."""
    workspace = str(tmp_path_factory.mktemp("qws"))
    config = RoundConfig(bucket=str(bucket), workspace=workspace, round_id="q1", seed=1, quality_sample=1.0, **SMALL)
    summary = run_round(config).to_dict()
    return workspace, summary


def labelled_rows(workspace: str) -> list[dict]:
    return [r for r in Catalog(open_store(workspace)).latest().to_pylist() if r["status"] == "labelled"]


def test_a_round_writes_scores_to_shards_json_and_catalog(scored_round):
    workspace, summary = scored_round
    assert summary["labelled"] >= 2
    store = open_store(workspace)
    rows = {r["sample_key"]: r for r in labelled_rows(workspace)}
    seen = 0
    for manifest in committed_shards(store, "q1"):
        for sample in read_shard(shard_url(store, manifest["shard"])):
            seen += 1
            scores = sample["labels"]["lk"]["quality"]
            assert scores.dtype == np.float32 and scores.shape == (SMALL["num_queries"],)
            assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
            quality = sample["meta"]["quality"]
            assert quality["forward_backward"] is True and quality["min_track_quality"] is None
            assert quality["teachers"]["lk"]["mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
            assert quality["teachers"]["lk"]["signals"]["consistency"] is not None  # the check ran
            row = rows[sample["key"]]
            assert row["quality_mean"] == pytest.approx(quality["mean"]) and row["quality_fb"] is True
            assert row["quality_low_fraction"] == pytest.approx(quality["low_fraction"])
    assert seen == len(rows) == summary["labelled"]
    assert "quality" in summary["stage_seconds"]


def test_calibration_is_recorded_in_the_summary_and_status(scored_round):
    workspace, summary = scored_round
    cal = summary["calibration"]["lk"]
    assert 0.0 < cal["delta_avg"] <= 1.0 and 0.0 <= cal["average_jaccard"] <= 1.0 and cal["scenes"] == 3
    on_disk = json.loads((open_store(workspace).local_path("runs/q1/summary.json")).read_text())
    assert on_disk["calibration"]["lk"]["delta_avg"] == pytest.approx(cal["delta_avg"])
    result = runner.invoke(app, ["status", "--workspace", workspace, "--json"])
    assert result.exit_code == 0, result.output
    quality = json.loads(result.output)["quality"]["q1"]
    assert quality["calibration"]["lk"]["delta_avg"] == pytest.approx(cal["delta_avg"])
    assert quality["scored"] == summary["labelled"] and quality["unknown"] == 0
    assert sum(quality["teachers"]["lk"]["histogram"]) == summary["labelled"]
    table = runner.invoke(app, ["status", "--workspace", workspace], terminal_width=200, env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "teacher calibration" in table.output and "label quality" in table.output


def test_min_sample_quality_filters_videos_with_the_reason(bucket, tmp_path):
    workspace = str(tmp_path / "ws")
    config = RoundConfig(
        bucket=str(bucket), workspace=workspace, round_id="f1", min_sample_quality=1.0, cpu_workers=0, **SMALL
    )
    summary = run_round(config)
    assert summary.labelled == 0 and summary.filtered >= 2 and summary.filter_rules.get("quality < 1", 0) >= 2
    rows = [r for r in Catalog(open_store(workspace)).latest().to_pylist() if r["stage"] == "quality"]
    assert len(rows) == summary.filter_rules["quality < 1"]
    for row in rows:
        assert row["status"] == "filtered" and row["reason"].startswith("quality: ") and row["reason"].endswith(" < 1")
        assert row["quality_mean"] is not None and row["quality_mean"] < 1.0 and row["shard_id"] is None
    assert committed_shards(open_store(workspace), "f1") == []


def test_pipelined_batch_scores_too(bucket, tmp_path):
    workspace = str(tmp_path / "ws")
    config = RoundConfig(bucket=str(bucket), workspace=workspace, round_id="p1", cpu_workers=1, **SMALL)
    summary = run_round(config)
    assert summary.labelled >= 2
    assert all(r["quality_mean"] is not None for r in labelled_rows(workspace))


def test_a_nan_score_fails_the_clip_with_the_reason(bucket, tmp_path, monkeypatch):
    import pseudotrack.tasks.quality as quality

    monkeypatch.setattr(quality, "combine", lambda signals: np.full(len(signals["coverage"]), np.nan))
    workspace = str(tmp_path / "ws")
    summary = run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id="n1", cpu_workers=0, **SMALL))
    assert summary.labelled == 0 and summary.failed >= 2
    failed = [r for r in Catalog(open_store(workspace)).latest().to_pylist() if r["status"] == "failed"]
    assert failed and all(r["stage"] == "quality" and "NaN or infinite" in r["reason"] for r in failed)


def test_a_teacher_that_cannot_be_calibrated_does_not_fail_the_round(bucket, tmp_path, monkeypatch):
    import pseudotrack.student.calibration as calibration

    def broken(teacher, calibration_set=None, max_clips=1):
        raise RuntimeError("no calibration today")

    monkeypatch.setattr(calibration, "calibrate", broken)
    config = RoundConfig(bucket=str(bucket), workspace=str(tmp_path / "ws"), round_id="c1", cpu_workers=0, **SMALL)
    summary = run_round(config)
    assert summary.labelled >= 2
    assert summary.calibration["lk"]["error"] == "RuntimeError: no calibration today"


def test_quality_options_out_of_range_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="min_sample_quality"):
        RoundConfig(bucket=str(tmp_path), workspace=str(tmp_path / "w"), min_sample_quality=1.5)
    base = ["round", "--bucket", str(tmp_path), "--workspace", str(tmp_path / "w")]
    for option, value in (("--min-track-quality", "-0.1"), ("--min-sample-quality", "2"), ("--quality-sample", "3")):
        result = runner.invoke(app, [*base, option, value])
        assert result.exit_code == 2 and option.lstrip("-").replace("-", "_") in result.output, result.output
    result = runner.invoke(
        app, ["train", "--workspace", str(tmp_path), "--output", str(tmp_path / "o"), "--min-track-quality", "1.5"]
    )
    assert result.exit_code == 2 and "min_track_quality" in result.output


# --------------------------------------------------------------------------- the loader and the loss


def scene_sample(scores: np.ndarray | None, round_threshold: float | None = None) -> tuple[dict, np.ndarray]:
    """A decoded-sample dict (as `decode_sample` gives) of a generated scene, with or without scores."""
    scene = render_scene(3, num_frames=8, height=48, width=64, num_points=12)
    tracks = scene.tracks.transpose(1, 0, 2).astype(np.float32)
    visible = ~scene.occluded.T
    queries = np.concatenate([np.zeros((12, 1)), tracks[0]], axis=1).astype(np.float32)
    visible[0] = True
    label = {"tracks": tracks, "visibility": visible, "confidence": np.ones(visible.shape, np.float16)}
    meta = {"tracks_occluded": {"t": True}}
    if scores is not None:
        label["quality"] = scores.astype(np.float32)
        meta["quality"] = {"min_track_quality": round_threshold}
    return {"key": "s", "queries": queries, "labels": {"t": label}, "meta": meta}, scene.frames


SCORES = np.linspace(0.05, 0.95, 12)


def chosen_queries(clip: dict) -> set[tuple]:
    return {tuple(q) for q, ok in zip(clip["queries"].numpy().round(3), clip["valid"].numpy(), strict=True) if ok}


def test_min_track_quality_masks_tracks_in_the_loader_only():
    sample, frames = scene_sample(SCORES)
    spec = ClipSpec(num_frames=8, num_tracks=12, height=48, width=64)
    all_tracks = prepare_clip(sample, frames, spec, 8, np.random.default_rng(0))
    assert len(chosen_queries(all_tracks)) == 12  # no threshold: every track is supervised
    masked = prepare_clip(sample, frames, ClipSpec(8, 12, 48, 64, min_track_quality=0.5), 8, np.random.default_rng(0))
    kept = {tuple(q) for q in sample["queries"][SCORES >= 0.5].round(3)}
    assert chosen_queries(masked) == kept and int(masked["valid"].sum()) == len(kept) == 6
    # the round's threshold recorded in the sample applies when the training run sets none
    sample_r, _ = scene_sample(SCORES, round_threshold=0.5)
    by_round = prepare_clip(sample_r, frames, spec, 8, np.random.default_rng(0))
    assert chosen_queries(by_round) == kept
    assert sample_r["labels"]["t"]["quality"].shape == (12,)  # the sample itself is untouched


def test_quality_weighting_changes_the_loss_weights():
    sample, frames = scene_sample(SCORES)
    plain = prepare_clip(sample, frames, ClipSpec(8, 12, 48, 64), 8, np.random.default_rng(0))
    weighted = prepare_clip(
        sample, frames, ClipSpec(8, 12, 48, 64, quality_weighting=True), 8, np.random.default_rng(0)
    )
    assert torch.equal(plain["weights"], torch.ones(12))
    assert sorted(weighted["weights"].tolist()) == pytest.approx(sorted(SCORES.tolist()), abs=1e-6)
    batch = collate([weighted])
    target = batch["tracks"].float()
    pred = target.clone()
    pred[..., 0] += torch.linspace(0.0, 11.0, 12)  # errors grow with the track index
    windows = [WindowPrediction(0, [pred])]
    supervised = batch["valid"].unsqueeze(1).expand(-1, 8, -1)
    args = (windows, target, batch["visible"], supervised, batch["occluded_supervised"])
    equal = track_loss(*args)
    assert torch.allclose(track_loss(*args, track_weights=torch.ones(1, 12)), equal)
    weighted_loss = track_loss(*args, track_weights=batch["weights"])
    assert not torch.allclose(weighted_loss, equal)


def test_an_old_sample_without_scores_is_unknown_not_zero():
    sample, frames = scene_sample(None)
    spec = ClipSpec(8, 12, 48, 64, min_track_quality=0.9, quality_weighting=True)
    clip = prepare_clip(sample, frames, spec, 8, np.random.default_rng(0))
    assert int(clip["valid"].sum()) == 12 and torch.equal(clip["weights"], torch.ones(12))
    assert quality_colors(None, 3).tolist() == [[160, 160, 160]] * 3
    colors = quality_colors(np.array([0.0, 1.0, np.nan]), 3)
    assert colors[0, 0] > colors[0, 1] and colors[1, 1] > colors[1, 0] and colors[2].tolist() == [160, 160, 160]


@pytest.fixture(scope="module")
def old_workspace(tmp_path_factory) -> str:
    """A shard and catalog rows written the way rounds wrote them before scores existed."""
    path = str(tmp_path_factory.mktemp("oldws"))
    store = open_store(path)
    sink = ShardSink(store, "old", "b0", max_samples=4)
    committed = []
    for seed in range(2):
        scene = render_scene(seed, num_frames=12, height=64, width=96, num_objects=2, num_points=16)
        queries = np.concatenate([np.zeros((16, 1)), scene.tracks[:, 0]], axis=1).astype(np.float32)
        label = TeacherOutput(scene.tracks.transpose(1, 0, 2), ~scene.occluded.T, np.ones((12, 16), np.float16))
        meta = {"teachers": ["exact"], "tracks_occluded": {"exact": True}, "source_key": f"v{seed}.mp4", "fps": 24.0}
        row = {
            "video_key": f"v{seed}.mp4",
            "etag": "e",
            "status": "labelled",
            "sample_key": f"old{seed:09d}_00",
            "teachers": ["exact"],
            "round_id": "old",
            "batch_id": "b0",
        }
        committed += sink.add(
            Sample(row["sample_key"], encode_clip(scene.frames, 24.0), queries, {"exact": label}, meta), row
        )
    committed += sink.close()
    Catalog(store).append([r for c in committed for r in c.rows])
    return path


def test_an_old_shard_loads_trains_and_shows_with_quality_unknown(old_workspace, tmp_path):
    store = open_store(old_workspace)
    (manifest,) = committed_shards(store, "old")
    samples = list(read_shard(shard_url(store, manifest["shard"])))
    assert samples and all("quality" not in s["labels"]["exact"] for s in samples)
    assert all(quality_field("exact") not in s for s in samples)

    from pseudotrack.student.train import TrainConfig, run_training

    torch.set_num_threads(1)
    config = TrainConfig(
        workspace=old_workspace,
        output=str(tmp_path / "train"),
        model_size="tiny",
        steps=1,
        batch_size=1,
        num_frames=8,
        num_tracks=8,
        iters=1,
        workers=0,
        checkpoint_every=1,
        min_track_quality=0.9,
        quality_weighting=True,
    )
    result = run_training(config)
    assert result.steps == 1 and np.isfinite(result.final_loss) and result.final_loss > 0

    out = tmp_path / "show.png"
    shown = runner.invoke(
        app, ["show", "--workspace", old_workspace, "--video", "v0.mp4", "--out", str(out), "--color-by-quality"]
    )
    assert shown.exit_code == 0, shown.output
    assert "unknown" in shown.output and out.stat().st_size > 0

    result = runner.invoke(app, ["status", "--workspace", old_workspace, "--json"])
    quality = json.loads(result.output)["quality"]["old"]
    assert quality["unknown"] == 2 and quality["scored"] == 0 and quality["mean"] is None


def test_show_colours_a_scored_sample(scored_round, tmp_path):
    workspace, _ = scored_round
    row = labelled_rows(workspace)[0]
    out = tmp_path / "q.png"
    result = runner.invoke(
        app, ["show", "--workspace", workspace, "--sample", row["sample_key"], "--out", str(out), "--color-by-quality"]
    )
    assert result.exit_code == 0, result.output
    assert f"mean {row['quality_mean']:.3f}"[:9] in result.output


def test_dashboard_shows_the_quality_section(scored_round, old_workspace, tmp_path):
    from pseudotrack.dashboard import app as dash

    workspace, summary = scored_round
    mixed = tmp_path / "mixed"
    shutil.copytree(workspace, mixed)
    old = open_store(old_workspace)
    target = open_store(str(mixed))
    for info in old.list(""):
        target.write_bytes(info.key, old.read_bytes(info.key))
    board = dash.Dashboard(str(mixed), refresh_s=1.0)
    data = board.summary()
    rounds = {r["round_id"]: r for r in data["quality"]["rounds"]}
    assert rounds["q1"]["scored"] == summary["labelled"] and rounds["old"]["unknown"] == 2
    assert rounds["q1"]["calibration"]["lk"]["delta_avg"] == pytest.approx(summary["calibration"]["lk"]["delta_avg"])
    worst = rounds["q1"]["worst"]
    assert worst == sorted(worst, key=lambda w: w["quality_mean"])
    page = board.page()
    assert 'id="label-quality"' in page and "Label quality" in page
    assert "δ_avg" in page and f"{summary['calibration']['lk']['delta_avg']:.3f}" in page
    assert f"preview/{worst[0]['sample_key']}.png" in page
    assert "label quality of lk in q1" in page  # the histogram's label
    assert "2 unknown" in page
    assert board.preview(worst[0]["sample_key"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_scenes_sizes_or_turns_off_calibration(bucket, tmp_path):
    off = run_round(
        RoundConfig(
            bucket=str(bucket),
            workspace=str(tmp_path / "a"),
            round_id="o1",
            calibration_scenes=0,
            cpu_workers=0,
            **SMALL,
        )
    )
    assert off.labelled >= 2 and off.calibration == {}
    with pytest.raises(ConfigError, match="calibration_scenes=-1"):
        RoundConfig(bucket=str(bucket), workspace=str(tmp_path / "b"), calibration_scenes=-1)
