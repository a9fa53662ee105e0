"""The student's shard loader: clip handling, teacher choice, and an exactly resumable position."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pseudotrack.student.data import (
    ClipSpec,
    LoaderState,
    choose_tracks,
    frame_indices,
    make_loader,
    prepare_clip,
    rebase_queries,
    sample_plan,
    scale_points,
    shard_refs,
)

T0, H0, W0, N0 = 12, 32, 64, 6


def _label(seed: int, visible_every: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    tracks = (rng.uniform(0, 1, size=(T0, N0, 2)) * [W0 - 1, H0 - 1]).astype(np.float32)
    visibility = np.ones((T0, N0), bool)
    visibility[::visible_every, 0] = True
    return {"tracks": tracks, "visibility": visibility, "confidence": np.ones((T0, N0), np.float16)}


def _sample(key: str = "k0", teachers: tuple[str, ...] = ("lk", "cotracker3_offline")) -> dict:
    queries = np.stack([np.zeros(N0), np.linspace(1, 40, N0), np.linspace(1, 30, N0)], 1).astype(np.float32)
    labels = {name: _label(i) for i, name in enumerate(teachers)}
    for name in teachers:
        labels[name]["tracks"][0] = queries[:, 1:]
    meta = {"tracks_occluded": {name: name != "lk" for name in teachers}}
    return {"key": key, "queries": queries, "labels": labels, "meta": meta}


def _frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(T0, H0, W0, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- plain functions


def test_sample_plan_is_a_pure_function_and_reads_shards_front_to_back() -> None:
    counts = [3, 5, 2]
    first = [d for _, d in zip(range(200), sample_plan(counts, 7, (0, 1)), strict=False)]
    again = [d for _, d in zip(range(200), sample_plan(counts, 7, (0, 1)), strict=False)]
    other = [d for _, d in zip(range(200), sample_plan(counts, 7, (1, 1)), strict=False)]
    assert first == again
    assert [(d.shard, d.position) for d in first] != [(d.shard, d.position) for d in other]
    assert {d.shard for d in first} == {0, 1, 2}
    last: dict[int, tuple[int, int]] = {}
    for d in first:  # each slot continues where it stopped, or starts a new shard at 0
        shard, pos = last.get(d.slot, (None, -1))
        assert d.position < counts[d.shard]
        assert (d.shard == shard and d.position == pos + 1) or d.position == 0
        last[d.slot] = (d.shard, d.position)


def test_frame_indices_stride_start_and_ping_pong() -> None:
    rng = np.random.default_rng(0)
    strides = Counter()
    for _ in range(200):
        idx = frame_indices(30, 8, 4, rng)
        step = set(np.diff(idx).tolist())
        assert len(step) == 1 and idx[0] >= 0 and idx[-1] < 30
        strides[step.pop()] += 1
    assert set(strides) == {1, 2, 3, 4}  # (8-1)*4+1 = 29 <= 30 frames, so every stride fits
    assert set(np.diff(frame_indices(10, 8, 4, rng)).tolist()) == {1}  # only stride 1 fits 10 frames
    assert frame_indices(4, 9, 1, rng).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]


def test_rebase_queries_keeps_exact_queries_and_requeries_dropped_frames() -> None:
    tracks = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    visible = np.ones((5, 3), bool)
    visible[:4, 1] = False  # point 1 becomes visible only at frame 4
    visible[:, 2] = False  # point 2 is never visible
    queries = np.array([[2, 10.5, 11.5], [0, 1, 1], [0, 2, 2]], np.float32)
    out, valid = rebase_queries(queries, tracks, visible, np.array([1, 2, 3, 4]))
    assert valid.tolist() == [True, True, False]
    assert out[0].tolist() == [1, 10.5, 11.5]  # frame 2 is now frame 1, position untouched
    assert out[1].tolist() == [3, *tracks[4, 1].tolist()]  # query frame 0 dropped: first visible kept frame


def test_choose_tracks_subsets_or_pads_with_masked_repeats() -> None:
    rng = np.random.default_rng(0)
    valid = np.array([True, False, True, True, False])
    idx, ok = choose_tracks(valid, 2, rng)
    assert ok.all() and set(idx.tolist()) <= {0, 2, 3} and len(set(idx.tolist())) == 2
    idx, ok = choose_tracks(valid, 5, rng)
    assert ok.tolist() == [True, True, True, False, False]
    assert set(idx.tolist()) <= {0, 2, 3}


def test_scale_points_maps_corner_pixels_to_corner_pixels() -> None:
    pts = np.array([[0, 0], [63, 31]], np.float32)
    assert scale_points(pts, (32, 64), (64, 128)) == pytest.approx(np.array([[0, 0], [127, 63]]))


def test_prepare_clip_picks_teachers_at_random_and_resizes() -> None:
    spec = ClipSpec(num_frames=8, num_tracks=4, height=64, width=96)  # also a different aspect ratio
    seen = Counter()
    for draw in range(40):
        clip = prepare_clip(_sample(), _frames(), spec, 8, np.random.default_rng(draw))
        assert clip is not None
        seen[clip["teacher"]] += 1
        assert clip["video"].shape == (8, 64, 96, 3) and clip["video"].dtype == torch.uint8
        assert clip["tracks"].shape == (8, 4, 2) and clip["visible"].shape == (8, 4)
        assert clip["occluded_supervised"] == (clip["teacher"] != "lk")
        q = clip["queries"]
        assert q.shape == (4, 3) and float(q[:, 1].max()) <= 95 and float(q[:, 2].max()) <= 63
    assert seen["lk"] > 5 and seen["cotracker3_offline"] > 5


def test_prepare_clip_scales_labels_with_the_frames() -> None:
    spec = ClipSpec(num_frames=T0, num_tracks=N0, height=2 * H0, width=2 * W0)
    sample = _sample(teachers=("lk",))
    clip = prepare_clip(sample, _frames(), spec, T0, np.random.default_rng(0))
    assert clip is not None
    expected = scale_points(sample["labels"]["lk"]["tracks"], (H0, W0), (2 * H0, 2 * W0))
    assert torch.allclose(clip["tracks"], torch.from_numpy(expected))


def test_prepare_clip_gives_up_when_no_point_is_trackable() -> None:
    sample = _sample(teachers=("lk",))
    sample["labels"]["lk"]["visibility"][:] = False
    sample["queries"][:, 0] = 11  # query frame outside the 4 kept frames below
    clip = prepare_clip(
        sample, _frames(), ClipSpec(num_frames=4, num_tracks=2, height=H0, width=W0), 4, np.random.default_rng(0)
    )
    assert clip is None or not bool(clip["valid"].any())


# --------------------------------------------------------------------------- shards on disk


def _write_shards(workspace: str, shards: int = 3, per_shard: int = 4) -> None:
    from pseudotrack.storage.uri import open_store
    from pseudotrack.tasks.clip_codec import encode_clip
    from pseudotrack.tasks.shards import Sample, ShardSink
    from pseudotrack.teachers.base import TeacherOutput

    store = open_store(workspace)
    frames = _frames()
    data = encode_clip(frames, 24.0)
    for b in range(shards):
        sink = ShardSink(store, "r1", f"b{b}", max_samples=per_shard)
        for i in range(per_shard):
            s = _sample(f"s{b}_{i}")
            labels = {n: TeacherOutput(**lab) for n, lab in s["labels"].items()}
            sink.add(Sample(s["key"], data, s["queries"], labels, s["meta"]), {"video_key": s["key"]})
        sink.close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = tmp_path_factory.mktemp("ws")
    _write_shards(str(path))
    return path


def _take(loader, n: int, state: LoaderState | None = None) -> list[dict]:
    out = []
    for batch in loader:
        if state is not None:
            state.update(batch)
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_shard_refs_count_only_committed_shards(workspace) -> None:
    refs = shard_refs(str(workspace))
    assert len(refs) == 3 and all(r.count == 4 for r in refs)
    (workspace / "shards" / "r1" / "orphan-0000.tar").write_bytes(b"no manifest, not committed")
    assert len(shard_refs(str(workspace), ["r1"])) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_where_it_stopped(workspace, workers: int) -> None:
    refs = shard_refs(str(workspace))
    spec = ClipSpec(num_frames=8, num_tracks=5, height=H0, width=W0, min_frames=4)  # an offline student's trim
    straight = _take(make_loader(refs, spec, 3, seed=5, num_workers=workers), 5)
    state = LoaderState()
    _take(make_loader(refs, spec, 3, seed=5, num_workers=workers), 3, state)  # "killed" after 3 batches
    saved = LoaderState.from_dict(state.to_dict())
    resumed = _take(make_loader(refs, spec, 3, seed=5, num_workers=workers, state=saved), 2)
    for a, b in zip(straight[3:], resumed, strict=True):
        assert a["keys"] == b["keys"] and a["teachers"] == b["teachers"]
        for name in ("video", "queries", "tracks", "visible", "valid"):
            assert torch.equal(a[name], b[name]), name
    lengths = {b["video"].shape[1] for b in straight}
    assert lengths <= set(range(4, 9)) and len(lengths) > 1  # offline random trim, shared within a batch
    assert straight[0]["video"].shape[0] == 3


def test_ranks_read_different_streams(workspace) -> None:
    refs = shard_refs(str(workspace))
    spec = ClipSpec(num_frames=6, num_tracks=3, height=H0, width=W0)
    a = _take(make_loader(refs, spec, 4, seed=1, rank=0), 3)
    b = _take(make_loader(refs, spec, 4, seed=1, rank=1), 3)
    assert [x["keys"] for x in a] != [x["keys"] for x in b]


def test_loader_reads_shards_from_s3(s3_uri: str) -> None:
    _write_shards(s3_uri, shards=2, per_shard=3)
    refs = shard_refs(s3_uri)
    assert [r.url.startswith(s3_uri + "/shards/r1/") for r in refs] == [True, True]
    spec = ClipSpec(num_frames=6, num_tracks=3, height=H0, width=W0)
    batches = _take(make_loader(refs, spec, 2, seed=0), 4)  # 8 clips from 6 samples: resampled
    assert all(b["video"].shape == (2, 6, H0, W0, 3) for b in batches)
    assert {k for b in batches for k in b["keys"]} <= {f"s{i}_{j}" for i in range(2) for j in range(3)}


def test_loader_stops_with_a_reason_when_no_sample_is_usable(tmp_path) -> None:
    from pseudotrack.storage.uri import open_store
    from pseudotrack.tasks.shards import Sample, ShardSink
    from pseudotrack.teachers.base import TeacherOutput

    sink = ShardSink(open_store(str(tmp_path)), "r1", "broken")
    s = _sample("bad")
    labels = {n: TeacherOutput(**lab) for n, lab in s["labels"].items()}
    sink.add(Sample("bad", b"not a video", s["queries"], labels, s["meta"]), {"video_key": "bad"})
    sink.close()
    loader = make_loader(shard_refs(str(tmp_path)), ClipSpec(num_frames=6, num_tracks=3, height=H0, width=W0), 1, 0)
    with pytest.raises(RuntimeError, match="in a row could not be used"):
        next(iter(loader))


def test_shards_written_before_the_clip_field_was_renamed_still_load(tmp_path) -> None:
    """Old shards hold the clip as an MJPEG AVI under the field `mp4`: the loader and `render` read them."""
    import cv2

    from pseudotrack.render import render_sample_file
    from pseudotrack.storage.catalog import Catalog
    from pseudotrack.storage.uri import open_store
    from pseudotrack.tasks.clip_codec import CLIP_FIELD, jpegs, mux_jpegs, psnr
    from pseudotrack.tasks.shards import Sample, ShardSink, read_shard, recover_committed
    from pseudotrack.teachers.base import TeacherOutput

    class OldSample(Sample):
        def to_record(self) -> dict:
            record = super().to_record()
            record["mp4"] = record.pop(CLIP_FIELD)
            return record

    frames = _frames()
    # the old format: an MJPEG AVI (quality 100, as the old encoder stored noise like these frames)
    old_clip = mux_jpegs(jpegs(frames, 100), W0, H0, 24.0, container_format="avi")
    assert old_clip[:4] == b"RIFF" and old_clip[8:12] == b"AVI "
    store = open_store(str(tmp_path))
    sink = ShardSink(store, "old", "b0")
    s = _sample("old0", teachers=("lk",))
    labels = {n: TeacherOutput(**lab) for n, lab in s["labels"].items()}
    row = {"video_key": "v.mp4", "etag": "e", "status": "labelled", "sample_key": "old0", "teachers": ["lk"]}
    meta = dict(s["meta"], source_key="v.mp4", fps=24.0)
    sink.add(OldSample("old0", old_clip, s["queries"], labels, meta), dict(row, round_id="old"))
    (shard,) = sink.close()
    (sample,) = read_shard(str(tmp_path / shard.key))
    assert sample["clip"] == old_clip
    # the student loader
    spec = ClipSpec(num_frames=T0, num_tracks=N0, height=H0, width=W0)
    (batch,) = _take(make_loader(shard_refs(str(tmp_path)), spec, 1, seed=0), 1)
    assert batch["keys"] == ["old0"] and batch["video"].shape == (1, T0, H0, W0, 3)
    shown = batch["video"][0].numpy()
    assert all(max(psnr(f, g) for g in frames) >= 40.0 for f in shown)  # each frame is one of the clip's
    # render (through the catalog, as `pseudotrack show` finds a sample)
    assert recover_committed(store, Catalog(store)) == 1
    out = tmp_path / "old.png"
    info = render_sample_file(str(tmp_path), out, sample_key="old0")
    assert info == {"teacher": "lk", "source_key": "v.mp4", "frames": T0}
    assert cv2.imread(str(out)).shape == (2 * H0, 3 * W0, 3)  # the frame grid
