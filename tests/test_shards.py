"""Shard writing: real WebDataset tars, manifests as commit markers, exact read-back, local and S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from pseudotrack.render import shard_url
from pseudotrack.tasks.shards import Sample, ShardSink, committed_shards, read_shard, to_jsonable
from pseudotrack.teachers.base import TeacherOutput


def make_sample(i: int, teachers=("lk",), t: int = 6, n: int = 5) -> Sample:
    rng = np.random.default_rng(i)
    labels = {
        name: TeacherOutput(
            rng.normal(size=(t, n, 2)).astype(np.float32) * 50,
            rng.random((t, n)) > 0.3,
            rng.random((t, n)).astype(np.float16),
        )
        for name in teachers
    }
    queries = np.column_stack([rng.integers(0, t, n), rng.random((n, 2)) * 100]).astype(np.float32)
    meta = {"source_key": f"videos/clip {i}.v1.mp4", "fps": np.float64(12.5), "frame_indices": np.arange(t)}
    return Sample(f"k{i:04d}_00", rng.bytes(1000 + i), queries, labels, meta)


def row_for(sample: Sample) -> dict:
    return {
        "video_key": sample.meta["source_key"],
        "etag": "e",
        "status": "labelled",
        "sample_key": sample.key,
        "teachers": sorted(sample.labels),
        "round_id": "r",
        "batch_id": "b1",
    }


def test_shards_roll_over_and_read_back_exactly(store):
    sink = ShardSink(store, "r", "b1", max_samples=3)
    samples = [make_sample(i, teachers=("lk", "tapir") if i % 2 else ("lk",)) for i in range(7)]
    committed = []
    for sample in samples:
        committed += sink.add(sample, row_for(sample))
        # a shard in progress is not visible: only committed ones have manifests
        assert len(committed_shards(store, "r")) == len(committed)
    committed += sink.close()
    assert [len(c.sample_keys) for c in committed] == [3, 3, 1]
    manifests = committed_shards(store, "r")
    assert [m["shard"] for m in manifests] == [c.key for c in committed]
    assert manifests[0]["teachers"] == {"lk": 3, "tapir": 1}
    assert all(m["bytes"] == store.info(m["shard"]).size for m in manifests)
    assert [r["shard_id"] for r in manifests[2]["rows"]] == [committed[2].key]
    by_key = {s.key: s for s in samples}
    read = [s for m in manifests for s in read_shard(shard_url(store, m["shard"]))]
    assert [s["key"] for s in read] == [s.key for s in samples]
    for got in read:
        want = by_key[got["key"]]
        assert got["clip"] == want.clip
        np.testing.assert_array_equal(got["queries"], want.queries)
        assert set(got["labels"]) == set(want.labels)
        for name, out in want.labels.items():
            np.testing.assert_array_equal(got["labels"][name]["tracks"], out.tracks)
            np.testing.assert_array_equal(got["labels"][name]["visibility"], out.visibility)
            np.testing.assert_array_equal(got["labels"][name]["confidence"], out.confidence)
            assert got["labels"][name]["visibility"].dtype == bool
        assert got["meta"]["fps"] == 12.5 and got["meta"]["frame_indices"] == list(range(6))


def test_abort_leaves_nothing_visible(store):
    sink = ShardSink(store, "r", "b2", max_samples=10)
    sink.add(make_sample(1), row_for(make_sample(1)))
    sink.abort()
    assert committed_shards(store, "r") == []
    assert list(store.list("shards/")) == []


def test_shards_hold_no_pickles(tmp_path):
    from pseudotrack.storage.uri import open_store

    store = open_store(str(tmp_path))
    sink = ShardSink(store, "r", "b3")
    sink.add(make_sample(2), row_for(make_sample(2)))
    (shard,) = sink.close()
    names = [name for raw in wds.WebDataset(str(tmp_path / shard.key), shardshuffle=False) for name in raw]
    assert not [n for n in names if n.endswith((".pyd", ".pickle", ".pkl"))]
    # every .npy loads without allow_pickle
    assert next(iter(read_shard(str(tmp_path / shard.key))))["queries"].dtype == np.float32


def test_jsonable_converts_numpy():
    value = {"a": np.int64(3), "b": [np.float32(1.5)], "c": np.zeros(2, np.uint8)}
    assert json.loads(json.dumps(to_jsonable(value))) == {"a": 3, "b": [1.5], "c": [0, 0]}


def test_sample_shapes_are_checked():
    with pytest.raises(ValueError, match="shapes disagree"):
        TeacherOutput(np.zeros((4, 3, 2)), np.zeros((4, 2), bool), np.zeros((4, 3)))
