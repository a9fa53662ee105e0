"""Planning at scale: a round over 20,000 listed videos (bench/bench_planning.py measures 100,000), and the
folder-parallel S3 listing that discovery uses, checked against the plain listing."""

from __future__ import annotations

import json

import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.flows.label_round import plan_round
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.objects import open_store
from pseudotrack.tasks.discover import batches, discover, list_objects, stable_order

VIDEOS = 20_000
KEPT = ["A dog runs across a park.", "A woman walks her bicycle.", "Two children play catch."]
DROPPED = ["An animated cartoon fox.", "Time-lapse of clouds.", "Waves crash on a beach."]
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 16


@pytest.fixture(scope="module")
def big_bucket(tmp_path_factory):
    """20,000 tiny objects named like videos in 50 folders; a manifest captions 99%, sidecars the rest.

    Returns (root, the keys the caption filter keeps)."""
    root = tmp_path_factory.mktemp("big-bucket")
    manifest, kept = [], []
    for i in range(VIDEOS):
        folder = root / f"f{i % 50:02d}"
        folder.mkdir(exist_ok=True)
        key = f"f{i % 50:02d}/v{i:06d}.mp4"
        (root / key).write_bytes(FAKE_MP4)
        caption = DROPPED[i % 3] if i % 3 == 2 else KEPT[i % 3]
        if i % 3 != 2:
            kept.append(key)
        if i % 100 == 7:
            (root / key).with_suffix(".txt").write_text(caption)
        else:
            manifest.append(json.dumps({"file": key, "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(manifest) + "\n")
    return root, kept


def test_a_round_over_20000_videos_plans_every_one_and_records_every_verdict(big_bucket, tmp_path):
    root, kept = big_bucket
    config = RoundConfig(bucket=str(root), workspace=str(tmp_path / "ws"), round_id="big", batch_size=64)
    bucket = open_store(config.bucket)
    catalog = Catalog(open_store(config.workspace))

    discovery = discover(bucket)
    assert len(discovery.videos) == VIDEOS and len(discovery.all_keys) == VIDEOS + VIDEOS // 100 + 1
    assert [v.order for v in discovery.videos] == sorted(stable_order(v.key) for v in discovery.videos)
    planned, rows, reused = plan_round(config, bucket, discovery.videos, discovery.all_keys, catalog.done())
    assert sorted(v.key for v in planned) == sorted(kept) and reused == 0
    assert len(rows) == VIDEOS - len(kept) and {r["status"] for r in rows} == {"filtered"}
    sidecar_kept = [v for v in planned if int(v.key[-10:-4]) % 100 == 7]
    assert sidecar_kept and all(v.caption in KEPT for v in sidecar_kept)  # captions read from the sidecars
    catalog.append([dict(r, round_id="big", batch_id="plan") for r in rows])
    assert len(batches(planned, config.batch_size)) == -(-len(kept) // 64)
    done = catalog.done()
    assert len(done) == len(rows) and all(done[r["video_key"]] == r["etag"] for r in rows)


def test_videos_n_is_the_first_n_eligible_in_stable_order_and_grows_by_prefix(big_bucket, tmp_path):
    root, kept = big_bucket
    bucket = open_store(str(root))
    discovery = discover(bucket)
    first_kept = sorted(kept, key=stable_order)

    def plan(n: int, done: dict):
        config = RoundConfig(bucket=str(root), workspace=str(tmp_path / "ws"), videos=n)
        return plan_round(config, bucket, discovery.videos, discovery.all_keys, done)

    small, _, reused = plan(1000, {})
    assert [v.key for v in small] == first_kept[:1000] and reused == 0
    # once the 1000 are done, a round of 3000 reuses them and plans exactly the next 2000 eligible
    done = {v.key: v.etag for v in small}
    big, _, reused = plan(3000, done)
    assert reused == 1000 and [v.key for v in big] == first_kept[1000:3000]


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_folder_parallel_s3_listing_equals_the_plain_listing(s3_uri, layout):
    store = open_store(s3_uri)
    keys = ["captions.jsonl", "captions.jsonl.bak", "root.mp4", "a.json"]
    if layout == "folders":
        keys += [f"d{i}/sub/v{j}.mp4" for i in range(4) for j in range(6)] + ["d1.mp4", "d1x/v.mp4", "e/f/g.txt"]
    else:
        keys += [f"v{j:03d}.mp4" for j in range(20)]
    for key in keys:
        store.write_bytes(key, key.encode())
    plain = list(store.list())
    parallel = list_objects(store)
    assert parallel == plain and sorted(i.key for i in parallel) == sorted(keys)
    assert list_objects(store, include_unsafe=True) == list(store.list(include_unsafe=True))
