"""Model faults: out of memory splits the work and retries; NaN or infinite labels fail only their clip.

`OomAbove` wraps a real teacher and raises torch's OutOfMemoryError whenever
a forward holds more clips, or a clip more queries, than it allows, the way a
GPU fails when a batch is too big. The labelling test registers such a teacher
by name and runs a real batch through `label_batch` into real shards and
catalog events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference import TAPIR_TINY  # tests/reference.py
from videos import translating_frames, write_mp4  # tests/videos.py

from pseudotrack.config import RoundConfig
from pseudotrack.errors import SampleError
from pseudotrack.render import shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.labelling import PlannedVideo, TeacherPool, label_batch, resolve_checkpoints
from pseudotrack.tasks.shards import committed_shards, read_shard
from pseudotrack.teachers import base
from pseudotrack.teachers.base import (
    TeacherSpec,
    create_teacher,
    is_out_of_memory,
    predict_batch,
    predict_clips,
    register_teacher,
    teacher_names,
)
from pseudotrack.teachers.cotracker3 import CoTracker3, tiny_config
from pseudotrack.teachers.tapir import Tapir

TOL_PX = 1e-4  # float rounding of a batched or differently chunked forward (see test_teacher_batching)


class OomAbove:
    """A real teacher that "runs out of memory" on forwards of more than `max_clips` clips or on clips
    of more than `max_queries` queries; `poison_brighter_than` makes it return NaN for bright clips.
    Every forward asked of it is logged in `calls` as the query counts of its clips."""

    def __init__(self, inner, max_clips: int, max_queries: int = 10**9, error=None, poison_brighter_than=None):
        self.inner = inner
        self.max_clips = max_clips
        self.max_queries = max_queries
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        self.poison = poison_brighter_than
        self.calls: list[tuple[int, ...]] = []
        self.name = inner.name
        self.checkpoint_sha256 = inner.checkpoint_sha256
        self.tracks_occluded = inner.tracks_occluded
        self.queries_independent = getattr(inner, "queries_independent", False)
        if hasattr(inner, "batch_key"):
            self.batch_key = inner.batch_key

    def setup(self, device: str = "cpu") -> None:
        self.inner.setup(device)

    def predict(self, frames, queries):
        return self.predict_batch([(frames, queries)])[0]

    def predict_batch(self, clips):
        self.calls.append(tuple(len(q) for _, q in clips))
        if len(clips) > self.max_clips or max(len(q) for _, q in clips) > self.max_queries:
            raise self.error()
        outs = predict_batch(self.inner, clips)
        for (frames, _), out in zip(clips, outs, strict=True):
            if self.poison is not None and frames.mean() > self.poison:
                out.tracks[:] = np.nan
        return outs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tapir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("oom") / "tapir.pt"
    torch.save(Tapir(TAPIR_TINY).state_dict(), path)
    teacher = create_teacher("tapir", checkpoint=path, config=TAPIR_TINY)
    teacher.setup("cpu")
    return teacher


@pytest.fixture(scope="module")
def cotracker(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("oom") / "ct3.pth"
    torch.save(CoTracker3(tiny_config(True)).state_dict(), path)
    teacher = create_teacher("cotracker3_offline", checkpoint=path, model_config=tiny_config())
    teacher.setup("cpu")
    return teacher


@pytest.fixture
def releases(monkeypatch) -> list[int]:
    """Counts the CUDA cache releases between retries."""
    count: list[int] = []
    monkeypatch.setattr(base, "release_accelerator_memory", lambda: count.append(1))
    return count


def clip(t: int, seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return translating_frames(t, h, w, 1.0, 0.5, seed=seed)


def queries(t: int, n: int, seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, t, n), rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], 1).astype(np.float32)


def assert_close(got, want) -> None:
    assert got.tracks.shape == want.tracks.shape
    assert float(np.abs(got.tracks - want.tracks).max(initial=0.0)) <= TOL_PX
    np.testing.assert_array_equal(got.visibility, want.visibility)


# ---------------------------------------------------------------- recognising the error


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocation errors, not any text


# ---------------------------------------------------------------- splitting clips


def test_batch_is_halved_down_to_single_clips(tapir, releases):
    teacher = OomAbove(tapir, max_clips=1)
    clips = [(clip(8, s), queries(8, 6, s)) for s in range(4)]
    outs = predict_clips(teacher, clips, max_clips=4)
    # 4 fails, 2 fails, 1 + 1, 2 fails, 1 + 1
    assert [len(c) for c in teacher.calls] == [4, 2, 1, 1, 2, 1, 1]
    assert len(releases) == 3
    for (frames, q), out in zip(clips, outs, strict=True):
        assert_close(out, tapir.predict(frames, q))
        assert out.notes == {}


def test_batch_splits_only_as_far_as_needed(tapir, releases):
    teacher = OomAbove(tapir, max_clips=2)
    clips = [(clip(8, s), queries(8, 6, s)) for s in range(5)]
    outs = predict_clips(teacher, clips, max_clips=5)
    assert [len(c) for c in teacher.calls] == [5, 3, 2, 1, 2]  # 5 -> 3 + 2, 3 -> 2 + 1
    assert len(releases) == 2
    for (frames, q), out in zip(clips, outs, strict=True):
        assert_close(out, tapir.predict(frames, q))


def test_plain_runtime_error_saying_out_of_memory_splits_too(tapir):
    teacher = OomAbove(tapir, max_clips=1, error=lambda: RuntimeError("CUDA error: out of memory"))
    clips = [(clip(8, s), queries(8, 4, s)) for s in range(2)]
    outs = predict_clips(teacher, clips, max_clips=2)
    assert [len(c) for c in teacher.calls] == [2, 1, 1]
    assert all(not isinstance(o, Exception) for o in outs)


# ---------------------------------------------------------------- splitting one clip's queries


def test_independent_queries_run_in_parts_exactly(tapir, releases):
    teacher = OomAbove(tapir, max_clips=4, max_queries=12)
    frames, q = clip(8, 7), queries(8, 40, 7)
    (out,) = predict_clips(teacher, [(frames, q)], max_clips=4)
    assert teacher.calls == [(40,), (20,), (10,), (10,), (10,), (10,)]  # whole, halves (first fails), quarters
    assert len(releases) == 2
    assert out.notes == {"query_chunks": 4}
    assert_close(out, tapir.predict(frames, q))


def test_cotracker_query_parts_are_an_accepted_and_recorded_fallback(cotracker, caplog):
    """CoTracker's tracks share context, so parts differ slightly from a whole run: each part is exactly
    what the teacher gives those queries alone (with its support points), and the output says so."""
    teacher = OomAbove(cotracker, max_clips=4, max_queries=10)
    frames, q = clip(8, 8), queries(8, 16, 8)
    with caplog.at_level("WARNING"):
        (out,) = predict_clips(teacher, [(frames, q)], max_clips=4)
    assert out.notes == {"query_chunks": 2}
    assert "queries in 2 parts" in caplog.text
    assert out.tracks.shape == (8, 16, 2) and out.is_finite()
    for part in (slice(0, 8), slice(8, 16)):
        alone = cotracker.predict(frames, q[part])
        np.testing.assert_allclose(out.tracks[:, part], alone.tracks, atol=TOL_PX)
        np.testing.assert_array_equal(out.visibility[:, part], alone.visibility)


def test_clip_fails_with_a_reason_when_even_small_parts_do_not_fit(tapir):
    teacher = OomAbove(tapir, max_clips=0)
    good, big = (clip(8, 9), queries(8, 20, 9)), (clip(8, 10), queries(8, 20, 10))
    outs = predict_clips(teacher, [good, big], max_clips=2, min_query_chunk=5)
    for out in outs:
        assert isinstance(out, SampleError) and out.stage == "teacher"
        assert "tapir ran out of memory on 8 frames and 20 queries" in out.reason
        assert "parts of 5" in out.reason
    # two clips, halved to one each; each alone, then in 2 and 4 parts (the first part of each fails)
    assert [len(c) for c in teacher.calls] == [2, 1, 1, 1, 1, 1, 1]


def test_single_predict_turns_out_of_memory_into_a_sample_error(tapir, monkeypatch):
    def no_memory(group):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(tapir, "forward", no_memory)
    with pytest.raises(SampleError, match="tapir ran out of memory on 8 frames and 3 queries"):
        tapir.predict(clip(8, 11), queries(8, 3, 11))


# ---------------------------------------------------------------- in a labelling batch

TEST_TEACHER = "oom_test_lk"
BUILT: list[OomAbove] = []


def _make_test_teacher(**options) -> OomAbove:
    teacher = OomAbove(create_teacher("lk"), max_clips=1, poison_brighter_than=160, **options)
    teacher.name = TEST_TEACHER
    BUILT.append(teacher)
    return teacher


if TEST_TEACHER not in teacher_names():
    register_teacher(
        TeacherSpec(
            name=TEST_TEACHER,
            factory=_make_test_teacher,
            needs_checkpoint=False,
            description="lk that runs out of memory above one clip per forward and poisons bright clips (tests)",
        )
    )


def _bucket(folder: Path) -> list[PlannedVideo]:
    """Five textured clips; the third is bright, which the test teacher answers with NaN."""
    folder.mkdir()
    videos = []
    for i in range(5):
        frames = translating_frames(14, 96, 128, 1.5, -0.5, seed=40 + i)
        if i == 2:
            frames = frames // 2 + 128  # mean about 190, still textured
        path = write_mp4(frames, folder / f"v{i}.mp4")
        videos.append(PlannedVideo(key=path.name, size=path.stat().st_size, etag=f"e{i}"))
    return videos


def _round(tmp_path: Path, name: str, teacher: str, batch: int, videos, bucket, cpu_workers: int = 0) -> dict:
    """cpu_workers=0 by default: the in-process batch gives the teacher its clips `batch` at a time, in order
    (the pipelined one gives them as they arrive from the workers, so its groups depend on timing)."""
    config = RoundConfig(
        bucket=str(bucket),
        workspace=str(tmp_path / name),
        round_id=name,
        teachers=[teacher],
        teacher_batch=batch,
        device="cpu",
        num_frames=12,
        min_frames=8,
        height=96,
        width=128,
        num_queries=24,
        num_keyframes=4,
        seed=3,
        cpu_workers=cpu_workers,
    )
    workspace = open_store(str(tmp_path / name))
    result = label_batch(
        videos, config, resolve_checkpoints(config), open_store(str(bucket)), workspace, Catalog(workspace)
    )
    rows = {r["video_key"]: r for r in Catalog(workspace).latest().to_pylist()}
    samples = {}
    for manifest in committed_shards(workspace, name):
        for sample in read_shard(shard_url(workspace, manifest["shard"])):
            samples[sample["meta"]["source_key"]] = sample
    return {"result": result, "rows": rows, "samples": samples}


def test_labelling_splits_on_out_of_memory_and_fails_only_the_nan_clip(tmp_path):
    bucket = tmp_path / "bucket"
    videos = _bucket(bucket)
    BUILT.clear()
    TeacherPool._cache.pop((TEST_TEACHER, None, "cpu"), None)  # a fresh instance, so its call log is this test's
    got = _round(tmp_path, "oom", TEST_TEACHER, 4, videos, bucket)
    want = _round(tmp_path, "plain", "lk", 1, videos, bucket)

    (teacher,) = BUILT
    sizes = [len(c) for c in teacher.calls]
    assert sizes[:3] == [4, 2, 1] and max(sizes) == 4  # the first four clips went in together and were split
    rows = got["rows"]
    assert rows["v2.mp4"]["status"] == "failed" and rows["v2.mp4"]["stage"] == "teacher"
    assert rows["v2.mp4"]["reason"] == f"{TEST_TEACHER} returned NaN or infinite values"
    assert "v2.mp4" not in got["samples"]
    labelled = [f"v{i}.mp4" for i in (0, 1, 3, 4)]
    assert all(rows[k]["status"] == "labelled" for k in labelled)
    assert got["result"].labelled == 4 and got["result"].failed == 1
    # the neighbours of the NaN clip, split apart after running out of memory, carry exactly lk's labels
    assert set(got["samples"]) == set(labelled) and want["rows"]["v2.mp4"]["status"] == "labelled"
    for key in labelled:
        ours, theirs = got["samples"][key]["labels"][TEST_TEACHER], want["samples"][key]["labels"]["lk"]
        np.testing.assert_array_equal(ours["tracks"], theirs["tracks"])
        np.testing.assert_array_equal(ours["visibility"], theirs["visibility"])
        np.testing.assert_array_equal(got["samples"][key]["queries"], want["samples"][key]["queries"])


def test_pipelined_batch_fails_only_the_nan_clip(tmp_path):
    """With CPU worker processes the teacher still fails the NaN clip alone, and its neighbours get lk's labels."""
    bucket = tmp_path / "bucket"
    videos = _bucket(bucket)
    got = _round(tmp_path, "pipelined", TEST_TEACHER, 4, videos, bucket, cpu_workers=1)
    want = _round(tmp_path, "plain", "lk", 1, videos, bucket)
    rows = got["rows"]
    assert rows["v2.mp4"]["status"] == "failed" and rows["v2.mp4"]["stage"] == "teacher"
    assert rows["v2.mp4"]["reason"] == f"{TEST_TEACHER} returned NaN or infinite values"
    labelled = [f"v{i}.mp4" for i in (0, 1, 3, 4)]
    assert set(got["samples"]) == set(labelled) and got["result"].labelled == 4 and got["result"].failed == 1
    for key in labelled:
        ours, theirs = got["samples"][key]["labels"][TEST_TEACHER], want["samples"][key]["labels"]["lk"]
        np.testing.assert_array_equal(ours["tracks"], theirs["tracks"])
        np.testing.assert_array_equal(got["samples"][key]["queries"], want["samples"][key]["queries"])
