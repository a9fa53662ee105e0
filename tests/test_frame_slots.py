"""Shared-memory frame slots (tasks/frame_slots.py): what a worker puts is what the batch reads, slots are
handed out once, and a /dev/shm that cannot hold them is refused at the start, leaving nothing behind."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from pseudotrack.tasks import pipeline
from pseudotrack.tasks.frame_slots import SHM_DIR, FrameSlots, WorkerSlots, slot_bytes


def leftovers() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("pseudotrack-frames-")}


def test_what_a_worker_puts_the_batch_reads():
    before = leftovers()
    slots = FrameSlots(3, slot_bytes(4, 6, 8))
    worker = WorkerSlots(slots.path, slots.size, slots.count)
    slots.unlink()  # as the batch does once its workers mapped the file
    assert leftovers() == before
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (n, 6, 8, 3), dtype=np.uint8) for n in (4, 2, 4)]
    taken = [slots.take() for _ in clips]
    assert sorted(taken) == [0, 1, 2] and slots.take() is None
    for slot, frames in zip(taken, clips, strict=True):
        assert worker.put(slot, frames)
    for slot, frames in zip(taken, clips, strict=True):  # each slot kept its own clip
        assert np.array_equal(slots.view(slot, frames.shape), frames)
    assert not worker.put(taken[0], np.zeros((5, 6, 8, 3), np.uint8))  # longer than a slot: refused, untouched
    assert not worker.put(3, clips[0])  # no such slot
    assert np.array_equal(slots.view(taken[0], clips[0].shape), clips[0])
    slots.give(taken[1])
    with pytest.raises(RuntimeError, match="given back twice"):
        slots.give(taken[1])
    assert slots.free() == 1 and slots.take() == taken[1]
    view = slots.view(taken[0], clips[0].shape)
    slots.close()  # a view still alive: the mapping stays with it instead of failing
    assert np.array_equal(view, clips[0])
    worker.close()


def test_a_full_dev_shm_is_refused_at_the_start_and_leaves_nothing():
    before = leftovers()
    with pytest.raises(OSError):
        FrameSlots(4, 10**13)  # more than any /dev/shm holds
    assert leftovers() == before
    with pytest.raises(ValueError):
        FrameSlots(0, 10)


def test_a_batch_without_room_for_slots_sends_frames_by_pipe(tmp_path, monkeypatch):
    """The batch labels as before, with one line saying why, when /dev/shm cannot hold its slots."""
    from test_pipeline import SMALL, VIDEOS, run, shard_members

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "cat.mp4").write_bytes((VIDEOS / "cat.mp4").read_bytes())
    reference = run(bucket, tmp_path / "reference", cpu_workers=0)
    monkeypatch.setattr(pipeline, "slot_bytes", lambda *size: 10**13)
    # a handler of our own: Prefect's logging set-up, on its first flow in this process, replaces caplog's
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("pseudotrack.tasks.pipeline")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        summary = run(bucket, tmp_path / "ws", cpu_workers=1)
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if "no shared memory" in r.getMessage()]
    assert len(lines) == 1 and "through the workers' pipes" in lines[0]
    assert summary.labelled == reference.labelled == 1 and SMALL["batch_size"] >= 1
    assert shard_members(tmp_path / "ws") == shard_members(tmp_path / "reference")
