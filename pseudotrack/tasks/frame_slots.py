"""Clip-sized slots of shared memory that the pipelined batch's workers write decoded frames into.

A prepared clip is 37.7 MB of frames at the recipe's size. Sent back through
a worker's pipe it is pickled, copied through the kernel and unpickled: CPU
in the worker, and CPU and the GIL in the batch's main thread, whose teacher
thread launches the GPU's kernels (bench/bench_label_worker.py prints both
ways). With slots the worker copies the frames once into memory the batch's
process already maps, and only the small rest of the clip crosses the pipe.

One file in /dev/shm holds `count` slots (the batch's in-flight limit Q,
so there is always one free for a video handed to a worker). Its memory is
reserved up front with `posix_fallocate`, so a full /dev/shm (Docker gives
64 MB by default) is an error here, at the start, and the batch sends frames
through the pipes as before, never a SIGBUS in a worker that would look like
a crash on the video. The workers map the file and then it is unlinked:
nothing is left in /dev/shm whatever kills the batch, and the memory goes
back when the last process mapping it ends. A worker started later (one
replacing a dead worker) has no mapping and uses its pipe.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading

import numpy as np

SHM_DIR = "/dev/shm"


def slot_bytes(num_frames: int, height: int, width: int) -> int:
    """The bytes of one slot: a full-length clip's RGB frames."""
    return num_frames * height * width * 3


def slot_array(mapping: mmap.mmap, size: int, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 frames of `shape` at the start of `slot` in `mapping`, no copy.

    `frombuffer` holds the mapping's buffer while the array lives, so the mapping cannot be closed under it
    (`np.ndarray(buffer=...)` does not, and a close would leave it pointing at unmapped memory)."""
    return np.frombuffer(mapping, np.uint8, int(np.prod(shape)), slot * size).reshape(shape)


class FrameSlots:
    """The batch process's side: the slots, which are free, and numpy views of what workers wrote."""

    def __init__(self, count: int, size: int, directory: str = SHM_DIR):
        """Raises OSError when the memory cannot be reserved (no /dev/shm, or too little room in it)."""
        if count < 1 or size < 1:
            raise ValueError(f"need at least one slot of at least one byte, got {count} of {size}")
        fd, self.path = tempfile.mkstemp(prefix="pseudotrack-frames-", dir=directory)
        try:
            os.posix_fallocate(fd, 0, count * size)
            self.map = mmap.mmap(fd, count * size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.size = size
        self.count = count
        self._free = list(range(count - 1, -1, -1))
        self._lock = threading.Lock()
        self.linked = True

    def unlink(self) -> None:
        """Remove the file once the workers have mapped it (the mappings keep the memory)."""
        if self.linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.linked = False

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            if slot in self._free:
                raise RuntimeError(f"frame slot {slot} given back twice")
            self._free.append(slot)

    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The frames a worker wrote into `slot` (no copy: valid until the slot is given back)."""
        return slot_array(self.map, self.size, slot, shape)

    def close(self) -> None:
        """Unmap, unless views are still alive somewhere (then the mapping goes with the last of them)."""
        self.unlink()
        with contextlib.suppress(BufferError):
            self.map.close()


class WorkerSlots:
    """A worker's mapping of the batch's slots."""

    def __init__(self, path: str, size: int, count: int):
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, size * count)
        finally:
            os.close(fd)
        self.path, self.size, self.count = path, size, count

    def put(self, slot: int, frames: np.ndarray) -> bool:
        """Copy `frames` into `slot`; False (nothing written) when they do not fit."""
        if not 0 <= slot < self.count or frames.dtype != np.uint8 or frames.nbytes > self.size:
            return False
        slot_array(self.map, self.size, slot, frames.shape)[...] = frames
        return True

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()
