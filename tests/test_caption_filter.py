"""Caption filter: the packaged rules, caption sources and the missing-caption policies."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudotrack.errors import ConfigError
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.caption_filter import CaptionIndex, CaptionRules, filter_captions, parse_manifest


@pytest.fixture(scope="module")
def rules() -> CaptionRules:
    return CaptionRules.load()


@pytest.mark.parametrize(
    ("caption", "keep", "rule"),
    [
        ("A dog runs across a park.", True, "animals"),
        ("Two women dancing at a wedding", True, "people"),
        ("An animated cartoon of a cat", False, "animation"),
        ("CGI dragon flying", False, "computer-generated"),
        ("Time-lapse of a city with people walking", False, "time-lapse"),
        ("timelapse of a flower", False, "time-lapse"),
        ("Children playing in the water", False, "water"),
        ("A campfire with people around it", False, "fire"),
        ("Clouds over the hills", False, "sky"),
        ("Fireworks over a crowd", False, "fireworks"),
        ("A red apple lies on a carpet", False, "no-keep-match"),
        ("A man waves at the camera", True, "people"),
        ("A pencil drawing of a horse", False, "drawing"),
    ],
)
def test_default_rules(rules: CaptionRules, caption: str, keep: bool, rule: str) -> None:
    verdict = rules.judge(caption)
    assert verdict.keep is keep
    assert verdict.rule == rule


def test_real_clip_captions(rules: CaptionRules, shared_dir) -> None:
    records = [json.loads(line) for line in (shared_dir / "videos" / "captions.jsonl").read_text().splitlines()]
    verdicts = {r["file"]: rules.judge(r["caption"] + " " + r["keywords"]) for r in records}
    assert verdicts["bear.mp4"].keep and verdicts["cat.mp4"].keep
    assert not verdicts["apple.mp4"].keep and verdicts["apple.mp4"].rule == "no-keep-match"


def test_rules_file_is_read_and_validated(tmp_path) -> None:
    custom = tmp_path / "rules.toml"
    custom.write_text('require_keep = false\n[[drop]]\nname = "boats"\nwords = ["boat", "sail boat"]\n')
    rules = CaptionRules.load(custom)
    assert rules.judge("two sail-boats racing").rule == "boats"
    assert rules.judge("a teapot").keep
    bad = tmp_path / "bad.toml"
    bad.write_text("[[drop]]\nname = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        CaptionRules.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        CaptionRules.load(tmp_path / "missing.toml")


def test_manifest_formats(tmp_path) -> None:
    rows = [
        {"file": "a.mp4", "caption": "A dog", "keywords": "dog,park"},
        {"file": "b.mp4", "caption": "Sea"},
    ]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    assert parse_manifest(jsonl, "captions.jsonl") == {"a.mp4": "A dog | dog,park", "b.mp4": "Sea"}
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["key", "caption"])
        writer.writeheader()
        writer.writerow({"key": "x/a.mp4", "caption": "A cat"})
    assert parse_manifest((tmp_path / "c.csv").read_bytes(), "c.csv") == {"x/a.mp4": "A cat"}
    pq.write_table(pa.table({"video": ["v.mp4"], "caption": ["A horse"]}), tmp_path / "c.parquet")
    assert parse_manifest((tmp_path / "c.parquet").read_bytes(), "c.parquet") == {"v.mp4": "A horse"}
    with pytest.raises(ConfigError, match="no key column"):
        parse_manifest(b'{"caption": "x"}', "m.jsonl")
    with pytest.raises(ConfigError, match="m.jsonl"):
        parse_manifest(b"{not json", "m.jsonl")


def test_sources_and_policies(tmp_path, rules: CaptionRules) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "b.mp4", "sub/c.mp4", "d.mp4", "e.mp4", "f.mp4"):
        (tmp_path / name).write_bytes(b"video")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "a dog"}) + "\n")
    (tmp_path / "b.txt").write_text("waves on the sea\n")
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"caption": "a girl jumps", "keywords": ["girl"]}))
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad \xc3\x28")
    (tmp_path / "f.json").write_text("{broken")
    store = open_store(str(tmp_path))
    keys = [i.key for i in store.list()]
    index = CaptionIndex.build(store, keys)
    videos = ["a.mp4", "b.mp4", "sub/c.mp4", "d.mp4", "e.mp4", "f.mp4"]
    results = {r.key: r for r in filter_captions(videos, index, rules)}
    assert results["a.mp4"].keep and results["a.mp4"].caption == "a dog"
    assert not results["b.mp4"].keep and results["b.mp4"].rule == "water"
    assert results["sub/c.mp4"].keep
    assert "not valid UTF-8" in results["d.mp4"].failure and "d.txt" in results["d.mp4"].failure
    assert results["e.mp4"].keep and results["e.mp4"].caption is None  # default policy: keep
    assert "not valid JSON" in results["f.mp4"].failure
    dropped = {r.key: r for r in filter_captions(videos, index, rules, missing_caption="drop")}
    assert not dropped["e.mp4"].keep and dropped["e.mp4"].rule == "no-caption"
    failing = {r.key: r for r in filter_captions(videos, index, rules, missing_caption="fail")}
    assert "no caption" in failing["e.mp4"].failure


def test_oversized_caption_is_a_failure(tmp_path, rules: CaptionRules) -> None:
    (tmp_path / "big.mp4").write_bytes(b"v")
    (tmp_path / "big.txt").write_bytes(b"a dog " * 20000)
    store = open_store(str(tmp_path))
    index = CaptionIndex.build(store, [i.key for i in store.list()])
    (result,) = filter_captions(["big.mp4"], index, rules)
    assert not result.keep and "limit" in result.failure
