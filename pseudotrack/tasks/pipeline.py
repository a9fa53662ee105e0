"""The pipelined label batch: CPU stages in worker processes, the teacher fed as clips arrive.

Run one after another, a clip's stages leave the GPU idle while the CPU
decodes, samples SIFT queries and encodes (on a GPU host the CPU stages take
several times the teacher's forward). Here:

    batch process, read threads     read the next videos' bytes from storage, READ_AHEAD at a time, so an
                                    object store's latency is not paid on the main thread
    batch process, main thread      hands each video's bytes to an idle worker, takes results
                                    back, and yields (video, outcome) in the batch's planned order, so the
                                    caller writes shards and catalog rows in that order, as before
    batch process, teacher thread   takes prepared clips as they arrive, up to `teacher_batch` per call
                                    (the usual grouping by teacher), and runs the teachers
    batch process, finisher threads score each labelled clip (`finish`: the quality signals) as soon as
                                    the teacher hands it over, so neither the main thread's intake nor
                                    the teacher waits for it; one per four cores (`finisher_count`), as
                                    a clip's scoring is mostly OpenCV, which lets the other threads run
    worker processes (N)            decode, SIFT queries and clip encoding, one video at a time
                                    (tasks/cpu_worker.py); forkserver context (torch and fork do not mix),
                                    preloaded once per batch process, so later batches start in milliseconds;
                                    the decoded frames come back through shared memory, one slot per video
                                    in flight (tasks/frame_slots.py), or through the pipe where there is none

Bounded: at most Q = 2 * N + teacher_batch videos are between "read" and
"yielded" at any time (in a worker, queued for the teacher, or waiting for
an earlier video to be yielded). Each holds its decoded clip: at 64 frames
of 384x512 RGB that is 37.7 MB, plus its encoded bytes (3-6 MB) and queries
(a few KB). So the batch's process holds at most Q clips: 1 worker and
teacher_batch 1 on a CPU host give Q = 3 (about 130 MB); 15 workers and
teacher_batch 4 on a 16-core GPU host give Q = 34 (about 1.4 GB), plus one
clip being decoded in each worker. The frames of those Q clips live in Q
shared-memory slots reserved in /dev/shm when the batch starts (Q x 37.7 MB
at the recipe's size, taken whole at once, so a /dev/shm too small for them
is found then and the frames go through the pipes instead).

Guarantees kept: labels do not depend on the worker count or arrival order
(each video's random draws come from `video_rng`, and the teacher's grouping
is the usual one, which is exact on the CPU at one clip per forward). A
worker that dies (a library's SIGSEGV on a damaged file, the kernel's SIGKILL
for memory) fails only its video, with the stage it was in and the signal,
and is replaced. A pool that cannot start leaves the batch to run in-process
(one warning). Killing the batch's process stops its workers (they watch
their parent) and leaves what the in-process path leaves: only shards whose
manifest was written count.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import wait

from ..errors import SampleError
from ..faults import fault_point
from .cpu_pool import CpuPool, PoolWorker, host_cores, signal_name
from .frame_slots import FrameSlots, slot_bytes
from .prepare import PlannedVideo, PreparedVideo

log = logging.getLogger(__name__)

READ_AHEAD = 4  # source reads in flight ahead of the workers: their cost is storage latency, not CPU
USE_FRAME_SLOTS = True  # False sends frames through the pipes (bench/bench_label_worker.py compares the two)


def finisher_count() -> int:
    """Threads scoring labelled clips: one per four cores, 1 to 4.

    On a many-core GPU host one scoring thread caps a batch's clips/s near what the teacher reaches
    (`bench/bench_label_worker.py` prints the CPU a clip's scoring takes); the scoring is mostly OpenCV,
    which runs beside the other threads, and a 2-core host keeps one."""
    return max(1, min(4, host_cores() // 4))


def in_flight_limit(workers: int, teacher_batch: int) -> int:
    """Q: the most videos read and not yet yielded (see the module docstring for the memory it implies)."""
    return 2 * workers + teacher_batch


def _result_outcome(video: PlannedVideo, result: tuple) -> PreparedVideo | Exception:
    kind = result[0]
    if kind == "ok":
        return result[1]
    if kind == "sample_error":
        return SampleError(result[1], result[2])
    # not the video's fault (a bug, a full disk): the batch fails and the video stays pending, as in-process
    log.warning("labelling %s failed unexpectedly in a CPU worker:\n%s", video.key, result[3])
    return RuntimeError(f"a CPU worker failed on {video.key}: {result[1]}: {result[2]}")


class _Frames:
    """Which video in flight holds which frame slot; slots go back as soon as nothing reads their frames."""

    def __init__(self, slots: FrameSlots | None):
        self.slots = slots
        self.held: dict[int, int] = {}  # video index -> slot
        self.lock = threading.Lock()

    def assign(self, index: int, worker: PoolWorker) -> int | None:
        if self.slots is None or not worker.slots:
            return None
        slot = self.slots.take()
        if slot is not None:
            with self.lock:
                self.held[index] = slot
        return slot

    def arrived(self, index: int, prepared: PreparedVideo) -> None:
        """Point the clip's frames at its slot (no copy); a clip whose frames came by pipe frees its slot."""
        with self.lock:
            slot = self.held.get(index)
        if prepared.frames_slot is not None and slot == prepared.frames_slot[0]:
            prepared.clip.frames = self.slots.view(slot, prepared.frames_slot[1])
            prepared.frames_slot = None
        elif prepared.frames_slot is not None:
            raise RuntimeError(f"video {index} came back in frame slot {prepared.frames_slot[0]}, not {slot}")
        else:
            self.release(index)

    def release(self, index: int, prepared: PreparedVideo | None = None) -> None:
        """Give back the video's slot, if it holds one, dropping the clip's view of it first."""
        with self.lock:
            slot = self.held.pop(index, None)
        if slot is not None:
            if prepared is not None:
                prepared.clip.frames = None
            self.slots.give(slot)

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()


def open_slots(pool: CpuPool, count: int, config) -> FrameSlots | None:
    """The batch's frame slots, mapped by its workers; None (frames by pipe) when /dev/shm cannot hold them."""
    if not USE_FRAME_SLOTS:
        return None
    try:
        slots = FrameSlots(count, slot_bytes(config.num_frames, config.height, config.width))
    except OSError as exc:
        log.info("no shared memory for %d clips (%s); frames come back through the workers' pipes", count, exc)
        return None
    try:
        pool.attach(slots)
    finally:
        slots.unlink()  # mapped by the workers now, or never: nothing stays in /dev/shm
    return slots


def _pin(prepared: PreparedVideo) -> None:
    """On CUDA, move the frames into page-locked memory (a numpy view of it) so the teacher's host-to-device
    copies run at full speed; the teachers' `torch.from_numpy(frames).to(device)` keeps the pinning."""
    import torch

    frames = prepared.clip.frames
    prepared.clip.frames = torch.from_numpy(frames).pin_memory().numpy()


def label_pipelined(
    pool: CpuPool,
    videos: list[PlannedVideo],
    config,
    names: list[str],
    *,
    teacher_batch: int,
    device: str,
    read: Callable[[PlannedVideo], bytes],
    teach: Callable[[list[PreparedVideo]], list],
    finish: Callable[[PreparedVideo, dict, dict], tuple],
    timings: dict[str, float],
) -> Iterator[tuple[PlannedVideo, tuple | Exception]]:
    """(video, (sample, row) or the exception that failed it) for each video, in `videos`' order.

    read: the video's bytes, or raises SampleError (a storage fault past its retries escapes, failing the batch);
    teach: prepared clips -> for each, its labels by teacher or the exception that failed it (`run_teachers`),
    called from the teacher thread;
    finish: a labelled clip, its labels and a timings dict of its own -> (sample, catalog row) (`finish_video`),
    called from the finisher threads. Closes `pool` when done.
    """
    limit = in_flight_limit(len(pool.workers), teacher_batch)
    try:
        frames = _Frames(open_slots(pool, limit, config))
    except BaseException:
        pool.close()
        raise
    outcomes: dict[int, object] = {}  # index -> exception, or the finisher's Future of finish(prepared, labels)
    lock = threading.Lock()
    to_teacher: queue.Queue = queue.Queue()
    wake_r, wake_w = multiprocessing.Pipe(duplex=False)
    teacher_failure: list[BaseException] = []
    pin = device.startswith("cuda")
    # each call times itself in a dict of its own, added to the batch's under `lock`
    finisher = ThreadPoolExecutor(max_workers=finisher_count(), thread_name_prefix="pseudotrack-finish")
    wake_lock = threading.Lock()  # the teacher and the finisher both wake the main thread; a pipe is not shared

    def wake(count: int) -> None:
        with wake_lock, contextlib.suppress(OSError):
            wake_w.send(count)

    reader = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="pseudotrack-read")
    reads: dict[int, Future] = {}
    read_lock = threading.Lock()

    def timed_read(video: PlannedVideo) -> bytes | SampleError:
        t = time.perf_counter()
        try:
            return read(video)
        except SampleError as exc:
            return exc
        finally:
            with read_lock:
                timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t

    def finished(index: int, p: PreparedVideo, labels) -> tuple | Exception:
        own: dict[str, float] = {}
        try:
            if isinstance(labels, Exception):
                return labels
            try:
                return finish(p, labels, own)
            except Exception as exc:
                return exc
        finally:
            frames.release(index, p)  # the outcome holds labels and encoded bytes, never the frames
            with lock:
                for stage, seconds in own.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds

    def teacher_loop() -> None:
        try:
            while True:
                item = to_teacher.get()
                if item is None:
                    return
                group = [item]
                while len(group) < teacher_batch:
                    try:
                        more = to_teacher.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        to_teacher.put(None)
                        break
                    group.append(more)
                fault_point("pipeline.teacher")  # crash tests: the batch's process killed with clips in flight
                results = teach([p for _, p in group])
                with lock:
                    for (index, p), labels in zip(group, results, strict=True):
                        future = finisher.submit(finished, index, p, labels)
                        future.add_done_callback(lambda _: wake(1))
                        outcomes[index] = future
                wake(len(group))
        except BaseException as exc:  # the batch fails with it, in the main thread
            teacher_failure.append(exc)
            wake(-1)

    teacher = threading.Thread(target=teacher_loop, name="pseudotrack-teacher", daemon=True)
    teacher.start()
    next_read = next_ask = next_yield = 0
    try:
        while next_yield < len(videos):
            with lock:
                outcome = outcomes.get(next_yield)
            if isinstance(outcome, Future):  # still being scored: its callback wakes the wait below
                outcome = outcome.result() if outcome.done() else None
            if outcome is not None:
                with lock:
                    del outcomes[next_yield]
                video = videos[next_yield]
                next_yield += 1
                yield video, outcome
                continue
            while len(reads) < READ_AHEAD and next_ask < len(videos) and next_ask - next_yield < limit:
                reads[next_ask] = reader.submit(timed_read, videos[next_ask])
                reads[next_ask].add_done_callback(lambda _: wake(0))
                next_ask += 1
            worker = pool.idle()
            if next_read < next_ask and worker is not None and reads[next_read].done():
                # a storage fault past the store's retries raises here and fails the batch, as in-process
                data = reads.pop(next_read).result()
                if isinstance(data, Exception):
                    with lock:
                        outcomes[next_read] = data
                else:
                    slot = frames.assign(next_read, worker)
                    pool.submit(worker, next_read, (next_read, videos[next_read], data, config, names, slot))
                del data
                next_read += 1
                continue
            _wait_for_work(pool, videos, wake_r, outcomes, lock, to_teacher, timings, pin, frames)
            if teacher_failure:
                raise teacher_failure[0]
    finally:
        to_teacher.put(None)
        reader.shutdown(wait=True, cancel_futures=True)
        pool.close()
        teacher.join()
        finisher.shutdown(wait=True, cancel_futures=True)
        frames.close()
        wake_r.close()
        wake_w.close()


def _wait_for_work(pool, videos, wake_r, outcomes, lock, to_teacher, timings, pin, frames: _Frames) -> None:
    """Block until a worker reports, dies, or the teacher finishes a group; take in what arrived."""
    by_conn = {w.conn: w for w in pool.workers}
    by_sentinel = {w.process.sentinel: w for w in pool.workers}
    t = time.perf_counter()
    ready = wait([wake_r, *by_conn, *by_sentinel])
    timings["wait"] = timings.get("wait", 0.0) + time.perf_counter() - t
    if wake_r in ready:
        while wake_r.poll():
            wake_r.recv()
    dead = []
    for handle in ready:
        worker = by_conn.get(handle) or by_sentinel.get(handle)
        if worker is None:
            continue
        if not _drain(worker, videos, outcomes, lock, to_teacher, timings, pin, frames):
            dead.append(worker)
    for worker in dict.fromkeys(dead):
        worker.process.join(1.0)
        if worker.process.is_alive():
            continue  # its pipe broke but it lives on: the sentinel will tell
        _drain(worker, videos, outcomes, lock, to_teacher, timings, pin, frames)  # what it sent before it died
        if worker.job is not None:
            reason = f"worker crashed ({signal_name(worker.process.exitcode)})"
            log.warning("%s: %s: %s; starting a new worker", videos[worker.job].key, worker.stage, reason)
            frames.release(worker.job)
            with lock:
                outcomes[worker.job] = SampleError(worker.stage, reason)
        pool.replace(worker)


def _drain(worker: PoolWorker, videos, outcomes, lock, to_teacher, timings, pin, frames: _Frames) -> bool:
    """Take in every message the worker has sent; False when its pipe is closed (it died)."""
    try:
        while worker.conn.poll():
            message = worker.conn.recv()
            if message[0] == "stage":
                worker.stage = message[1]
            elif message[0] == "done":
                _, index, result = message
                with lock:
                    for stage, seconds in result[-1].items():
                        timings[stage] = timings.get(stage, 0.0) + seconds
                got = _result_outcome(videos[index], result)
                worker.job = None
                if isinstance(got, PreparedVideo):
                    frames.arrived(index, got)
                    if pin:
                        _pin(got)
                        frames.release(index)  # the pinned copy is the teacher's now
                    to_teacher.put((index, got))
                else:
                    frames.release(index)
                    with lock:
                        outcomes[index] = got
    except (EOFError, OSError):
        return False
    return worker.process.is_alive() or worker.job is None
