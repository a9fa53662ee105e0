"""End to end: a generated bucket mixed with the real clips, labelled locally and on S3."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.errors import ConfigError
from pseudotrack.flows.label_round import run_label_round_flow, run_round
from pseudotrack.render import shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.clip_codec import decode_clip_bytes
from pseudotrack.tasks.shards import committed_shards, read_shard
from pseudotrack.teachers.lk import LKTeacher

SMALL = dict(height=96, width=128, num_frames=16, min_frames=8, num_queries=48, num_keyframes=4, batch_size=4)


@pytest.fixture(scope="module")
def local_bucket(tmp_path_factory, shared_dir):
    """8 generated clips (a third with captions the filter drops), one broken file, the three real clips."""
    root = tmp_path_factory.mktemp("bucket")
    write_demo_bucket(root, videos=8, frames=20, height=120, width=160, seed=3, broken=1, include=shared_dir / "videos")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file named like a video", encoding="utf-8")
    shutil.copyfile(shared_dir / "videos" / "cat.mp4", root / "unreadable caption.mp4")
    (root / "unreadable caption.txt").write_bytes(b"a cat \xff\xfe on a sofa")
    return root


def expected_states(bucket) -> dict[str, str]:
    return {
        "bear.mp4": "labelled",
        "cat.mp4": "labelled",
        "apple.mp4": "filtered",
        "broken_00.mp4": "failed",
        "empty.mp4": "failed",
        "notes.mp4": "failed",
        "unreadable caption.mp4": "failed",
    }


def latest_by_key(workspace_uri: str) -> dict[str, dict]:
    return {r["video_key"]: r for r in Catalog(open_store(workspace_uri)).latest().to_pylist()}


def check_round(bucket, workspace_uri: str, config: RoundConfig, summary) -> dict[str, dict]:
    rows = latest_by_key(workspace_uri)
    videos = sorted(p.name for p in bucket.iterdir() if p.suffix == ".mp4")
    # every video ends in exactly one terminal state
    assert sorted(rows) == videos
    assert {r["status"] for r in rows.values()} <= {"labelled", "filtered", "failed"}
    for key, state in expected_states(bucket).items():
        assert rows[key]["status"] == state, (key, rows[key])
    assert rows["apple.mp4"]["filter_rule"] == "no-keep-match"
    assert "0 bytes" in rows["empty.mp4"]["reason"] or "empty" in rows["empty.mp4"]["reason"]
    for key in ("broken_00.mp4", "notes.mp4", "empty.mp4"):
        assert rows[key]["stage"] == "decode" and rows[key]["reason"]
    assert rows["unreadable caption.mp4"]["stage"] == "caption"
    assert "UTF-8" in rows["unreadable caption.mp4"]["reason"]
    assert summary["labelled"] == sum(r["status"] == "labelled" for r in rows.values())
    # shards read back into the arrays that were written, and no sample twice
    store = open_store(workspace_uri)
    manifests = committed_shards(store, config.round_id)
    seen: dict[str, dict] = {}
    for manifest in manifests:
        samples = list(read_shard(shard_url(store, manifest["shard"])))
        assert [s["key"] for s in samples] == manifest["samples"]
        for sample in samples:
            assert sample["key"] not in seen
            seen[sample["key"]] = sample
    labelled = {r["sample_key"]: r for r in rows.values() if r["status"] == "labelled"}
    assert set(seen) == set(labelled)
    for key, sample in seen.items():
        meta, row = sample["meta"], labelled[key]
        assert meta["source_key"] == row["video_key"] and meta["teachers"] == ["lk"]
        frames = decode_clip_bytes(sample["clip"])
        t = len(frames)
        assert frames.shape == (t, config.height, config.width, 3)
        assert sample["queries"].shape == (config.num_queries, 3) and sample["queries"].dtype == np.float32
        lk = sample["labels"]["lk"]
        assert lk["tracks"].shape == (t, config.num_queries, 2) and lk["tracks"].dtype == np.float32
        assert lk["visibility"].dtype == bool and lk["confidence"].dtype == np.float16
        # the labels are the teacher's output on the stored clip's frames
        assert t == meta["num_frames"] == row["clip_frames"]
    return rows


def test_round_local_then_rerun_and_change(local_bucket, tmp_path):
    bucket = tmp_path / "bucket"
    shutil.copytree(local_bucket, bucket)
    workspace = str(tmp_path / "ws")
    config = RoundConfig(bucket=str(bucket), workspace=workspace, round_id="r1", seed=7, **SMALL)
    summary = run_round(config).to_dict()
    rows = check_round(bucket, workspace, config, summary)
    assert summary["filtered"] >= 3 and summary["failed"] >= 3

    # the labels equal what the teacher gives on the stored frames
    store = open_store(workspace)
    manifest = committed_shards(store, "r1")[0]
    sample = next(iter(read_shard(shard_url(store, manifest["shard"]))))
    teacher = LKTeacher()
    teacher.setup("cpu")
    again = teacher.predict(decode_clip_bytes(sample["clip"]), sample["queries"])
    assert np.mean(np.abs(again.tracks - sample["labels"]["lk"]["tracks"])) < 1.0

    # a re-run labels nothing twice
    second = run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id="r2", seed=7, **SMALL))
    assert second.labelled == 0 and second.failed == 0 and second.filtered == 0
    eligible = [r for r in rows.values() if r["status"] != "filtered" and r["stage"] != "caption"]
    assert second.reused == len(eligible)

    # a changed object is labelled again
    shutil.copyfile(bucket / "cat.mp4", bucket / "bear.mp4")
    third = run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id="r3", seed=7, **SMALL))
    assert third.labelled == 1
    after = latest_by_key(workspace)
    assert after["bear.mp4"]["round_id"] == "r3" and after["bear.mp4"]["etag"] != rows["bear.mp4"]["etag"]


def test_round_is_reproducible(local_bucket, tmp_path):
    results = []
    for name in ("a", "b"):
        config = RoundConfig(
            bucket=str(local_bucket), workspace=str(tmp_path / name), round_id="same", seed=11, **SMALL
        )
        run_round(config)
        store = open_store(str(tmp_path / name))
        samples = {}
        for manifest in committed_shards(store, "same"):
            for s in read_shard(shard_url(store, manifest["shard"])):
                samples[s["key"]] = s
        results.append(samples)
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key]["queries"], results[1][key]["queries"])
        np.testing.assert_array_equal(
            results[0][key]["labels"]["lk"]["tracks"], results[1][key]["labels"]["lk"]["tracks"]
        )


def test_videos_limit_takes_a_stable_prefix(local_bucket, tmp_path):
    workspace = str(tmp_path / "ws")
    small = run_round(RoundConfig(bucket=str(local_bucket), workspace=workspace, round_id="n3", videos=3, **SMALL))
    assert small.labelled + small.failed == 3
    first = {k for k, r in latest_by_key(workspace).items() if r["status"] != "filtered"}
    big = run_round(RoundConfig(bucket=str(local_bucket), workspace=workspace, round_id="n6", videos=6, **SMALL))
    assert big.reused == 3 and big.labelled + big.failed == 3
    rows = latest_by_key(workspace)
    assert all(rows[k]["round_id"] == "n3" for k in first)


def test_bad_bucket_or_workspace_stops_at_once(tmp_path, local_bucket):
    with pytest.raises(ConfigError, match="no-such-bucket"):
        run_round(RoundConfig(bucket=str(tmp_path / "no-such-bucket"), workspace=str(tmp_path / "ws")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="file"):
        run_round(RoundConfig(bucket=str(local_bucket), workspace=str(blocker / "ws")))
    with pytest.raises(ConfigError, match="cotracker3_online"):
        run_round(
            RoundConfig(bucket=str(local_bucket), workspace=str(tmp_path / "ws2"), teachers=["cotracker3_online"])
        )
    assert not (tmp_path / "ws2" / "catalog").exists()


def test_round_on_s3_through_prefect(local_bucket, s3_uri, prefect_server):
    import boto3

    bucket_uri = s3_uri + "/videos"
    workspace_uri = s3_uri + "/workspace"
    bucket_name, _, prefix = bucket_uri[len("s3://") :].partition("/")
    client = boto3.client("s3")
    for path in sorted(local_bucket.iterdir()):
        client.upload_file(str(path), bucket_name, f"{prefix}/{path.name}")
    config = RoundConfig(bucket=bucket_uri, workspace=workspace_uri, round_id="s3-round", seed=5, workers=2, **SMALL)
    summary = run_label_round_flow(config)
    check_round(local_bucket, workspace_uri, config, summary)
    saved = json.loads(open_store(workspace_uri).read_bytes("runs/s3-round/summary.json"))
    assert saved["labelled"] == summary["labelled"]
    # progress and summary artifacts were published to the Prefect API
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["label-progress-s3-round", "label-summary-s3-round"])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"label-progress-s3-round", "label-summary-s3-round"}
    assert float(by_key["label-progress-s3-round"].data) == 100.0
    assert f"| labelled | {summary['labelled']} |" in by_key["label-summary-s3-round"].data


def test_query_sampling_settings_reach_the_sampler(tmp_path):
    """The round's SIFT settings are the ones used: a strong start bias pulls keyframes early, a high floor fails."""
    bucket = tmp_path / "bucket"
    write_demo_bucket(bucket, videos=4, frames=24, height=96, width=128, seed=5, broken=0)
    small = dict(SMALL, num_frames=24, num_keyframes=4)

    def query_frames(name: str, **settings) -> list[float]:
        workspace = str(tmp_path / name)
        run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id=name, **small, **settings))
        store = open_store(workspace)
        return [
            float(s["queries"][:, 0].mean())
            for m in committed_shards(store, name)
            for s in read_shard(shard_url(store, m["shard"]))
        ]

    early, uniform = query_frames("early", query_start_bias=50.0), query_frames("uniform", query_start_bias=0.0)
    assert len(early) == len(uniform) >= 2
    assert max(early) < 3 < min(uniform), (early, uniform)  # weight exp(-50 t/24) leaves only the first frames

    run_round(
        RoundConfig(
            bucket=str(bucket),
            workspace=str(tmp_path / "floor"),
            round_id="floor",
            **small,
            query_min_per_keyframe=10_000,
        )
    )
    rows = latest_by_key(str(tmp_path / "floor"))
    failed = [r for r in rows.values() if r["status"] != "filtered"]
    assert len(failed) == len(early) and {r["status"] for r in failed} == {"failed"}
    assert all(r["stage"] == "queries" and "at least 10000 on each" in r["reason"] for r in failed)
    with pytest.raises(ConfigError, match="query_start_bias"):
        RoundConfig(bucket="b", workspace="w", query_start_bias=-1)


def test_a_round_folds_its_catalog_as_it_goes(tmp_path, monkeypatch):
    """One event file per batch would make `status` slower with every batch; the round folds them."""
    import pseudotrack.storage.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "COMPACT_AT_FILES", 3)
    bucket = tmp_path / "bucket"
    write_demo_bucket(bucket, videos=7, frames=12, height=64, width=96, seed=1, broken=0)
    workspace = str(tmp_path / "ws")
    folds: list[int] = []
    real = Catalog.compact_if_needed

    def counting(self, threshold=None):
        folds.append(real(self, threshold))
        return folds[-1]

    monkeypatch.setattr(Catalog, "compact_if_needed", counting)
    config = RoundConfig(
        bucket=str(bucket), workspace=workspace, round_id="fold", teachers=["noop"], **dict(SMALL, batch_size=1)
    )
    summary = run_round(config)
    assert summary.labelled >= 4
    assert sum(1 for n in folds if n) >= 2, folds  # folded during the round, not only at its end
    catalog = Catalog(open_store(workspace))
    assert len(catalog.files()) < 3
    latest = catalog.latest().to_pylist()
    assert len(latest) == 7 and sum(r["status"] == "labelled" for r in latest) == summary.labelled
    assert catalog.events().num_rows == len(set(catalog.events()["event_id"].to_pylist()))


def test_a_round_on_seaweedfs_matches_the_same_round_on_local_disk(local_bucket, s3_uri, tmp_path):
    """Bucket and workspace on a real S3 server (SeaweedFS) label, filter and fail exactly the videos a local
    round does, for the same reasons, with byte-identical labels."""
    import boto3

    bucket_uri, workspace_uri = s3_uri + "/same-videos", s3_uri + "/same-workspace"
    bucket_name, _, prefix = bucket_uri[len("s3://") :].partition("/")
    for path in sorted(local_bucket.iterdir()):
        boto3.client("s3").upload_file(str(path), bucket_name, f"{prefix}/{path.name}")
    local_ws = str(tmp_path / "local-ws")
    for bucket, workspace in ((str(local_bucket), local_ws), (bucket_uri, workspace_uri)):
        run_round(RoundConfig(bucket=bucket, workspace=workspace, round_id="same", seed=7, **SMALL))

    def outcome(workspace: str) -> dict[str, tuple]:
        return {
            key: (row["status"], row["stage"], row["reason"], row["filter_rule"])
            for key, row in latest_by_key(workspace).items()
        }

    def labels(workspace: str) -> dict[str, dict]:
        store = open_store(workspace)
        return {
            # by source video: sample keys hash the ETag, which differs between a disk and S3
            sample["meta"]["source_key"]: {
                name: {k: v.tobytes() for k, v in arrays.items()} for name, arrays in sample["labels"].items()
            }
            for manifest in committed_shards(store, "same")
            for sample in read_shard(shard_url(store, manifest["shard"]))
        }

    local, s3 = outcome(local_ws), outcome(workspace_uri)
    assert {s for s, *_ in local.values()} == {"labelled", "filtered", "failed"}
    assert s3 == local
    assert labels(workspace_uri) == labels(local_ws) and labels(local_ws)
