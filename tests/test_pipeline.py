"""The pipelined label batch (tasks/pipeline.py): the same shards whatever the number of CPU workers, a worker
that crashes fails only its video, a pool that cannot start falls back to the in-process path."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from pseudotrack.config import RoundConfig
from pseudotrack.errors import ConfigError
from pseudotrack.flows.label_round import run_round
from pseudotrack.tasks import cpu_pool, pipeline
from pseudotrack.tasks.clip_codec import CLIP_FIELD
from pseudotrack.tasks.cpu_pool import cpu_worker_count, signal_name
from pseudotrack.tasks.frame_slots import FrameSlots
from pseudotrack.tasks.pipeline import in_flight_limit
from pseudotrack.tasks.throughput import bound_by

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
SMALL = dict(
    height=96,
    width=128,
    num_frames=8,
    min_frames=8,
    num_queries=32,
    num_keyframes=2,
    batch_size=8,
    shard_max_samples=3,
    teachers=["lk"],
    device="cpu",
    seed=5,
)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """The real clips, each under two names (different keys: different frames and queries), and a broken file."""
    if not VIDEOS.is_dir():
        pytest.fail(f"the shared sample videos are missing: {VIDEOS}")
    root = tmp_path_factory.mktemp("pipe-bucket")
    for path in sorted(VIDEOS.glob("*.mp4")):
        for copy in ("a", "b"):
            shutil.copy(path, root / f"{path.stem}_{copy}.mp4")
    (root / "broken.mp4").write_bytes((VIDEOS / "cat.mp4").read_bytes()[:4000])
    return root


def shard_members(workspace: Path) -> dict[str, bytes]:
    """Every member of every committed shard: name -> bytes (the samples' exact stored bytes)."""
    members = {}
    for tar in sorted((workspace / "shards").rglob("*.tar")):
        with tarfile.open(tar) as archive:
            for info in archive.getmembers():
                members[info.name] = archive.extractfile(info).read()
    return members


def run(bucket: Path, workspace: Path, **overrides):
    config = RoundConfig(bucket=str(bucket), workspace=str(workspace), round_id="r", **{**SMALL, **overrides})
    return run_round(config)


def test_cpu_workers_config():
    assert cpu_worker_count(0) == 0 and cpu_worker_count(3) == 3 and cpu_worker_count(None) >= 1
    # batches side by side in one process share the cores instead of each starting cores - 1 workers
    cores = len(os.sched_getaffinity(0))
    assert cpu_worker_count(None, 2) == max(1, (cores - 1) // 2) and cpu_worker_count(None, 10**6) == 1
    assert cpu_worker_count(3, 4) == 3  # an explicit number is per batch, as given
    with pytest.raises(ConfigError, match="cpu_workers=-1 must be 0"):
        RoundConfig(bucket="b", workspace="w", cpu_workers=-1)
    assert in_flight_limit(1, 1) == 3
    assert signal_name(-11) == "signal SIGSEGV" and signal_name(-9) == "signal SIGKILL"
    assert bound_by({"teacher": 9.5, "batch": 10.0}) == "teacher"
    assert bound_by({"teacher": 2.0, "batch": 10.0}) == "cpu"


class WatchedSlots(FrameSlots):
    """The batch's frame slots, noting how many clips came back through them and what was free at the end."""

    made: list[WatchedSlots] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.views = 0
        self.free_at_close = None
        WatchedSlots.made.append(self)

    def view(self, slot, shape):
        self.views += 1
        return super().view(slot, shape)

    def close(self):
        self.free_at_close = self.free()
        super().close()


def test_labels_identical_for_any_worker_count(bucket, tmp_path, monkeypatch):
    """cpu_workers 0 (in-process), 1 and 3, frames back through shared memory or the pipes, one or three
    scoring threads: the committed shards hold the same bytes, failures the same reasons."""
    monkeypatch.setattr(pipeline, "FrameSlots", WatchedSlots)
    WatchedSlots.made.clear()
    results = {}
    for workers in (0, 1, 3, "3 by pipe"):
        if workers == 3:  # and three threads scoring the labelled clips, as on a 12-core host
            monkeypatch.setattr(pipeline, "finisher_count", lambda: 3)
        if workers == "3 by pipe":
            monkeypatch.setattr(pipeline, "USE_FRAME_SLOTS", False)
        summary = run(bucket, tmp_path / f"ws{workers}", cpu_workers=int(str(workers)[0]))
        results[workers] = (summary, shard_members(tmp_path / f"ws{workers}"))
    base, members = results[0]
    assert base.labelled == 6 and base.failed == 1, base
    assert len([m for m in members if m.endswith(f".{CLIP_FIELD}")]) == 6  # one stored clip per labelled video
    # with 1 and 3 workers every labelled clip came back through a slot, all slots were free at the end, and
    # nothing is left in /dev/shm; the pipe run made none
    slots = WatchedSlots.made
    assert len(slots) == 2 and [s.count for s in slots] == [in_flight_limit(1, 1), in_flight_limit(3, 1)]
    assert [s.views for s in slots] == [6, 6]
    assert all(s.free_at_close == s.count and not os.path.exists(s.path) for s in slots)
    for workers in (1, 3, "3 by pipe"):
        summary, got = results[workers]
        assert (summary.labelled, summary.failed, summary.failure_reasons) == (
            base.labelled,
            base.failed,
            base.failure_reasons,
        )
        assert got.keys() == members.keys()
        differ = [name for name in members if got[name] != members[name]]
        assert not differ, f"cpu_workers={workers}: members differ from the in-process run: {differ}"
    # where the time went, and the teacher's share of it
    stages = results[1][0].stage_seconds
    assert {"read", "decode", "queries", "encode", "teacher", "quality", "batch"} <= stages.keys()
    assert 0 < stages["teacher"] < stages["batch"]
    assert results[3][0].stage_seconds["quality"] > 0  # the scoring threads' own timings reach the batch's
    # the catalog's duration_s is the source video's length (it was empty on every row)
    rows = _catalog_rows(tmp_path / "ws1")
    assert rows["bear_a.mp4"]["duration_s"] == pytest.approx(82 / 30, rel=0.02)
    assert all(r["duration_s"] > 0 for r in rows.values() if r["status"] == "labelled")


def _catalog_rows(workspace: Path) -> dict[str, dict]:
    from pseudotrack.storage.catalog import Catalog
    from pseudotrack.storage.uri import open_store

    table = Catalog(open_store(str(workspace))).latest()
    return {row["video_key"]: row for row in table.to_pylist()}


@pytest.mark.parametrize("signal_var", ["PSEUDOTRACK_FAULT_SEGV", "PSEUDOTRACK_FAULT_POINT"])
@pytest.mark.parametrize("point", ["worker.queries", "worker.frames"])
def test_crashed_worker_fails_its_video_alone(bucket, tmp_path, monkeypatch, signal_var, point):
    """A worker dying on one file (SIGSEGV as decord does on some damaged files; SIGKILL as the kernel's
    out-of-memory killer does) fails that video with its stage and signal; a new worker takes the rest.
    Also while it copies the frames into their shared-memory slot: the slot goes back, the batch goes on."""
    reference = run(bucket, tmp_path / "reference", cpu_workers=0)
    monkeypatch.setattr(pipeline, "FrameSlots", WatchedSlots)
    WatchedSlots.made.clear()
    monkeypatch.setenv(signal_var, f"{point}.bear_b.mp4:1")
    summary = run(bucket, tmp_path / "ws", cpu_workers=1)
    assert len(WatchedSlots.made) == 1 and WatchedSlots.made[0].free_at_close == WatchedSlots.made[0].count
    name = "SIGSEGV" if signal_var.endswith("SEGV") else "SIGKILL"
    assert summary.labelled == reference.labelled - 1 and summary.failed == reference.failed + 1
    rows = _catalog_rows(tmp_path / "ws")
    assert rows["bear_b.mp4"]["status"] == "failed"
    row = rows["bear_b.mp4"]
    stage = "queries" if point == "worker.queries" else "encode"  # the copy follows the encode stage
    assert f"{row['stage']}: {row['reason']}" == f"{stage}: worker crashed (signal {name})"
    # every other video labelled exactly as in-process
    ref, got = shard_members(tmp_path / "reference"), shard_members(tmp_path / "ws")
    bear_b = {n for n, data in ref.items() if n.endswith(".json") and b'"bear_b.mp4"' in data}
    assert len(bear_b) == 1
    prefix = next(iter(bear_b)).split(".")[0]
    assert {n: d for n, d in ref.items() if not n.startswith(prefix)} == got


def test_pool_that_cannot_start_falls_back(bucket, tmp_path, monkeypatch, caplog):
    def broken(workers):
        raise OSError("no processes for you")

    monkeypatch.setattr(cpu_pool, "CpuPool", broken)
    with caplog.at_level(logging.WARNING, logger="pseudotrack.tasks.pipeline"):
        summary = run(bucket, tmp_path / "ws", cpu_workers=2)
    assert summary.labelled == 6 and summary.failed == 1
    warnings = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert len(warnings) == 1 and "labelling in this process instead" in warnings[0].getMessage()
