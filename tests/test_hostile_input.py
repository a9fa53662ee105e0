"""Hostile input: a corpus of bad files mixed with good videos in one batch, labelled by one real round.

Every file is generated here (tests/videos.py; PyAV for what OpenCV's writer cannot make). Each bad
file must end as a `failed` or `filtered` row whose stage and reason say what was wrong; its good
neighbours in the same batch must be labelled; and nothing may be lost: every video the bucket
lists has exactly one terminal row. Valid but unusual videos (rotation metadata, a variable frame
rate, 100,000 frames, 4K frames, odd keys) must be labelled correctly, not just survive.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import videos  # tests/videos.py

from pseudotrack.config import RoundConfig
from pseudotrack.dashboard import app as dash
from pseudotrack.errors import SampleError
from pseudotrack.flows.label_round import run_round
from pseudotrack.render import shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.caption_filter import MAX_CAPTION_BYTES, read_manifest
from pseudotrack.tasks.clip_codec import decode_clip_bytes
from pseudotrack.tasks.containers import MAX_SOURCE_BYTES, check_container
from pseudotrack.tasks.decode import decode_clip, probe_video
from pseudotrack.tasks.shards import committed_shards, read_shard
from pseudotrack.teachers.base import TeacherSpec, register_teacher, teacher_names
from pseudotrack.teachers.lk import LKTeacher

SMALL = dict(height=96, width=128, num_frames=16, min_frames=8, num_queries=32, num_keyframes=4, batch_size=64)
GOP = 500  # frame i of the long video shows index i % GOP
LONG_REPEATS = 200  # 100,000 frames
TERMINAL = ("labelled", "filtered", "failed")
NFC = unicodedata.normalize("NFC", "keys/unicode/café.mp4")
NFD = unicodedata.normalize("NFD", NFC)
MARKUP_KEY = "keys/<b>markup</b> & co.mp4"
MARKUP_CAPTION = '<script>document.title="pwned"</script> a dog runs & <b>jumps</b>'
PLAIN_CAPTION = "a person walks a dog"


def good_clip(seed: int) -> bytes:
    return videos.mp4_bytes(videos.translating_frames(24, 96, 128, 1.5, -0.5, seed))


def build_corpus() -> tuple[dict[str, bytes], dict[str, tuple], dict[str, bytes]]:
    """(key -> bytes, key -> expected (status, stage, reason pattern), extra objects such as captions).

    Expected: ("labelled", None, None), ("filtered", rule, None) or ("failed", stage, reason regex).
    """
    files: dict[str, bytes] = {}
    expect: dict[str, tuple] = {}

    def add(key: str, data: bytes, status: str, stage: str | None = None, reason: str | None = None) -> None:
        files[key] = data
        expect[key] = (status, stage, reason)

    # valid videos, several of them unusual
    add("good/plain.mp4", good_clip(1), "labelled")
    add("good/with audio.mp4", videos.with_audio_mp4(videos.translating_frames(24, 96, 128, 1, 0.5, 2)), "labelled")
    add("good/rotated portrait.mp4", videos.rotated_mp4(videos.index_frames(24, 96, 128, seed=3), 90), "labelled")
    durations = np.random.default_rng(4).choice([10, 33, 100, 250], 60).tolist()
    add("good/variable frame rate.mp4", videos.vfr_mp4(videos.index_frames(60, 96, 128, seed=4), durations), "labelled")
    add(
        "good/long 100k frames.mp4",
        videos.long_mp4(videos.index_frames(GOP, 96, 128, seed=5), LONG_REPEATS),
        "labelled",
    )
    # 4K frames of a texture coarse enough to keep its features at the label size
    uhd = [cv2.resize(f, (3840, 2160)) for f in videos.translating_frames(8, 108, 192, 1, 0.5, 6)]
    add("good/large 4k.avi", videos.mjpeg_avi_file(np.stack(uhd)), "labelled")
    # odd but safe keys
    for i, key in enumerate(
        [
            "keys/spaces and dots/a..b.mp4",
            "keys/.leading dot.mp4",
            "keys/..two leading dots.mp4",
            NFC,
            NFD,
            "keys/unicode/日本語 ñ.mp4",
            "keys/back\\slash.mp4",
            MARKUP_KEY,
        ]
    ):
        add(key, good_clip(10 + i), "labelled")
    add("captions/cgi.mp4", good_clip(20), "filtered", "computer-generated")
    # bad files
    h264 = videos.av_encode(videos.translating_frames(24, 96, 128, 1, 0, 7))
    add("bad/empty.mp4", videos.empty_file(), "failed", "decode", r"^empty file: 0 bytes")
    add("bad/notes.mp4", videos.text_file(), "failed", "decode", r"^not a video: .*holds text")
    add("bad/photo.mp4", videos.png_file(), "failed", "decode", r"^not a video: .*holds a PNG image")
    add(
        "bad/cut short.mp4",
        videos.truncated(good_clip(30), 0.6),
        "failed",
        "decode",
        r"^truncated or corrupt: FFmpeg cannot read .*cut short\.mp4: it has no 'moov' index box.*re-upload",
    )
    add(
        "bad/garbage.mp4",
        videos.ftyp_then_garbage(),
        "failed",
        "decode",
        r"^truncated or corrupt: FFmpeg cannot read .*garbage\.mp4: it has no 'moov' index box",
    )
    add(
        "bad/damaged frames.mp4",
        videos.damage_frames(h264),
        "failed",
        "decode",
        r"^(truncated or corrupt|cannot decode): .*damaged frames\.mp4",
    )
    add(
        "bad/lying index.mp4",
        videos.claim_frames(h264, 10**8),
        "failed",
        "decode",
        r"^truncated or corrupt: video track 1: its index claims 100000000 samples but lists only 24",
    )
    add(
        "bad/podcast.mp4",
        videos.audio_only_mp4(),
        "failed",
        "decode",
        r"^not a video: .*only audio tracks and no video",
    )
    add("bad/one frame.mp4", videos.one_frame_video(), "failed", "decode", r"^too short: only 1 frame; need at least 8")
    add("bad/huge frames.avi", videos.huge_frames_avi(), "failed", "decode", r"^too large: .*frames of 8200x8200")
    add(
        "bad/huge header.mp4",
        videos.claim_size(h264, 40000, 40000),
        "failed",
        "decode",
        r"^too large: .*frames of 40000x40000",
    )
    # captions: a sidecar and a manifest entry each invalid UTF-8 or megabytes long
    extra = {
        "captions/bad utf8 sidecar.txt": b"a dog \xff\xfe runs",
        "captions/huge sidecar.txt": b"a dog runs " * 300_000,
    }
    for key, why in [
        ("captions/bad utf8 sidecar.mp4", r"^caption in .*bad utf8 sidecar\.txt is not valid UTF-8"),
        ("captions/huge sidecar.mp4", rf"^caption in .*huge sidecar\.txt is over the {MAX_CAPTION_BYTES}-byte limit"),
        ("captions/bad utf8 manifest.mp4", r"^caption in captions\.jsonl is unreadable: line \d+ is not valid UTF-8"),
        ("captions/huge manifest.mp4", r"^caption in captions\.jsonl is 2000000 bytes, over the"),
    ]:
        add(key, good_clip(40 + len(extra)), "failed", "caption", why)
    lines = []
    for key in files:
        if key == "captions/cgi.mp4":
            lines.append(json.dumps({"key": key, "caption": "a CGI render of a dog"}).encode())
        elif key == MARKUP_KEY:
            lines.append(json.dumps({"key": key, "caption": MARKUP_CAPTION}).encode())
        elif key == "captions/bad utf8 manifest.mp4":
            lines.append(b'{"key": "captions/bad utf8 manifest.mp4", "caption": "a dog \xff\xfe runs"}')
        elif key == "captions/huge manifest.mp4":
            lines.append(json.dumps({"key": key, "caption": "d" * 2_000_000}).encode())
        elif key != NFD and not key.startswith("captions/"):  # NFD finds the NFC entry
            lines.append(json.dumps({"key": key, "caption": PLAIN_CAPTION}, ensure_ascii=False).encode())
    extra["captions.jsonl"] = b"\n".join(lines) + b"\n"
    return files, expect, extra


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


def local_bucket(root: Path, corpus) -> dict[str, tuple]:
    """Write the corpus to a directory, with the files only a disk can hold; returns the expectations."""
    files, expect, extra = corpus
    for key, data in {**files, **extra}.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    expect = dict(expect)
    # a file over the size a worker may read: sparse, so it costs no disk; it must fail unread
    with open(root / "bad" / "huge file.mp4", "wb") as fh:
        fh.truncate(MAX_SOURCE_BYTES + 1)
    expect["bad/huge file.mp4"] = ("failed", "decode", r"^too large: .*huge file\.mp4 is 4\.0 GiB, over the 4 GiB")
    # a name that is not UTF-8 (Latin-1 bytes): it cannot be a catalog key; it fails at discovery, named
    os.close(os.open(os.fsencode(root / "bad") + b"/caf\xe9.mp4", os.O_CREAT | os.O_WRONLY, 0o644))
    expect["bad/caf\\xe9.mp4"] = (
        "failed",
        "discover",
        r"^unsafe key: object key 'bad/caf\\xe9\.mp4' is not valid UTF-8",
    )
    return expect


# --------------------------------------------------------------------------- checking a round


def check_round(workspace: str, round_id: str, expect: dict[str, tuple]) -> dict[str, dict]:
    store = open_store(workspace)
    catalog = Catalog(store)
    events = catalog.events(round_id).to_pylist()
    terminal = Counter(e["video_key"] for e in events if e["status"] in TERMINAL)
    # nothing lost, nothing twice: every listed video has exactly one terminal row
    assert sorted(terminal) == sorted(expect), set(terminal) ^ set(expect)
    assert set(terminal.values()) == {1}, {k: n for k, n in terminal.items() if n != 1}
    rows = {r["video_key"]: r for r in catalog.latest(round_id).to_pylist()}
    for key, (status, stage, pattern) in expect.items():
        row = rows[key]
        assert row["status"] == status, (key, row["status"], row["stage"], row["reason"])
        if status == "failed":
            assert row["stage"] == stage, (key, row["stage"], row["reason"])
            assert re.search(pattern, row["reason"]), (key, row["reason"])
        elif status == "filtered":
            assert row["filter_rule"] == stage, (key, row["filter_rule"])
    # the bad files and their good neighbours went through the same batch
    labelling = [r for r in rows.values() if r["stage"] not in ("discover", "caption") and r["status"] != "filtered"]
    assert len({r["batch_id"] for r in labelling}) == 1
    assert {r["status"] for r in labelling} == {"labelled", "failed"}
    # shards hold exactly the labelled videos, each with its own source key (odd keys round-trip)
    samples = {}
    for manifest in committed_shards(store, round_id):
        for sample in read_shard(shard_url(store, manifest["shard"])):
            samples[sample["meta"]["source_key"]] = sample
    labelled = {k for k, r in rows.items() if r["status"] == "labelled"}
    assert set(samples) == labelled
    for key in labelled:
        assert samples[key]["key"] == rows[key]["sample_key"]
        assert samples[key]["meta"]["caption"] == rows[key]["caption"]
    return {"rows": rows, "samples": samples}


def check_unusual_videos(rows: dict[str, dict], samples: dict[str, dict]) -> None:
    """The valid-but-unusual videos were labelled on the right frames, upright."""
    # rotation metadata is applied: the clip shows the frames turned as a player shows them (the part of
    # them its crop box names: the round's default resize is mixed)
    sample = samples["good/rotated portrait.mp4"]
    stored = decode_clip_bytes(sample["clip"])
    source = videos.index_frames(24, 96, 128, seed=3)
    k = int(sample["meta"]["frame_indices"][0])
    x0, y0, x1, y1 = (round(v) for v in sample["meta"]["crop_box"])
    shown = np.rot90(source[k], 1)[y0:y1, x0:x1]
    upright = cv2.resize(shown, (128, 96), interpolation=cv2.INTER_AREA).astype(float)
    as_stored = source[k].astype(float)
    assert np.abs(stored[0] - upright).mean() < 12 < np.abs(stored[0] - as_stored).mean()
    assert (rows["good/rotated portrait.mp4"]["width"], rows["good/rotated portrait.mp4"]["height"]) == (96, 128)
    # variable frame rate: frames are taken by index, each the one the metadata names
    sample = samples["good/variable frame rate.mp4"]
    shown = [videos.frame_index_of(f) for f in decode_clip_bytes(sample["clip"])]
    assert shown == sample["meta"]["frame_indices"]
    assert 0.5 < sample["meta"]["source_fps"] < 100
    # 100,000 frames: the clip is where it says it is, decoded without reading the whole video
    sample = samples["good/long 100k frames.mp4"]
    shown = [videos.frame_index_of(f) for f in decode_clip_bytes(sample["clip"])]
    assert shown == [i % GOP for i in sample["meta"]["frame_indices"]]
    assert rows["good/long 100k frames.mp4"]["num_frames"] == GOP * LONG_REPEATS
    # 4K frames are resized by the decoder to the label size
    row = rows["good/large 4k.avi"]
    assert (row["width"], row["height"], row["clip_frames"]) == (3840, 2160, 8)
    # NFC and NFD spellings are two objects, both labelled; the NFD one found the NFC manifest entry
    assert rows[NFC]["sample_key"] != rows[NFD]["sample_key"]
    assert rows[NFD]["caption"] == rows[NFC]["caption"] == PLAIN_CAPTION
    assert rows[MARKUP_KEY]["caption"] == MARKUP_CAPTION


def check_dashboard(workspace: str) -> None:
    """The dashboard renders the round; no caption or key became markup (tests/test_security.py: shown as text)."""
    board = dash.Dashboard(workspace)
    page = board.page()
    assert page.count("<script") == 1 and "<b>" not in page and "pwned" not in page.replace("&quot;pwned", "")
    json.dumps(board.summary(), allow_nan=False)


# --------------------------------------------------------------------------- the rounds


def test_hostile_corpus_round_on_a_local_bucket(corpus, tmp_path, capsys):
    bucket = tmp_path / "bucket"
    expect = local_bucket(bucket, corpus)
    workspace = str(tmp_path / "ws")
    summary = run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id="hostile", seed=3, **SMALL))
    found = check_round(workspace, "hostile", expect)
    check_unusual_videos(found["rows"], found["samples"])
    check_dashboard(workspace)
    bad = sum(1 for status, _, _ in expect.values() if status != "labelled")
    assert summary.labelled + summary.failed + summary.filtered == len(expect)
    with capsys.disabled():
        print(f"\nhostile corpus (local): {len(expect)} videos, {bad} bad inputs, {summary.labelled} labelled, lost 0")


def test_odd_and_unsafe_keys_on_s3(corpus, moto_s3_uri, tmp_path):
    """On S3 '..' segments and a leading '/' are legal: those videos fail at discovery, named; the rest label."""
    import boto3

    # moto, not SeaweedFS: SeaweedFS cannot hold the '.', '..' and '//' keys below (conftest.moto_server)
    s3_uri = moto_s3_uri
    files, expect, extra = corpus
    bucket_uri = s3_uri + "/videos"
    name, _, prefix = bucket_uri[len("s3://") :].partition("/")
    client = boto3.client("s3")
    small = {k: v for k, v in files.items() if not k.startswith(("good/long", "good/large", "bad/huge"))}
    wanted = {k: expect[k] for k in small}
    for key, data in {**small, **extra}.items():
        client.put_object(Bucket=name, Key=f"{prefix}/{key}", Body=data)
    for key, data, status, why in [
        ("keys/a//b.mp4", good_clip(50), "labelled", None),
        ("keys/./dot segment.mp4", good_clip(51), "labelled", None),
        ("../escape.mp4", good_clip(52), "failed", r"^unsafe key: object key '\.\./escape\.mp4' escapes the store's"),
        ("/leading slash.mp4", good_clip(53), "failed", r"^unsafe key: object key '/leading slash\.mp4' is absolute"),
    ]:
        client.put_object(Bucket=name, Key=f"{prefix}/{key}", Body=data)
        wanted[key] = (status, "discover" if why else None, why)
    workspace = s3_uri + "/workspace"
    config = RoundConfig(bucket=bucket_uri, workspace=workspace, round_id="hostile-s3", seed=3, **SMALL)
    summary = run_round(config)
    found = check_round(workspace, "hostile-s3", wanted)
    assert found["rows"][MARKUP_KEY]["caption"] == MARKUP_CAPTION
    assert found["rows"][NFD]["caption"] == PLAIN_CAPTION
    check_dashboard(workspace)
    # a re-run labels nothing twice and records nothing twice, unsafe keys included
    again = run_round(RoundConfig(bucket=bucket_uri, workspace=workspace, round_id="hostile-s3b", seed=3, **SMALL))
    assert again.labelled == again.failed == again.filtered == 0 and summary.labelled > 0
    assert again.reused == sum(1 for status, stage, _ in wanted.values() if status == "labelled" or stage == "decode")


# --------------------------------------------------------------------------- the pieces, directly


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotation_metadata_is_applied(degrees):
    source = videos.index_frames(24, 96, 128, seed=1)
    data = videos.rotated_mp4(source, degrees)
    facts = probe_video(data, "phone.mp4")
    turns = {90: 1, -90: 3, 180: 2}[degrees]  # counter-clockwise quarter turns
    assert (facts.height, facts.width) == np.rot90(source[0], turns).shape[:2]
    clip = decode_clip(data, "phone.mp4", 64, 96, 8, stride=1, rng=np.random.default_rng(0))
    for frame, index in zip(clip.frames, clip.frame_indices, strict=True):
        upright = cv2.resize(np.rot90(source[index], turns), (96, 64), interpolation=cv2.INTER_AREA)
        assert np.abs(frame.astype(float) - upright).mean() < 12


def test_variable_frame_rate_is_read_by_frame_index():
    durations = np.random.default_rng(0).choice([10, 33, 100, 250], 200).tolist()
    data = videos.vfr_mp4(videos.index_frames(200, 96, 128), durations)
    facts = probe_video(data, "vfr.mp4")
    assert facts.num_frames == 200
    assert facts.fps == pytest.approx(200 / (sum(durations[:199]) / 1000), rel=0.05)  # the average rate
    for seed in range(4):
        clip = decode_clip(data, "vfr.mp4", 96, 128, 16, rng=np.random.default_rng(seed))
        assert [videos.frame_index_of(f) for f in clip.frames] == clip.frame_indices.tolist()


def test_headers_that_claim_too_much_are_refused_before_decoding():
    """check_container runs before decord opens a file: raising there means no decoder allocated anything."""
    h264 = videos.av_encode(videos.translating_frames(24, 96, 128, 1, 0))
    for data, pattern in [
        (videos.claim_size(h264, 40000, 40000), r"^too large: its header declares frames of 40000x40000"),
        (videos.claim_size(h264, 8200, 8200), r"^too large: its header declares frames of 8200x8200"),
        (videos.claim_frames(h264, 10**8), r"^truncated or corrupt: video track 1: its index claims 100000000"),
        (videos.audio_only_mp4(), r"^not a video: x\.mp4 holds only audio tracks and no video track"),
        (videos.huge_frames_avi(8200, 8200, 2), r"^too large: its header declares frames of 8200x8200"),
    ]:
        with pytest.raises(SampleError) as info:
            check_container(data, "x.mp4")
        assert info.value.stage == "decode" and re.search(pattern, info.value.reason), info.value.reason
    assert check_container(videos.claim_size(h264, 4096, 4096), "x.mp4") == "mp4"  # large is not too large


LONG_PROBE = """
import sys, time
import numpy as np
from pseudotrack.tasks.decode import _decord, decode_clip, probe_video

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

_decord()
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current size
before = kib("VmRSS:")
start = time.perf_counter()
facts = probe_video(data, "v.mp4")
clip = decode_clip(data, "v.mp4", 96, 128, 16, rng=np.random.default_rng(0), facts=facts)
seconds = time.perf_counter() - start
print(facts.num_frames, len(clip.frames), round(seconds, 3), round((kib("VmHWM:") - before) / 1024, 1))
"""


def test_a_100k_frame_video_decodes_in_bounded_time_and_memory(tmp_path):
    """Only the clip's frames are decoded: measured in fresh processes, against a 500-frame video."""
    gop = videos.index_frames(GOP, 96, 128)
    figures = {}
    for name, repeats in (("short", 1), ("long", LONG_REPEATS)):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(videos.long_mp4(gop, repeats))
        done = subprocess.run(
            [sys.executable, "-c", LONG_PROBE, str(path)], capture_output=True, text=True, timeout=300, check=True
        )
        frames, clip, seconds, grown = done.stdout.split()
        figures[name] = (int(frames), int(clip), float(seconds), float(grown), path.stat().st_size / 2**20)
    assert figures["short"][:2] == (GOP, 16) and figures["long"][:2] == (GOP * LONG_REPEATS, 16)
    # generous bounds (the machine is shared); measured here: about 1.5 s and 100 MB above the short one
    assert figures["long"][2] < 30.0
    assert figures["long"][3] - figures["short"][3] < 400.0
    print(
        "\n100k-frame video ({:.0f} MB): probe + clip {:.2f} s, peak memory +{:.0f} MB "
        "(500 frames: {:.2f} s, +{:.0f} MB)".format(
            figures["long"][4], figures["long"][2], figures["long"][3], figures["short"][2], figures["short"][3]
        )
    )


def test_manifest_captions_fail_one_video_each():
    bad = b'{"key": "a.mp4", "caption": "a dog \xff runs"}\n'
    huge = json.dumps({"key": "b.mp4", "caption": "x" * (MAX_CAPTION_BYTES + 1)}).encode() + b"\n"
    fine = '{"key": "c.mp4", "caption": "a cat jumps \u2028 high"}\n'.encode()  # U+2028 inside a string
    captions, errors = read_manifest(b"\xef\xbb\xbf" + bad + huge + fine, "captions.jsonl")
    assert captions == {"c.mp4": "a cat jumps \u2028 high"}
    assert re.match(r"caption in captions\.jsonl is unreadable: line 1 is not valid UTF-8", errors["a.mp4"])
    assert f"is {MAX_CAPTION_BYTES + 1} bytes, over the {MAX_CAPTION_BYTES}-byte limit" in errors["b.mp4"]
    csv_data = b"key,caption\nd.mp4,a horse \xe9 runs\ne.mp4,a horse runs\n"
    captions, errors = read_manifest(csv_data, "captions.csv")
    assert captions == {"e.mp4": "a horse runs"} and "row 2 is not valid UTF-8" in errors["d.mp4"]


# --------------------------------------------------------------------------- teachers that emit NaN or infinity

NONFINITE = "test_nonfinite_lk"


class NonFiniteTeacher(LKTeacher):
    """lk, except on reddish clips (NaN tracks) and bluish clips (infinite confidence)."""

    name = NONFINITE

    def __init__(self, checkpoint=None):
        super().__init__(checkpoint)

    def predict(self, frames, queries):
        out = super().predict(frames, queries)
        mean = frames.reshape(-1, 3).mean(axis=0)
        if mean[0] > mean[1] + 60:
            out.tracks[3:, ::2] = np.nan
        elif mean[2] > mean[1] + 60:
            out.confidence[-1, 0] = np.inf
        return out


if NONFINITE not in teacher_names():
    register_teacher(TeacherSpec(name=NONFINITE, factory=NonFiniteTeacher, needs_checkpoint=False))


def tinted_clip(seed: int, channel: int) -> bytes:
    frames = videos.translating_frames(24, 96, 128, 1, 0.5, seed).astype(np.int16)
    frames[..., channel] += 120
    return videos.mp4_bytes(np.clip(frames, 0, 255).astype(np.uint8))


def test_teacher_nan_or_inf_fails_that_clip_and_writes_nothing_for_it(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for i in range(3):
        (bucket / f"fine_{i}.mp4").write_bytes(good_clip(60 + i))
    (bucket / "red.mp4").write_bytes(tinted_clip(70, 0))
    (bucket / "blue.mp4").write_bytes(tinted_clip(71, 2))
    workspace = str(tmp_path / "ws")
    config = RoundConfig(bucket=str(bucket), workspace=workspace, round_id="nan", teachers=[NONFINITE], **SMALL)
    summary = run_round(config)
    assert (summary.labelled, summary.failed) == (3, 2)
    rows = {r["video_key"]: r for r in Catalog(open_store(workspace)).latest().to_pylist()}
    for key in ("red.mp4", "blue.mp4"):
        assert rows[key]["status"] == "failed" and rows[key]["stage"] == "teacher"
        assert re.search(rf"{NONFINITE} returned NaN or infinite values", rows[key]["reason"])
        assert rows[key]["sample_key"] is None and rows[key]["shard_id"] is None
    assert len({r["batch_id"] for r in rows.values()}) == 1  # one batch: the neighbours went on
    store = open_store(workspace)
    samples = [s for m in committed_shards(store, "nan") for s in read_shard(shard_url(store, m["shard"]))]
    assert sorted(s["meta"]["source_key"] for s in samples) == ["fine_0.mp4", "fine_1.mp4", "fine_2.mp4"]
    for sample in samples:
        labels = sample["labels"][NONFINITE]
        assert np.isfinite(labels["tracks"]).all() and np.isfinite(labels["confidence"].astype(np.float32)).all()
