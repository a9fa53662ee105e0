"""The CPU worker processes of a pipelined label batch (tasks/pipeline.py): started, watched, replaced.

Workers come from a forkserver (torch and fork do not mix) that imports
torch, decord and the worker's module once per batch process, so a later
batch's pool starts in milliseconds. A worker that dies is replaced; a pool
that cannot start is reported with one warning and the batch runs in-process.
The worker's own loop is tasks/cpu_worker.py.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait

from ..faults import fault_env
from .cpu_worker import worker_main
from .frame_slots import FrameSlots

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds for a worker to import its libraries and say it is ready
# imported once by the forkserver, so a worker starts in milliseconds (decord wants torch imported before it)
_PRELOAD = ["torch", "decord", "pseudotrack.tasks.cpu_worker"]


def cpu_worker_count(cpu_workers: int | None, batches_at_once: int = 1) -> int:
    """Worker processes for one batch's CPU stages: the configured number, else the host's cores minus one,
    shared by the `batches_at_once` batches this process runs side by side (each has its own pool), at least 1."""
    if cpu_workers is not None:
        return cpu_workers
    return max(1, (host_cores() - 1) // max(1, batches_at_once))


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class PoolWorker:
    def __init__(self, process, conn):
        self.process = process
        self.conn = conn
        self.job: int | None = None  # the index of the video it holds
        self.stage = "decode"
        self.ready = False
        self.slots = False  # whether it maps the batch's frame slots


class CpuPool:
    """Worker processes that run `cpu_worker.cpu_stages`, replaced when they die."""

    def __init__(self, size: int):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(_PRELOAD)
        self.workers: list[PoolWorker] = []
        self.replaced = 0
        try:
            for _ in range(size):
                self.workers.append(self._start())
            for worker in self.workers:
                self._await_ready(worker)
        except BaseException:
            self.close()
            raise

    def _start(self) -> PoolWorker:
        mine, theirs = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main, args=(theirs, fault_env()), daemon=True, name="pseudotrack-cpu-worker"
        )
        process.start()
        theirs.close()
        return PoolWorker(process, mine)

    def _await_ready(self, worker: PoolWorker) -> None:
        ready = wait([worker.conn, worker.process.sentinel], timeout=START_TIMEOUT)
        if worker.conn in ready:
            try:
                if worker.conn.recv() == ("ready",):
                    worker.ready = True
                    return
            except (EOFError, OSError):
                pass
        worker.process.join(1.0)
        raise RuntimeError(f"a CPU worker process did not start ({signal_name(worker.process.exitcode)})")

    def attach(self, slots: FrameSlots) -> None:
        """Have every worker map `slots` (a worker that did not sends its frames by pipe)."""
        for worker in self.workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(("attach", slots.path, slots.size, slots.count))
        for worker in self.workers:
            if worker.conn in wait([worker.conn, worker.process.sentinel], timeout=START_TIMEOUT):
                with contextlib.suppress(EOFError, OSError):
                    message = worker.conn.recv()
                    worker.slots = message == ("attached", True)

    def idle(self) -> PoolWorker | None:
        return next((w for w in self.workers if w.job is None), None)

    def submit(self, worker: PoolWorker, index: int, job: tuple) -> None:
        worker.job, worker.stage = index, "decode"
        worker.conn.send(job)

    def replace(self, worker: PoolWorker) -> None:
        """A dead worker's place goes to a new one (raises if it cannot start)."""
        worker.conn.close()
        worker.process.join(1.0)
        self.workers.remove(worker)
        fresh = self._start()
        self.workers.append(fresh)
        self._await_ready(fresh)
        self.replaced += 1

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
        deadline = time.monotonic() + 5.0
        for worker in self.workers:
            if worker.job is None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():  # busy on a clip nobody wants any more
                worker.process.kill()
                worker.process.join(5.0)
            worker.conn.close()
        self.workers = []


def start_pool(workers: int) -> CpuPool | None:
    """The worker pool, or None (with one warning) when it cannot start: the batch then runs in-process."""
    try:
        return CpuPool(workers)
    except Exception as exc:
        log.warning("CPU worker pool of %d could not start (%s); labelling in this process instead", workers, exc)
        return None
