"""Planning at scale: a round over 20,000 listed videos (bench/bench_planning.py measures 100,000), and the
prefix-group S3 listing that discovery uses, checked against the plain listing on a real S3 server."""

from __future__ import annotations

import json

import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.flows.label_round import plan_round
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.s3 import S3Store
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks import discover as discover_module
from pseudotrack.tasks.discover import _prefix_groups as prefix_groups
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


@pytest.mark.parametrize("page_keys", [None, 3])  # the server's own page size, and 3-key pages
@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_s3_listing_by_prefix_groups_equals_the_plain_listing(s3_uri, layout, page_keys, monkeypatch):
    store = open_store(s3_uri)
    keys = ["captions.jsonl", "captions.jsonl.bak", "root.mp4", "a.json"]
    if layout == "folders":
        keys += [f"d{i}/sub/v{j}.mp4" for i in range(4) for j in range(6)] + ["d1.mp4", "d1x/v.mp4", "e/f/g.txt"]
        keys += ["d1-x.mp4", "d1/a-b.mp4"]  # '-' sorts before '/': a server listing folders first gets these wrong
    else:
        keys += [f"v{j:03d}.mp4" for j in range(20)]
    for key in keys:
        store.write_bytes(key, key.encode())
    monkeypatch.setattr(S3Store, "page_keys", page_keys)  # every listing then pages on, the group listings too
    groups = []
    monkeypatch.setattr(discover_module, "_prefix_groups", lambda *a: groups.append(prefix_groups(*a)) or groups[-1])
    plain = list(store.list())
    assert [i.key for i in plain] == sorted(keys)  # byte order, whatever order the server lists in
    parallel = list_objects(store)
    assert parallel == plain
    assert list_objects(store, include_unsafe=True) == list(store.list(include_unsafe=True))
    found = discover(store)  # pages sorted out as they arrive, from side-by-side groups in any order
    assert found.all_keys == sorted(keys)
    assert [v.key for v in found.videos] == sorted((k for k in keys if k.endswith(".mp4")), key=stable_order)
    assert groups and len(groups[0]) > 1
    assert all(sum(k.startswith(g) for g in groups[0]) == 1 for k in keys)  # disjoint, and cover every key


def test_a_flat_bucket_is_listed_in_one_go(s3_uri, monkeypatch):
    store = open_store(s3_uri)
    keys = [f"v{j:03d}.mp4" for j in range(discover_module.MAX_ROOT_OBJECTS + 1)]
    for key in keys:
        store.write_bytes(key, b"x")
    monkeypatch.setattr(S3Store, "page_keys", 10)
    assert prefix_groups(store, 32) is None
    assert [i.key for i in list_objects(store)] == keys


def test_prefix_groups_split_names_on_the_next_character(s3_uri):
    store = open_store(s3_uri)
    names = [f"clips{i:02d}/v.mp4" for i in range(20)] + ["a", "a/x.mp4", "ab.json", "captions.jsonl"]
    for key in names:
        store.write_bytes(key, b"x")
    assert prefix_groups(store, 2) == ["a", "c"]  # 'a' beside 'a/' and 'ab.json' stays whole, always
    assert prefix_groups(store, 4) == ["a", "ca", "clips0", "clips1"]
    assert prefix_groups(store, 8) == ["a", "ca", *(f"clips0{i}" for i in range(10)), "clips1"]
    assert prefix_groups(store, 100) == ["a", "ca", *(f"clips{i:02d}" for i in range(20))]  # as far as it goes
    assert prefix_groups(open_store(s3_uri + "/clips00"), 4) is None  # one name: nothing to split


def test_s3_listing_pages_follow_continuation_tokens(s3_uri, monkeypatch):
    store = open_store(s3_uri)
    keys = sorted(f"clips/v{j:02d}.mp4" for j in range(11)) + ["clips/v00.txt"]
    for key in keys:
        store.write_bytes(key, b"x")
    monkeypatch.setattr(S3Store, "page_keys", 4)
    pages = list(store.list_pages("clips/"))
    assert [len(page["Contents"]) for page in pages] == [4, 4, 4]
    assert [i.key for i in store.list("clips/", (".mp4",))] == sorted(k for k in keys if k.endswith(".mp4"))
