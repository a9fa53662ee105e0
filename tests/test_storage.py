"""Object store: the same behaviour on a local directory and on S3 (a real SeaweedFS server through boto3)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import threading

import boto3
import pytest

from pseudotrack.errors import ConfigError
from pseudotrack.storage import layout
from pseudotrack.storage import s3 as s3_module
from pseudotrack.storage.base import TMP_MARK, ObjectStore
from pseudotrack.storage.local import LocalStore
from pseudotrack.storage.s3 import S3Store, register_s3_gopen
from pseudotrack.storage.uri import open_store


def raw_keys(store: ObjectStore) -> list[str]:
    """Everything physically under the store's root, temporary files included."""
    if isinstance(store, LocalStore):
        return sorted(
            os.path.relpath(os.path.join(d, f), store.root) for d, _, files in os.walk(store.root) for f in files
        )
    client = boto3.client("s3")
    contents = client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix).get("Contents", [])
    return sorted(o["Key"][len(store.prefix) :] for o in contents)


class Unplugged(Exception):
    pass


class FailingReader(io.BytesIO):
    """A source that breaks half-way, like a dying disk or a killed producer."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= len(self.getbuffer()) // 2:
            raise Unplugged("source went away half-way")
        return super().read(min(size if size and size > 0 else 1 << 20, len(self.getbuffer()) // 2))


def test_keys_with_spaces_dots_and_unicode_round_trip(store: ObjectStore) -> None:
    keys = ["plain.mp4", "with space/clip 1.mp4", "dots/bear.001.v2.mp4", "ünïcödé/熊.mp4", "deep/a/b/c.bin"]
    for i, key in enumerate(keys):
        info = store.write_bytes(key, f"payload {i}".encode())
        assert info.key == key and info.size == len(f"payload {i}")
    for i, key in enumerate(keys):
        assert store.read_bytes(key) == f"payload {i}".encode()
        assert store.exists(key)
        assert store.info(key).size == len(f"payload {i}")
    assert [i.key for i in store.list()] == sorted(keys)
    # a store opened from the object's own URI's folder sees the same bytes
    parent = open_store(store.uri("ünïcödé"))
    assert parent.read_bytes("熊.mp4") == b"payload 3"


def test_listing_is_sorted_recursive_and_filtered(store: ObjectStore) -> None:
    keys = ["z.txt", "a/b.mp4", "a-c.mp4", "A.MP4", "b/x.tar", "b/x.tar.json", "a/sub/deep.webm", "ab.mp4"]
    for key in keys:
        store.write_bytes(key, b"x")
    listed = [i.key for i in store.list()]
    assert listed == sorted(keys)  # byte order, as S3 lists: "a-c.mp4" < "a/b.mp4"
    assert listed.index("a-c.mp4") < listed.index("a/b.mp4")
    assert [i.key for i in store.list(suffixes=(".mp4",))] == ["A.MP4", "a-c.mp4", "a/b.mp4", "ab.mp4"]
    assert [i.key for i in store.list("a/")] == ["a/b.mp4", "a/sub/deep.webm"]
    # a plain string prefix, as on S3: "a" matches the folder and the files that start with it
    assert [i.key for i in store.list("a")] == ["a-c.mp4", "a/b.mp4", "a/sub/deep.webm", "ab.mp4"]
    assert [i.key for i in store.list("b/", suffixes=(".tar",))] == ["b/x.tar"]
    assert list(store.list("nothing/here/")) == []


def test_write_is_atomic_and_a_failed_write_keeps_the_old_object(store: ObjectStore) -> None:
    store.write_bytes("obj.bin", b"old content")
    with pytest.raises(Unplugged):
        store.write_bytes("obj.bin", FailingReader(os.urandom(3 << 20)))
    assert store.read_bytes("obj.bin") == b"old content"
    with pytest.raises(Unplugged):
        store.write_bytes("new/never.bin", FailingReader(os.urandom(3 << 20)))
    assert not store.exists("new/never.bin")
    assert raw_keys(store) == ["obj.bin"]  # no temporary file left beside it
    store.write_bytes("obj.bin", io.BytesIO(b"streamed"))
    assert store.read_bytes("obj.bin") == b"streamed"
    assert raw_keys(store) == ["obj.bin"]


def test_etag_changes_when_content_changes(store: ObjectStore) -> None:
    first = store.write_bytes("v.mp4", b"AAAA")
    listed = next(iter(store.list()))
    assert listed.etag == first.etag == store.info("v.mp4").etag
    second = store.write_bytes("v.mp4", b"BBBB")  # same size, new content
    assert second.etag != first.etag
    assert store.info("v.mp4").etag == second.etag
    assert store.info("v.mp4").etag == next(iter(store.list())).etag  # stable between calls
    assert '"' not in second.etag


def test_read_range_and_files(store: ObjectStore, tmp_path) -> None:
    data = bytes(range(256)) * 10
    store.write_bytes("r.bin", data)
    assert store.read_range("r.bin", 10, 20) == data[10:30]
    assert store.read_range("r.bin", len(data) - 5, 100) == data[-5:]
    assert store.read_range("r.bin", 0, 0) == b""
    src = tmp_path / "src file.tar"
    src.write_bytes(data * 3)
    info = store.put_file(src, "shards/r1/b-000000.tar")
    assert info.size == len(data) * 3
    dest = tmp_path / "out" / "copy.tar"
    store.get_file("shards/r1/b-000000.tar", dest)
    assert dest.read_bytes() == data * 3
    assert [p.name for p in dest.parent.iterdir()] == ["copy.tar"]


def test_missing_objects(store: ObjectStore, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.read_bytes("nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.read_range("nope.bin", 0, 4)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.get_file("nope.bin", tmp_path / "x")
    assert store.info("nope.bin") is None and not store.exists("nope.bin")
    store.delete("nope.bin")  # deleting what is gone is fine
    store.write_bytes("yes.bin", b"1")
    store.delete("yes.bin")
    assert not store.exists("yes.bin")


@pytest.mark.parametrize("key", ["../escape.bin", "/abs/key.bin", "a/../../b.bin", "a/..", ""])
def test_keys_that_escape_the_root_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.read_bytes(key)
    assert list(store.list()) == []


def test_child_store_and_uris(store: ObjectStore) -> None:
    child = store.child("runs/r1/")
    child.write_bytes("config.json", b"{}")
    assert store.read_bytes("runs/r1/config.json") == b"{}"
    assert [i.key for i in child.list()] == ["config.json"]
    assert child.uri("config.json") == store.uri("runs/r1/config.json")
    assert open_store(child.uri()).read_bytes("config.json") == b"{}"
    with pytest.raises(ValueError):
        store.child("../up")
    assert pickle.loads(pickle.dumps(child)) == child


def test_concurrent_writers_all_land(store: ObjectStore) -> None:
    def write(worker: int) -> None:
        for i in range(5):
            store.write_bytes(f"w/{worker}-{i}.bin", f"{worker}:{i}".encode())

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [i.key for i in store.list("w/")]
    assert keys == sorted(f"w/{w}-{i}.bin" for w in range(4) for i in range(5))
    assert store.read_bytes("w/3-4.bin") == b"3:4"


# --------------------------------------------------------------------------- checks name what to fix


def test_local_checks_name_the_path(tmp_path) -> None:
    missing = open_store(str(tmp_path / "no-such-bucket"))
    with pytest.raises(ConfigError, match="no-such-bucket.*no such directory"):
        missing.check_readable()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"a-file is a file"):
        open_store(str(blocker)).check_readable()
    # tests run as root, which ignores permissions; a path under a regular file can never be created
    with pytest.raises(ConfigError, match=r"ws.*a-file is a file, not a directory"):
        open_store(str(blocker / "ws")).check_writable()
    fresh = open_store(str(tmp_path / "new" / "workspace"))
    fresh.check_writable()  # creates it
    fresh.check_readable()
    assert (tmp_path / "new" / "workspace").is_dir() and list(fresh.list()) == []


def test_s3_checks_name_the_bucket(s3_uri: str) -> None:
    store = open_store(s3_uri)
    store.check_readable()
    store.check_writable()
    assert list(store.list()) == []  # the write probe leaves nothing behind
    missing = open_store("s3://pt-no-such-bucket-here/videos")
    with pytest.raises(ConfigError, match="pt-no-such-bucket-here.*does not exist.*AWS_ENDPOINT_URL"):
        missing.check_readable()
    with pytest.raises(ConfigError, match="pt-no-such-bucket-here"):
        missing.check_writable()


def test_open_store_forms(tmp_path) -> None:
    local = open_store(str(tmp_path / "dir with space"))
    assert isinstance(local, LocalStore)
    local.write_bytes("a b/c#d%20e.txt", b"odd")
    uri = local.uri("a b/c#d%20e.txt")
    assert uri.startswith("file:///") and " " not in uri
    assert open_store(local.uri("a b")).read_bytes("c#d%20e.txt") == b"odd"
    assert local.local_path("a b/c#d%20e.txt").read_bytes() == b"odd"
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and s3.uri("k.mp4") == "s3://bucket/some/prefix/k.mp4"
    assert open_store("s3://bucket").uri("k") == "s3://bucket/k"
    with pytest.raises(ConfigError, match="gs"):
        open_store("gs://bucket/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        open_store("s3:///x")


def test_local_listing_skips_temporary_files_of_crashed_writers(tmp_path) -> None:
    store = open_store(str(tmp_path))
    store.write_bytes("clip.mp4", b"x")
    (tmp_path / f".clip2.mp4{TMP_MARK}deadbeef").write_bytes(b"half")
    assert [i.key for i in store.list()] == ["clip.mp4"]


# --------------------------------------------------------------------------- S3 specifics


def test_big_files_go_up_in_parts(s3_uri: str, tmp_path, monkeypatch) -> None:
    # 5 MiB is S3's smallest part; lowering the threshold exercises the multipart path with a small file
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(s3_module, "MULTIPART_CHUNK", 5 << 20)
    src = tmp_path / "big.tar"
    payload = os.urandom((11 << 20) + 123)
    src.write_bytes(payload)
    store = open_store(s3_uri)
    info = store.put_file(src, "shards/big.tar")
    assert info.etag.endswith("-3")  # three parts, completed as one object
    assert info.size == len(payload)
    assert store.read_range("shards/big.tar", (10 << 20), 50) == payload[10 << 20 : (10 << 20) + 50]


def test_webdataset_reads_s3_urls_through_boto3(s3_uri: str, tmp_path) -> None:
    import webdataset as wds

    tar_path = tmp_path / "shard.tar"
    keys = [layout.sample_key(f"videos/clip {i}.mp4", "etag", 0) for i in range(3)]
    with wds.TarWriter(str(tar_path)) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "txt": f"sample {i}", "bin": bytes([i]) * 1000})
    store = open_store(s3_uri)
    store.put_file(tar_path, "shards/r1/b-000000.tar")
    register_s3_gopen()
    samples = list(wds.WebDataset(store.uri("shards/r1/b-000000.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == keys
    assert [s["txt"] for s in samples] == [b"sample 0", b"sample 1", b"sample 2"]
    assert samples[2]["bin"] == bytes([2]) * 1000
    with pytest.raises(FileNotFoundError):
        s3_module.gopen_s3(store.uri("shards/missing.tar"))
    with tarfile.open(fileobj=s3_module.gopen_s3(store.uri("shards/r1/b-000000.tar")), mode="r|") as tar:
        assert len([m for m in tar]) == 6


def test_local_listing_follows_linked_folders_without_looping(tmp_path) -> None:
    outside = tmp_path / "other-disk"
    outside.mkdir()
    (outside / "linked.mp4").write_bytes(b"v")
    root = tmp_path / "bucket"
    root.mkdir()
    (root / "own.mp4").write_bytes(b"v")
    (root / "more").symlink_to(outside)
    (outside / "loop").symlink_to(root)  # bucket/more/loop -> bucket
    keys = [i.key for i in open_store(str(root)).list()]
    assert "more/linked.mp4" in keys and "own.mp4" in keys
    assert len(keys) == len(set(keys)) and len(keys) <= 3


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("good", ["r1", "round-20260101-120000-ab12", "My_Round-2"])
def test_valid_round_ids(good: str) -> None:
    assert layout.validate_round_id(good) == good
    assert layout.shards_prefix(good) == f"shards/{good}/"


@pytest.mark.parametrize("bad", ["", "r 1", "r/1", "r.1", "../r", "ü", "x" * 97])
def test_invalid_round_ids_say_what_is_allowed(bad: str) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        layout.validate_round_id(bad)


def test_new_round_ids_sort_by_time_and_validate() -> None:
    from datetime import UTC, datetime

    early = layout.new_round_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    late = layout.new_round_id(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert early.startswith("round-20260102-030405-") and len(early) == len("round-20260102-030405-abcd")
    assert early < late
    assert layout.validate_round_id(layout.new_round_id()) != layout.new_round_id()


def test_shard_names_differ_per_writer_and_pair_with_manifests() -> None:
    a = layout.shard_key("r1", "b0001", 3)
    b = layout.shard_key("r1", "b0002", 3)
    assert a == "shards/r1/b0001-000003.tar" and a != b
    assert layout.shard_pattern("r1", "b0001") % 3 == a
    assert layout.manifest_key(a) == a + ".json" and layout.is_manifest(layout.manifest_key(a))
    assert not layout.is_manifest(a)
    assert layout.round_of_shard(a) == "r1" and layout.round_of_shard("catalog/x.parquet") is None
    with pytest.raises(ValueError, match="batch id"):
        layout.shard_pattern("r1", "b/../x")
    with pytest.raises(ValueError, match=".tar"):
        layout.manifest_key("shards/r1/x.zip")


def test_sample_keys_are_webdataset_safe_and_distinct() -> None:
    sources = ["bear.001.mp4", "folder/bear.001.mp4", "with space/ü.mp4", "a" * 500]
    keys = {layout.sample_key(s, "etag1", c) for s in sources for c in range(3)}
    assert len(keys) == len(sources) * 3
    assert all(layout.is_sample_key(k) and "." not in k and "/" not in k for k in keys)
    assert layout.sample_key("bear.mp4", "e1") == layout.sample_key("bear.mp4", "e1", 0)  # stable
    assert layout.sample_key("bear.mp4", "e1") != layout.sample_key("bear.mp4", "e2")  # changed video


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_create_exclusive_has_one_winner(backend, tmp_path, s3_uri):
    """Claims rest on this: of many racing writers to one key exactly one wins, and the winner's bytes stay."""
    from concurrent.futures import ThreadPoolExecutor

    store = open_store(str(tmp_path / "ws") if backend == "local" else s3_uri)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: store.create_exclusive("claims/a.json", f"writer {i}".encode()), range(16)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.read_bytes("claims/a.json") == f"writer {winner}".encode()
    assert store.create_exclusive("claims/b.json", b"x") is True
    assert [o.key for o in store.list("claims/")] == ["claims/a.json", "claims/b.json"]


@pytest.mark.parametrize(
    "text",
    ["2026-11-23T13:30:00.000Z", "2026-11-23T13:30:00Z", "2026-11-23T13:30:00+02:00", "Wed, 21 Oct 2015 07:28:00 GMT"],
)
def test_fast_timestamps_equal_botocores(text: str) -> None:
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    from pseudotrack.storage.s3 import parse_timestamp

    assert parse_timestamp(text) == DEFAULT_TIMESTAMP_PARSER(text)
    assert parse_timestamp(text).tzinfo is not None


def test_listed_times_are_the_servers(s3_uri: str) -> None:
    from pseudotrack.storage.s3 import s3_client, split_s3_uri

    store = open_store(s3_uri)
    store.write_bytes("a/b.bin", b"xyz")
    (info,) = [i for i in store.list("a/")]
    bucket, prefix = split_s3_uri(s3_uri)
    head = s3_client().head_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/a/b.bin".lstrip("/"))
    assert info.mtime == head["LastModified"].timestamp()
