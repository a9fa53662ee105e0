"""The worker-process side of the pipelined label batch (tasks/pipeline.py): a clip's CPU stages.

A worker runs decode, SIFT queries and the clip's encoding for one video at a
time and sends back the prepared clip with its encoded bytes, so the frames
cross a pipe once and the batch's own process only runs the teachers and
writes. It imports no Prefect and no teacher code; torch comes in only because
decord must be imported after it (DESIGN.md pitfalls).

Messages on the worker's pipe, worker to batch:
    ("ready",)                       after the imports, once
    ("attached", ok)                 after an "attach": whether it maps the batch's frame slots
    ("stage", name)                  as each stage starts, so a crash is reported with its stage
    ("done", index, result)          result: ("ok", PreparedVideo, timings) or
                                     ("sample_error", stage, reason, timings) or
                                     ("error", type name, message, traceback, timings)
and batch to worker: ("attach", path, slot bytes, slots) (tasks/frame_slots.py), or
(index, PlannedVideo, bytes, RoundConfig, teacher names, slot or None), or None to stop. With a slot,
the frames of an "ok" result are in it (PreparedVideo.frames_slot) rather than in the message.
A worker also stops when the batch's process dies (its parent's sentinel).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from multiprocessing.connection import wait

import cv2

from ..errors import SampleError
from ..faults import configure_from_env, fault_point
from .clip_codec import encode_clip_described
from .decode import _decord
from .frame_slots import WorkerSlots
from .prepare import prepare_video

# Workers yield the CPU to the batch's own process: on a GPU host its teacher thread launches the GPU's
# kernels one by one, and a launch that waits for a core behind a worker's decode leaves the GPU idle.
# Only the order in which runnable threads get a core changes; nothing a worker computes does.
WORKER_NICENESS = 10


class _Names:
    def __init__(self, names: list[str]):
        self.names = names


def cpu_stages(video, data: bytes, config, names: list[str], on_stage=None) -> tuple:
    """One video's CPU stages; never raises for a bad video (the result says what failed and where)."""
    timings: dict[str, float] = {}
    stage = ["read"]

    def enter(name: str) -> None:
        stage[0] = name
        if on_stage:
            on_stage(name)
        fault_point(f"worker.{name}")  # crash tests: a worker killed (or crashing) in this stage
        fault_point(f"worker.{name}.{video.key}")  # ... for one video only

    cpu = time.process_time()
    try:
        prepared = prepare_video(video, data, config, _Names(names), timings, on_stage=enter)
        enter("encode")
        t = time.perf_counter()
        prepared.clip_bytes, prepared.clip_stored = encode_clip_described(prepared.clip.frames, prepared.clip.fps)
        timings["encode"] = time.perf_counter() - t
        timings["cpu"] = time.process_time() - cpu
        return ("ok", prepared, timings)
    except SampleError as exc:
        timings["cpu"] = time.process_time() - cpu
        return ("sample_error", exc.stage, exc.reason, timings)
    except Exception as exc:  # a bug or an unexpected library error: reported as internal, like in-process
        timings["cpu"] = time.process_time() - cpu
        return ("error", type(exc).__name__, str(exc), traceback.format_exc(), timings)


def worker_main(conn, fault_vars: dict[str, str]) -> None:
    """A worker process's loop (the target the batch starts)."""
    configure_from_env(fault_vars)
    with contextlib.suppress(OSError):  # a host that forbids it still labels, at the default priority
        os.nice(WORKER_NICENESS)
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only contend with the other workers
    _decord()  # torch and decord loaded before "ready", not on the first clip
    slots: WorkerSlots | None = None
    parent = multiprocessing.parent_process()
    watched = [conn] + ([parent.sentinel] if parent is not None else [])
    conn.send(("ready",))
    while True:
        if conn not in wait(watched):
            return  # the batch's process died: nobody will read what this worker makes
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        if job[0] == "attach":
            slots = attach(*job[1:])
            conn.send(("attached", slots is not None))
            continue
        index, video, data, config, names, slot = job
        result = cpu_stages(video, data, config, names, on_stage=lambda name: conn.send(("stage", name)))
        del data
        if slot is not None and slots is not None and result[0] == "ok":
            move_frames(result, slots, slot)
        try:
            conn.send(("done", index, result))
        except (BrokenPipeError, OSError):
            return


def attach(path: str, size: int, count: int) -> WorkerSlots | None:
    """Map the batch's frame slots (a pool serves one batch, so once); None when they cannot be mapped."""
    try:
        return WorkerSlots(path, size, count)
    except (OSError, ValueError):
        return None


def move_frames(result: tuple, slots: WorkerSlots, slot: int) -> None:
    """Put an "ok" result's frames into its slot, leaving the message without them (or as it was if they
    do not fit). The copy's CPU counts in the result's timings, as the stages' does."""
    prepared, timings = result[1], result[2]
    fault_point("worker.frames")  # crash tests: a worker killed while its frames go into their slot
    fault_point(f"worker.frames.{prepared.video.key}")
    cpu = time.process_time()
    frames = prepared.clip.frames
    if slots.put(slot, frames):
        prepared.frames_slot = (slot, tuple(frames.shape))
        prepared.clip.frames = None
    timings["cpu"] = timings.get("cpu", 0.0) + time.process_time() - cpu
