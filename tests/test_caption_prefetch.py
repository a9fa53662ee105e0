"""The caption stage started while the bucket is listed reads and judges exactly what the plan would have read
and judged after the listing, each object once."""

from __future__ import annotations

import json
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.errors import ConfigError
from pseudotrack.flows.label_round import plan_round, start_captions
from pseudotrack.storage.base import ObjectInfo
from pseudotrack.storage.s3 import S3Store
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.caption_filter import MANIFEST_NAMES, sidecar_map
from pseudotrack.tasks.discover import discover, list_objects

KEEP, DROP = "A dog runs across a park.", "An animated cartoon fox."
NFD = unicodedata.normalize("NFD", "m/café.mp4")

BUCKET = {
    "captions.jsonl": "\n".join(
        json.dumps({"file": k, "caption": c})
        for k, c in [("m/a.mp4", KEEP), ("m/b.mp4", DROP), (unicodedata.normalize("NFC", NFD), KEEP)]
    ),
    "m/a.mp4": "video",
    "m/a.txt": DROP,  # the manifest captions m/a.mp4: this sidecar is never read
    "m/b.mp4": "video",
    NFD: "video",  # captioned by the manifest's NFC entry
    "s/c.mp4": "video",
    "s/c.txt": KEEP,
    "s/d.mp4": "video",
    "s/d.json": json.dumps({"caption": DROP}),
    "s/e.mp4": "video",
    "s/e.json": json.dumps({"caption": DROP}),
    "s/e.txt": KEEP,  # .txt wins over .json
    "s/f.mp4": "video",
    "s/f.json": "{not json",
    "s/g.mp4": "video",  # no caption anywhere: the missing-caption policy decides
    "s/orphan.txt": KEEP,  # no video: never read
}
SIDECARS_NEEDED = {"s/c.txt", "s/d.json", "s/e.txt", "s/f.json"}


class CountingStore:
    """The bucket, with every object read recorded as it starts and as it ends (reads run on many threads)."""

    def __init__(self, store):
        self._store = store
        self.reads: list[str] = []
        self.finished: list[str] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _read(self, key: str, read):
        self.reads.append(key)  # list.append is atomic
        try:
            return read()
        finally:
            self.finished.append(key)

    def read_bytes(self, key: str) -> bytes:
        return self._read(key, lambda: self._store.read_bytes(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self._read(key, lambda: self._store.read_range(key, start, length))

    def wait_for(self, keys: set[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= set(self.finished):
            assert time.monotonic() < deadline, f"reads not done: {sorted(keys - set(self.finished))}"
            time.sleep(0.01)


def fill(store, objects: dict[str, str]) -> None:
    for key, text in objects.items():
        store.write_bytes(key, text.encode())


def outcome(planned, rows, reused) -> tuple:
    verdicts = sorted((r["video_key"], r["status"], r.get("filter_rule"), r.get("reason")) for r in rows)
    return sorted((v.key, v.caption) for v in planned), verdicts, reused


def plan_after_listing(config: RoundConfig, store) -> tuple:
    """The plan as made without a prefetch: every caption read after the listing."""
    discovery = discover(store)
    return outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}))


@pytest.fixture
def bucket(tmp_path) -> tuple[RoundConfig, CountingStore]:
    root = tmp_path / "bucket"
    fill(open_store(str(root)), BUCKET)
    config = RoundConfig(bucket=str(root), workspace=str(tmp_path / "ws"), round_id="r")
    return config, CountingStore(open_store(str(root)))


def test_sidecars_are_read_while_listing_and_the_plan_is_the_same(bucket):
    config, store = bucket
    expected = plan_after_listing(config, store)
    assert expected[0] == [("m/a.mp4", KEEP), (NFD, KEEP), ("s/c.mp4", KEEP), ("s/e.mp4", KEEP), ("s/g.mp4", None)]
    store.reads.clear()
    store.finished.clear()  # else the earlier plan's reads would satisfy wait_for below at once
    with start_captions(config, store) as captions:
        discovery = discover(store, on_page=captions.add)
        captions.index(discovery.all_keys)  # waits until every page seen has had its reads sent
        store.wait_for(SIDECARS_NEEDED)
        before_plan = sorted(store.reads)
        got = outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions))
    assert got == expected
    assert before_plan == sorted(["captions.jsonl", *SIDECARS_NEEDED])  # all read before the plan began
    assert sorted(store.reads) == before_plan  # and none read again by the plan


@pytest.mark.parametrize("order", ["one key a page, in key order", "one key a page, backwards", "pages of 3, shuffled"])
def test_pages_in_any_split_and_order_give_the_same_plan(bucket, order):
    """Groups listed side by side arrive in any order, and a video's sidecar may come pages after it."""
    config, store = bucket
    expected = plan_after_listing(config, store)
    discovery = discover(store)
    infos = [ObjectInfo(k, 1, "e", 0.0) for k in sorted(discovery.all_keys)]
    if order == "one key a page, in key order":
        pages = [[i] for i in infos]
    elif order == "one key a page, backwards":
        pages = [[i] for i in reversed(infos)]
    else:
        pages = [infos[i : i + 3] for i in range(0, len(infos), 3)]
        pages = pages[1::2] + pages[::2]
    store.reads.clear()
    with start_captions(config, store) as captions:
        for page in pages:
            captions.add(page)
        # the scans saw every key: their sidecar choice stands for the one made over the whole listing
        assert captions.index(discovery.all_keys)._sidecars == sidecar_map(discovery.all_keys)
        got = outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions))
    assert got == expected
    assert len(store.reads) == len(set(store.reads))  # nothing read twice
    # in key order s/e.json shows up before s/e.txt, and is read before the better sidecar is seen
    assert SIDECARS_NEEDED <= set(store.reads) <= {"captions.jsonl", "s/e.json", *SIDECARS_NEEDED}


def test_a_listing_the_scans_did_not_all_see_has_its_sidecars_found_from_the_keys(bucket):
    """The watcher passes its own listing: what the prefetch saw of pages does not decide the sidecars."""
    config, store = bucket
    keys = discover(store).all_keys
    with start_captions(config, store) as captions:
        captions.add([ObjectInfo(k, 1, "e", 0.0) for k in keys if k != "s/e.txt"])  # s/e.json would win
        assert captions.index(keys)._sidecars == sidecar_map(keys)
        assert captions.index(keys)._sidecars["s/e"] == "s/e.txt"


def test_a_sidecar_removed_after_the_listing_fails_its_video_with_the_reason(bucket):
    config, store = bucket
    with start_captions(config, store) as captions:
        discovery = discover(store, on_page=captions.add)
        captions.index(discovery.all_keys)
        store.wait_for(SIDECARS_NEEDED)
        Path(config.bucket, "s/c.txt").unlink()  # read already: the bytes read stand
        Path(config.bucket, "s/f.json").write_text(json.dumps({"caption": KEEP}))  # read before the change
        prefetched = outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions))
    assert ("s/c.mp4", KEEP) in prefetched[0]
    assert (
        "s/f.mp4",
        "failed",
        None,
        "caption sidecar s/f.json is not valid JSON (Expecting property name enclosed in double quotes)",
    ) in prefetched[1]

    discovery = discover(store)
    Path(config.bucket, "s/e.txt").unlink()  # listed, then removed before the plan reads it
    _, rows, _ = outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}))
    assert (
        "s/e.mp4",
        "failed",
        None,
        "caption sidecar s/e.txt was removed after the bucket was listed: run again with --retry-failed",
    ) in rows


def test_a_round_capped_at_n_videos_reads_sidecars_only_as_it_walks(tmp_path):
    root = tmp_path / "bucket"
    fill(
        open_store(str(root)),
        {**{f"v{i:04d}.mp4": "v" for i in range(600)}, **{f"v{i:04d}.txt": KEEP for i in range(600)}},
    )
    store = CountingStore(open_store(str(root)))
    config = RoundConfig(bucket=str(root), workspace=str(tmp_path / "ws"), round_id="r", videos=5)
    with start_captions(config, store) as captions:
        discovery = discover(store, on_page=captions.add)
        captions.index(discovery.all_keys)
        assert set(store.reads) == set(MANIFEST_NAMES)  # each looked for; no sidecar read ahead of the walk
        planned, _, _ = plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions)
    assert len(planned) == 5
    sidecars = [key for key in store.reads if key.endswith(".txt")]
    assert 5 <= len(sidecars) <= 256  # one chunk of the walk, not the 600 sidecars


def test_a_missing_captions_manifest_is_a_config_error_naming_it(bucket, tmp_path):
    config, store = bucket
    config.captions = str(tmp_path / "nowhere" / "captions.csv")
    with start_captions(config, store) as captions, pytest.raises(ConfigError, match="nowhere/captions.csv does not"):
        discovery = discover(store, on_page=captions.add)
        plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions)
    config.captions = "captions.jsonl"  # a manifest in the bucket, named
    assert plan_after_listing(config, store)[0][0] == ("m/a.mp4", KEEP)


def test_on_s3_every_page_is_shown_once_and_the_plan_is_the_same(s3_uri, monkeypatch):
    store = open_store(s3_uri)
    fill(store, BUCKET)
    monkeypatch.setattr(S3Store, "page_keys", 3)  # many pages, from prefix groups side by side
    shown: list[list[str]] = []
    lock = threading.Lock()

    def on_page(objects):
        with lock:
            shown.append([o.key for o in objects])

    listed = list_objects(store, on_page=on_page)
    assert len(shown) > 2 and sorted(k for page in shown for k in page) == [i.key for i in listed]

    config = RoundConfig(bucket=s3_uri, workspace=s3_uri + "-ws", round_id="r")
    expected = plan_after_listing(config, store)
    with start_captions(config, store) as captions:
        discovery = discover(store, on_page=captions.add)
        got = outcome(*plan_round(config, store, discovery.videos, discovery.all_keys, {}, captions))
    assert got == expected and len(got[0]) == 5
